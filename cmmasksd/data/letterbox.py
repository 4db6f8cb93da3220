"""CRIS's input transform: scale to fit a square, centre, fill the border with CLIP's mean.

The transform keeps the aspect ratio, so predictions can be mapped back exactly onto the
original image for evaluation (`unletterbox`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BORDER_RGB = tuple(round(c * 255) for c in CLIP_MEAN)  # normalises to ~0 at the border


@dataclass(frozen=True)
class LetterboxMeta:
    """Where an original `height` x `width` image sits inside the `size` x `size` input."""

    height: int
    width: int
    scale: float
    pad_x: int
    pad_y: int
    size: int

    @classmethod
    def fit(cls, height: int, width: int, size: int) -> "LetterboxMeta":
        scale = min(size / height, size / width)
        content_w, content_h = round(width * scale), round(height * scale)
        return cls(height, width, scale, (size - content_w) // 2, (size - content_h) // 2, size)

    @property
    def content_w(self) -> int:
        return round(self.width * self.scale)

    @property
    def content_h(self) -> int:
        return round(self.height * self.scale)


def letterbox_image(img: Image.Image, size: int) -> tuple[np.ndarray, LetterboxMeta]:
    """uint8 (size, size, 3) RGB, resized bicubically, and where the content went."""
    img = img.convert("RGB")
    meta = LetterboxMeta.fit(img.height, img.width, size)
    canvas = Image.new("RGB", (size, size), BORDER_RGB)
    canvas.paste(img.resize((meta.content_w, meta.content_h), Image.Resampling.BICUBIC), (meta.pad_x, meta.pad_y))
    return np.asarray(canvas), meta


def letterbox_mask(mask: np.ndarray, meta: LetterboxMeta) -> np.ndarray:
    """A bool (height, width) mask moved like its image: uint8 0/1 (size, size)."""
    if mask.shape != (meta.height, meta.width):
        raise ValueError(f"mask shape {mask.shape} does not match the letterboxed image ({meta.height}, {meta.width})")
    resized = Image.fromarray(mask.astype(np.float32)).resize(
        (meta.content_w, meta.content_h), Image.Resampling.BILINEAR
    )
    out = np.zeros((meta.size, meta.size), dtype=np.uint8)
    out[meta.pad_y : meta.pad_y + meta.content_h, meta.pad_x : meta.pad_x + meta.content_w] = np.asarray(resized) > 0.5
    return out


def unletterbox(prob: torch.Tensor | np.ndarray, meta: LetterboxMeta) -> torch.Tensor | np.ndarray:
    """Map a (..., size, size) float map back to (..., height, width): crop the content, resize
    bilinearly. Maps of one image go in one call (a batch of sizes alike); each is resized on its own.

    Returns the same kind (tensor or array) it was given.
    """
    if tuple(prob.shape[-2:]) != (meta.size, meta.size):
        raise ValueError(f"expected a (..., {meta.size}, {meta.size}) map, got shape {tuple(prob.shape)}")
    x = torch.as_tensor(prob, dtype=torch.float32)
    content = x[..., meta.pad_y : meta.pad_y + meta.content_h, meta.pad_x : meta.pad_x + meta.content_w]
    out = F.interpolate(
        content.reshape(-1, 1, meta.content_h, meta.content_w), size=(meta.height, meta.width), mode="bilinear",
        align_corners=False, antialias=True,
    ).reshape(*x.shape[:-2], meta.height, meta.width)
    return out if isinstance(prob, torch.Tensor) else out.numpy()
