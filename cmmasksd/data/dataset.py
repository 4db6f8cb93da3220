"""Torch view of a prepared split: one item per object (training) or per expression (evaluation).

Training draws one of the object's expressions per epoch, as CRIS does. The draw depends only
on (seed, epoch, index), so it is the same whatever the number of DataLoader workers or
processes; the epoch comes with each key (`EpochBatchSampler`), so workers that live for the
whole run draw each epoch's expressions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from cmmasksd.data.prepared import clip_tokenizer
from cmmasksd.data.split import PreparedSplit


class RefSegDataset(Dataset):
    """Items: image uint8 [3,S,S], tokens long [word_len], mask float32 [1,S,S], content box [4], sentence_idx,
    kind, object_idx.

    Images stay uint8 (the model normalises on the device). `blank_text` replaces every
    expression by the empty string (the no-language ablation). `max_items` keeps the first N
    items, for tiny test runs.
    """

    def __init__(self, split: PreparedSplit, train: bool, seed: int = 0, blank_text: bool = False,
                 max_items: int | None = None):
        self.split = split
        self.train = train
        self.seed = seed
        n = split.n_objects if train else split.n_sentences
        self._len = n if max_items is None else min(n, max_items)
        self._blank = np.asarray(clip_tokenizer(split.word_len)([""])[0]) if blank_text else None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        """`index` (epoch 0), or `(epoch, index)`: the key `EpochBatchSampler` yields."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} items")
        if self.train:
            obj_idx = index
            sentences = self.split.sentences_of(obj_idx)
            rng = np.random.default_rng([self.seed, epoch, index])
            sent_idx = sentences[int(rng.integers(len(sentences)))]
        else:
            sent_idx = index
            obj_idx = int(self.split.sentence_object[sent_idx])
        tokens = self._blank if self._blank is not None else self.split.tokens(sent_idx)
        image_idx = int(self.split.object_image[obj_idx])
        image = self.split.image(image_idx)
        meta = self.split.meta(image_idx)
        return {
            # the letterboxed picture's box in the input (top, left, bottom, right): the rest is border
            "content": torch.tensor([meta.pad_y, meta.pad_x, meta.pad_y + meta.content_h, meta.pad_x + meta.content_w]),
            "image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
            "tokens": torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
            "mask": torch.from_numpy(self.split.mask(obj_idx)).float()[None],
            "sentence_idx": sent_idx,
            "kind": int(self.split.kinds[1][sent_idx]),  # the expression's kind (`cmmasksd.data.kinds`)
            "object_idx": obj_idx,
        }
