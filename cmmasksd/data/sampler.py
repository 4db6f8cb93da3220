"""Training batches of `(epoch, index)` keys: one order per (seed, epoch), split across ranks.

The epoch travels with every index, so `RefSegDataset` draws that epoch's expression even in
DataLoader workers started once for the whole run (`persistent_workers=True`). Under data
parallelism each global batch is cut into `world` consecutive slices and rank r takes slice r:
at every step the ranks together see the batch a one-process run sees, and `batch_size` stays
the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(n) that depends only on (seed, epoch).

    It is the order `DataLoader(shuffle=True, generator=manual_seed(seed * 10007 + epoch))` gave,
    which draws one number for its workers' base seed before the permutation: runs made before
    this sampler existed reproduce exactly.
    """
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(n, generator=generator).tolist()


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of each global batch of `batch_size`, as `(epoch, index)` keys.

    `drop_last` drops an incomplete final batch (as a one-process run does when there is more
    than one batch); every rank then takes the same number of items.
    """

    def __init__(self, n: int, batch_size: int, seed: int, *, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if batch_size % world:
            raise ValueError(f"optim.batch_size ({batch_size}) is the global batch: it must be divisible by "
                             f"the {world} processes")
        if n < world:
            raise ValueError(f"{n} items cannot be shared by {world} processes")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world = shuffle, drop_last, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        batches = [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(batches[-1]) < (self.batch_size if self.drop_last else self.world):
            batches.pop()  # dropped, or too small to give every rank an item
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._global_batches():
            start, stop = self.rank * len(batch) // self.world, (self.rank + 1) * len(batch) // self.world
            yield [(self.epoch, index) for index in batch[start:stop]]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world and not self.drop_last else 0)
