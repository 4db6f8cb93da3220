"""Checkpoint files that survive a crash, a full disk or a bad copy.

`save_checkpoint` writes beside the target, reads what landed back, and only then renames it over
the previous file: the previous checkpoint stays until the new one is known good, and a full disk
is an `OSError` naming the file (torch itself reports only "unexpected pos"). `read_checkpoint`
loads with `weights_only=True`, so nothing in a file runs, and turns a truncated, corrupt or
foreign file into a `CheckpointError` naming it. `read_resume_state` is what a resumable run calls:
an unreadable resume file is moved aside (`<name>.corrupt`) and the run starts over, instead of
crashing on an unpickling traceback or training on half a state.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class _RecordingWriter:
    """A file for torch.save that keeps the first OSError: torch replaces it by its own message."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(state: Any, path: Path) -> None:
    """Write `state` to `path` atomically; on any failure the previous file at `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = _RecordingWriter(open(tmp, "wb", buffering=0))
    try:
        with writer.file:
            torch.save(state, writer)
            os.fsync(writer.file.fileno())
        read_checkpoint(tmp, mmap=True)  # a short or garbled write does not read back
    except BaseException as err:
        tmp.unlink(missing_ok=True)  # on a full disk, give the space back
        cause = writer.error or err
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, f"{path}: cannot write the checkpoint: {os.strerror(cause.errno)}; "
                                       f"the previous {path.name}, if any, is kept") from err
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_checkpoint(path: Path, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) on the CPU, every failure a one-line `CheckpointError`.

    torch wraps the safe unpickler's reason in advice to retry with weights_only off, which would
    let the file run code: that advice is not passed on.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: noise before the real error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # corrupt, truncated, foreign, or refused by the safe unpickler
        cause = err.__context__ if isinstance(err, pickle.UnpicklingError) and err.__context__ else err
        raise CheckpointError(path, f"unreadable: torch.load(weights_only=True) failed: {first_sentence(cause)}") from err


def read_resume_state(path: Path, required: Iterable[str]) -> dict | None:
    """The resume state at `path`, or None (start over) when there is none or it is unusable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = read_checkpoint(path)
        missing = sorted(set(required) - set(state)) if isinstance(state, dict) else ["(not a dict)"]
        if missing:
            raise CheckpointError(path, f"not a resume state: no {', '.join(missing)}")
    except CheckpointError as err:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s; moved to %s, starting this run over", err, aside.name)
        return None
    return state


def weights_mismatch(expected: Mapping[str, torch.Tensor], weights: Mapping[str, Any]) -> str | None:
    """How `weights` fail to fit a model with state dict `expected`: counts and a few keys, else None."""
    missing = sorted(expected.keys() - weights.keys())
    unexpected = sorted(weights.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & weights.keys()
                      if getattr(weights[k], "shape", None) != expected[k].shape)
    if not (missing or unexpected or reshaped):
        return None
    parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
             if keys]
    return "; ".join(parts)


def first_sentence(err: BaseException) -> str:
    """torch's and open_clip's messages run on (advice, every model name): the reason comes first."""
    text = str(err).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(err).__name__


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a power cut could otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
