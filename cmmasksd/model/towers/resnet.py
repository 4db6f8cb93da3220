"""open_clip's `ModifiedResNet` as CRIS reads it: layer2, layer3, and the attention pool at stride 32."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

from cmmasksd.model.batchnorm import checkpointed
from cmmasksd.model.towers.base import VisualFeatures, VisualTower, resize_pos_embed


def spatial_attention_pool(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pool with every position as a query: B x C x H x W -> (1 + HW) x B x out.

    Row 0 (the mean-token query) is exactly open_clip's pooled output; rows 1: are CRIS's
    per-position features in the joint space.
    """
    _, _, h, w = x.shape
    x = x.flatten(2).permute(2, 0, 1)  # (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x])
    side = math.isqrt(pool.positional_embedding.shape[0] - 1)
    x = x + resize_pos_embed(pool.positional_embedding, (side, side), (h, w))[:, None].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=pool.training,
        need_weights=False,
    )
    return out


def value_path(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """Each position's own value, projected as the pool projects its output: c_proj(v_proj(x + pos)).

    The pooled embedding is c_proj of an attention-weighted mix of these values (head by head), so
    they are dense features in the joint space that no query mixes (MaskCLIP's reading of CLIP).
    B x C x H x W -> B x out x H x W.
    """
    b, _, h, w = x.shape
    side = math.isqrt(pool.positional_embedding.shape[0] - 1)
    pos = resize_pos_embed(pool.positional_embedding, (side, side), (h, w))[1:].to(x.dtype)
    out = pool.c_proj(pool.v_proj(x.flatten(2).transpose(1, 2) + pos))
    return out.transpose(1, 2).reshape(b, -1, h, w)


def cells_to_pixels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A B x gh x gw cell mask -> B x H x W pixels; the cells must be squares that tile H x W."""
    gh, gw = mask.shape[1:]
    h, w = size
    cell = h // gh if gh else 0
    if cell == 0 or cell * gh != h or cell * gw != w:
        raise ValueError(f"patch_mask must be B x gh x gw with square cells that tile the {h} x {w} input, "
                         f"got {tuple(mask.shape)}")
    return mask.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


def fill_cells(x: torch.Tensor, masked: torch.Tensor, fill: str, backbone: nn.Module) -> torch.Tensor:
    """The normalised images with the B x H x W `masked` pixels replaced (`masksd.fill`): zero (the
    mean colour), black (pixel value 0), noise (N(0, 1) in the normalised space) or median (each
    image's per-channel median colour: on a plain background, the background)."""
    if fill == "zero":
        value = torch.zeros_like(x)
    elif fill == "median":
        value = x.flatten(2).median(dim=2).values[..., None, None].expand_as(x)
    elif fill == "black":
        value = (-backbone.mean / backbone.std).to(x.dtype).expand_as(x)
    elif fill == "noise":
        value = torch.randn_like(x)
    else:
        raise ValueError(f"unknown fill {fill!r}; expected zero, black, noise or median")
    return torch.where(masked[:, None], value, x)


class ResNetTower(VisualTower):
    """Levels: layer2 (stride 8), layer3 (16), and CRIS's stride-32 map, the attention pool with every
    position as a query plus a 1x1 conv + BN residual from layer4 (`pool_residual`, a new layer).

    A mask may be on any grid of square cells that tile the input: the cells' pixels are set to
    zero (the mean colour) before the stem, so no mask token is needed.
    """

    name = "ResNet"
    masking = "zeroes its masked cells"

    def __init__(self, visual: ModifiedResNet, embed_dim: int, vit_layers: tuple[int, int, int]):
        self.patch_stride = 32
        self.level_dims = (visual.layer2[-1].conv3.out_channels, visual.layer3[-1].conv3.out_channels, embed_dim)
        self.pooled_dim = visual.attnpool.k_proj.in_features
        self.embed_dim = embed_dim

    def new_layers(self) -> dict[str, nn.Module]:
        return {"pool_residual": nn.Sequential(nn.Conv2d(self.pooled_dim, self.embed_dim, 1, bias=False),
                                               nn.BatchNorm2d(self.embed_dim))}

    def encode(self, backbone: nn.Module, x: torch.Tensor, patch_mask: torch.Tensor | None,
               drop: bool, fill: str = "zero") -> VisualFeatures:
        visual = backbone.clip.visual
        if patch_mask is not None:
            x = fill_cells(x, cells_to_pixels(patch_mask, tuple(x.shape[-2:])), fill, backbone)
        run = checkpointed if backbone.grad_checkpointing else _call
        f8 = run(visual.layer2, run(visual.layer1, run(visual, x, visual.stem)))
        f16 = run(visual.layer3, f8)
        c5 = run(visual.layer4, f16)
        b, _, h, w = c5.shape
        pooled = spatial_attention_pool(visual.attnpool, c5)
        joint = pooled[1:].permute(1, 2, 0).reshape(b, -1, h, w)
        f32 = F.relu(joint + backbone.pool_residual(c5))
        return VisualFeatures([f8, f16, f32], joint, (h, w), value_path(visual.attnpool, c5), pooled[0])



def _call(module: nn.Module, x: torch.Tensor, forward=None) -> torch.Tensor:
    return (forward or module)(x)
