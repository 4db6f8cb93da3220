"""The sweep's grid and identity, without Ray: which trials run, in which order, and when a sweep resumes."""

from __future__ import annotations

from pipeline.sweep import base_config, expand_grid, sweep_fingerprint


def test_grid_always_holds_the_baseline_and_starts_the_costliest_trials_first():
    sweep = {"seeds": [0, 1], "variants": [{"masksd.branches": "vmlsd"},
                                           {"masksd.branches": "both", "masksd.lambda_v": 0.5}]}
    trials = expand_grid(sweep)
    assert [(t["name"], t["overrides"]["seed"]) for t in trials] == [
        ("both l_v=0.5", 0), ("both l_v=0.5", 1), ("vmlsd", 0), ("vmlsd", 1), ("cris", 0), ("cris", 1)]
    assert trials[-1]["overrides"] == {"masksd.branches": "none", "seed": 1}
    # a listed baseline is not run twice
    assert [t["name"] for t in expand_grid({"variants": [{"masksd.branches": "none"}]})] == ["cris"]


def test_fingerprint_follows_what_defines_the_trials_only():
    params = {"train": {"profile": "sweep-refshapes", "overrides": {}}}
    base = base_config(params)
    sweep = {"seeds": [0], "variants": [], "max_concurrent": 2}
    same = sweep_fingerprint(base, {**sweep, "max_concurrent": 8}, "data1")  # scheduling is not identity
    assert sweep_fingerprint(base, sweep, "data1") == same
    assert sweep_fingerprint(base, sweep, "data2") != same
    longer = base_config({"train": {"profile": "sweep-refshapes", "overrides": {"optim": {"epochs": 9}}}})
    assert longer["optim"]["epochs"] == 9 and longer["optim"]["lr"] == base["optim"]["lr"]
    assert sweep_fingerprint(longer, sweep, "data1") != same
