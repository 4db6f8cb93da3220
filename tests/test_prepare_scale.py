"""Preprocessing at COCO scale: worker processes, crash and resume, skipping finished splits.

Runs on 40 COCO-like 640x480 JPEGs prepared at 416 px, the real image and input sizes.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmmasksd.data import PreparedSplit, PrepareReport, Refer, format_reports, prepare_split
from cmmasksd.data.cocolike import generate_cocolike
from cmmasksd.data.letterbox import BORDER_RGB
from helpers import CrashingTokenizer

SIZE, WORD_LEN = 416, 17  # CrashingTokenizer tokenizes to 17, as CLIP's for RefCOCO
ARRAYS = ("images.npy", "masks.npy", "tokens.npy", "skipped.json")


@pytest.fixture(scope="module")
def cocolike_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cocolike")
    generate_cocolike(root, {"train": 40})
    return root


@pytest.fixture(scope="module")
def reference(cocolike_root, tmp_path_factory) -> PrepareReport:
    """The train split prepared in one go, in this process."""
    out = tmp_path_factory.mktemp("reference")
    return prepare_split(Refer(cocolike_root, "unc"), "train", out, SIZE, WORD_LEN, CrashingTokenizer(), progress=False)


def assert_same_split(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert filecmp.cmp(a / name, b / name, shallow=False), name
    for table in ("images", "objects", "sentences"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet"))
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    assert not (b / "progress.json").exists()


def test_two_workers_write_what_one_writes(cocolike_root, reference, tmp_path):
    report = prepare_split(Refer(cocolike_root, "unc"), "train", tmp_path, SIZE, WORD_LEN, CrashingTokenizer(),
                           progress=False, workers=2)
    counts = Refer(cocolike_root, "unc").split_counts()["train"]
    assert (report.n_images, report.n_objects, report.n_sentences) == (40, counts["refs"], counts["expressions"])
    assert report.status == "prepared" and report.skipped == []
    assert_same_split(reference.split_dir, report.split_dir)
    split = PreparedSplit(report.split_dir)
    assert split._images.shape == (40, SIZE, SIZE, 3)
    assert split.images.width.tolist().count(480) == 8  # every 5th image is portrait: letterboxed sideways
    portrait = split.image(4)  # 640 high: content 312 wide, centred
    assert (portrait[:, :52] == BORDER_RGB).all() and (portrait[:, 52:364] != BORDER_RGB).any(axis=-1).mean() > 0.9


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(cocolike_root, reference, tmp_path):
    script = (
        "import sys; from pathlib import Path; from cmmasksd.data import Refer, prepare_split; "
        "from helpers import CrashingTokenizer; "
        f"prepare_split(Refer(Path({str(cocolike_root)!r}), 'unc'), 'train', Path({str(tmp_path)!r}), {SIZE}, "
        f"{WORD_LEN}, CrashingTokenizer(kill_at=21), progress=False, workers=2, flush_every=8)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    # Returns only once the pool workers, which share the output pipes, have exited too.
    crashed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    split_dir = tmp_path / "train"
    assert json.loads((split_dir / "progress.json").read_text())["done"] == 16  # the last checkpoint before 21
    assert not (split_dir / "manifest.json").exists()

    tokenizer = CrashingTokenizer()
    report = prepare_split(Refer(cocolike_root, "unc"), "train", tmp_path, SIZE, WORD_LEN, tokenizer, progress=False)
    assert (report.status, report.resumed_from) == ("resumed", 16)
    assert tokenizer.calls == 40 - 16  # only the images after the checkpoint were done again
    assert_same_split(reference.split_dir, split_dir)


def test_interrupted_run_keeps_every_finished_image(cocolike_root, reference, tmp_path):
    """Ctrl-C (an exception) saves progress on the way out, not just at checkpoints."""
    with pytest.raises(KeyboardInterrupt):
        prepare_split(Refer(cocolike_root, "unc"), "train", tmp_path, SIZE, WORD_LEN,
                      CrashingTokenizer(interrupt_at=14), progress=False, flush_every=1000)
    assert json.loads((tmp_path / "train" / "progress.json").read_text())["done"] == 13
    report = prepare_split(Refer(cocolike_root, "unc"), "train", tmp_path, SIZE, WORD_LEN, CrashingTokenizer(),
                           progress=False)
    assert (report.status, report.resumed_from) == ("resumed", 13)
    assert_same_split(reference.split_dir, tmp_path / "train")


def test_finished_split_is_skipped_until_inputs_or_settings_change(refshapes_root, tmp_path):
    refer = Refer(refshapes_root, "unc")
    first = prepare_split(refer, "val", tmp_path, 64, 17, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.split_dir.iterdir()}
    again = prepare_split(refer, "val", tmp_path, 64, 17, progress=False)
    assert again.status == "up to date"
    assert (again.n_images, again.n_objects, again.n_sentences, again.skipped) == (
        first.n_images, first.n_objects, first.n_sentences, first.skipped)
    assert {p.name: p.stat().st_mtime_ns for p in first.split_dir.iterdir()} == mtimes

    changed = prepare_split(refer, "val", tmp_path, 64, 22, progress=False)  # another word_len
    assert changed.status == "prepared" and PreparedSplit(changed.split_dir).word_len == 22


def test_progress_of_other_inputs_is_not_resumed(refshapes_root, tmp_path):
    split_dir = tmp_path / "val"
    split_dir.mkdir()
    (split_dir / "progress.json").write_text(json.dumps({"fingerprint": "other", "done": 5, "bad": {}}))
    report = prepare_split(Refer(refshapes_root, "unc"), "val", tmp_path, 64, 17, progress=False)
    assert (report.status, report.resumed_from) == ("prepared", 0)
    assert not (split_dir / "progress.json").exists()

    # Progress whose arrays were replaced (other shapes) is not trusted either.
    fingerprint = json.loads((split_dir / "manifest.json").read_text())["fingerprint"]
    (split_dir / "manifest.json").unlink()
    (split_dir / "progress.json").write_text(json.dumps({"fingerprint": fingerprint, "done": 5, "bad": {}}))
    np.save(split_dir / "images.npy", np.zeros((1, 64, 64, 3), np.uint8))
    again = prepare_split(Refer(refshapes_root, "unc"), "val", tmp_path, 64, 17, progress=False)
    assert (again.status, again.resumed_from) == ("prepared", 0) and again.n_images == report.n_images


def test_report_prints_as_a_table(refshapes_root, prepared_root):
    skipped = [{"reason": "missing image file"}, {"reason": "bad image: 10x10, instances.json says 64x64"},
               {"reason": "bad image: truncated"}]
    reports = {"val": PrepareReport("val", prepared_root / "val", 20, 41, 88, skipped, "resumed", 7, 3.25)}
    text = format_reports(reports)
    header, _, row = (line.split("|")[1:-1] for line in text.splitlines()[:3])
    assert [cell.strip() for cell in header] == ["split", "images", "objects", "sentences", "skipped", "status",
                                                 "seconds"]
    assert [cell.strip() for cell in row] == ["val", "20", "41", "88", "3", "resumed", "3.2"]
    assert "skipped 2 x bad image (see <split>/skipped.json)" in text
    assert "skipped 1 x missing image file" in text
    assert str(reports["val"]) == "val: 20 images, 41 objects, 88 sentences, 3 skipped; resumed in 3.2 s"
