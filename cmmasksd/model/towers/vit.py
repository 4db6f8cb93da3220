"""open_clip's `VisionTransformer` as CRIS reads it: three blocks' patch tokens, resampled to strides 8/16/32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from cmmasksd.model.towers.base import VisualFeatures, VisualTower, resize_pos_embed

_LEVEL_STRIDES = (8, 16, 32)


def _as_is(tokens: torch.Tensor) -> torch.Tensor:
    return tokens


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear up, average down: ViT's single-stride maps to CRIS's three strides."""
    if size[0] > x.shape[-2]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x, size)


class ViTTower(VisualTower):
    """Levels: the patch tokens after blocks `vit_layers`, resampled to strides 8, 16 and 32.

    A mask is on the patch grid (a ViT masks whole tokens): masked patches are replaced by the
    learned visual mask token at the input, or dropped (`encode`).
    """

    name = "ViT"
    masking = "replaces or drops whole patch tokens"
    supports_drop = True

    def __init__(self, visual: VisionTransformer, embed_dim: int, vit_layers: tuple[int, int, int]):
        blocks = len(visual.transformer.resblocks)
        if list(vit_layers) != sorted(set(vit_layers)) or not 1 <= vit_layers[0] <= vit_layers[-1] <= blocks:
            raise ValueError(f"vit_layers must be increasing block numbers in 1..{blocks}, got {vit_layers}")
        self.vit_layers = tuple(vit_layers)
        self.patch_stride = visual.patch_size[0]
        self.level_dims = (visual.transformer.width,) * 3
        self.mask_token_dim = visual.transformer.width

    def check_mask_cell(self, cell: int | None) -> None:
        if cell not in (None, self.patch_stride):
            raise ValueError(f"mask_cell must be the ViT's patch size {self.patch_stride} or None "
                             f"(a ViT masks whole tokens), got {cell}")

    def encode(self, backbone: nn.Module, x: torch.Tensor, patch_mask: torch.Tensor | None,
               drop: bool, fill: str = "zero") -> VisualFeatures:
        """Masked patches are replaced by the mask token at the input (`drop` False), or dropped.

        Dropping (MAE): the visible tokens, with their positional embeddings, are encoded alone, so
        they attend only to each other and the encoder's cost falls with the visible fraction; each
        block's output then gets the mask token at the dropped positions, so the neck sees a full
        grid. With replacement, the mask tokens go through every block: the visible tokens attend
        to them, and they leave the encoder as features of their own.
        """
        visual = backbone.clip.visual
        token = backbone.visual_mask_token
        size = x.shape[-2:]
        if patch_mask is not None:
            grid = (size[0] // self.patch_stride, size[1] // self.patch_stride)
            if tuple(patch_mask.shape[1:]) != grid:
                raise ValueError(f"patch_mask must be B x {grid[0]} x {grid[1]} (a ViT masks whole tokens), "
                                 f"got {tuple(patch_mask.shape)}")
        x = visual.conv1(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x N x width
        if patch_mask is not None and token is None:
            raise ValueError("this backbone was built without mask tokens (with_mask_tokens=False)")
        if patch_mask is not None and not drop:
            x = torch.where(patch_mask.reshape(b, -1, 1), token.to(x.dtype), x)
        cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(visual.positional_embedding, visual.grid_size, (h, w)).to(x.dtype)
        refill = _as_is
        if patch_mask is not None and drop:
            x, refill = _drop_masked(x, patch_mask.reshape(b, -1), token)
        first = visual.ln_pre(x)
        blocks = len(visual.transformer.resblocks)
        wanted = sorted({i - 1 for i in self.vit_layers} | ({blocks - 2} if blocks > 1 else set()))
        x, taken = visual.transformer.forward_intermediates(first, indices=wanted)
        x = refill(x)
        taken = {i: refill(t) for i, t in zip(wanted, taken)}
        before_last = taken.get(blocks - 2, refill(first))  # the last block's input
        levels = [
            _resample(taken[i - 1][:, 1:].transpose(1, 2).reshape(b, -1, h, w), (size[0] // s, size[1] // s))
            for i, s in zip(self.vit_layers, _LEVEL_STRIDES)
        ]
        joint = (visual.ln_post(x[:, 1:]) @ visual.proj).transpose(1, 2).reshape(b, -1, h, w)
        pooled = visual.ln_post(x[:, 0]) @ visual.proj  # the class token: CLIP's image embedding
        return VisualFeatures(levels, joint, (h, w), _values(visual, before_last[:, 1:], (h, w)), pooled)


def _drop_masked(x: torch.Tensor, masked: torch.Tensor, token: torch.Tensor):
    """Keep the class token and the visible patch tokens (B x 1+N x C -> B x 1+V x C, V equal
    per image), and a function that puts encoded tokens back on the full grid, `token` at the
    dropped positions."""
    b, n = masked.shape
    visible = (~masked).sum(dim=1)
    if not bool((visible == visible[0]).all()):
        raise ValueError("dropping needs the same number of visible patches in every image of a batch")
    order = (~masked).float().argsort(dim=1, descending=True, stable=True)[:, : int(visible[0])]  # B x V
    index = order[..., None]

    def refill(tokens: torch.Tensor) -> torch.Tensor:
        width = tokens.shape[-1]
        grid = token.to(tokens.dtype).expand(b, n, width)
        grid = grid.scatter(1, index.expand(-1, -1, width), tokens[:, 1:])
        return torch.cat([tokens[:, :1], grid], dim=1)

    kept = x[:, 1:].gather(1, index.expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], kept], dim=1), refill


def _values(visual: VisionTransformer, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The last block's value path alone (no query-key mixing, no residual, no MLP), then CLIP's
    output norm and projection: MaskCLIP's dense features for a ViT."""
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    width = attn.embed_dim
    v = F.linear(block.ln_1(tokens), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    out = visual.ln_post(attn.out_proj(v)) @ visual.proj
    return out.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
