"""RefShapes: a tiny synthetic referring-segmentation dataset in the exact refer layout.

Scenes of 2-4 filled circles, squares and triangles; distractors copy another object and
change one or two attributes, so an expression has to name the right ones. Every expression
is parsed back and resolved against its scene, and kept only if it picks out its target alone
(with a safety margin for positional words). The files are those of RefCOCO (`instances.json`,
`refs(unc).p`, `train2014/*.jpg`), so the real pipeline runs on them unchanged; each annotation also
carries its object's `attributes` (shape, colour, size), from which pretraining writes captions.
Like RefCOCO, testA's targets are one family (circles) and testB's the others.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cmmasksd.data.safe_pickle import load_pickle

SHAPES = ("circle", "square", "triangle")
CATEGORY_IDS = {"circle": 1, "square": 2, "triangle": 3}
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 165, 70),
    "blue": (50, 90, 220),
    "purple": (150, 60, 190),
}
SIZES = {"small": 0.07, "large": 0.12}  # radius as a fraction of the image size
# Outline radius per shape (circle radius, square half-side, triangle circumradius) in units
# of the size's radius, chosen so that shapes of one size look about equally large.
EXTENT = {"circle": 1.0, "square": 0.85, "triangle": 1.25}
BOUND = 1.25  # every shape fits in a circle of BOUND * radius; used to keep shapes apart
POSITION_MARGIN = 0.1  # positional words must hold by this fraction of the image size
TARGET_SHAPES = {"testA": ("circle",), "testB": ("square", "triangle")}  # other splits: all
COPY_PROBABILITY = 0.7  # how often a new object is a distractor copied from an existing one

_SIZE_WORDS = {"small": "small", "large": "large", "big": "large"}
_SUPERLATIVES = {"largest": "large", "biggest": "large", "smallest": "small"}
_EXTREME_PREFIX = {"leftmost": "left", "rightmost": "right", "top": "top", "bottom": "bottom"}
_EXTREME_SUFFIX = {"on the left": "left", "on the right": "right", "at the top": "top", "at the bottom": "bottom"}
_RELATIONS = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
              "above": "above", "below": "below"}
_GENERIC_NOUNS = ("object", "shape")
_EXTREME_KEYS = {"left": lambda s: s.x, "right": lambda s: -s.x, "top": lambda s: s.y, "bottom": lambda s: -s.y}


class RefShapesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(default=96, ge=32)
    images: dict[str, int] = Field(default_factory=lambda: {"train": 1320, "val": 170, "testA": 85, "testB": 85})
    min_objects: int = Field(default=2, ge=2)
    max_objects: int = Field(default=4, le=6)
    min_expressions: int = Field(default=1, ge=1)
    max_expressions: int = 3
    positional_fraction: float = Field(default=1 / 3, ge=0.0, le=1.0)
    seed: int = 0
    jpeg_quality: int = Field(default=95, ge=1, le=100)

    @model_validator(mode="after")
    def _check_ranges(self) -> "RefShapesConfig":
        if self.min_objects > self.max_objects or self.min_expressions > self.max_expressions:
            raise ValueError("min_objects/min_expressions must not exceed max_objects/max_expressions")
        return self


@dataclass(frozen=True)
class Shape:
    """One object of a scene; (x, y) is its centroid in pixels, y pointing down."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Phrase:
    """'[size] [colour] noun'; None matches anything."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class Query:
    """The meaning of an expression: a phrase narrowed by a relation, a superlative, an extreme."""

    phrase: Phrase
    superlative: str | None = None  # "large" / "small"
    extreme: str | None = None  # "left" / "right" / "top" / "bottom"
    relation: str | None = None  # "left" / "right" / "above" / "below" ...
    landmark: Phrase | None = None  # ... of the one object this phrase names

    @property
    def positional(self) -> bool:
        return self.extreme is not None or self.relation is not None


# --- the expression language ---------------------------------------------------------------

def parse(text: str) -> Query:
    """The `Query` a RefShapes expression means; ValueError if it is not in the grammar."""
    words = " ".join(text.lower().split())
    m = re.fullmatch(r"the (.+?) (" + "|".join(_RELATIONS) + r") the (.+)", words)
    if m:
        target, rel, landmark = m.groups()
        return replace(_parse_target(target, text), relation=_RELATIONS[rel], landmark=_parse_phrase(landmark, text))
    if not words.startswith("the "):
        raise ValueError(f"not a RefShapes expression (must start with 'the'): {text!r}")
    return _parse_target(words[4:], text)


def _parse_target(words: str, text: str) -> Query:
    extreme = superlative = None
    for suffix, direction in _EXTREME_SUFFIX.items():
        if words.endswith(" " + suffix):
            words, extreme = words[: -len(suffix) - 1], direction
            break
    first, _, rest = words.partition(" ")
    if rest and first in _EXTREME_PREFIX and extreme is None:
        words, extreme = rest, _EXTREME_PREFIX[first]
    elif rest and first in _SUPERLATIVES:
        words, superlative = rest, _SUPERLATIVES[first]
    return Query(_parse_phrase(words, text), superlative=superlative, extreme=extreme)


def _parse_phrase(words: str, text: str) -> Phrase:
    *adjectives, noun = words.split()
    if noun not in SHAPES and noun not in _GENERIC_NOUNS:
        raise ValueError(f"unknown noun {noun!r} in {text!r}")
    size = colour = None
    for word in adjectives:
        if word in _SIZE_WORDS and size is None and colour is None:
            size = _SIZE_WORDS[word]
        elif word in COLOURS and colour is None:
            colour = word
        else:
            raise ValueError(f"unexpected word {word!r} in {text!r}")
    return Phrase(shape=noun if noun in SHAPES else None, colour=colour, size=size)


def render(query: Query, rng: np.random.Generator) -> str:
    """One wording of `query` (synonyms drawn from `rng`)."""
    target = _render_phrase(query.phrase, rng)
    if query.superlative:
        target = f"{_pick(_SUPERLATIVES, query.superlative, rng)} {target}"
    if query.extreme and rng.random() < 0.5:
        target = f"{target} {_pick(_EXTREME_SUFFIX, query.extreme, rng)}"
    elif query.extreme:
        target = f"{_pick(_EXTREME_PREFIX, query.extreme, rng)} {target}"
    if query.relation:
        target = f"{target} {_pick(_RELATIONS, query.relation, rng)} the {_render_phrase(query.landmark, rng)}"
    return f"the {target}"


def _render_phrase(phrase: Phrase, rng: np.random.Generator) -> str:
    words = [_pick(_SIZE_WORDS, phrase.size, rng)] if phrase.size else []
    words += [phrase.colour] if phrase.colour else []
    words.append(phrase.shape or str(rng.choice(_GENERIC_NOUNS)))
    return " ".join(words)


def _pick(synonyms: dict[str, str], meaning: str, rng: np.random.Generator) -> str:
    return str(rng.choice([word for word, m in synonyms.items() if m == meaning]))


def resolve(expression: str | Query, scene: list[Shape], margin: float = 0.0) -> list[int]:
    """Indices of the scene objects the expression refers to (exactly one if unambiguous).

    Positional comparisons must win by more than `margin` pixels: resolving with a positive and
    a negative margin tells a clear "leftmost" from a near tie.
    """
    q = parse(expression) if isinstance(expression, str) else expression
    found = _matching(q.phrase, scene)
    if q.relation:
        landmarks = _matching(q.landmark, scene)
        if len(landmarks) != 1:
            return []
        ref = scene[landmarks[0]]
        found = [i for i in found if i != landmarks[0] and _offset(scene[i], ref, q.relation) > margin]
    if q.superlative:
        if len({scene[i].size for i in found}) > 1:  # all of one size: none is "the largest"
            found = [i for i in found if scene[i].size == q.superlative]
    if q.extreme:
        key = _EXTREME_KEYS[q.extreme]
        found = [i for i in found if all(key(scene[i]) + margin < key(scene[j]) for j in found if j != i)]
    return found


def _matching(phrase: Phrase, scene: list[Shape]) -> list[int]:
    def fits(s: Shape) -> bool:
        return all(want in (None, got) for want, got in ((phrase.shape, s.shape), (phrase.colour, s.colour),
                                                          (phrase.size, s.size)))

    return [i for i, s in enumerate(scene) if fits(s)]


def _offset(obj: Shape, ref: Shape, relation: str) -> float:
    """How far `obj` lies in the relation's direction from `ref` (positive: it holds)."""
    return {"left": ref.x - obj.x, "right": obj.x - ref.x, "above": ref.y - obj.y, "below": obj.y - ref.y}[relation]


