"""Activation checkpointing (`run.grad_checkpointing`): the towers' blocks are recomputed in the
backward pass, BatchNorm's running statistics are updated once per forward, and the weights are
those of a run without it."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_batch, wrap
from torch import nn


def count_calls(module: nn.Module, calls: dict, key: str) -> None:
    """Count `module`'s forward runs (the recomputation too, which forward hooks do not see)."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls[key] += 1
        return forward(*args, **kwargs)

    module.forward = counted


def two_steps(model: nn.Module, images, tokens, gt) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        model.training_loss(images, tokens, gt)[0].backward()
        optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("kind,cell", [("rn", 8), ("vit", None)])
def test_checkpointing_recomputes_the_blocks_and_trains_the_same_weights(tiny_cris, kind, cell):
    images, tokens, gt = make_batch(64)
    plain = wrap(tiny_cris, kind, mask_cell=cell)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    visual = checkpointed.seg.backbone.clip.visual
    block = visual.layer1 if kind == "rn" else visual.transformer.resblocks[0]
    text_block = checkpointed.seg.backbone.clip.transformer.resblocks[0]
    calls = {"image": 0, "text": 0}
    count_calls(block, calls, "image")
    count_calls(text_block, calls, "text")

    want, got = two_steps(plain, images, tokens, gt), two_steps(checkpointed, images, tokens, gt)
    # per step the image tower runs clean + image-masked (+ the text-masked pass reuses it), the text
    # tower clean + text-masked: each block twice, and twice more in the backward pass
    assert calls == {"image": 2 * 2 * 2, "text": 2 * 2 * 2}
    assert want.keys() == got.keys()
    assert not [k for k in want if not torch.equal(want[k], got[k])]  # running statistics included


def test_batchnorm_statistics_move_once_per_clean_forward_not_in_the_recomputation(tiny_cris):
    model = wrap(tiny_cris, "rn", mask_cell=8, branches="none")
    model.set_grad_checkpointing(True)
    norm = model.seg.backbone.clip.visual.layer1[0].bn1
    images, tokens, gt = make_batch(64)
    model.training_loss(images, tokens, gt)[0].backward()
    assert int(norm.num_batches_tracked) == 1
    assert norm.momentum == 0.1  # restored after the recomputation

