"""What a stage depends on follows from what it imports: dvc.yaml, the sweep's identity and the
modules Python really loads agree, and an edit to any imported module is seen by both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import REPO_ROOT
from pipeline.identity import code_digest, dvc_deps, module_closure, stage_code, stage_modules

STAGES = ("fetch", "preprocess", "pretrain", "sweep", "report")


def _files(root: Path, paths: list[str]) -> list[Path]:
    """`stage_code` entries as files (a folder entry: every file in it)."""
    found = []
    for name in paths:
        path = root / name
        found += [f for f in sorted(path.rglob("*")) if f.is_file() and "__pycache__" not in f.parts] \
            if path.is_dir() else [path]
    return found


def _copy_code(root: Path) -> None:
    for name in ("cmmasksd", "pipeline"):
        shutil.copytree(REPO_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")


def test_every_stage_in_dvc_yaml_runs_one_of_our_modules():
    assert set(stage_modules()) == set(STAGES)


def test_dvc_yaml_lists_what_each_stage_imports():
    listed = dvc_deps()
    for stage, module in stage_modules().items():
        assert sorted(map(str, listed[stage])) == stage_code(module), (
            f"dvc.yaml's code deps of `{stage}` are stale: run `python -m pipeline.identity --write`")


def test_the_sweep_and_report_cover_the_modules_the_old_hand_lists_missed():
    sweep, report = stage_code("pipeline.sweep"), stage_code("pipeline.report")
    assert {"pipeline/trial.py", "pipeline/storage.py", "pipeline/contract.py"} <= set(sweep)
    assert {"cmmasksd/metrics.py", "cmmasksd/stats.py", "pipeline/common.py", "pipeline/params_schema.py",
            "pipeline/report"} <= set(report)
    assert "cmmasksd/model" in sweep  # through the trial's lazy `from cmmasksd.train import train`
    assert "pipeline/fetch.py" not in sweep and "cmmasksd/cli.py" not in sweep  # not what it runs


@pytest.mark.parametrize("stage", STAGES)
def test_the_closure_holds_every_module_python_loads(stage):
    """A cross-check of the import reader: the modules of ours a fresh interpreter loads for the
    stage (the sweep: also what its trials import lazily) are all among the stage's code."""
    module = stage_modules()[stage]
    entries = [module] + (["pipeline.trial", "cmmasksd.train"] if stage == "sweep" else [])
    script = (f"import importlib, json, sys; [importlib.import_module(m) for m in {entries!r}]; "
              "print(json.dumps([getattr(m, '__file__', None) for m in list(sys.modules.values())]))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                                       text=True, check=True).stdout)
    ours = {Path(f).resolve() for f in loaded if f and Path(f).resolve().is_relative_to(REPO_ROOT)
            and Path(f).resolve().relative_to(REPO_ROOT).parts[0] in ("cmmasksd", "pipeline")}
    covered = {f.resolve() for f in _files(REPO_ROOT, stage_code(module))}
    assert ours and ours <= covered, sorted(str(p.relative_to(REPO_ROOT)) for p in ours - covered)


def test_relative_imports_and_package_inits_are_followed(tmp_path):
    pkg = tmp_path / "pipeline"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("def run():\n    from .sub import helper\n")
    (pkg / "sub" / "__init__.py").write_text("from . import other\n")
    (pkg / "sub" / "helper.py").write_text("")
    (pkg / "sub" / "other.py").write_text("import json\n")
    (pkg / "unused.py").write_text("")
    found = {p.relative_to(tmp_path).as_posix() for p in module_closure(["pipeline.stage"], tmp_path)}
    assert found == {"pipeline/__init__.py", "pipeline/stage.py", "pipeline/sub/__init__.py",
                     "pipeline/sub/helper.py", "pipeline/sub/other.py"}


def test_a_comment_in_any_module_the_sweep_imports_changes_its_identity(tmp_path):
    """The bug this guards: `pipeline/trial.py` was missing from the hand-written list, so an edit to
    it left the Ray experiment name unchanged and a rerun restored the old trials."""
    _copy_code(tmp_path)
    before = code_digest("pipeline.sweep", tmp_path)
    files = _files(tmp_path, stage_code("pipeline.sweep", tmp_path))
    assert tmp_path / "pipeline" / "trial.py" in files
    for file in files:
        original = file.read_bytes()
        file.write_bytes(original + (b"\n# edited\n" if file.suffix == ".py" else b"\n"))
        assert code_digest("pipeline.sweep", tmp_path) != before, file.relative_to(tmp_path)
        file.write_bytes(original)
    assert code_digest("pipeline.sweep", tmp_path) == before
    (tmp_path / "pipeline" / "fetch.py").write_text("# not run by the sweep\n", encoding="utf-8")
    assert code_digest("pipeline.sweep", tmp_path) == before


def _dvc(root: Path, *args: str) -> str:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=root, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_dvc_sees_an_edit_to_any_module_the_sweep_or_report_imports(tmp_path):
    """In a scratch DVC project holding this repo's code, dvc.yaml and params: record the sweep and
    report as done, append a comment to every module each imports, and `dvc status` lists each one."""
    _copy_code(tmp_path)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    for stub in ("data/prepared/refshapes/val/manifest.json", "data/pretrained/tiny-rn-refshapes.pt",
                 "sweep/trials.csv", "sweep/best_config.yaml", "sweep/sweep.json", "reports/ablation.md",
                 "reports/ablation.csv", "reports/ablation.tex", "reports/metrics.json",
                 "reports/figures/learning_curves.png", "reports/curves/cris_seed0.csv"):
        (tmp_path / stub).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / stub).write_text("{}\n")
    _dvc(tmp_path, "init", "--no-scm", "-q")
    _dvc(tmp_path, "commit", "-f", "-q", "sweep", "report")
    assert json.loads(_dvc(tmp_path, "status", "--json", "sweep", "report")) == {}

    for stage, module in (("sweep", "pipeline.sweep"), ("report", "pipeline.report")):
        listed = stage_code(module, tmp_path)
        for file in _files(tmp_path, listed):
            if file.suffix == ".py":
                file.write_text(file.read_text() + "\n# edited\n")
        status = json.loads(_dvc(tmp_path, "status", "--json", stage))
        changed = {path for entry in status.get(stage, []) if isinstance(entry, dict)
                   for path in entry.get("changed deps", {})}
        code_listed = {p for p in listed if any(f.suffix == ".py" for f in _files(tmp_path, [p]))}
        assert code_listed <= changed, sorted(code_listed - changed)
        _dvc(tmp_path, "commit", "-f", "-q", "sweep", "report")
