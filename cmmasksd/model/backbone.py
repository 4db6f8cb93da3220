"""CLIP towers as CRIS uses them: three visual levels, per-word features, and the joint space.

`ClipBackbone` wraps an open_clip `CLIP` without copying its weights, so any open_clip
checkpoint loads into `backbone.clip` unchanged. It re-runs CLIP's own forward step by step
to expose what CRIS needs (intermediate maps, per-position attention-pool outputs, word
features) and to insert the masks of the self-distillation branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

_LEVEL_STRIDES = (8, 16, 32)
_MASK_TOKEN_STD = 0.02  # as CLIP's token embedding init


@dataclass
class VisualFeatures:
    levels: list[torch.Tensor]  # [f8, f16, f32]: B x C_i x S/8, S/16, S/32
    joint: torch.Tensor  # B x embed_dim x gh x gw: patch features in CLIP's joint space
    grid: tuple[int, int]  # (gh, gw): the patch grid a `patch_mask` refers to
    values: torch.Tensor  # B x embed_dim x gh x gw: each patch's value path into the joint space


@dataclass
class TextFeatures:
    words: torch.Tensor  # B x L x width, after ln_final, not projected
    sentence: torch.Tensor  # B x embed_dim: EOT feature @ text_projection
    pad_mask: torch.Tensor  # B x L, True at padding (token 0)


def resize_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resize a [1 + h*w, C] positional embedding (leading class/mean token) to another grid, bicubic."""
    if tuple(src) == tuple(dst):
        return pos
    grid = pos[1:].reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.flatten(2)[0].T])


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


def _as_is(tokens: torch.Tensor) -> torch.Tensor:
    return tokens


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear up, average down: ViT's single-stride maps to CRIS's three strides."""
    if size[0] > x.shape[-2]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x, size)


def cells_to_pixels(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A B x gh x gw cell mask -> B x H x W pixels; the cells must be squares that tile H x W."""
    gh, gw = mask.shape[1:]
    h, w = size
    cell = h // gh if gh else 0
    if cell == 0 or cell * gh != h or cell * gw != w:
        raise ValueError(f"patch_mask must be B x gh x gw with square cells that tile the {h} x {w} input, "
                         f"got {tuple(mask.shape)}")
    return mask.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


