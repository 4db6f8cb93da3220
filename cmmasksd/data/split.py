"""The prepared split's format, and its reader: memory-mapped arrays and three small tables.

Layout of `<out_dir>/<split>/` (written by `cmmasksd.data.prepared.prepare_split`):

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

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from cmmasksd.data.kinds import expression_kinds
from cmmasksd.data.letterbox import LetterboxMeta

FORMAT_VERSION = 1


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

    @cached_property
    def kinds(self) -> tuple[tuple[str, ...], np.ndarray]:
        """(kind names, each sentence's index into them): `cmmasksd.data.kinds`."""
        return expression_kinds(self.sentences["text"].tolist())

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
