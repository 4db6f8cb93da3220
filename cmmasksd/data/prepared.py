"""Writing the prepared split (`cmmasksd.data.split` is its format and its reader).

Training reads fixed-size arrays instead of decoding JPEGs and polygons every step; the writer
and the reader are tested as a round trip, so the format cannot drift between them.

COCO-sized splits (17k images, 9 GB at 416 px) are decoded by a pool of worker processes; the
parent writes their results in order with plain file writes, so memory stays flat whatever the
split's size. A crash costs at most `flush_every` images: `progress.json` records how far the
run got, and a run on the same inputs and settings (the manifest's `fingerprint`) continues from
there, or skips the split altogether once its manifest is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pandas as pd
from pycocotools import mask as mask_utils
from tabulate import tabulate
from tqdm import tqdm

from cmmasksd.data.decode import ImageTask, decoded
from cmmasksd.data.letterbox import LetterboxMeta
from cmmasksd.data.refer import Refer, ReferObject
from cmmasksd.data.split import FORMAT_VERSION, PreparedSplit
from cmmasksd.io.digest import file_sha256

FLUSH_EVERY = 256  # images between progress checkpoints: what a crash can cost

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
    status: str = "prepared"  # "prepared", "resumed" (continued an interrupted run) or "up to date"
    resumed_from: int = 0  # images an interrupted run had done
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.split}: {self.n_images:,} images, {self.n_objects:,} objects, {self.n_sentences:,} sentences, "
                f"{len(self.skipped):,} skipped; {self.status} in {self.seconds:.1f} s")


def format_reports(reports: Mapping[str, PrepareReport]) -> str:
    """A table of prepared splits, then how many records were skipped for which kind of reason."""
    headers = ["split", "images", "objects", "sentences", "skipped", "status", "seconds"]
    rows = [[r.split, r.n_images, r.n_objects, r.n_sentences, len(r.skipped), r.status, round(r.seconds, 1)]
            for r in reports.values()]
    # "bad image: 480x640, ..." and "empty mask (annotation 7)" are counted by kind.
    kinds = Counter(re.split(r"[:(]", s["reason"])[0].strip() for r in reports.values() for s in r.skipped)
    lines = [tabulate(rows, headers=headers, tablefmt="github", intfmt=",")]
    lines += [f"skipped {n:,} x {kind} (see <split>/skipped.json)" for kind, n in kinds.most_common()]
    return "\n".join(lines)


@dataclass
class _Planned:
    """An object that passed the cheap checks, with the sentences that did."""

    obj: ReferObject
    rle: dict[str, Any]
    sentences: list[tuple[int, str]]


@dataclass
class _Progress:
    """How far a run got through the planned images, and the images that could not be used."""

    fingerprint: str
    done: int = 0
    bad: dict[int, str] = field(default_factory=dict)  # planned image index -> reason

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> _Progress:
        """The saved progress of a run on the same inputs and settings, else a fresh start."""
        try:
            saved = json.loads(path.read_text())
            if saved["fingerprint"] == fingerprint:
                return cls(fingerprint, int(saved["done"]), {int(k): str(v) for k, v in saved["bad"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
        return cls(fingerprint)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done, "bad": self.bad}))
        os.replace(tmp, path)  # a crash leaves the old progress or the new one, never half of one


def prepare_split(
    refer: Refer,
    split: str,
    out_dir: str | Path,
    size: int,
    word_len: int,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
    workers: int = 1,
    flush_every: int = FLUSH_EVERY,
) -> PrepareReport:
    """Write `<out_dir>/<split>/`; bad records are skipped and listed in `skipped.json`.

    `workers` processes decode images (1: in this process). A split already prepared from the
    same inputs and settings is left as it is; an interrupted one is continued.
    """
    started = time.perf_counter()
    if size % 8:
        raise ValueError(f"size must be a multiple of 8 (masks are bit-packed), got {size}")
    if workers < 1 or flush_every < 1:
        raise ValueError(f"workers and flush_every must be >= 1, got {workers} and {flush_every}")
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or clip_tokenizer(word_len)
    digests = {"refs": file_sha256(refer.refs_path), "instances": file_sha256(refer.instances_path)}
    fingerprint = _fingerprint(refer, split, size, word_len, tokenizer, digests)
    ready = _up_to_date(split_dir, fingerprint)
    if ready is not None:
        ready.seconds = time.perf_counter() - started
        return ready
    (split_dir / "manifest.json").unlink(missing_ok=True)  # incomplete until rewritten

    by_image, skipped = _plan(refer, split)
    if not by_image:
        raise _nothing_left(split_dir, split, refer, skipped)
    plan = list(by_image.values())
    shapes = {
        "images": ((len(plan), size, size, 3), np.uint8),
        "masks": ((sum(len(objs) for objs in plan), size, size // 8), np.uint8),
        "tokens": ((sum(len(p.sentences) for objs in plan for p in objs), word_len), np.int32),
    }
    progress_path = split_dir / "progress.json"
    state = _Progress.load(progress_path, fingerprint)
    if state.done and not _arrays_match(split_dir, shapes):
        state = _Progress(fingerprint)  # the arrays are not those the progress was recorded for
    resumed_from = state.done
    if state.done < len(plan):
        _write_arrays(refer, plan, split_dir, shapes, state, progress_path, tokenizer, word_len, size, workers,
                      flush_every, progress, split)

    image_cols, object_cols, sentence_cols = _tables(plan, state.bad, size)
    skipped += [_skip(p.obj, None, refer.image_path(p.obj), reason)
                for i, reason in sorted(state.bad.items()) for p in plan[i]]
    if not sentence_cols["idx"]:
        raise _nothing_left(split_dir, split, refer, skipped)
    for table, array, cols in (("images", "images", image_cols), ("objects", "masks", object_cols),
                               ("sentences", "tokens", sentence_cols)):
        _truncate(split_dir / f"{array}.npy", len(cols["idx"]))
        pd.DataFrame(cols).to_parquet(split_dir / f"{table}.parquet", index=False)
    (split_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
    report = PrepareReport(split, split_dir, len(image_cols["idx"]), len(object_cols["idx"]),
                           len(sentence_cols["idx"]), skipped, "resumed" if resumed_from else "prepared",
                           resumed_from)
    _write_manifest(report, refer, size, word_len, tokenizer, fingerprint, digests)
    progress_path.unlink(missing_ok=True)
    report.seconds = time.perf_counter() - started
    return report


def prepare_dataset(
    refer: Refer,
    out_dir: str | Path,
    size: int,
    word_len: int,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    workers: int = 1,
) -> dict[str, PrepareReport]:
    """Prepare several splits (default: all) with one shared tokenizer."""
    tokenizer = clip_tokenizer(word_len)
    return {s: prepare_split(refer, s, out_dir, size, word_len, tokenizer, progress, workers)
            for s in splits or refer.splits()}


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


def _write_arrays(
    refer: Refer,
    plan: list[list[_Planned]],
    split_dir: Path,
    shapes: dict[str, tuple[tuple[int, ...], type]],
    state: _Progress,
    progress_path: Path,
    tokenizer: Tokenizer,
    word_len: int,
    size: int,
    workers: int,
    flush_every: int,
    progress: bool,
    split: str,
) -> None:
    """Decode the planned images from `state.done` on and write their rows, saving progress as it goes.

    Rows are compact (an unusable image takes none), so where the next one goes follows from the
    images done and those found bad.
    """
    image_row = object_row = sentence_row = 0
    for i in range(state.done):
        if i not in state.bad:
            image_row += 1
            object_row += len(plan[i])
            sentence_row += sum(len(p.sentences) for p in plan[i])
    tasks = (ImageTask(str(refer.image_path(objs[0].obj)), objs[0].obj.height, objs[0].obj.width, size,
                        [p.rle for p in objs]) for objs in plan[state.done:])
    writers = {name: _RowWriter(split_dir / f"{name}.npy", shape, dtype, create=state.done == 0)
               for name, (shape, dtype) in shapes.items()}
    bar = tqdm(total=len(plan), initial=state.done, desc=f"prepare {split}", unit="img", disable=not progress)

    def checkpoint() -> None:
        for writer in writers.values():
            writer.sync()
        state.save(progress_path)

    try:
        with closing(decoded(tasks, workers)) as results:
            for i, result in enumerate(results, start=state.done):
                if isinstance(result, str):
                    state.bad[i] = result
                else:
                    pixels, masks = result
                    sentences = [sentence for p in plan[i] for sentence in p.sentences]
                    writers["images"].write(image_row, pixels[None])
                    writers["masks"].write(object_row, masks)
                    writers["tokens"].write(sentence_row, _tokenize(tokenizer, sentences, word_len))
                    image_row += 1
                    object_row += len(masks)
                    sentence_row += len(sentences)
                state.done = i + 1
                bar.update()
                if state.done % flush_every == 0:
                    checkpoint()
    finally:  # also on Ctrl-C: the next run continues from the last finished image
        checkpoint()
        for writer in writers.values():
            writer.close()
        bar.close()


class _RowWriter:
    """Writes rows of an `.npy` file at their place with plain file writes.

    Pages written through a memmap count as this process's resident memory until unmapped;
    written to the file they are the page cache's, so memory does not grow with the split.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: type, create: bool):
        if create:  # the header, and a sparse file of the full size
            created = np.lib.format.open_memmap(path, "w+", dtype, shape)
            del created  # unmapped: only the file is written from here on
        existing = np.load(path, mmap_mode="r")
        self._offset, self._dtype, self._row_shape = existing.offset, existing.dtype, existing.shape[1:]
        del existing
        self._row_bytes = int(np.prod(self._row_shape)) * self._dtype.itemsize
        self._file = path.open("r+b")

    def write(self, row: int, values: np.ndarray) -> None:
        if values.shape[1:] != self._row_shape:
            raise ValueError(f"{self._file.name}: rows of shape {values.shape[1:]}, expected {self._row_shape}")
        self._file.seek(self._offset + row * self._row_bytes)
        self._file.write(np.ascontiguousarray(values, dtype=self._dtype).data)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _arrays_match(split_dir: Path, shapes: dict[str, tuple[tuple[int, ...], type]]) -> bool:
    """Whether the split's arrays have the full planned shapes an interrupted run wrote into."""
    for name, (shape, dtype) in shapes.items():
        try:
            array = np.load(split_dir / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError):
            return False
        if array.shape != shape or array.dtype != dtype:
            return False
    return True


