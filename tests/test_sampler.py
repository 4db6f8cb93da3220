"""The training order: what the one-process DataLoader gave, and its split across ranks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cmmasksd.data.sampler import EpochBatchSampler, epoch_order


@pytest.mark.parametrize("n", [7, 40, 41])
def test_the_order_is_what_a_shuffling_dataloader_gave(n):
    """Runs made before the sampler (DataLoader(shuffle=True) with a per-epoch generator) reproduce."""
    for seed, epoch in [(0, 0), (3, 5)]:
        loader = DataLoader(range(n), batch_size=4, shuffle=True,
                            generator=torch.Generator().manual_seed(seed * 10_007 + epoch))
        assert torch.cat(list(loader)).tolist() == epoch_order(n, seed, epoch)
    assert epoch_order(n, 0, 1) != epoch_order(n, 0, 0) and sorted(epoch_order(n, 0, 1)) == list(range(n))


def test_ranks_together_see_each_global_batch():
    n, batch, world = 37, 8, 2
    one = EpochBatchSampler(n, batch, seed=1, drop_last=True)
    ranks = [EpochBatchSampler(n, batch, seed=1, drop_last=True, rank=r, world=world) for r in range(world)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        global_batches = list(one)
        local = [list(r) for r in ranks]
        assert len(global_batches) == len(one) == 4 and all(len(batches) == len(r) for batches, r in zip(local, ranks))
        for step, batch_keys in enumerate(global_batches):
            assert local[0][step] + local[1][step] == batch_keys  # rank 0 the first half, rank 1 the second
            assert {e for e, _ in batch_keys} == {epoch}


def test_one_small_batch_is_kept_and_bad_splits_are_refused():
    sampler = EpochBatchSampler(6, 8, seed=0, rank=1, world=2)
    assert len(sampler) == 1 and len(next(iter(sampler))) == 3
    with pytest.raises(ValueError, match="global batch: it must be divisible by the 3 processes"):
        EpochBatchSampler(40, 8, seed=0, world=3)
    with pytest.raises(ValueError, match="1 items cannot be shared by 2 processes"):
        EpochBatchSampler(1, 8, seed=0, world=2)
