"""What a stage's results depend on, derived in one place: the code from what it imports.

A stage's code is its module (`cmd: python -m pipeline.<stage>` in `dvc.yaml`) and every module of
`cmmasksd` and `pipeline` it imports, at any depth, including imports inside functions (read from
the import statements, so lazily imported code counts too), plus the package data the library reads
(model configs, profiles). Two consumers read that one answer:

- `dvc.yaml`: each stage's code deps are written from it (`python -m pipeline.identity --write`;
  a test fails while they disagree), so an edit to any module a stage imports reruns that stage;
- the sweep's Ray experiment is named after the digest of its code and of its trials' identities
  (`cmmasksd.identity.run_identity`: config, data and weights by content, precision, versions), so
  an edit or a changed input trains a new experiment instead of restoring stale trials
  (`Tuner.restore` hands back finished trials as they are).

    python -m pipeline.identity            # each stage's code deps
    python -m pipeline.identity --write    # rewrite them into dvc.yaml
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

from cmmasksd.io.digest import file_sha256
from pipeline.common import REPO_ROOT

PACKAGES = ("cmmasksd", "pipeline")
# Files the library reads at run time (named configs and profiles), with the code that reads them.
PACKAGE_DATA = ("cmmasksd/model_configs", "cmmasksd/train_configs")
DVC_FILE = "dvc.yaml"
_STAGE_PREFIX = "python -m "


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module `name` if it is one of ours, else None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(path: Path, module: str) -> list[str]:
    """Every module name an import statement in `path` may load (`from a import b`: `a` and `a.b`)."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing package
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return names


def module_closure(entries: list[str], root: Path = REPO_ROOT) -> list[Path]:
    """The files of `entries` and of every module of ours they import, at any depth, with the
    `__init__.py` of each package on the way (importing `a.b` runs `a/__init__.py`)."""
    seen: dict[str, Path] = {}
    queue = list(entries)
    while queue:
        name = queue.pop()
        if name in seen or (path := _module_file(name, root)) is None:
            continue
        seen[name] = path
        parts = name.split(".")
        queue += [".".join(parts[:i]) for i in range(1, len(parts))]
        queue += _imported_names(path, name)
    return sorted(set(seen.values()))


def stage_code(module: str, root: Path = REPO_ROOT) -> list[str]:
    """What stage `module` runs, as repo-relative paths: its import closure (a folder where every
    module in it is imported), and the library's package data when it imports the library."""
    entries = [module, f"{module}.__main__"]  # `python -m package` runs its __main__
    files = {path.relative_to(root).as_posix() for path in module_closure(entries, root)}
    if any(f.startswith("cmmasksd/") for f in files):
        files |= {folder for folder in PACKAGE_DATA if (root / folder).is_dir()}
    return sorted(_folded(files, root))


def _folded(paths: set[str], root: Path) -> set[str]:
    """`paths` with each package folder whose modules (and package data) are all in it written as the folder."""
    for package in sorted({str(Path(p).parent) for p in paths if p.endswith(".py")}, key=len):
        inside = {f.relative_to(root).as_posix() for f in (root / package).rglob("*.py") if "__pycache__" not in f.parts}
        inside |= {folder for folder in PACKAGE_DATA if folder.startswith(f"{package}/")}
        if inside <= paths:
            paths = {p for p in paths if not p.startswith(f"{package}/")} | {package}
    return paths


def code_digest(module: str = "pipeline.sweep", root: Path = REPO_ROOT) -> str:
    """SHA-256 over the relative path and bytes of every file stage `module` runs (a comment counts)."""
    digest = hashlib.sha256()
    for name in stage_code(module, root):
        path = root / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(file.relative_to(root).as_posix().encode() + b"\0")
                digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def sweep_identity(trials: list[dict[str, Any]], scheduling: dict[str, Any], code: str) -> dict[str, Any]:
    """What defines a sweep's results: its trials' identities (in grid order), how they are run where
    that changes numbers (data-parallel workers, early stopping), and the code."""
    return {"trials": trials, "scheduling": scheduling, "code": code}


def git_state(root: Path = REPO_ROOT, paths: list[str] | None = None) -> dict[str, str]:
    """The commit and whether the stage's code differs from it (the code digest then tells the truth)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    paths = paths if paths is not None else stage_code("pipeline.sweep", root)
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", *paths))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}


# ---- dvc.yaml: each stage's code deps written from its imports -----------------------------------

def _yaml():
    from ruamel.yaml import YAML  # DVC's own YAML library: keeps the file's comments and layout

    yaml = YAML()
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)  # the file's own style: "  - item"
    return yaml


def stage_modules(root: Path = REPO_ROOT) -> dict[str, str]:
    """Each `dvc.yaml` stage that runs one of our modules (`python -m pipeline.x ...`): stage -> module."""
    stages = _yaml().load((root / DVC_FILE).read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        cmd = str((stage.get("do") or stage)["cmd"])
        if cmd.startswith(_STAGE_PREFIX):
            found[name] = cmd.removeprefix(_STAGE_PREFIX).split()[0]
    return found


def is_code(dep: str) -> bool:
    """A dvc.yaml dep that is code (ours to derive), not data."""
    return dep.split("/")[0] in PACKAGES


def dvc_deps(root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """Each stage's code deps as `dvc.yaml` lists them now."""
    stages = _yaml().load((root / DVC_FILE).read_text())["stages"]
    return {name: [d for d in (stages[name].get("do") or stages[name])["deps"] if is_code(str(d))]
            for name in stage_modules(root)}


def write_dvc_deps(root: Path = REPO_ROOT) -> bool:
    """Rewrite each stage's code deps in `dvc.yaml` from its imports (data deps kept first); True if changed."""
    yaml = _yaml()
    path = root / DVC_FILE
    document = yaml.load(path.read_text())
    changed = False
    for name, module in stage_modules(root).items():
        stage = document["stages"][name].get("do") or document["stages"][name]
        data = [d for d in stage["deps"] if not is_code(str(d))]
        wanted = stage_code(module, root) + data
        if list(stage["deps"]) != wanted:
            stage["deps"].clear()
            stage["deps"].extend(wanted)
            changed = True
    if changed:
        with path.open("w") as f:
            yaml.dump(document, f)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="each DVC stage's code, from what its module imports")
    parser.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml's code deps are out of date")
    args = parser.parse_args(argv)
    if args.write:
        print("dvc.yaml updated" if write_dvc_deps() else "dvc.yaml already up to date")
        return 0
    listed = dvc_deps()
    stale = False
    for stage, module in stage_modules().items():
        derived = stage_code(module)
        mark = "" if sorted(map(str, listed[stage])) == derived else "   <- dvc.yaml differs: run with --write"
        stale |= bool(mark)
        print(f"{stage} ({module}): {len(derived)} paths{mark}")
        for path in derived:
            print(f"  {path}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
