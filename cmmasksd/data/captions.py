"""Image-text pairs for contrastive pretraining on RefShapes: whole scenes and single objects.

A scene pair captions every object from left to right ("a large red circle, a small blue square
and a small green triangle"). An object pair keeps one object, paints the others with the
background colour and names it, with a position phrase when one clearly holds ("a small blue
square on the left"). Object pairs make the towers align words with regions, which is what the
correlation-guided masks of CM-MaskSD read; scene pairs keep the pooled feature a description of
the whole image. Attributes are the generator's own (`attributes` of each annotation in
`instances.json`); the split's images are those its refs name, so val never leaks into training.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from cmmasksd.data.refer import Refer, ReferFormatError

_POSITION_BAND = 0.35  # a position phrase holds when the centre lies in the outer 35 % of the image


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    mask: np.ndarray  # bool H x W, at the scene's (resized) resolution
    x: float  # centre of mass, as a fraction of the width (0 = left)
    y: float  # as a fraction of the height (0 = top)

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def positions(self) -> list[str]:
        """The position phrases that clearly hold for this object."""
        out = []
        out += ["on the left"] if self.x < _POSITION_BAND else ["on the right"] if self.x > 1 - _POSITION_BAND else []
        out += ["at the top"] if self.y < _POSITION_BAND else ["at the bottom"] if self.y > 1 - _POSITION_BAND else []
        return out


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 H x W x 3
    objects: tuple[SceneObject, ...]
    background: np.ndarray  # uint8 (3,): the median colour off every object

    def caption(self) -> str:
        phrases = [f"a {o.phrase}" for o in sorted(self.objects, key=lambda o: o.x)]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

    def isolate(self, index: int) -> np.ndarray:
        """The scene with every object but `index` painted over with the background."""
        image = self.image.copy()
        others = np.zeros(image.shape[:2], dtype=bool)
        for k, obj in enumerate(self.objects):
            if k != index:
                others |= obj.mask
        image[others & ~self.objects[index].mask] = self.background
        return image


def load_scenes(raw_dir: str | Path, split: str, size: int, split_by: str = "unc") -> list[Scene]:
    """The split's scenes (images named by its refs) with all their objects, resized to `size` px."""
    refer = Refer(raw_dir, split_by)
    image_ids = sorted({obj.image_id for obj in refer.objects(split)})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(refer.instances_path))
    return [_scene(coco, refer, image_id, size) for image_id in image_ids]


def _scene(coco: COCO, refer: Refer, image_id: int, size: int) -> Scene:
    info = coco.loadImgs(image_id)[0]
    with Image.open(refer.image_dir / info["file_name"]) as im:
        image = np.array(im.convert("RGB").resize((size, size), Image.BILINEAR))
    objects, covered = [], np.zeros((size, size), dtype=bool)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
        attributes = ann.get("attributes")
        if not isinstance(attributes, dict) or any(k not in attributes for k in ("shape", "colour", "size")):
            raise ReferFormatError(
                f"{refer.instances_path}: annotation {ann['id']} has no 'attributes' with shape, colour and size; "
                "captions need a RefShapes written by this version (rerun `dvc repro fetch@refshapes`)")
        mask = np.asarray(Image.fromarray(coco.annToMask(ann) * 255).resize((size, size), Image.NEAREST)) > 127
        rows, cols = np.nonzero(mask)
        if not len(rows):
            continue  # too small to survive the resize
        covered |= mask
        objects.append(SceneObject(attributes["shape"], attributes["colour"], attributes["size"], mask,
                                   float(cols.mean() + 0.5) / size, float(rows.mean() + 0.5) / size))
    background = np.median(image[~covered], axis=0).astype(np.uint8) if (~covered).any() else np.zeros(3, np.uint8)
    return Scene(image, tuple(objects), background)


class CaptionPairs(Dataset):
    """One item per scene and per object: {"image": uint8 3 x S x S, "tokens": long [context]}.

    The position phrase of an object pair is drawn per epoch from (seed, epoch, index), so a run
    is reproducible whatever the number of workers.
    """

    def __init__(self, scenes: list[Scene], tokenizer, seed: int = 0):
        self.scenes = scenes
        self.tokenizer = tokenizer
        self.seed = seed
        self.epoch = 0
        self.items = [(s, None) for s in range(len(scenes))]
        self.items += [(s, k) for s, scene in enumerate(scenes) for k in range(len(scene.objects))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        scene_idx, obj_idx = self.items[index]
        scene = self.scenes[scene_idx]
        if obj_idx is None:
            image, text = scene.image, scene.caption()
        else:
            obj = scene.objects[obj_idx]
            rng = np.random.default_rng([self.seed, self.epoch, index])
            options = [""] + [f" {p}" for p in obj.positions()]
            image, text = scene.isolate(obj_idx), f"a {obj.phrase}{options[int(rng.integers(len(options)))]}"
        return {"image": torch.from_numpy(image).permute(2, 0, 1),
                "tokens": self.tokenizer([text])[0]}
