"""The prepared split: letterboxed images, packed masks and tokens in memory-mapped arrays.

Training reads fixed-size arrays instead of decoding JPEGs and polygons every step. One
writer (`prepare_split`) and one reader (`PreparedSplit`) live here together, tested as a
round trip, so the format cannot drift between them. Layout of `<out_dir>/<split>/`:

- `images.npy` uint8 [N_img, S, S, 3]: letterboxed RGB (see `letterbox`)
- `masks.npy` uint8 [N_obj, S, S // 8]: the letterboxed mask, `np.packbits` along the last axis
- `tokens.npy` int32 [N_sent, word_len]: CLIP BPE tokens, SOT ... EOT, zero padded
- `images.parquet` (idx, image_id, file_name, height, width, scale, pad_x, pad_y)
- `objects.parquet` (idx, ref_id, ann_id, image_idx, category_id, rle_counts, first_sentence,
  n_sentences): an object's sentences are rows first_sentence .. first_sentence + n_sentences - 1
- `sentences.parquet` (idx, sent_id, object_idx, text)
- `skipped.json`: the records left out and why
- `manifest.json`: written last; a split without it is incomplete
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from cmmasksd.data.letterbox import LetterboxMeta, letterbox_image, letterbox_mask
from cmmasksd.data.refer import Refer, ReferObject

FORMAT_VERSION = 1

Tokenizer = Callable[[list[str]], Any]  # texts -> [n, word_len] integer tensor or array


def clip_tokenizer(word_len: int) -> Tokenizer:
    """CLIP's BPE tokenizer; longer texts are cut to `word_len` with EOT kept last."""
    return open_clip.SimpleTokenizer(context_length=word_len)


@dataclass
class PrepareReport:
    split: str
    split_dir: Path
    n_images: int
    n_objects: int
    n_sentences: int
    skipped: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Planned:
    """An object that passed the cheap checks, with the sentences that did."""

    obj: ReferObject
    rle: dict[str, Any]
    sentences: list[tuple[int, str]]


