"""BatchNorm running statistics that only the clean forward pass may update.

Evaluation sees clean images, so the statistics should describe them: not the masked passes of
CM-MaskSD (`masksd.py`), and not the second forward that activation checkpointing runs in the
backward pass (`checkpointed`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def clean_batch_stats(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers normalise by the batch as in training but leave their running
    statistics alone: those should describe clean images, which is what evaluation sees.

    Done with momentum 0 (running = 1 * running + 0 * batch: unchanged) and the batch count put back,
    not with `track_running_stats = False`: the layers call the same kernel with the same buffers as a
    clean pass, which activation checkpointing needs (its recomputation must save what the forward
    saved)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.training]
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, count) in zip(norms, saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def checkpointed(module: nn.Module, x: torch.Tensor, forward=None) -> torch.Tensor:
    """`module(x)` (or `forward(x)`, a method of `module`) without keeping its activations: they are
    recomputed in the backward pass, where `module`'s BatchNorm layers normalise as before (by the
    batch) but leave the running statistics, already updated once by this forward, alone. Outside
    training (or without grad) a plain call."""
    forward = forward or module
    if not (module.training and torch.is_grad_enabled()):
        return forward(x)
    return checkpoint(forward, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), clean_batch_stats(module)))