# --- scenes --------------------------------------------------------------------------------

def polygon(shape: Shape, image_size: int) -> list[float]:
    """The outline [x1, y1, x2, y2, ...] that both the pixels and instances.json use."""
    r = SIZES[shape.size] * EXTENT[shape.shape] * image_size
    if shape.shape == "circle":
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        points = [(r * math.cos(a), r * math.sin(a)) for a in angles]
    elif shape.shape == "square":
        points = [(-r, -r), (r, -r), (r, r), (-r, r)]
    else:  # triangle, apex up, centroid at (x, y)
        points = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return [round(v, 2) for px, py in points for v in (shape.x + px, shape.y + py)]


def sample_scene(rng: np.random.Generator, cfg: RefShapesConfig,
                 first_shapes: tuple[str, ...] = SHAPES) -> list[Shape]:
    """2-4 non-overlapping objects, most copied from an earlier one with 1-2 attributes changed."""
    while True:
        scene: list[Shape] = []
        for k in range(int(rng.integers(cfg.min_objects, cfg.max_objects + 1))):
            if k and rng.random() < COPY_PROBABILITY:
                attrs = _distractor(scene[int(rng.integers(len(scene)))], rng)
            else:
                choices = first_shapes if k == 0 else SHAPES
                attrs = dict(shape=str(rng.choice(choices)), colour=str(rng.choice(list(COLOURS))),
                             size=str(rng.choice(list(SIZES))))
            placed = _place(attrs, scene, rng, cfg.image_size)
            if placed:
                scene.append(placed)
        if len(scene) >= cfg.min_objects:
            return scene


