"""The image tower families behind `ClipBackbone`: picked by open_clip module type, extensible by registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from cmmasksd.config import MaskSDConfig
from cmmasksd.model import CRIS, ClipBackbone, CMMaskSD, create_clip, create_cris, get_model_config
from cmmasksd.model.towers import ResNetTower, VisualFeatures, VisualTower, ViTTower, register_tower, tower_for
from cmmasksd.model.towers import base as towers_base


class FakeVisual(nn.Module):
    """An image tower of a type open_clip does not have: one stride-32 patchify conv."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.width = width
        self.patchify = nn.Conv2d(3, width, 32, stride=32)


class FakeTower(VisualTower):
    """The least a family implements: sizes, masking (`fill` is what a family that hides pixels puts
    in a masked cell; this one blanks them), the features (CLIP's pooled image embedding included),
    and one new layer."""

    name = "Fake"
    masking = "blanks its masked patches"

    def __init__(self, visual: FakeVisual, embed_dim: int, vit_layers):
        self.patch_stride = 32
        self.level_dims = (visual.width, visual.width, embed_dim)
        self.width, self.embed_dim = visual.width, embed_dim

    def new_layers(self) -> dict[str, nn.Module]:
        return {"fake_proj": nn.Conv2d(self.width, self.embed_dim, 1)}

    def check_mask_cell(self, cell):
        if cell not in (None, 32):
            raise ValueError(f"mask_cell must be 32 or None for the fake tower, got {cell}")

    def encode(self, backbone, x, patch_mask, drop, fill="zero"):
        if patch_mask is not None:
            keep = ~patch_mask.repeat_interleave(32, dim=1).repeat_interleave(32, dim=2)
            x = x * keep[:, None]
        f32 = backbone.clip.visual.patchify(x)
        joint = backbone.fake_proj(f32)
        h, w = x.shape[-2:]
        levels = [F.interpolate(f32, size=(h // s, w // s)) for s in (8, 16)] + [F.relu(joint)]
        # CLIP's image embedding, which VMLSD scores words against: here the mean patch feature.
        return VisualFeatures(levels, joint, tuple(joint.shape[-2:]), joint, pooled=joint.mean(dim=(2, 3)))


@pytest.fixture
def fake_registered(monkeypatch):
    monkeypatch.setattr(towers_base, "_TOWERS", dict(towers_base._TOWERS))  # undone after the test
    register_tower(FakeVisual, FakeTower)


def fake_clip() -> nn.Module:
    clip = create_clip("tiny-rn")
    clip.visual = FakeVisual()
    return clip


def make_batch(size: int = 64):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g)
    tokens = torch.zeros(2, 17, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, 320, 49407  # SOT, three words, EOT
    gt = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    return images, tokens, gt


@pytest.mark.parametrize("name,tower", [("cris-tiny-rn", ResNetTower), ("cris-tiny-vit", ViTTower)])
def test_open_clip_towers_get_their_family(name, tower):
    backbone = create_cris(get_model_config(name), with_mask_tokens=True).backbone
    assert type(backbone.tower) is tower
    assert backbone.patch_stride == backbone.tower.patch_stride
    assert (backbone.visual_mask_token is not None) == (backbone.tower.mask_token_dim is not None)


def test_a_subclass_of_a_registered_type_gets_its_family():
    class MyViT(VisionTransformer):
        pass

    assert tower_for(MyViT.__new__(MyViT)) is ViTTower


def test_an_unknown_image_tower_names_the_known_families():
    clip = create_clip("tiny-rn")
    clip.visual = nn.Identity()
    with pytest.raises(TypeError, match=r"no visual tower family for an open_clip Identity image tower; "
                                        r"known: ModifiedResNet \(ResNet\), VisionTransformer \(ViT\)"):
        ClipBackbone(clip)


def test_a_registered_tower_is_picked_up_and_trains(fake_registered):
    torch.manual_seed(0)
    backbone = ClipBackbone(fake_clip(), with_mask_tokens=True)
    assert isinstance(backbone.tower, FakeTower)
    assert backbone.visual_mask_token is None  # its masking needs no token
    model = CMMaskSD(CRIS(backbone, get_model_config("cris-tiny-rn")), MaskSDConfig()).train()
    names = set(model.state_dict())
    assert {"seg.backbone.fake_proj.weight", "seg.backbone.clip.visual.patchify.weight"} <= names

    loss, parts = model.training_loss(*make_batch())
    loss.backward()
    assert parts["lmvsd"] > 0 and parts["vmlsd"] > 0
    assert backbone.clip.visual.patchify.weight.grad.abs().sum() > 0
    assert backbone.fake_proj.weight.grad.abs().sum() > 0


def test_masksd_asks_the_tower_about_masking(fake_registered):
    cris = CRIS(ClipBackbone(fake_clip(), with_mask_tokens=True), get_model_config("cris-tiny-rn"))
    with pytest.raises(ValueError, match="mask_cell must be 32 or None for the fake tower, got 12"):
        CMMaskSD(cris, MaskSDConfig(mask_cell=12))
    with pytest.raises(ValueError,
                       match=r"vit_masking: drop needs a ViT backbone \(a Fake blanks its masked patches\)"):
        CMMaskSD(cris, MaskSDConfig(vit_masking="drop"))
    with pytest.raises(ValueError, match="dropping masked patches needs a ViT; a Fake blanks its masked patches"):
        cris.encode_image(make_batch()[0], torch.zeros(2, 2, 2, dtype=torch.bool), drop=True)
