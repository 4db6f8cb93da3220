"""CRIS (Wang et al., CVPR 2022): CLIP features -> multi-modal FPN -> text decoder -> text-to-pixel head.

Layer for layer as CRIS.pytorch (`model/layers.py`), with the widths taken from `ModelConfig`
(neck_dim 512 and head_dim 256 give the original) and the word width decoupled from the
decoder width, so tiny text towers work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmmasksd.config import ModelConfig
from cmmasksd.model.backbone import ClipBackbone, TextFeatures, VisualFeatures


def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.ReLU(inplace=True),
    )


class CoordConv(nn.Module):
    """A conv that also sees normalised (x, y) coordinates: positional expressions need them."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = conv_bn_relu(in_dim + 2, out_dim, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([grid_x, grid_y]).expand(b, -1, -1, -1)
        return self.conv(torch.cat([x, coords], dim=1))


class Neck(nn.Module):
    """Multi-modal FPN: the sentence gates the stride-32 map, then top-down fusion to stride 16."""

    def __init__(self, in_dims: tuple[int, int, int], sentence_dim: int, dim: int):
        super().__init__()
        d8, d16, d32 = dim // 2, dim, dim * 2  # CRIS: 256 / 512 / 1024 for dim 512
        self.sentence_proj = nn.Sequential(nn.Linear(sentence_dim, d32, bias=False), nn.BatchNorm1d(d32),
                                           nn.ReLU(inplace=True))
        self.proj32 = conv_bn_relu(in_dims[2], d32)
        self.gate_norm = nn.Sequential(nn.BatchNorm2d(d32), nn.ReLU(inplace=True))
        self.proj16 = conv_bn_relu(in_dims[1], d16, 3)
        self.fuse16 = conv_bn_relu(d32 + d16, d16)
        self.proj8 = conv_bn_relu(in_dims[0], d8, 3)
        self.fuse8 = conv_bn_relu(d8 + d16, d16)
        self.out32 = conv_bn_relu(d32, d16, 3)
        self.out16 = conv_bn_relu(d16, d16, 3)
        self.out8 = conv_bn_relu(d16, d16, 3)
        self.aggregate = conv_bn_relu(3 * d16, d16)
        self.coord = nn.Sequential(CoordConv(d16, d16, 3), conv_bn_relu(d16, d16, 3))

    def forward(self, levels: list[torch.Tensor], sentence: torch.Tensor) -> torch.Tensor:
        v8, v16, v32 = levels
        gate = self.sentence_proj(sentence)[..., None, None]
        f32 = self.gate_norm(self.proj32(v32) * gate)
        f16 = self.fuse16(torch.cat([self.proj16(v16), _up2(f32)], dim=1))
        f8 = self.fuse8(torch.cat([F.avg_pool2d(self.proj8(v8), 2), f16], dim=1))
        fused = torch.cat([self.out8(f8), self.out16(f16), _up2(self.out32(f32))], dim=1)
        return self.coord(self.aggregate(fused))


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def sine_positions_1d(dim: int, length: int, device: torch.device) -> torch.Tensor:
    """length x dim sinusoidal positions (Transformer style)."""
    if dim % 2:
        raise ValueError(f"1-D sine positions need an even width, got {dim}")
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


def sine_positions_2d(dim: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(height*width) x dim: half the channels encode x, half y (as CRIS's `pos2d`)."""
    if dim % 4:
        raise ValueError(f"2-D sine positions need a width divisible by 4, got {dim}")
    half = dim // 2
    pe_x = sine_positions_1d(half, width, device)  # w x half
    pe_y = sine_positions_1d(half, height, device)  # h x half
    return torch.cat([pe_x[None].expand(height, -1, -1), pe_y[:, None].expand(-1, width, -1)], dim=-1).flatten(0, 1)


class DecoderLayer(nn.Module):
    """Pre-norm: visual self-attention, cross-attention to the words, FFN (CRIS's extra norms kept)."""

    def __init__(self, dim: int, word_dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, kdim=word_dim, vdim=word_dim,
                                                batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.LayerNorm(ffn_dim), nn.Linear(ffn_dim, dim))
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, words, vis_pos, word_pos, pad_mask):
        x = self.norm1(vis)
        q = k = x + vis_pos
        x = self.self_attn(q, k, x, need_weights=False)[0]
        vis = vis + self.dropout1(self.self_attn_norm(x))
        x = self.norm2(vis)
        x = self.cross_attn(x + vis_pos, words + word_pos, words, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(x))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class Decoder(nn.Module):
    """Visual tokens of the stride-16 map attend to themselves and to the words."""

    def __init__(self, layers: int, dim: int, word_dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, word_dim, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, words: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        vis_pos = sine_positions_2d(c, h, w, x.device).to(x.dtype)
        word_pos = sine_positions_1d(words.shape[-1], words.shape[1], x.device).to(words.dtype)
        x = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            x = layer(x, words, vis_pos, word_pos, pad_mask)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


class Head(nn.Module):
    """Text-to-pixel: upsample to stride 4; the sentence becomes a per-sample conv kernel + bias."""

    def __init__(self, in_dim: int, dim: int, sentence_dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(in_dim, in_dim, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            conv_bn_relu(in_dim, dim, 3),
            nn.Conv2d(dim, dim, 1),
        )
        self.txt = nn.Linear(sentence_dim, dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        x = self.vis(x)
        b, c, h, w = x.shape
        params = self.txt(sentence).to(x.dtype)
        weight = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        # One grouped conv applies sample i's kernel to sample i's map.
        out = F.conv2d(x.reshape(1, b * c, h, w), weight, bias=params[:, -1], padding=self.kernel_size // 2, groups=b)
        return out.transpose(0, 1)  # B x 1 x S/4 x S/4


class CRIS(nn.Module):
    """f(I, T) -> B x 1 x S/4 x S/4 logits; encoding and decoding are separate so features can be reused."""

    def __init__(self, backbone: ClipBackbone, cfg: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.neck = Neck(backbone.level_dims, backbone.embed_dim, cfg.neck_dim)
        self.decoder = Decoder(cfg.decoder_layers, cfg.neck_dim, backbone.word_dim, cfg.decoder_heads,
                               cfg.decoder_ffn, cfg.decoder_dropout)
        self.head = Head(cfg.neck_dim, cfg.head_dim, backbone.embed_dim, cfg.head_kernel)

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None,
                     drop: bool = False, fill: str = "zero") -> VisualFeatures:
        return self.backbone.encode_image(images, patch_mask, drop, fill)

    def encode_text(self, tokens: torch.Tensor, word_mask: torch.Tensor | None = None) -> TextFeatures:
        return self.backbone.encode_text(tokens, word_mask)

    def decode(self, vis: VisualFeatures, txt: TextFeatures) -> torch.Tensor:
        x = self.neck(vis.levels, txt.sentence)
        x = self.decoder(x, txt.words, txt.pad_mask)
        return self.head(x, txt.sentence)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_image(images), self.encode_text(tokens))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(CLIP weights, everything else), as CRIS's `build_segmenter`.

        Everything else: neck, decoder, head, CRIS's pool residual, mask tokens, and CLIP's
        positional embeddings (CRIS trains them at the new layers' rate). One difference, on
        purpose: CRIS's pool residual (`connect`) sits inside its backbone and so trains at the
        backbone rate although it starts from random weights; ours is a new layer at `lr`.
        """
        clip = list(self.backbone.clip_parameters())
        ids = {id(p) for p in clip}
        backbone = [p for p in clip if p.requires_grad]  # not a frozen token embedding
        return backbone, [p for p in self.parameters() if id(p) not in ids]