def _tables(
    plan: list[list[_Planned]], bad: Mapping[int, str], size: int
) -> tuple[dict[str, list], dict[str, list], dict[str, list]]:
    """The images, objects and sentences tables (as columns) of the usable planned images."""
    images: dict[str, list] = {k: [] for k in ("idx", "image_id", "file_name", "height", "width", "scale", "pad_x",
                                                "pad_y")}
    objects: dict[str, list] = {k: [] for k in ("idx", "ref_id", "ann_id", "image_idx", "category_id", "rle_counts",
                                                 "first_sentence", "n_sentences")}
    sentences: dict[str, list] = {k: [] for k in ("idx", "sent_id", "object_idx", "text")}
    for i, objs in enumerate(plan):
        if i in bad:
            continue
        first = objs[0].obj
        meta = LetterboxMeta.fit(first.height, first.width, size)  # as `letterbox_image` placed it
        image_idx = len(images["idx"])
        for key, value in zip(images, (image_idx, first.image_id, first.file_name, meta.height, meta.width,
                                       meta.scale, meta.pad_x, meta.pad_y)):
            images[key].append(value)
        for p in objs:
            obj_idx = len(objects["idx"])
            for key, value in zip(objects, (obj_idx, p.obj.ref_id, p.obj.ann_id, image_idx, p.obj.category_id,
                                            p.rle["counts"], len(sentences["idx"]), len(p.sentences))):
                objects[key].append(value)
            for sent_id, text in p.sentences:
                for key, value in zip(sentences, (len(sentences["idx"]), sent_id, obj_idx, text)):
                    sentences[key].append(value)
    return images, objects, sentences


