"""Read the refer toolkit's layout (RefCOCO, RefCOCO+, G-Ref and RefShapes alike).

`<root>/refs(<split_by>).p` lists the referred objects and their expressions;
`<root>/instances.json` (COCO) gives each object's image and segmentation. Both are checked
when loaded, so a wrong or truncated file fails here with the record at fault, not later
inside training.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tabulate import tabulate

from cmmasksd.data.safe_pickle import load_pickle


class ReferFormatError(ValueError):
    """An annotation file does not have the refer/COCO layout."""


@dataclass(frozen=True)
class ReferObject:
    """One referred object (a ref) with all its expressions."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    sentences: tuple[tuple[int, str], ...]  # (sent_id, text)
    file_name: str  # the image file, from instances.json
    height: int
    width: int
    split: str


@dataclass(frozen=True)
class ReferSample:
    """One (object, expression) pair: the unit of evaluation."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    sent_id: int
    sentence: str
    file_name: str
    height: int
    width: int
    split: str


COUNT_KINDS = ("refs", "images", "expressions")  # what `Refer.split_counts` counts per split


@dataclass(frozen=True)
class CountCheck:
    """One split's counts against the published ones; a missing split counts zero."""

    split: str
    found: dict[str, int]
    official: dict[str, int | None]

    @property
    def ok(self) -> bool:
        return all(want is None or self.found.get(kind, 0) == want for kind, want in self.official.items())


def check_official_counts(
    found: Mapping[str, Mapping[str, int]], official: Mapping[str, Mapping[str, int | None]]
) -> list[CountCheck]:
    """Compare per-split counts (`Refer.split_counts()`) with the published ones
    (`cmmasksd.catalogue.split_sizes`).

    Every official split gets a row, and so does any split the files have beyond them (which is
    a mismatch: its official counts are taken as zero).
    """
    splits = list(official) + [split for split in found if split not in official]
    return [
        CountCheck(split, {kind: int(found.get(split, {}).get(kind, 0)) for kind in COUNT_KINDS},
                   dict(official.get(split, dict.fromkeys(COUNT_KINDS, 0))))
        for split in splits
    ]


def format_count_checks(checks: list[CountCheck]) -> str:
    """A table: found / official per count, and OK or MISMATCH per split."""
    def cell(check: CountCheck, kind: str) -> str:
        want = check.official.get(kind)
        return f"{check.found[kind]:,} / {'-' if want is None else f'{want:,}'}"

    rows = [[c.split, *(cell(c, kind) for kind in COUNT_KINDS), "OK" if c.ok else "MISMATCH"] for c in checks]
    headers = ["split", *(f"{kind} (found / official)" for kind in COUNT_KINDS), "status"]
    return tabulate(rows, headers=headers, tablefmt="github")


_REF_KEYS = ("ref_id", "ann_id", "image_id", "category_id", "split", "sentences")
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANN_KEYS = ("id", "image_id", "segmentation")