def _distractor(base: Shape, rng: np.random.Generator) -> dict[str, str]:
    attrs = dict(shape=base.shape, colour=base.colour, size=base.size)
    options = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}
    for name in rng.choice(list(options), size=int(rng.integers(1, 3)), replace=False):
        attrs[name] = str(rng.choice([v for v in options[name] if v != attrs[name]]))
    return attrs


def _place(attrs: dict[str, str], scene: list[Shape], rng: np.random.Generator, size: int,
           tries: int = 100) -> Shape | None:
    r = BOUND * SIZES[attrs["size"]] * size
    gap = 0.04 * size
    for _ in range(tries):
        x, y = rng.uniform(r + 1, size - r - 1, size=2)
        if all(math.hypot(x - s.x, y - s.y) > r + BOUND * SIZES[s.size] * size + gap for s in scene):
            return Shape(x=round(float(x), 2), y=round(float(y), 2), **attrs)
    return None


def candidate_queries(scene: list[Shape], target: int) -> list[Query]:
    """Every query in the grammar that describes `target` (before checking it is unique)."""
    t = scene[target]
    phrases = [Phrase(shape, colour, size)
               for shape in (t.shape, None) for colour in (t.colour, None) for size in (t.size, None)]
    queries = [Query(p) for p in phrases]
    queries += [Query(p, superlative=t.size) for p in phrases if p.size is None]
    queries += [Query(p, extreme=e) for p in phrases for e in ("left", "right", "top", "bottom")]
    for j in range(len(scene)):
        landmark = _shortest_unique_phrase(scene, j) if j != target else None
        if landmark:
            queries += [Query(p, relation=rel, landmark=landmark)
                        for p in phrases for rel in ("left", "right", "above", "below")]
    return queries


def _shortest_unique_phrase(scene: list[Shape], index: int) -> Phrase | None:
    s = scene[index]
    options = [Phrase(s.shape), Phrase(None, s.colour), Phrase(s.shape, s.colour), Phrase(s.shape, None, s.size),
               Phrase(None, s.colour, s.size), Phrase(s.shape, s.colour, s.size)]
    return next((p for p in options if _matching(p, scene) == [index]), None)


def is_clear(query: Query, scene: list[Shape], target: int, margin: float) -> bool:
    """The query names `target` alone, positional words win by `margin`, and every word is needed.

    Superlatives and extremes must choose among at least two objects; a relation among at least
    two besides its landmark.
    """
    if resolve(query, scene, margin) != [target] or resolve(query, scene, -margin) != [target]:
        return False
    matches = _matching(query.phrase, scene)
    if query.relation:
        return len([i for i in matches if i not in _matching(query.landmark, scene)]) >= 2
    if query.superlative or query.extreme:
        return len(matches) >= 2
    return True


def choose_expressions(scene: list[Shape], target: int, n: int, cfg: RefShapesConfig,
                       rng: np.random.Generator) -> list[str]:
    """Up to `n` distinct expressions for `target`, about `positional_fraction` positional."""
    margin = POSITION_MARGIN * cfg.image_size
    valid = [q for q in candidate_queries(scene, target) if is_clear(q, scene, target, margin)]
    pools = ([q for q in valid if not q.positional], [q for q in valid if q.positional])  # indexed by positional
    texts: list[str] = []
    for _ in range(n):
        want_positional = rng.random() < cfg.positional_fraction
        pool = pools[want_positional] or pools[not want_positional]
        if not pool:
            break
        query = pool.pop(int(rng.integers(len(pool))))
        text = render(query, rng)
        if parse(text) != query or resolve(text, scene) != [target]:
            raise RuntimeError(f"bug: generated expression {text!r} does not resolve to object {target} of {scene}")
        if text not in texts:
            texts.append(text)
    return texts