def _up_to_date(split_dir: Path, fingerprint: str) -> PrepareReport | None:
    """The report of a complete split prepared from the same inputs and settings, else None."""
    try:
        if json.loads((split_dir / "manifest.json").read_text()).get("fingerprint") != fingerprint:
            return None
        split = PreparedSplit(split_dir)
        skipped = json.loads((split_dir / "skipped.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    (split_dir / "progress.json").unlink(missing_ok=True)
    return PrepareReport(split.name, split_dir, split.n_images, split.n_objects, split.n_sentences, skipped,
                         "up to date")


def _fingerprint(refer: Refer, split: str, size: int, word_len: int, tokenizer: Tokenizer,
                 digests: dict[str, str]) -> str:
    """Identifies what a split is prepared from and how: equal fingerprints, equal outputs."""
    inputs = {"format_version": FORMAT_VERSION, "split": split, "split_by": refer.split_by, "size": size,
              "word_len": word_len, "tokenizer": _tokenizer_name(tokenizer), "image_dir": str(refer.image_dir),
              "digests": digests}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _tokenizer_name(tokenizer: Tokenizer) -> str:
    return type(tokenizer).__module__ + "." + type(tokenizer).__qualname__


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
    """Rewrite an .npy with only its first `n` rows (unusable images left rows unwritten at the end)."""
    old = np.load(path, mmap_mode="r")
    if len(old) == n:
        return
    tmp = path.with_suffix(".tmp.npy")
    new = np.lib.format.open_memmap(tmp, "w+", old.dtype, (n, *old.shape[1:]))
    new[:] = old[:n]
    new.flush()
    del old, new
    tmp.replace(path)


def _write_manifest(report: PrepareReport, refer: Refer, size: int, word_len: int, tokenizer: Tokenizer,
                    fingerprint: str, digests: dict[str, str]) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": report.split,
        "size": size,
        "word_len": word_len,
        "tokenizer": _tokenizer_name(tokenizer),
        "counts": {"images": report.n_images, "objects": report.n_objects, "sentences": report.n_sentences,
                   "skipped": len(report.skipped)},
        "source": {
            "root": str(refer.root),
            "split_by": refer.split_by,
            "image_dir": str(refer.image_dir),
            "refs": {"path": str(refer.refs_path), "sha256": digests["refs"]},
            "instances": {"path": str(refer.instances_path), "sha256": digests["instances"]},
        },
        "fingerprint": fingerprint,
    }
    (report.split_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
