"""The sweep's grid and identity, without Ray: which trials run, in which order, and when a sweep resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cmmasksd.identity import digest, prepared_digest
from pipeline.contract import BASELINE_KEY, variant_name
from pipeline.identity import code_digest, sweep_identity
from pipeline.params_schema import AshaParams, ResourcesParams, SweepParams, TrainParams
from pipeline.sweep import base_config, expand_grid, trial_identities
from pipeline.trial import Trial

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN = TrainParams(profile="sweep-refshapes")


def sweep(seeds=(0,), variants=(), **fields) -> SweepParams:
    return SweepParams(name="grid", dataset="refshapes", seeds=list(seeds), variants=list(variants), **fields)


def test_grid_always_holds_the_baseline_and_starts_the_costliest_trials_first():
    grid = sweep([0, 1], [{"masksd.branches": "vmlsd"}, {"masksd.branches": "both", "masksd.lambda_v": 0.5}])
    trials = expand_grid(grid)
    assert all(isinstance(t, Trial) for t in trials)
    assert [(t.name, t.seed) for t in trials] == [
        ("both l_v=0.5", 0), ("both l_v=0.5", 1), ("vmlsd", 0), ("vmlsd", 1), ("cris", 0), ("cris", 1)]
    assert trials[-1].settings == {"masksd.branches": "none", "seed": 1}
    assert trials[-1].overrides == {"masksd.branches": "none"}  # the seed is not part of the variant
    assert trials[-1].key == json.dumps({"masksd.branches": "none"}) == BASELINE_KEY
    # a listed baseline is not run twice
    assert [t.name for t in expand_grid(sweep([0], [{"masksd.branches": "none"}]))] == ["cris"]


def test_variants_that_differ_outside_masksd_get_their_own_name_and_key():
    grid = sweep([0], [{"optim.lr": 0.001}, {"optim.lr": 0.002}, {"masksd.branches": "none", "optim.lr": 0.001}])
    trials = expand_grid(grid, base_branches="both")
    names = [t.name for t in trials]
    assert sorted(names) == ["both optim.lr=0.001", "both optim.lr=0.002", "cris", "cris optim.lr=0.001"]
    assert len({t.key for t in trials}) == 4
    assert variant_name({"masksd.strategy": "random"}, base_branches="vmlsd") == "vmlsd strategy=random"


def test_a_variant_listed_twice_or_with_a_seed_is_refused():
    with pytest.raises(ValueError, match="lists the variant `both` twice"):
        expand_grid(sweep([0], [{"masksd.branches": "both"}, {}]), base_branches="both")
    with pytest.raises(ValueError, match="sets `seed`"):
        expand_grid(sweep([0], [{"masksd.branches": "both", "seed": 3}]))


def experiment_digest(grid: SweepParams, prepared: Path, train: TrainParams = DEFAULT_TRAIN, code: str = "code1",
                      threads: int = 1) -> str:
    """What names the sweep's Ray experiment, computed as `run_sweep` does (its scheduling dict included)."""
    trials = expand_grid(grid, "both")
    identities = trial_identities(base_config(train), trials, prepared, threads, grid.resources)
    scheduling = {"workers": grid.resources.workers, "asha": grid.asha.model_dump()}
    return digest(sweep_identity(identities, scheduling, code))


def test_experiment_name_follows_what_defines_the_trials_only(prepared_root, tmp_path):
    same = experiment_digest(sweep(max_concurrent=2), prepared_root)
    assert experiment_digest(sweep(max_concurrent=8), prepared_root) == same  # packing trials is not identity
    moved = tmp_path / "moved"
    shutil.copytree(prepared_root, moved)
    assert experiment_digest(sweep(), moved) == same  # the data by content, not by path
    manifest = moved / "val" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "word_len": 22}))
    assert experiment_digest(sweep(), moved) != same
    assert experiment_digest(sweep(), prepared_root, code="code2") != same
    assert experiment_digest(sweep([0, 1]), prepared_root) != same
    longer = TrainParams(profile="sweep-refshapes", overrides={"optim": {"epochs": 9}})
    assert experiment_digest(sweep(), prepared_root, train=longer) != same
    assert experiment_digest(sweep(), prepared_root, threads=2) != same  # 1 and 2 CPU threads train other weights
    assert experiment_digest(sweep(asha=AshaParams(enabled=True)), prepared_root) != same  # stops trials early
    assert experiment_digest(sweep(resources=ResourcesParams(workers=2)), prepared_root) != same  # data-parallel


def test_trial_identity_expands_the_named_model_and_leaves_out_where_it_runs(prepared_root):
    (trial,) = expand_grid(sweep([0], [{"masksd.branches": "none"}]))
    (identity,) = trial_identities(base_config(DEFAULT_TRAIN), [trial], prepared_root, 1, ResourcesParams())
    named = json.loads((PROJECT / "cmmasksd/model_configs/cris-tiny-rn.json").read_text())
    assert identity["model"]["clip"] == named["clip"]  # the JSON's content, not only its name, is hashed
    assert "run" not in identity and "threads" not in identity and "device" not in identity
    assert identity["data"]["prepared_dir"] == f"sha256:{prepared_digest(prepared_root)}"
    assert identity["runtime"]["device"] == "cpu" and identity["runtime"]["threads"] == 1  # what the machine runs


def test_code_digest_changes_with_a_comment_and_ignores_caches(tmp_path):
    for name in ("cmmasksd", "pipeline"):
        shutil.copytree(PROJECT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest("pipeline.sweep", tmp_path)
    cache = tmp_path / "cmmasksd" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "losses.cpython-311.pyc").write_bytes(b"compiled")
    assert code_digest("pipeline.sweep", tmp_path) == before
    with (tmp_path / "cmmasksd" / "losses.py").open("a") as f:
        f.write("# a comment\n")
    assert code_digest("pipeline.sweep", tmp_path) != before
    (tmp_path / "cmmasksd" / "losses.py").write_text((PROJECT / "cmmasksd" / "losses.py").read_text())
    assert code_digest("pipeline.sweep", tmp_path) == before
    named = tmp_path / "cmmasksd" / "model_configs" / "cris-tiny-rn.json"  # package data the library reads
    named.write_text(named.read_text() + "\n")
    assert code_digest("pipeline.sweep", tmp_path) != before
    named.write_text((PROJECT / "cmmasksd" / "model_configs" / "cris-tiny-rn.json").read_text())
    with (tmp_path / "pipeline" / "sweep.py").open("a") as f:  # the stage's own module counts too
        f.write("\n")
    assert code_digest("pipeline.sweep", tmp_path) != before


def test_prepared_digest_follows_the_manifests_content_not_their_paths(tmp_path):
    def write(split: str, refs_sha: str, root: str) -> None:
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / "manifest.json").write_text(json.dumps({
            "split": split, "size": 64, "word_len": 17,
            "source": {"root": root, "split_by": "unc", "refs": {"path": f"{root}/refs(unc).p", "sha256": refs_sha}}}))

    for split in ("val", "train"):
        write(split, "a", "/data/raw")
    before = prepared_digest(tmp_path)
    (tmp_path / "val" / "notes.txt").write_text("not part of the data")
    (tmp_path / "progress.json").write_text("{}")
    assert prepared_digest(tmp_path) == before
    for split in ("val", "train"):
        write(split, "a", "/elsewhere/raw")  # the same annotations, read from another folder
    assert prepared_digest(tmp_path) == before
    for split in ("val", "train"):
        write(split, "b", "/data/raw")
        changed = prepared_digest(tmp_path)
        assert changed != before
        before = changed