class Refer:
    """The objects, expressions and masks of one refer dataset under one split scheme."""

    def __init__(self, root: str | Path, split_by: str, image_dir: str | Path | None = None):
        self.root = Path(root)
        self.split_by = split_by
        self.refs_path = self.root / f"refs({split_by}).p"
        self.instances_path = self.root / "instances.json"
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "train2014"
        for path in (self.refs_path, self.instances_path):
            if not path.is_file():
                raise ReferFormatError(f"{path}: missing; expected the refer layout under {self.root}")
        self._images, self._anns = _load_instances(self.instances_path)
        self._objects = [self._object(ref) for ref in _load_refs(self.refs_path)]
        self._splits = sorted({obj.split for obj in self._objects})

    def splits(self) -> list[str]:
        return list(self._splits)

    def objects(self, split: str) -> list[ReferObject]:
        """The split's refs in file order."""
        if split not in self._splits:
            raise KeyError(f"{self.refs_path}: no split {split!r}; found {self._splits}")
        return [obj for obj in self._objects if obj.split == split]

    def split_counts(self) -> dict[str, dict[str, int]]:
        """Refs, images and expressions per split, as the files hold them (cf. `cmmasksd.catalogue`)."""
        return {
            split: dict(zip(COUNT_KINDS, (len(objects), len({o.image_id for o in objects}),
                                          sum(len(o.sentences) for o in objects))))
            for split in self._splits
            for objects in [self.objects(split)]
        }

    def samples(self, split: str) -> list[ReferSample]:
        """One sample per (object, expression), in file order."""
        return [
            ReferSample(
                ref_id=o.ref_id, ann_id=o.ann_id, image_id=o.image_id, category_id=o.category_id,
                sent_id=sent_id, sentence=text, file_name=o.file_name, height=o.height,
                width=o.width, split=o.split,
            )
            for o in self.objects(split)
            for sent_id, text in o.sentences
        ]

    def image_path(self, obj: ReferObject | ReferSample) -> Path:
        return self.image_dir / obj.file_name

    def rle(self, ann_id: int) -> dict[str, Any]:
        """The object's mask as compressed RLE, counts as str (JSON-friendly)."""
        ann = self._anns.get(ann_id)
        if ann is None:
            raise KeyError(f"{self.instances_path}: no annotation with id {ann_id}")
        image = self._images[ann["image_id"]]
        where = f"{self.instances_path}: annotation {ann_id}"
        rle = _segmentation_rle(ann["segmentation"], image["height"], image["width"], where)
        if list(rle["size"]) != [image["height"], image["width"]]:
            raise ReferFormatError(
                f"{where}: RLE size {rle['size']}, expected the image size {[image['height'], image['width']]}"
            )
        counts = rle["counts"]
        return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}

    def mask(self, ann_id: int) -> np.ndarray:
        """The object's mask, bool (height, width); the union of all its polygons."""
        return mask_utils.decode(self.rle(ann_id)).astype(bool)

    def _object(self, ref: dict[str, Any]) -> ReferObject:
        where = f"{self.refs_path}: ref {ref.get('ref_id')!r}"
        ann = self._anns.get(ref["ann_id"])
        if ann is None:
            raise ReferFormatError(f"{where}: ann_id {ref['ann_id']} is not an annotation id in {self.instances_path}")
        image = self._images.get(ann["image_id"])
        if image is None or ann["image_id"] != ref["image_id"]:
            raise ReferFormatError(
                f"{where}: image_id {ref['image_id']} must match annotation {ann['id']}'s image_id "
                f"{ann['image_id']}, an image in {self.instances_path}"
            )
        sentences = []
        for sent in ref["sentences"]:
            text = sent.get("sent", sent.get("raw")) if isinstance(sent, dict) else None
            if not isinstance(text, str) or "sent_id" not in sent:
                raise ReferFormatError(
                    f"{where}: a sentence needs 'sent_id' and a 'sent' or 'raw' string, got {sent!r}"
                )
            sentences.append((int(sent["sent_id"]), _from_py2_bytes(text)))
        return ReferObject(
            ref_id=int(ref["ref_id"]), ann_id=int(ref["ann_id"]), image_id=int(ref["image_id"]),
            category_id=int(ref["category_id"]), sentences=tuple(sentences), file_name=image["file_name"],
            height=int(image["height"]), width=int(image["width"]), split=str(ref["split"]),
        )


def _load_refs(path: Path) -> list[dict[str, Any]]:
    refs = load_pickle(path)
    if not isinstance(refs, list):
        raise ReferFormatError(f"{path}: expected a list of ref dicts, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or any(k not in ref for k in _REF_KEYS):
            got = sorted(ref) if isinstance(ref, dict) else type(ref).__name__
            raise ReferFormatError(
                f"{path}: record {i} (ref_id {_get(ref, 'ref_id')}): expected keys {_REF_KEYS}, got {got}"
            )
    return refs


def _load_instances(path: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReferFormatError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ReferFormatError(f"{path}: expected a COCO object with 'images' and 'annotations'")
    for section, keys in (("images", _IMAGE_KEYS), ("annotations", _ANN_KEYS)):
        for i, record in enumerate(data[section]):
            if not isinstance(record, dict) or any(k not in record for k in keys):
                raise ReferFormatError(f"{path}: {section}[{i}] (id {_get(record, 'id')}): expected keys {keys}")
    return {im["id"]: im for im in data["images"]}, {ann["id"]: ann for ann in data["annotations"]}


def _segmentation_rle(segmentation: Any, height: int, width: int, where: str) -> dict[str, Any]:
    """Polygons (merged), uncompressed or compressed RLE, all as one compressed RLE."""
    if isinstance(segmentation, list):
        # Fewer than 3 points encloses nothing (and 4 numbers would be read as a bbox).
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ReferFormatError(
            f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and 'counts'"
        )
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, *segmentation["size"])
    return segmentation


def _from_py2_bytes(text: str) -> str:
    """Undo latin1 unpickling of a Python 2 UTF-8 byte string; leave real text as is."""
    try:
        return text.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _get(record: Any, key: str) -> Any:
    return record.get(key) if isinstance(record, dict) else None
