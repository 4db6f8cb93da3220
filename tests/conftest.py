"""Shared fixtures: a tiny RefShapes dataset (raw refer layout), its prepared splits, and the one tiny
training setting on them (`tiny_config`). Helpers shared by test modules live in `helpers.py`."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import debug_config

from cmmasksd.data import Refer, RefShapesConfig, generate_refshapes, prepare_dataset

TINY_REFSHAPES = RefShapesConfig(image_size=64, images={"train": 20, "val": 20, "testA": 20, "testB": 20}, seed=0)
PREPARED_SIZE = 64
PREPARED_WORD_LEN = 17


@pytest.fixture(autouse=True, scope="session")
def ray_temp_dir():
    """Every Ray the tests start (in-process, in a stage's subprocess, `ray start`) keeps its
    session folder here, and the folder goes when the session ends: a sweep stages its trials'
    checkpoints there, hundreds of MB per test. A short path, as Ray's sockets must fit 107 bytes."""
    folder = tempfile.mkdtemp(prefix="cmray-", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = folder
    yield Path(folder)
    if previous is None:
        os.environ.pop("RAY_TMPDIR")
    else:
        os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def drop_finished_ray_sessions(ray_temp_dir):
    """After each test, remove the session folders of Rays that have stopped (none is shared
    between tests), so the suite's disk use stays that of its largest test."""
    yield
    ray = sys.modules.get("ray")  # imported only if a test started Ray in this process
    if ray is not None and ray.is_initialized():
        return
    for session in (ray_temp_dir / "ray").glob("session_2*"):
        shutil.rmtree(session, ignore_errors=True)


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


@pytest.fixture
def tiny_config(prepared_root, tmp_path):
    """A factory of raw training configs: `tiny_config(out_dir=None, **overrides) -> dict`.

    The shipped `debug` profile (3 epochs of the tiny RN on 32 objects, seconds on a CPU) on
    `prepared_root`, writing to `out_dir` (default: a fresh `run`, `run-2`, ... folder under the
    test's tmp_path), with dotted overrides (`optim__epochs=1` or `**{"optim.epochs": 1}`).
    """
    made = 0

    def make(out_dir: str | Path | None = None, **overrides) -> dict:
        nonlocal made
        made += 1
        if out_dir is None:
            out_dir = tmp_path / ("run" if made == 1 else f"run-{made}")
        return debug_config(prepared_root, out_dir, **overrides)

    return make


@pytest.fixture(scope="module")
def tiny_cris():
    """One tiny CRIS per backbone (`rn`, `vit`), with mask tokens; tests work on deep copies (`helpers.wrap`)."""
    import torch

    from cmmasksd.model import create_cris, get_model_config

    torch.manual_seed(0)
    return {kind: create_cris(get_model_config(name), with_mask_tokens=True)
            for kind, name in {"rn": "cris-tiny-rn", "vit": "cris-tiny-vit"}.items()}
