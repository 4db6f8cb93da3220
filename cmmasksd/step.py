"""One optimizer step, from one global batch: gradient accumulation and step timing.

`optim.accumulate: N` cuts this process's share of each global batch (`optim.batch_size`, split
across data-parallel ranks) into N micro-batches, runs forward and backward on each, and steps once:
the batch that fits in memory is the micro-batch, the batch the recipe means is unchanged. Each
micro-batch's loss is weighted by its share of the batch, so for losses that are means over samples
the gradient is the whole batch's. Under DDP the micro-batches that do not step skip the all-reduce
(`no_sync`); the last one averages the accumulated gradients across ranks.

What differs: BatchNorm (the CLIP ResNet and the CRIS neck) normalises each micro-batch by its own
statistics and updates its running statistics once per micro-batch, so with BN in training mode N
micro-batches are not the same computation as one batch (as with N GPUs without SyncBatchNorm); the
gradient equality holds with BN in eval mode and no dropout (tested, 3 optimizer steps, atol 1e-6).
That is why `accumulate` is part of a run's identity. `accumulate: 1` is the plain step, unchanged.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

BATCH_KEYS = ("image", "tokens", "mask", "content", "kind")  # what the training step reads, in call order


def micro_batches(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """`batch` cut into n consecutive micro-batches (sizes differ by at most one)."""
    size = len(batch["image"])
    if n == 1:
        return [batch]
    if size < 2 * n:  # the CRIS neck's BatchNorm1d cannot train on one sample
        raise ValueError(f"optim.accumulate: {n} micro-batches of this process's {size} samples leave fewer than 2 "
                         "in a micro-batch (BatchNorm needs 2); lower optim.accumulate or raise optim.batch_size")
    parts = {key: batch[key].tensor_split(n) for key in BATCH_KEYS}
    return [{key: parts[key][i] for key in BATCH_KEYS} for i in range(n)]


def optimizer_step(step: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], *,
                   accumulate: int, grad_clip: float | None, amp: bool, device_type: str,
                   stats=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over `accumulate` micro-batches of `batch` (on the device), one optimizer
    step; returns the batch's loss and loss parts (detached, summed as the weights sum them)."""
    micro = micro_batches(batch, accumulate)
    size = len(batch["image"])
    optimizer.zero_grad(set_to_none=True)
    total, parts_total = None, {}
    for i, part in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(step, "no_sync") else step.no_sync()
        with sync:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
                loss, parts = step(*(part[key] for key in BATCH_KEYS[:3]), stats, part["content"], part["kind"])
            if len(micro) > 1:
                weight = len(part["image"]) / size
                loss, parts = loss * weight, {k: v * weight for k, v in parts.items()}
            loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
        parts_total = {k: parts_total.get(k, 0.0) + v for k, v in parts.items()}
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(step.parameters(), grad_clip)
    optimizer.step()
    return total, parts_total


class StepTimer:
    """Step times without a synchronize per step: on CUDA, events recorded around each step are
    read once at the end of the epoch (the host queues work ahead instead of waiting)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self) -> None:
        self.marks.append([self._now(), None])

    def stop(self) -> None:
        self.marks[-1][1] = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def epoch_times(self) -> list[float]:
        """Seconds per step since the last call."""
        marks, self.marks = self.marks, []
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in marks]
        return [end - start for start, end in marks]
