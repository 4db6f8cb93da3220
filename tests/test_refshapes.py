import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cmmasksd.data.refer import Refer
from cmmasksd.data.refshapes import (
    CATEGORY_IDS,
    COLOURS,
    SIZES,
    Phrase,
    Query,
    RefShapesConfig,
    Shape,
    generate_refshapes,
    parse,
    polygon,
    refshapes_stats,
    resolve,
)
from cmmasksd.data.safe_pickle import load_pickle

# A red circle (left), a red square, a blue circle and a small blue circle (right, low).
SCENE = [
    Shape("circle", "red", "large", x=15, y=40),
    Shape("square", "red", "large", x=45, y=20),
    Shape("circle", "blue", "large", x=60, y=70),
    Shape("circle", "blue", "small", x=85, y=85),
]


@pytest.mark.parametrize("text, expected", [
    ("the red circle", [0]),
    ("the circle", [0, 2, 3]),
    ("the square", [1]),
    ("the small blue object", [3]),
    ("the leftmost circle", [0]),
    ("the circle on the right", [3]),
    ("the top object", [1]),
    ("the bottom circle", [3]),
    ("the largest blue circle", [2]),
    ("the smallest shape", [3]),
    ("the largest object", [0, 1, 2]),  # three large ones: ambiguous
    ("the circle left of the square", [0]),
    ("the circle to the right of the red square", [2, 3]),
    ("the object below the big blue circle", [3]),
    ("the circle above the blue circle", []),  # the landmark is not unique
])
def test_resolver(text, expected):
    assert resolve(text, SCENE) == expected


def test_resolver_margin_separates_near_ties():
    scene = [Shape("circle", "red", "large", x=30, y=50), Shape("circle", "blue", "large", x=33, y=10)]
    assert resolve("the leftmost circle", scene) == [0]
    assert resolve("the leftmost circle", scene, margin=5) == []  # not clearly leftmost
    assert resolve("the leftmost circle", scene, margin=-5) == [0, 1]


def test_parse_rejects_text_outside_the_grammar():
    assert parse("The small red circle at the bottom") == Query(Phrase("circle", "red", "small"), extreme="bottom")
    for text in ("a red circle", "the red banana", "the circle red"):
        with pytest.raises(ValueError):
            parse(text)


def _scene_from_files(refer, anns, pixels, size):
    """Recover shape, colour, size and centroid of each object from instances.json and the JPEG."""
    scene = []
    for ann in anns:
        mask = refer.mask(ann["id"])
        shape = next(name for name, cid in CATEGORY_IDS.items() if cid == ann["category_id"])
        median = np.median(pixels[mask], axis=0)
        colour = min(COLOURS, key=lambda c: np.abs(np.array(COLOURS[c]) - median).sum())
        areas = {s: _area(shape, s, size) for s in SIZES}
        size_name = min(areas, key=lambda s: abs(areas[s] - mask.sum()))
        ys, xs = np.nonzero(mask)
        scene.append(Shape(shape, colour, size_name, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
    return scene


def _area(shape, size_name, image_size):
    poly = polygon(Shape(shape, "red", size_name, image_size / 2, image_size / 2), image_size)
    return float(mask_utils.area(mask_utils.frPyObjects([poly], image_size, image_size)[0]))


def test_every_expression_picks_its_target_from_the_written_files(refshapes_root):
    """End to end: the scene as read back from the files, not the generator's memory."""
    refer = Refer(refshapes_root, "unc")
    instances = json.loads((refshapes_root / "instances.json").read_text())
    anns_by_image = {}
    for ann in instances["annotations"]:
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    n_checked = 0
    for split in refer.splits():
        for obj in refer.objects(split):
            anns = anns_by_image[obj.image_id]
            pixels = np.asarray(Image.open(refer.image_path(obj)))
            scene = _scene_from_files(refer, anns, pixels, obj.width)
            target = [a["id"] for a in anns].index(obj.ann_id)
            for _, text in obj.sentences:
                assert resolve(text, scene) == [target], (split, obj.ref_id, text)
                n_checked += 1
    assert n_checked > 200


def test_pixels_are_the_polygons(refshapes_root):
    """Inside each decoded mask the JPEG shows the object's colour; outside, the background."""
    refer = Refer(refshapes_root, "unc")
    obj = refer.objects("train")[0]
    pixels = np.asarray(Image.open(refer.image_path(obj))).astype(int)
    instances = json.loads((refshapes_root / "instances.json").read_text())
    union = np.zeros(pixels.shape[:2], bool)
    for ann in (a for a in instances["annotations"] if a["image_id"] == obj.image_id):
        mask = refer.mask(ann["id"])
        colours = pixels[mask]
        assert (np.abs(colours - np.median(colours, axis=0)).max(axis=1) < 40).mean() > 0.9
        union |= mask
    background = pixels[~union]
    assert (np.abs(background - np.median(background, axis=0)).max(axis=1) < 40).mean() > 0.95


def test_layout_splits_and_families(refshapes_root):
    refs = load_pickle(refshapes_root / "refs(unc).p")
    instances = json.loads((refshapes_root / "instances.json").read_text())
    assert {c["id"] for c in instances["categories"]} <= set(range(1, 91))
    images_of = {s: {r["image_id"] for r in refs if r["split"] == s} for s in ("train", "val", "testA", "testB")}
    assert all(len(v) == 20 for v in images_of.values())
    all_images = [i for v in images_of.values() for i in v]
    assert len(all_images) == len(set(all_images))  # image-disjoint
    assert {r["category_id"] for r in refs if r["split"] == "testA"} == {CATEGORY_IDS["circle"]}
    assert CATEGORY_IDS["circle"] not in {r["category_id"] for r in refs if r["split"] == "testB"}
    refer = Refer(refshapes_root, "unc")
    for ann in instances["annotations"]:
        assert ann["iscrowd"] == 0 and len(ann["segmentation"]) == 1 and len(ann["segmentation"][0]) >= 6
        ys, xs = np.nonzero(refer.mask(ann["id"]))  # area and bbox (x, y, w, h) as COCO's, of the drawn mask
        assert ann["area"] == len(ys) > 0
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    ref = refs[0]
    assert set(ref) == {"ref_id", "ann_id", "image_id", "category_id", "split", "sent_ids", "file_name", "sentences"}
    assert set(ref["sentences"][0]) == {"tokens", "raw", "sent", "sent_id"}
    sent_ids = [s["sent_id"] for r in refs for s in r["sentences"]]
    assert len(sent_ids) == len(set(sent_ids))


def test_stats(refshapes_root):
    stats = refshapes_stats(refshapes_root)
    assert list(stats) == ["train", "val", "testA", "testB"]
    for split in stats.values():
        assert split["images"] == 20 and split["images"] <= split["refs"] <= split["expressions"] <= 3 * split["refs"]
    positional = sum(s["positional_fraction"] * s["expressions"] for s in stats.values()) / sum(
        s["expressions"] for s in stats.values())
    assert 0.2 < positional < 0.5


def test_same_seed_same_bytes(tmp_path):
    cfg = RefShapesConfig(image_size=48, images={"train": 4, "testA": 3}, seed=7)
    generate_refshapes(tmp_path / "a", cfg)
    generate_refshapes(tmp_path / "b", cfg)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 7
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    generate_refshapes(tmp_path / "c", cfg.model_copy(update={"seed": 8}))
    assert (tmp_path / "c" / "refs(unc).p").read_bytes() != (tmp_path / "a" / "refs(unc).p").read_bytes()