def prepare_split(
    refer: Refer,
    split: str,
    out_dir: str | Path,
    size: int,
    word_len: int,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Write `<out_dir>/<split>/`; bad records are skipped and listed in `skipped.json`."""
    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (masks are bit-packed), got {size}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "manifest.json").unlink(missing_ok=True)  # incomplete until rewritten
    tokenizer = tokenizer or clip_tokenizer(word_len)

    by_image, skipped = _plan(refer, split)
    if not by_image:
        raise _nothing_left(split_dir, split, refer, skipped)
    n_obj = sum(len(objs) for objs in by_image.values())
    n_sent = sum(len(p.sentences) for objs in by_image.values() for p in objs)
    images = np.lib.format.open_memmap(split_dir / "images.npy", "w+", np.uint8, (len(by_image), size, size, 3))
    masks = np.lib.format.open_memmap(split_dir / "masks.npy", "w+", np.uint8, (n_obj, size, size // 8))
    tokens = np.lib.format.open_memmap(split_dir / "tokens.npy", "w+", np.int32, (n_sent, word_len))

    image_rows, object_rows, sentence_rows = [], [], []
    for planned in tqdm(by_image.values(), desc=f"prepare {split}", unit="img", disable=not progress):
        first = planned[0].obj
        path = refer.image_path(first)
        loaded = _letterboxed(path, first, size)
        if isinstance(loaded, str):
            skipped += [_skip(p.obj, None, path, loaded) for p in planned]
            continue
        pixels, meta = loaded
        image_idx = len(image_rows)
        images[image_idx] = pixels
        image_rows.append(dict(idx=image_idx, image_id=first.image_id, file_name=first.file_name, height=meta.height,
                               width=meta.width, scale=meta.scale, pad_x=meta.pad_x, pad_y=meta.pad_y))
        for p in planned:
            obj_idx = len(object_rows)
            masks[obj_idx] = np.packbits(letterbox_mask(mask_utils.decode(p.rle).astype(bool), meta), axis=-1)
            first_sentence = len(sentence_rows)
            object_rows.append(dict(idx=obj_idx, ref_id=p.obj.ref_id, ann_id=p.obj.ann_id, image_idx=image_idx,
                                    category_id=p.obj.category_id, rle_counts=p.rle["counts"],
                                    first_sentence=first_sentence, n_sentences=len(p.sentences)))
            tokens[first_sentence : first_sentence + len(p.sentences)] = _tokenize(tokenizer, p.sentences, word_len)
            sentence_rows += [dict(idx=len(sentence_rows) + k, sent_id=sent_id, object_idx=obj_idx, text=text)
                              for k, (sent_id, text) in enumerate(p.sentences)]

    if not sentence_rows:
        raise _nothing_left(split_dir, split, refer, skipped)
    for array in (images, masks, tokens):
        array.flush()
    del images, masks, tokens  # closed before they may be rewritten smaller
    _truncate(split_dir / "images.npy", len(image_rows))
    _truncate(split_dir / "masks.npy", len(object_rows))
    _truncate(split_dir / "tokens.npy", len(sentence_rows))
    for name, rows in (("images", image_rows), ("objects", object_rows), ("sentences", sentence_rows)):
        pd.DataFrame(rows).to_parquet(split_dir / f"{name}.parquet", index=False)
    (split_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
    report = PrepareReport(split, split_dir, len(image_rows), len(object_rows), len(sentence_rows), skipped)
    _write_manifest(report, refer, size, word_len, tokenizer)
    return report


def prepare_dataset(
    refer: Refer,
    out_dir: str | Path,
    size: int,
    word_len: int,
    splits: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, PrepareReport]:
    """Prepare several splits (default: all) with one shared tokenizer."""
    tokenizer = clip_tokenizer(word_len)
    return {s: prepare_split(refer, s, out_dir, size, word_len, tokenizer, progress) for s in splits or refer.splits()}


def _plan(refer: Refer, split: str) -> tuple[dict[int, list[_Planned]], list[dict[str, Any]]]:
    """Group the split's objects by image, leaving out empty masks and empty expressions."""
    by_image: dict[int, list[_Planned]] = {}
    skipped: list[dict[str, Any]] = []
    for obj in refer.objects(split):
        rle = refer.rle(obj.ann_id)
        if mask_utils.area(rle) == 0:
            skipped.append(_skip(obj, None, refer.instances_path, f"empty mask (annotation {obj.ann_id})"))
            continue
        sentences = [(sent_id, text.strip()) for sent_id, text in obj.sentences if text.strip()]
        blank = [sent_id for sent_id, text in obj.sentences if not text.strip()]
        skipped += [_skip(obj, sent_id, refer.refs_path, "empty expression") for sent_id in blank]
        if not sentences:
            skipped.append(_skip(obj, None, refer.refs_path, "no non-empty expression"))
            continue
        by_image.setdefault(obj.image_id, []).append(_Planned(obj, rle, sentences))
    return by_image, skipped


def _letterboxed(path: Path, obj: ReferObject, size: int) -> tuple[np.ndarray, LetterboxMeta] | str:
    """The letterboxed image, or why it cannot be used."""
    try:
        with Image.open(path) as img:
            img.load()  # decodes everything, so a truncated JPEG fails here
            if (img.height, img.width) != (obj.height, obj.width):
                return f"bad image: {img.height}x{img.width}, instances.json says {obj.height}x{obj.width}"
            return letterbox_image(img, size)
    except FileNotFoundError:
        return "missing image file"
    except OSError as err:  # truncated or not an image
        return f"bad image: {err}"


def _nothing_left(split_dir: Path, split: str, refer: Refer, skipped: list[dict[str, Any]]) -> ValueError:
    reasons = sorted({s["reason"] for s in skipped})[:5]
    return ValueError(f"{split_dir}: no usable record in split {split!r} of {refer.refs_path} (all {len(skipped)} "
                      f"skipped, e.g. {reasons}); expected readable images under {refer.image_dir}")


def _skip(obj: ReferObject, sent_id: int | None, file: Path, reason: str) -> dict[str, Any]:
    return dict(ref_id=obj.ref_id, sent_id=sent_id, image_id=obj.image_id, file=str(file), reason=reason)


def _tokenize(tokenizer: Tokenizer, sentences: list[tuple[int, str]], word_len: int) -> np.ndarray:
    out = np.asarray(tokenizer([text for _, text in sentences]), dtype=np.int32)
    if out.shape != (len(sentences), word_len):
        raise ValueError(f"tokenizer returned shape {out.shape}, expected {(len(sentences), word_len)}")
    return out


def _truncate(path: Path, n: int) -> None:
    """Rewrite an .npy with only its first `n` rows (rows of unreadable images were left empty)."""
    old = np.load(path, mmap_mode="r")
    if len(old) == n:
        return
    tmp = path.with_suffix(".tmp.npy")
    new = np.lib.format.open_memmap(tmp, "w+", old.dtype, (n, *old.shape[1:]))
    new[:] = old[:n]
    new.flush()
    del old, new
    tmp.replace(path)


def _write_manifest(report: PrepareReport, refer: Refer, size: int, word_len: int, tokenizer: Tokenizer) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": report.split,
        "size": size,
        "word_len": word_len,
        "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__qualname__,
        "counts": {"images": report.n_images, "objects": report.n_objects, "sentences": report.n_sentences,
                   "skipped": len(report.skipped)},
        "source": {
            "root": str(refer.root),
            "split_by": refer.split_by,
            "image_dir": str(refer.image_dir),
            "refs": {"path": str(refer.refs_path), "sha256": _sha256(refer.refs_path)},
            "instances": {"path": str(refer.instances_path), "sha256": _sha256(refer.instances_path)},
        },
    }
    (report.split_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class PreparedSplit:
    """Read a prepared split; arrays are memory-mapped, so opening it costs almost nothing."""

    def __init__(self, split_dir: str | Path):
        self.split_dir = Path(split_dir)
        manifest_path = self.split_dir / "manifest.json"
        if not manifest_path.is_file():
            raise ValueError(f"{self.split_dir}: not a complete prepared split (manifest.json missing)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{manifest_path}: format_version {self.manifest.get('format_version')}, "
                             f"expected {FORMAT_VERSION}; prepare the split again")
        self.name: str = self.manifest["split"]
        self.size: int = self.manifest["size"]
        self.word_len: int = self.manifest["word_len"]
        self._images = np.load(self.split_dir / "images.npy", mmap_mode="r")
        self._masks = np.load(self.split_dir / "masks.npy", mmap_mode="r")
        self._tokens = np.load(self.split_dir / "tokens.npy", mmap_mode="r")
        self.images = pd.read_parquet(self.split_dir / "images.parquet")
        self.objects = pd.read_parquet(self.split_dir / "objects.parquet")
        self.sentences = pd.read_parquet(self.split_dir / "sentences.parquet")
        counts = self.manifest["counts"]
        for name, array, table in (("images", self._images, self.images), ("objects", self._masks, self.objects),
                                   ("sentences", self._tokens, self.sentences)):
            if not len(array) == len(table) == counts[name]:
                raise ValueError(f"{self.split_dir}: {name}: {len(array)} array rows, {len(table)} table rows, "
                                 f"manifest says {counts[name]}")
        # Columns as arrays: per-item access without pandas overhead.
        self.object_image = self.objects["image_idx"].to_numpy()
        self.object_first_sentence = self.objects["first_sentence"].to_numpy()
        self.object_n_sentences = self.objects["n_sentences"].to_numpy()
        self.sentence_object = self.sentences["object_idx"].to_numpy()

    def __reduce__(self):
        # DataLoader workers reopen the memmaps instead of receiving a pickled copy of the data.
        return PreparedSplit, (self.split_dir,)

    @property
    def n_images(self) -> int:
        return len(self._images)

    @property
    def n_objects(self) -> int:
        return len(self._masks)

    @property
    def n_sentences(self) -> int:
        return len(self._tokens)

    def image(self, image_idx: int) -> np.ndarray:
        """uint8 (S, S, 3), letterboxed."""
        return np.array(self._images[image_idx])

    def mask(self, obj_idx: int) -> np.ndarray:
        """uint8 0/1 (S, S), letterboxed like the image."""
        return np.unpackbits(self._masks[obj_idx], axis=-1)

    def tokens(self, sent_idx: int) -> np.ndarray:
        """int32 (word_len,)."""
        return np.array(self._tokens[sent_idx])

    def meta(self, image_idx: int) -> LetterboxMeta:
        row = self.images.iloc[image_idx]
        return LetterboxMeta(int(row.height), int(row.width), float(row.scale), int(row.pad_x), int(row.pad_y),
                             self.size)

    def gt_mask(self, obj_idx: int) -> np.ndarray:
        """bool (height, width): the ground truth at the original resolution, for evaluation."""
        row = self.images.iloc[self.object_image[obj_idx]]
        rle = {"size": [int(row.height), int(row.width)], "counts": self.objects.rle_counts.iat[obj_idx]}
        return mask_utils.decode(rle).astype(bool)

    def sentences_of(self, obj_idx: int) -> range:
        """The indices of the object's sentences (rows of `sentences`, `tokens`)."""
        first = int(self.object_first_sentence[obj_idx])
        return range(first, first + int(self.object_n_sentences[obj_idx]))
