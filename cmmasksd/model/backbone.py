"""CLIP towers as CRIS uses them: three visual levels, per-word features, and the joint space.

`ClipBackbone` wraps an open_clip `CLIP` without copying its weights, so any open_clip
checkpoint loads into `backbone.clip` unchanged. It re-runs CLIP's own forward step by step
to expose what CRIS needs (intermediate maps, per-position attention-pool outputs, word
features) and to insert the masks of the self-distillation branches. The image side is the
`VisualTower` of the image tower's family (`cmmasksd.model.towers`); the text side is here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn

from cmmasksd.model.towers import VisualFeatures, VisualTower, tower_for

_MASK_TOKEN_STD = 0.02  # as CLIP's token embedding init


@dataclass
class TextFeatures:
    words: torch.Tensor  # B x L x width, after ln_final, not projected
    sentence: torch.Tensor  # B x embed_dim: EOT feature @ text_projection
    pad_mask: torch.Tensor  # B x L, True at padding (token 0)


class ClipBackbone(nn.Module):
    """An open_clip `CLIP` seen as a CRIS feature extractor; its image tower's family (ModifiedResNet,
    VisionTransformer, or any registered with `towers.register_tower`) is run by `self.tower`.

    Images are uint8 B x 3 x S x S, S a multiple of 32, normalised here on the device.
    With `with_mask_tokens`, a learned text mask embedding (and, for a tower whose masking needs
    one, a learned visual mask token) exist: the only parameters CM-MaskSD adds to CRIS.
    """

    def __init__(self, clip: CLIP, vit_layers: tuple[int, int, int] = (4, 8, 12), with_mask_tokens: bool = False):
        super().__init__()
        if not isinstance(clip, CLIP):
            raise TypeError(f"expected an open_clip CLIP, got {type(clip).__name__}")
        self.clip = clip
        proj = clip.text_projection
        self.embed_dim = proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]
        self.tower: VisualTower = tower_for(clip.visual)(clip.visual, self.embed_dim, vit_layers)
        self.word_dim = clip.transformer.width
        preprocess = getattr(clip.visual, "preprocess_cfg", {})  # set by open_clip.create_model
        mean = preprocess.get("mean", OPENAI_DATASET_MEAN)
        std = preprocess.get("std", OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for name, layer in self.tower.new_layers().items():
            self.add_module(name, layer)

        self.grad_checkpointing = False  # `set_grad_checkpointing`
        self.text_mask_token = self._mask_token(self.word_dim) if with_mask_tokens else None
        token_dim = self.tower.mask_token_dim
        self.visual_mask_token = self._mask_token(token_dim) if with_mask_tokens and token_dim else None

    @property
    def patch_stride(self) -> int:
        return self.tower.patch_stride

    @property
    def level_dims(self) -> tuple[int, int, int]:
        return self.tower.level_dims

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the towers' blocks in the backward pass instead of keeping their activations:
        open_clip's own switch for its transformers (ViT and text), `self.tower` for the rest (the
        ResNet stages, which open_clip leaves out)."""
        self.grad_checkpointing = enable
        self.clip.set_grad_checkpointing(enable)

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
                     drop: bool = False, fill: str = "zero") -> VisualFeatures:
        """uint8 images (and optionally a B x gh x gw patch mask, True = masked) -> three levels + joint map.

        The tower applies the mask as its family does: a ViT's mask is on its patch grid; a
        ResNet's on any grid of square cells that tile the input. `drop`: encode the visible
        patches alone, for a tower that `supports_drop` (ViT). `fill`: what masked pixels show (ResNet).
        """
        tower = self.tower
        if drop and not tower.supports_drop:
            raise ValueError(f"dropping masked patches needs a ViT; a {tower.name} {tower.masking}")
        return tower.encode(self, self.normalize(images), patch_mask, drop, fill)

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
