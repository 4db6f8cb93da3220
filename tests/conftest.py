"""Shared fixtures: a tiny RefShapes dataset (raw refer layout) and its prepared splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmmasksd.data import Refer, RefShapesConfig, generate_refshapes, prepare_dataset

TINY_REFSHAPES = RefShapesConfig(image_size=64, images={"train": 20, "val": 20, "testA": 20, "testB": 20}, seed=0)
PREPARED_SIZE = 64
PREPARED_WORD_LEN = 17


@pytest.fixture(scope="session")
def refshapes_root(tmp_path_factory) -> Path:
    """RefShapes at 64 px, 20 images per split, in the refer layout (read-only for tests)."""
    root = tmp_path_factory.mktemp("refshapes")
    generate_refshapes(root, TINY_REFSHAPES)
    return root


@pytest.fixture(scope="session")
def prepared_root(refshapes_root, tmp_path_factory) -> Path:
    """`refshapes_root` prepared at size 64, word_len 17: one folder per split."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_dataset(Refer(refshapes_root, "unc"), out, PREPARED_SIZE, PREPARED_WORD_LEN, progress=False)
    return out
