"""Data parallelism for `train`, when it runs inside a `torch.distributed` process group.

The launcher owns the group: `torchrun` (joined by `init_from_env`, as nanoGPT does) or Ray
Train's `TorchTrainer`, which sets it up before calling the training function. `train` only
asks where it is (`Dist.current()`) and uses the helpers below; with one process every helper is
a no-op, so the one-process run is exactly what it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, tables and figures, and talks to the tracking server."""
        return self.rank == 0

    @classmethod
    def current(cls) -> "Dist":
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


INIT_METHOD_ENV = "CMMASKSD_INIT_METHOD"


def init_from_env() -> bool:
    """Join the process group `torchrun` describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on the CPU. False if there is none.

    `CMMASKSD_INIT_METHOD=file:///path` meets through a file instead of MASTER_ADDR's TCP store,
    which listens on every interface of its host whatever MASTER_ADDR says: with a file rendezvous
    for torchrun too, a one-machine run opens no port beyond loopback (docs/cluster.md)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_method = os.environ.get(INIT_METHOD_ENV)
    if init_method:
        dist.init_process_group(backend, init_method=init_method, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    else:
        dist.init_process_group(backend)
    return True


def local_device(device: torch.device, ctx: Dist) -> torch.device:
    """Each process on its own GPU: `cuda` becomes `cuda:<local rank>` in a group."""
    if device.type == "cuda" and device.index is None and ctx.world > 1:
        return torch.device("cuda", ctx.local_rank)
    return device


class TrainingStep(nn.Module):
    """`model.training_loss` as a `forward`, so that DistributedDataParallel sees (and syncs) it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, tokens, masks, stats=None, content=None, kind=None):
        return self.model.training_loss(images, tokens, masks, stats, content, kind)


def training_step(model: nn.Module, device: torch.device, ctx: Dist) -> nn.Module:
    """The module a training step calls: DDP over `model` in a group (SyncBatchNorm on CUDA, so
    ResNet statistics cover the global batch), the bare step otherwise. DDP also copies rank 0's
    weights to every rank here, so all ranks start alike."""
    step = TrainingStep(model)
    if ctx.world == 1:
        return step
    if device.type == "cuda":
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        return nn.parallel.DistributedDataParallel(step, device_ids=[device.index], find_unused_parameters=True)
    return nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)


def barrier(ctx: Dist) -> None:
    if ctx.world > 1:
        dist.barrier()


def sum_tensors(values: dict[str, torch.Tensor], ctx: Dist) -> dict[str, torch.Tensor]:
    """Element-wise sums over the ranks (same keys and shapes on every rank), in one collective."""
    if ctx.world == 1 or not values:
        return values
    keys = sorted(values)
    tensors = [torch.as_tensor(values[k]).double() for k in keys]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    parts = flat.split([t.numel() for t in tensors])
    return {k: part.reshape(t.shape) for k, part, t in zip(keys, parts, tensors)}


def gather_objects(value: Any, ctx: Dist) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (picklable Python objects)."""
    if ctx.world == 1:
        return [value]
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_weights(model: nn.Module, ctx: Dist) -> None:
    """Rank 0's parameters and buffers to every rank (after rank 0 alone read a checkpoint)."""
    if ctx.world == 1:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
