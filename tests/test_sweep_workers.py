"""Multi-worker trials: `sweep.resources.workers: 2` makes each trial a Ray Train run of 2 gloo workers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_pipeline import child_runs, make_repo, run_stage

from cmmasksd.predict import load_checkpoint

pytestmark = pytest.mark.slow


def test_a_sweep_with_two_workers_per_trial_tracks_and_reports_like_one_worker(prepared_root, tmp_path):
    repo = make_repo(tmp_path / "two", prepared_root, **{"sweep.resources": {"cpu": 1, "gpu": 0, "workers": 2}})
    result = run_stage(repo, "pipeline.sweep")
    assert "at most 1 trial(s) at once, each 2 worker(s)" in result.stdout + result.stderr  # 2 cores: one trial

    trials = pd.read_csv(repo / "sweep" / "trials.csv")
    assert sorted(trials["variant"]) == ["both", "cris"] and (trials["status"] == "FINISHED").all()
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    assert len(runs) == 2  # one MLflow child run per trial, logged by rank 0 alone
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["masksd.branches"] in {"none", "both"}
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [1, 2]
        assert {"per_expression", "figures", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        checkpoint = Path(run.data.tags["checkpoint_path"])  # in Ray storage, written through Ray Train
        assert checkpoint.name == "best.pt" and checkpoint.is_relative_to(repo / "ray_results")
        assert load_checkpoint(checkpoint).config.masksd.branches == run.data.params["masksd.branches"]
    run_stage(repo, "pipeline.report", "--sweep-file", "sweep/sweep.json", "--out", "reports")

    one = make_repo(tmp_path / "one", prepared_root)
    run_stage(one, "pipeline.sweep")
    run_stage(one, "pipeline.report", "--sweep-file", "sweep/sweep.json", "--out", "reports")
    one_trials = pd.read_csv(one / "sweep" / "trials.csv")
    assert list(trials.columns) == list(one_trials.columns)
    for name in ("ablation.csv",):
        assert list(pd.read_csv(repo / "reports" / name).columns) == list(pd.read_csv(one / "reports" / name).columns)
    assert set(json.loads((repo / "reports" / "metrics.json").read_text())) == \
        set(json.loads((one / "reports" / "metrics.json").read_text()))
