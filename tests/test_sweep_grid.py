"""The sweep's grid and identity, without Ray: which trials run, in which order, and when a sweep resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.identity import CODE_PATHS, code_digest, data_digest, sweep_fingerprint
from pipeline.sweep import base_config, expand_grid, resolved_base, variant_name

PROJECT = Path(__file__).resolve().parent.parent


def test_grid_always_holds_the_baseline_and_starts_the_costliest_trials_first():
    sweep = {"seeds": [0, 1], "variants": [{"masksd.branches": "vmlsd"},
                                           {"masksd.branches": "both", "masksd.lambda_v": 0.5}]}
    trials = expand_grid(sweep)
    assert [(t["name"], t["overrides"]["seed"]) for t in trials] == [
        ("both l_v=0.5", 0), ("both l_v=0.5", 1), ("vmlsd", 0), ("vmlsd", 1), ("cris", 0), ("cris", 1)]
    assert trials[-1]["overrides"] == {"masksd.branches": "none", "seed": 1}
    assert trials[-1]["key"] == json.dumps({"masksd.branches": "none"})  # the seed is not part of the variant
    # a listed baseline is not run twice
    assert [t["name"] for t in expand_grid({"seeds": [0], "variants": [{"masksd.branches": "none"}]})] == ["cris"]


def test_variants_that_differ_outside_masksd_get_their_own_name_and_key():
    sweep = {"seeds": [0], "variants": [{"optim.lr": 0.001}, {"optim.lr": 0.002},
                                        {"masksd.branches": "none", "optim.lr": 0.001}]}
    trials = expand_grid(sweep, base_branches="both")
    names = [t["name"] for t in trials]
    assert sorted(names) == ["both optim.lr=0.001", "both optim.lr=0.002", "cris", "cris optim.lr=0.001"]
    assert len({t["key"] for t in trials}) == 4
    assert variant_name({"masksd.strategy": "random"}, base_branches="vmlsd") == "vmlsd strategy=random"


def test_a_variant_listed_twice_or_with_a_seed_is_refused():
    with pytest.raises(ValueError, match="lists the variant `both` twice"):
        expand_grid({"seeds": [0], "variants": [{"masksd.branches": "both"}, {}]}, base_branches="both")
    with pytest.raises(ValueError, match="sets `seed`"):
        expand_grid({"seeds": [0], "variants": [{"masksd.branches": "both", "seed": 3}]})


def test_fingerprint_follows_what_defines_the_trials_only():
    base = resolved_base(base_config({"train": {"profile": "sweep-refshapes", "overrides": {}}}))
    sweep = {"seeds": [0], "variants": [], "max_concurrent": 2}
    same = sweep_fingerprint(base, {**sweep, "max_concurrent": 8}, "data1", "code1")  # scheduling is not identity
    assert sweep_fingerprint(base, sweep, "data1", "code1") == same
    assert sweep_fingerprint(base, sweep, "data2", "code1") != same
    assert sweep_fingerprint(base, sweep, "data1", "code2") != same
    assert sweep_fingerprint(base, {**sweep, "seeds": [0, 1]}, "data1", "code1") != same
    longer = resolved_base(base_config({"train": {"profile": "sweep-refshapes", "overrides": {"optim": {"epochs": 9}}}}))
    assert longer["optim"]["epochs"] == 9 and longer["optim"]["lr"] == base["optim"]["lr"]
    assert sweep_fingerprint(longer, sweep, "data1", "code1") != same


def test_resolved_base_expands_the_named_model_and_drops_placement():
    base = resolved_base(base_config({"train": {"profile": "sweep-refshapes", "overrides": {}}}))
    named = json.loads((PROJECT / "cmmasksd/model_configs/cris-tiny-rn.json").read_text())
    assert base["model"]["clip"] == named["clip"]  # the JSON's content, not only its name, is hashed
    assert "out_dir" not in base and "threads" not in base and "prepared_dir" not in base["data"]


def test_code_digest_changes_with_a_comment_and_ignores_caches(tmp_path):
    for name in CODE_PATHS:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tmp_path / name)
    before = code_digest(tmp_path)
    cache = tmp_path / "cmmasksd" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "losses.cpython-311.pyc").write_bytes(b"compiled")
    assert code_digest(tmp_path) == before
    with (tmp_path / "cmmasksd" / "losses.py").open("a") as f:
        f.write("# a comment\n")
    assert code_digest(tmp_path) != before
    (tmp_path / "cmmasksd" / "losses.py").write_text((PROJECT / "cmmasksd" / "losses.py").read_text())
    assert code_digest(tmp_path) == before
    with (tmp_path / "pipeline" / "sweep.py").open("a") as f:  # the stage's own module counts too
        f.write("\n")
    assert code_digest(tmp_path) != before


def test_data_digest_follows_the_manifests(tmp_path):
    for split in ("val", "train"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "manifest.json").write_text(json.dumps({"split": split, "fingerprint": "a"}))
    before = data_digest(tmp_path)
    (tmp_path / "val" / "notes.txt").write_text("not part of the data")
    (tmp_path / "progress.json").write_text("{}")
    assert data_digest(tmp_path) == before
    for split in ("val", "train"):
        (tmp_path / split / "manifest.json").write_text(json.dumps({"split": split, "fingerprint": "b"}))
        changed = data_digest(tmp_path)
        assert changed != before
        before = changed
