"""COCO-like refer data: 640x480 photos' worth of JPEG and polygons, for scale tests and benchmarks.

RefCOCO itself cannot be downloaded here, yet preprocessing and loading must be measured and
tested at its scale and image size: these files have the refer layout and RefCOCO's shape
(textured 640x480 JPEGs, some portrait; 1-4 referred objects per image with 1-4 expressions each,
polygons of 12-40 vertices, some objects in two parts, unreferred annotations besides). The
content means nothing; only sizes and costs are realistic.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from cmmasksd.data.refer import Refer

_WORDS = ("the man woman person left right middle front back red blue white black green small big tall "
          "shirt chair table car dog cat bowl umbrella sitting standing near behind top bottom closest far "
          "with on in of holding wearing striped plate cake horse sheep giraffe elephant bus train").split()
_PORTRAIT_EVERY = 5  # every 5th image is 480 wide and 640 high, like COCO's portrait photos


def generate_cocolike(
    out_dir: str | Path, images: dict[str, int], seed: int = 0, jpeg_quality: int = 90
) -> dict[str, dict[str, int]]:
    """Write `instances.json`, `refs(unc).p` and `train2014/*.jpg` under `out_dir`; return the split counts."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "train2014"
    shutil.rmtree(image_dir, ignore_errors=True)
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    texture = rng.integers(-24, 25, size=(640, 640, 3), dtype=np.int16)  # JPEG-realistic high frequencies
    image_records, annotations, refs = [], [], []
    n_sentences = 0
    for split, n_images in images.items():
        for _ in range(n_images):
            image_id = len(image_records) + 1
            height, width = (640, 480) if image_id % _PORTRAIT_EVERY == 0 else (480, 640)
            canvas = _background(rng, texture, height, width)
            draw = ImageDraw.Draw(canvas)
            n_referred = int(rng.integers(1, 5))
            for k in range(n_referred + int(rng.integers(0, 3))):  # the extra ones are not referred to
                polygons = [_polygon(rng, height, width) for _ in range(1 + (rng.random() < 0.2))]
                for polygon in polygons:
                    draw.polygon(polygon, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
                rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
                ann_id = len(annotations) + 1
                category_id = int(rng.integers(1, 91))
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id,
                                    "segmentation": polygons, "area": float(mask_utils.area(rle)),
                                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
                if k < n_referred:
                    refs.append(_ref(rng, len(refs) + 1, ann_id, image_id, category_id, split, n_sentences))
                    n_sentences += len(refs[-1]["sentences"])
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            canvas.save(image_dir / file_name, quality=jpeg_quality)
            image_records.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    instances = {"info": {"description": "COCO-like (synthetic)", "seed": seed}, "images": image_records,
                 "annotations": annotations,
                 "categories": [{"id": i, "name": f"category {i}", "supercategory": "thing"} for i in range(1, 91)]}
    (out_dir / "instances.json").write_text(json.dumps(instances))
    (out_dir / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return Refer(out_dir, "unc").split_counts()


def _background(rng: np.random.Generator, texture: np.ndarray, height: int, width: int) -> Image.Image:
    """Smooth colour regions plus fine texture: compresses and decodes like a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    dy, dx = rng.integers(0, 640 - height + 1), rng.integers(0, 640 - width + 1)
    pixels = np.asarray(coarse, dtype=np.int16) + texture[dy : dy + height, dx : dx + width]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
    """A star-shaped polygon of 12-40 vertices, flat [x0, y0, x1, y1, ...] like COCO's."""
    n = int(rng.integers(12, 41))
    radius = rng.uniform(20, min(height, width) / 3)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.5, 1.0, n)
    xy = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    return [round(float(v), 2) for v in xy.reshape(-1)]


def _ref(rng: np.random.Generator, ref_id: int, ann_id: int, image_id: int, category_id: int, split: str,
         first_sent: int) -> dict:
    sentences = []
    for sent_id in range(first_sent, first_sent + int(rng.integers(1, 5))):
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(2, 11)))]
        text = " ".join(words)
        sentences.append({"tokens": words, "raw": text.capitalize(), "sent": text, "sent_id": sent_id})
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id, "split": split,
            "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            # As in RefCOCO, the refs' file_name is not the image file (that comes from instances.json).
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}