class ClipBackbone(nn.Module):
    """An open_clip `CLIP` (ModifiedResNet or ViT image tower) seen as a CRIS feature extractor.

    Images are uint8 B x 3 x S x S, S a multiple of 32, normalised here on the device.
    With `with_mask_tokens`, a learned text mask embedding (and, for ViT, a learned patch mask
    token) exist: the only parameters CM-MaskSD adds to CRIS.
    """

    def __init__(self, clip: CLIP, vit_layers: tuple[int, int, int] = (4, 8, 12), with_mask_tokens: bool = False):
        super().__init__()
        if not isinstance(clip, CLIP) or not isinstance(clip.visual, (ModifiedResNet, VisionTransformer)):
            raise TypeError(
                f"expected an open_clip CLIP with a ModifiedResNet or VisionTransformer image tower, "
                f"got {type(clip).__name__} with {type(getattr(clip, 'visual', None)).__name__}"
            )
        self.clip = clip
        self.is_vit = isinstance(clip.visual, VisionTransformer)
        proj = clip.text_projection
        self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.word_dim = clip.transformer.width
        preprocess = getattr(clip.visual, "preprocess_cfg", {})  # set by open_clip.create_model
        mean = preprocess.get("mean", OPENAI_DATASET_MEAN)
        std = preprocess.get("std", OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        visual = clip.visual
        if self.is_vit:
            blocks = len(visual.transformer.resblocks)
            if list(vit_layers) != sorted(set(vit_layers)) or not 1 <= vit_layers[0] <= vit_layers[-1] <= blocks:
                raise ValueError(f"vit_layers must be increasing block numbers in 1..{blocks}, got {vit_layers}")
            self.vit_layers = tuple(vit_layers)
            self.patch_stride = visual.patch_size[0]
            self.level_dims = (visual.transformer.width,) * 3
        else:
            pooled_dim = visual.attnpool.k_proj.in_features
            self.pool_residual = nn.Sequential(  # CRIS: 1x1 conv + BN from layer4 beside the attention pool
                nn.Conv2d(pooled_dim, self.embed_dim, 1, bias=False), nn.BatchNorm2d(self.embed_dim)
            )
            self.patch_stride = 32
            self.level_dims = (visual.layer2[-1].conv3.out_channels, visual.layer3[-1].conv3.out_channels,
                               self.embed_dim)

        self.text_mask_token = self._mask_token(self.word_dim) if with_mask_tokens else None
        with_visual_token = with_mask_tokens and self.is_vit  # ResNet masking zeroes pixels instead
        self.visual_mask_token = self._mask_token(visual.transformer.width) if with_visual_token else None

    @staticmethod
    def _mask_token(dim: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(dim) * _MASK_TOKEN_STD)

    def clip_parameters(self) -> list[nn.Parameter]:
        """The CLIP weights trained at the backbone learning rate: all but the positional embeddings.

        CRIS's `build_segmenter` trains those (image and text) at the new layers' rate.
        """
        return [p for name, p in self.clip.named_parameters() if "positional_embedding" not in name]

    # ---- image -------------------------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 B x 3 x S x S, got {images.dtype}")
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"image size must be a multiple of 32, got {tuple(images.shape[-2:])}")
        return (images.float() / 255.0 - self.mean) / self.std

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None,
                     drop: bool = False) -> VisualFeatures:
        """uint8 images (and optionally a B x gh x gw patch mask, True = masked) -> three levels + joint map.

        A ViT's mask is on its patch grid; a ResNet's on any grid of square cells that tile the input.
        `drop` (ViT only): encode the visible patches alone (`_encode_vit`).
        """
        if drop and not self.is_vit:
            raise ValueError("dropping masked patches needs a ViT; a ResNet zeroes its masked cells")
        x = self.normalize(images)
        if patch_mask is not None and self.is_vit:
            grid = (x.shape[-2] // self.patch_stride, x.shape[-1] // self.patch_stride)
            if tuple(patch_mask.shape[1:]) != grid:
                raise ValueError(f"patch_mask must be B x {grid[0]} x {grid[1]} (a ViT masks whole tokens), "
                                 f"got {tuple(patch_mask.shape)}")
        return self._encode_vit(x, patch_mask, drop) if self.is_vit else self._encode_resnet(x, patch_mask)

    def _encode_resnet(self, x: torch.Tensor, patch_mask: torch.Tensor | None) -> VisualFeatures:
        visual = self.clip.visual
        if patch_mask is not None:  # zero the masked cells (= the mean colour)
            keep = ~cells_to_pixels(patch_mask, tuple(x.shape[-2:]))
            x = x * keep[:, None].to(x.dtype)
        f8 = visual.layer2(visual.layer1(visual.stem(x)))
        f16 = visual.layer3(f8)
        c5 = visual.layer4(f16)
        b, _, h, w = c5.shape
        joint = spatial_attention_pool(visual.attnpool, c5)[1:].permute(1, 2, 0).reshape(b, -1, h, w)
        f32 = F.relu(joint + self.pool_residual(c5))
        return VisualFeatures([f8, f16, f32], joint, (h, w), value_path(visual.attnpool, c5))

    def _encode_vit(self, x: torch.Tensor, patch_mask: torch.Tensor | None, drop: bool = False) -> VisualFeatures:
        """Masked patches are replaced by the mask token at the input (`drop` False), or dropped.

        Dropping (MAE): the visible tokens, with their positional embeddings, are encoded alone, so
        they attend only to each other and the encoder's cost falls with the visible fraction; each
        block's output then gets the mask token at the dropped positions, so the neck sees a full
        grid. With replacement, the mask tokens go through every block: the visible tokens attend
        to them, and they leave the encoder as features of their own.
        """
        visual = self.clip.visual
        size = x.shape[-2:]
        x = visual.conv1(x)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # B x N x width
        if patch_mask is not None and self.visual_mask_token is None:
            raise ValueError("this backbone was built without mask tokens (with_mask_tokens=False)")
        if patch_mask is not None and not drop:
            x = torch.where(patch_mask.reshape(b, -1, 1), self.visual_mask_token.to(x.dtype), x)
        cls = visual.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_pos_embed(visual.positional_embedding, visual.grid_size, (h, w)).to(x.dtype)
        refill = _as_is
        if patch_mask is not None and drop:
            x, refill = self._drop_masked(x, patch_mask.reshape(b, -1))
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
        return VisualFeatures(levels, joint, (h, w), self._vit_values(before_last[:, 1:], (h, w)))

    def _drop_masked(self, x: torch.Tensor, masked: torch.Tensor):
        """Keep the class token and the visible patch tokens (B x 1+N x C -> B x 1+V x C, V equal
        per image), and a function that puts encoded tokens back on the full grid, the mask token
        at the dropped positions."""
        b, n = masked.shape
        visible = (~masked).sum(dim=1)
        if not bool((visible == visible[0]).all()):
            raise ValueError("dropping needs the same number of visible patches in every image of a batch")
        order = (~masked).float().argsort(dim=1, descending=True, stable=True)[:, : int(visible[0])]  # B x V
        index = order[..., None]

        def refill(tokens: torch.Tensor) -> torch.Tensor:
            width = tokens.shape[-1]
            grid = self.visual_mask_token.to(tokens.dtype).expand(b, n, width)
            grid = grid.scatter(1, index.expand(-1, -1, width), tokens[:, 1:])
            return torch.cat([tokens[:, :1], grid], dim=1)

        kept = x[:, 1:].gather(1, index.expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :1], kept], dim=1), refill

    def _vit_values(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The last block's value path alone (no query-key mixing, no residual, no MLP), then CLIP's
        output norm and projection: MaskCLIP's dense features for a ViT."""
        visual = self.clip.visual
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        width = attn.embed_dim
        v = F.linear(block.ln_1(tokens), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
        out = visual.ln_post(attn.out_proj(v)) @ visual.proj
        return out.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

    # ---- text --------------------------------------------------------------------------------

    def encode_text(self, tokens: torch.Tensor, word_mask: torch.Tensor | None = None) -> TextFeatures:
        """B x L tokens (L <= context_length; optionally a B x L word mask, True = masked)."""
        clip = self.clip
        length = tokens.shape[1]
        if length > clip.context_length:
            raise ValueError(f"word_len {length} exceeds the CLIP context length {clip.context_length}")
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype)
        if word_mask is not None:
            if self.text_mask_token is None:
                raise ValueError("this backbone was built without mask tokens (with_mask_tokens=False)")
            x = torch.where(word_mask[..., None], self.text_mask_token.to(cast_dtype), x)
        x = x + clip.positional_embedding[:length].to(cast_dtype)
        attn_mask = None if clip.attn_mask is None else clip.attn_mask[:length, :length]
        words = clip.ln_final(clip.transformer(x, attn_mask=attn_mask))
        eot = text_global_pool(words, tokens, clip.text_pool_type, eos_token_id=clip.text_eos_id)
        return TextFeatures(words, self.project_words(eot), tokens == 0)

    def project_words(self, words: torch.Tensor) -> torch.Tensor:
        """Text width -> CLIP's joint space (the sentence feature is the projected EOT word)."""
        proj = self.clip.text_projection
        return proj(words) if isinstance(proj, nn.Linear) else words @ proj
