"""Checkpoints under faults: a full disk mid-save, a truncated or corrupt `last.pt`.

A full disk is tested twice: on a real full file system (a small tmpfs the test mounts, where the
machine lets it: root, as in CI) and with ENOSPC injected into the write, which runs anywhere.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

import pytest
import torch

from cmmasksd.config import build_config
from cmmasksd.io import checkpoint
from cmmasksd.io.checkpoint import CheckpointError, read_checkpoint, read_resume_state, save_checkpoint
from cmmasksd.train import CHECKPOINT_DIR, LAST, train
from helpers import Interrupt, debug_config, stop_after


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 160 MB tmpfs: room for one epoch of the tiny model's checkpoints (~140 MB), not two."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-ENOSPC test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


TWO_EPOCHS = {"optim.epochs": 2, "optim.milestones": []}


def two_epochs(prepared_root, out_dir):
    """The debug profile for 2 epochs (a module fixture needs it too: `debug_config`, which `tiny_config` wraps)."""
    return build_config(debug_config(prepared_root, out_dir, **TWO_EPOCHS))


@pytest.fixture(scope="module")
def straight_weights(prepared_root, tmp_path_factory) -> dict:
    """The final weights of an uninterrupted two-epoch run: what every recovered run must end with."""
    out_dir = tmp_path_factory.mktemp("straight")
    train(two_epochs(prepared_root, out_dir))
    return read_checkpoint(out_dir / CHECKPOINT_DIR / LAST)["model"]


def test_save_on_a_full_file_system_names_the_file_and_keeps_the_previous(small_tmpfs):
    path = small_tmpfs / "last.pt"
    small = {"w": torch.arange(10.0)}
    save_checkpoint(small, path)
    with pytest.raises(OSError, match=r"last\.pt: cannot write the checkpoint: No space left on device") as err:
        save_checkpoint({"w": torch.zeros(50_000_000)}, path)  # 200 MB
    assert err.value.errno == errno.ENOSPC
    assert not path.with_name("last.pt.tmp").exists()  # the space is given back
    equal_weights(read_checkpoint(path), small)


@pytest.mark.slow
def test_full_disk_in_training_stops_with_the_path_and_a_rerun_resumes(prepared_root, small_tmpfs, tmp_path,
                                                                        straight_weights):
    run_dir = small_tmpfs / "run"
    with pytest.raises(OSError, match=rf"{run_dir / CHECKPOINT_DIR}/(last|best)\.pt: cannot write the checkpoint"):
        train(two_epochs(prepared_root, run_dir))
    assert read_resume_state(run_dir / CHECKPOINT_DIR / LAST, ["epoch"])["epoch"] == 1  # epoch 1 intact

    moved = tmp_path / "run"  # the user makes room: here, the run moves to a disk with space
    shutil.copytree(run_dir, moved)
    resumed = []
    train(two_epochs(prepared_root, moved), on_epoch=lambda report: resumed.append(report.epoch))
    assert resumed == [2]
    equal_weights(read_checkpoint(moved / CHECKPOINT_DIR / LAST)["model"], straight_weights)


class FullDisk:
    """A file on a disk that fills after 1 MB: writes then fail with ENOSPC, as on a real full disk."""

    def __init__(self, raw):
        self.raw, self.written = raw, 0

    def write(self, data) -> int:
        if self.written > 2**20:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.raw.close()


@pytest.mark.slow
def test_injected_enospc_keeps_the_previous_checkpoint(prepared_root, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_init = checkpoint._RecordingWriter.__init__
    resume_saves = []

    def second_resume_save_fills_the_disk(self, file):
        real_init(self, file)
        if file.name.endswith(f"{LAST}.tmp"):
            resume_saves.append(file.name)
            if len(resume_saves) == 2:
                self.file = FullDisk(file)

    monkeypatch.setattr(checkpoint._RecordingWriter, "__init__", second_resume_save_fills_the_disk)
    with pytest.raises(OSError, match=rf"{run_dir / CHECKPOINT_DIR / LAST}: cannot write the checkpoint: No space"):
        train(two_epochs(prepared_root, run_dir))
    assert read_checkpoint(run_dir / CHECKPOINT_DIR / LAST)["epoch"] == 1
    assert not (run_dir / CHECKPOINT_DIR / f"{LAST}.tmp").exists()


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # a copy cut short
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbled":  # bytes flipped in the zip's directory at the end
        path.write_bytes(data[:-200] + bytes(b ^ 0xFF for b in data[-200:]))
    else:  # a readable file that is not a resume state
        torch.save({"weights": torch.zeros(2)}, path)


@pytest.mark.parametrize("how", ["truncated", "garbled", "foreign"])
def test_unusable_resume_state_is_named_and_set_aside(tmp_path, caplog, how):
    last = tmp_path / LAST
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, last)
    damage(last, how)
    with caplog.at_level(logging.WARNING, logger="cmmasksd.io.checkpoint"):
        assert read_resume_state(last, ["model", "epoch"]) is None
    assert f"{last}:" in caplog.text and "starting this run over" in caplog.text
    assert not last.exists() and last.with_name("last.pt.corrupt").exists()


@pytest.mark.slow
def test_run_with_a_truncated_last_checkpoint_starts_over_to_the_same_weights(prepared_root, tmp_path, caplog,
                                                                             straight_weights):
    run_dir = tmp_path / "run"
    last = run_dir / CHECKPOINT_DIR / LAST
    with pytest.raises(Interrupt):  # a crash after epoch 1's checkpoint
        train(two_epochs(prepared_root, run_dir), on_epoch=stop_after(1))
    damage(last, "truncated")
    epochs = []
    with caplog.at_level(logging.WARNING, logger="cmmasksd.io.checkpoint"):
        train(two_epochs(prepared_root, run_dir), on_epoch=lambda report: epochs.append(report.epoch))
    assert epochs == [1, 2]  # from scratch: never from half a state
    assert f"{last}: unreadable" in caplog.text
    equal_weights(read_checkpoint(last)["model"], straight_weights)


def test_unreadable_file_is_a_checkpoint_error_not_an_unpickling_traceback(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"last\.pt: unreadable: torch\.load\(weights_only=True\) failed"):
        read_checkpoint(path)
