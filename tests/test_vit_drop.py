"""MAE-style token dropping for a ViT's masked pass (`masksd.vit_masking: drop`)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cmmasksd.config import MaskSDConfig
from cmmasksd.model import create_model, get_model_config

GRID = (6, 6)  # tiny-vit at 96 px: 16 px patches


@pytest.fixture(scope="module")
def vit_model():
    torch.manual_seed(0)
    return create_model(get_model_config("cris-tiny-vit"), MaskSDConfig(vit_masking="drop"))


def random_mask(ratio: float, batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    k = round(ratio * n)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(n, generator=generator)[:k]] = True
    return mask.view(batch, *GRID)


def images(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_flops_fall_with_the_visible_fraction(vit_model):
    backbone, x = vit_model.seg.backbone, images()
    full = flops(lambda: backbone.encode_image(x, random_mask(0.5)))  # token replacement: every token encoded
    dropped = [flops(lambda r=r: backbone.encode_image(x, random_mask(r), drop=True)) for r in (0.25, 0.5, 0.75)]
    assert dropped[0] > dropped[1] > dropped[2]
    assert dropped[1] < 0.8 * full  # the target for the lmvsd pass at ratio 0.5
    assert flops(lambda: backbone.encode_image(x)) == full


def test_nothing_dropped_is_the_clean_encoding(vit_model):
    backbone, x = vit_model.seg.backbone, images()
    clean = backbone.encode_image(x)
    same = backbone.encode_image(x, torch.zeros(4, *GRID, dtype=torch.bool), drop=True)
    for a, b in zip([*clean.levels, clean.joint], [*same.levels, same.joint]):
        torch.testing.assert_close(a, b)


def test_visible_tokens_never_see_the_dropped_ones(vit_model):
    """Dropped: the visible outputs are those of encoding the visible tokens alone, whatever the mask
    token is; replaced: the mask tokens take part in the attention and change the visible outputs."""
    backbone, x, mask = vit_model.seg.backbone, images(), random_mask(0.5)
    token = backbone.visual_mask_token
    outputs = {}
    for name, drop in (("drop", True), ("token", False)):
        before = backbone.encode_image(x, mask, drop=drop).joint
        with torch.no_grad():
            token.add_(1.0)
        after = backbone.encode_image(x, mask, drop=drop).joint
        with torch.no_grad():
            token.sub_(1.0)
        outputs[name] = (before, after)
    visible = ~mask.view(4, 1, *GRID).expand_as(outputs["drop"][0])
    torch.testing.assert_close(outputs["drop"][0][visible], outputs["drop"][1][visible])
    assert not torch.allclose(outputs["token"][0][visible], outputs["token"][1][visible])


def test_a_training_step_with_dropping_trains_the_mask_token(vit_model):
    tokens = torch.zeros(4, 17, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, 320, 49407  # SOT, three words, EOT
    gt = torch.zeros(4, 1, 96, 96)
    gt[..., 20:60, 30:70] = 1
    vit_model.train()
    loss, parts = vit_model.training_loss(images(), tokens, gt)
    loss.backward()
    assert parts["lmvsd"] > 0 and vit_model.seg.backbone.visual_mask_token.grad.abs().sum() > 0
    vit_model.zero_grad(set_to_none=True)


def test_dropping_needs_a_vit():
    with pytest.raises(ValueError, match="vit_masking: drop needs a ViT backbone"):
        create_model(get_model_config("cris-tiny-rn"), MaskSDConfig(vit_masking="drop"))
