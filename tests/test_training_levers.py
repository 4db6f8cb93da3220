"""Levers for a short budget: the distillation weights' warm-up and a frozen token embedding."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_batch, wrap

from cmmasksd.config import build_config
from cmmasksd.model.masksd import warmup_scale
from cmmasksd.train import train


def test_warmup_scale_rises_linearly_over_the_warmup_epochs_then_stays_at_one():
    assert warmup_scale(0, 0, 0, 10) == 1.0  # no warm-up: full weights from the first step
    assert [warmup_scale(2, e, s, 10) for e, s in ((0, 0), (0, 5), (1, 0), (1, 5), (2, 0), (5, 3))] == \
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_scale_multiplies_the_distillation_losses_only(tiny_cris):
    images, tokens, gt = make_batch(64)
    model = wrap(tiny_cris, "rn", mask_cell=8)
    torch.manual_seed(0)  # the decoder's dropout draws alike in both calls
    full = model.training_loss(images, tokens, gt)[1]
    model.distill_scale = 0.25
    torch.manual_seed(0)
    quarter = model.training_loss(images, tokens, gt)[1]
    assert torch.equal(quarter["seg"], full["seg"])
    for branch in ("lmvsd", "vmlsd"):
        assert full[branch] > 0
        torch.testing.assert_close(quarter[branch], 0.25 * full[branch], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_run_ramps_the_weights_over_its_first_epoch_and_logs_the_share(tiny_config):
    config = build_config(tiny_config(**{"masksd.distill_warmup": 1.0, "optim.epochs": 2, "optim.milestones": [],
                                         "run.num_overlays": 0}))
    history = train(config).history
    steps = 32 // 8  # the debug profile: 32 objects at batch 8
    assert history[0]["distill_scale"] == pytest.approx(sum(i / steps for i in range(steps)) / steps)
    assert history[1]["distill_scale"] == 1.0


def test_a_frozen_token_embedding_neither_trains_nor_takes_optimizer_state(tiny_cris):
    model = wrap(tiny_cris, "rn", mask_cell=8)
    model.seg.backbone.clip.token_embedding.requires_grad_(False)  # what model.freeze_token_embedding does
    embedding = model.seg.backbone.clip.token_embedding.weight
    backbone, rest = model.param_groups()
    assert all(p is not embedding for p in backbone + rest)
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW([{"params": backbone}, {"params": rest}], lr=1e-2)
    images, tokens, gt = make_batch(64)
    model.training_loss(images, tokens, gt)[0].backward()
    optimizer.step()
    after = model.state_dict()
    key = "seg.backbone.clip.token_embedding.weight"
    assert torch.equal(after[key], before[key]) and embedding.grad is None
    assert not torch.equal(after["seg.backbone.text_mask_token"], before["seg.backbone.text_mask_token"])
    assert not torch.equal(after["seg.backbone.clip.ln_final.weight"], before["seg.backbone.clip.ln_final.weight"])


def test_the_model_config_switch_freezes_it(tiny_config):
    from cmmasksd.model import create_model

    config = build_config(tiny_config(**{"model.freeze_token_embedding": True}))
    model = create_model(config.model, config.masksd)
    assert not model.seg.backbone.clip.token_embedding.weight.requires_grad
    assert sum(p.requires_grad for p in model.parameters()) == len(model.param_groups()[0] + model.param_groups()[1])