def render_scene(scene: list[Shape], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    """RGB pixels and each object's polygon; pixels are painted from the decoded polygon itself."""
    grey = rng.integers(185, 236)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = np.clip(grey + rng.integers(-6, 7, size=3), 0, 255)
    polygons = [polygon(s, size) for s in scene]
    for shape, poly in zip(scene, polygons):
        mask = mask_utils.decode(mask_utils.frPyObjects([poly], size, size)[0]).astype(bool)
        image[mask] = COLOURS[shape.colour]
    return image, polygons


# --- writing the refer layout --------------------------------------------------------------

def generate_refshapes(out_dir: str | Path, cfg: RefShapesConfig | None = None) -> dict[str, dict[str, Any]]:
    """Write RefShapes under `out_dir` in the refer layout; same config, same bytes.

    Returns `refshapes_stats(out_dir)`.
    """
    cfg = cfg or RefShapesConfig()
    out_dir = Path(out_dir)
    image_dir = out_dir / "train2014"
    if image_dir.exists():  # images of an earlier, possibly larger, generation
        shutil.rmtree(image_dir)
    image_dir.mkdir(parents=True)
    images, annotations, refs = [], [], []
    n_sentences = 0
    size = cfg.image_size
    for split_index, (split, n_images) in enumerate(cfg.images.items()):
        targets = TARGET_SHAPES.get(split, SHAPES)
        for i in range(n_images):
            rng = np.random.default_rng([cfg.seed, split_index, i])
            while True:  # resample until the scene has at least one describable target
                scene = sample_scene(rng, cfg, first_shapes=targets)
                n_expressions = [int(rng.integers(cfg.min_expressions, cfg.max_expressions + 1)) for _ in scene]
                described = [(k, choose_expressions(scene, k, n_expressions[k], cfg, rng))
                             for k, s in enumerate(scene) if s.shape in targets]
                described = [(k, texts) for k, texts in described if texts]
                if described:
                    break
            pixels, polygons = render_scene(scene, size, rng)
            image_id = len(images) + 1
            file_name = f"COCO_train2014_{image_id:012d}.jpg"
            Image.fromarray(pixels).save(image_dir / file_name, quality=cfg.jpeg_quality, subsampling=0)
            images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
            first_ann = len(annotations) + 1
            for k, (shape, poly) in enumerate(zip(scene, polygons)):
                rle = mask_utils.frPyObjects([poly], size, size)[0]
                annotations.append({
                    "id": first_ann + k, "image_id": image_id, "category_id": CATEGORY_IDS[shape.shape],
                    "segmentation": [poly], "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
                    "attributes": {"shape": shape.shape, "colour": shape.colour, "size": shape.size},
                })
            for k, texts in described:
                refs.append(_ref(len(refs), first_ann + k, image_id, scene[k], split, texts, n_sentences))
                n_sentences += len(texts)
    instances = {
        "info": {"description": "RefShapes (synthetic)", "config": cfg.model_dump()},
        "images": images, "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for name, cid in CATEGORY_IDS.items()],
    }
    (out_dir / "instances.json").write_text(json.dumps(instances))
    with (out_dir / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    return refshapes_stats(out_dir)


def _ref(ref_id: int, ann_id: int, image_id: int, shape: Shape, split: str, texts: list[str], first_sent: int) -> dict:
    sentences = [
        {"tokens": text.split(), "raw": text[0].upper() + text[1:], "sent": text, "sent_id": first_sent + i}
        for i, text in enumerate(texts)
    ]
    return {
        "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[shape.shape],
        "split": split, "sent_ids": [s["sent_id"] for s in sentences],
        # As in RefCOCO, the refs' file_name is not the image file (that comes from instances.json).
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sentences": sentences,
    }


def refshapes_stats(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per split: images, refs, expressions and the fraction of positional expressions."""
    refs = load_pickle(Path(out_dir) / "refs(unc).p")
    stats: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(r["split"] for r in refs):
        split_refs = [r for r in refs if r["split"] == split]
        sents = [s["sent"] for r in split_refs for s in r["sentences"]]
        stats[split] = {
            "images": len({r["image_id"] for r in split_refs}),
            "refs": len(split_refs),
            "expressions": len(sents),
            "positional_fraction": round(sum(parse(s).positional for s in sents) / len(sents), 3),
            "target_categories": dict(Counter(r["category_id"] for r in split_refs)),
        }
    return stats
