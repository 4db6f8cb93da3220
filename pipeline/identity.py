"""What a sweep's numbers depend on, as digests: the identity of its Ray experiment.

`Tuner.restore` hands back finished trials as they are, so a Ray experiment may be restored
only when nothing that can change a result has changed: the code the sweep stage runs
(`cmmasksd/`, with its model-config JSON and shipped profiles, and the stage's own modules), the
resolved base config, the grid and the prepared data. Any change names a new experiment, which
trains from scratch; an unchanged one resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from cmmasksd.io.digest import file_sha256
from pipeline.common import REPO_ROOT

# What the sweep stage executes; `dvc.yaml` lists the same paths as the stage's code deps.
CODE_PATHS = ("cmmasksd", "pipeline/common.py", "pipeline/identity.py", "pipeline/params_schema.py",
              "pipeline/preflight.py", "pipeline/sweep.py", "pipeline/tracking.py")
SCHEDULING_KEYS = ("max_concurrent",)  # how trials are packed onto the machine, not what they compute


def _code_files(root: Path, paths: tuple[str, ...]) -> list[Path]:
    files = []
    for name in paths:
        path = root / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [f for f in candidates if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    return files


def code_digest(root: Path = REPO_ROOT, paths: tuple[str, ...] = CODE_PATHS) -> str:
    """SHA-256 over the relative path and bytes of every file the stage runs (a comment counts)."""
    digest = hashlib.sha256()
    for file in _code_files(root, paths):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def data_digest(prepared_dir: Path) -> str:
    """SHA-256 of the prepared splits' manifests (each holds its split's input digests and settings)."""
    digest = hashlib.sha256()
    for manifest in sorted(prepared_dir.glob("*/manifest.json")):
        digest.update(manifest.parent.name.encode() + b"\0" + manifest.read_bytes())
    return digest.hexdigest()


def sweep_fingerprint(resolved_base: dict[str, Any], sweep: dict[str, Any], data: str, code: str) -> str:
    """Short hash of everything that defines the trials' results; the Ray experiment is named after it."""
    grid = {k: v for k, v in sweep.items() if k not in SCHEDULING_KEYS}
    keys = {"base": resolved_base, "sweep": grid, "data": data, "code": code}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


def git_state(root: Path = REPO_ROOT) -> dict[str, str]:
    """The commit and whether the stage's code differs from it (the code digest then tells the truth)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", *CODE_PATHS))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}
