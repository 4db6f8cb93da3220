import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cmmasksd.data.letterbox import BORDER_RGB, LetterboxMeta, letterbox_image, letterbox_mask, unletterbox


def _shapes_mask(height, width):
    """A disc, a rectangle and a triangle, scaled to the image."""
    img = Image.new("L", (width, height))
    draw = ImageDraw.Draw(img)
    draw.ellipse([0.1 * width, 0.1 * height, 0.45 * width, 0.5 * height], fill=1)
    draw.rectangle([0.55 * width, 0.2 * height, 0.9 * width, 0.45 * height], fill=1)
    draw.polygon([(0.3 * width, 0.6 * height), (0.7 * width, 0.95 * height), (0.1 * width, 0.9 * height)], fill=1)
    return np.asarray(img).astype(bool)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_meta_and_border():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    pixels, meta = letterbox_image(img, 64)
    assert meta == LetterboxMeta(height=50, width=100, scale=0.64, pad_x=0, pad_y=16, size=64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[0, 0]) == tuple(pixels[63, 63]) == BORDER_RGB == (123, 117, 104)
    assert tuple(pixels[32, 32]) == (255, 0, 0)
    assert (pixels[16:48, :] == (255, 0, 0)).all() and (pixels[:16] == BORDER_RGB).all()


# Sizes keep the shapes a few dozen pixels wide; shrinking 10x (640 -> 64) loses more than 5%.
@pytest.mark.parametrize(
    "height, width, size", [(480, 640, 128), (427, 640, 416), (300, 120, 128), (20, 30, 96), (57, 57, 64)]
)
def test_mask_round_trip(height, width, size):
    mask = _shapes_mask(height, width)
    _, meta = letterbox_image(Image.new("RGB", (width, height)), size)
    boxed = letterbox_mask(mask, meta)
    assert boxed.shape == (size, size) and set(np.unique(boxed)) <= {0, 1}
    back_np = unletterbox(boxed.astype(np.float32), meta)
    back_torch = unletterbox(torch.from_numpy(boxed).float(), meta)
    assert isinstance(back_np, np.ndarray) and isinstance(back_torch, torch.Tensor)
    assert back_np.shape == (height, width)
    np.testing.assert_allclose(back_np, back_torch.numpy(), atol=1e-6)
    assert _iou(back_np > 0.5, mask) > 0.95


def test_mask_must_match_the_image():
    meta = LetterboxMeta.fit(10, 20, 32)
    with pytest.raises(ValueError, match=r"mask shape \(20, 10\)"):
        letterbox_mask(np.zeros((20, 10), bool), meta)
    with pytest.raises(ValueError, match=r"expected a \(\.\.\., 32, 32\) map"):
        unletterbox(np.zeros((16, 16)), meta)


def test_maps_of_one_image_unletterbox_in_one_call_as_one_by_one():
    meta = LetterboxMeta.fit(37, 61, 32)
    maps = torch.rand(5, 32, 32, generator=torch.Generator().manual_seed(0))
    together = unletterbox(maps, meta)
    assert together.shape == (5, 37, 61)
    for one, batched in zip(maps, together):
        assert torch.equal(unletterbox(one, meta), batched)  # bit for bit: the metric is unchanged
