"""Multi-worker trials: `sweep.resources.workers: 2` makes each trial a Ray Train run of 2 gloo workers."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import COST, FINALS, TRIALS_COLUMNS, child_runs, make_repo, run_stage

from cmmasksd.predict import load_checkpoint

pytestmark = pytest.mark.slow


def test_a_sweep_with_two_workers_per_trial_tracks_and_reports_like_one_worker(prepared_root, tmp_path):
    repo = make_repo(tmp_path, prepared_root, **{"sweep.variants": [],
                                                  "sweep.resources": {"cpu": 1, "gpu": 0, "workers": 2}})
    result = run_stage(repo, "pipeline.sweep")
    assert "at most 1 trial(s) at once, each 2 worker(s)" in result.stderr  # 2 cores hold one such trial
    assert "State API may be temporarily unavailable" not in result.stdout + result.stderr  # no dashboard, no noise

    trials = pd.read_csv(repo / "sweep" / "trials.csv")
    assert trials["variant"].tolist() == ["cris"] and (trials["status"] == "FINISHED").all()
    assert list(trials.columns) == TRIALS_COLUMNS  # as a one-worker sweep's (`test_pipeline`): the report reads them
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    assert len(runs) == 1  # one MLflow child run per trial, logged by rank 0 alone
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["masksd.branches"] == "none"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/miou")] == [1, 2]
    assert set(FINALS) | set(COST) | {"best_epoch"} <= set(run.data.metrics)
    assert {"per_expression", "figures", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    checkpoint = Path(run.data.tags["checkpoint_path"])  # in Ray storage, written through Ray Train
    assert checkpoint.name == "best.pt" and checkpoint.is_relative_to(repo / "ray_results")
    assert "/train/" in str(checkpoint) and load_checkpoint(checkpoint).config.masksd.branches == "none"
    run_stage(repo, "pipeline.report", "--sweep-file", "sweep/sweep.json", "--out", "reports")
    long = pd.read_csv(repo / "reports" / "ablation.csv")
    val = long[(long.table == "variants") & (long.split == "val") & (long.metric == "miou")]
    assert val["mean"].tolist() == pytest.approx([run.data.metrics["final/val/miou"]])


def test_a_two_worker_trial_survives_losing_a_worker(prepared_root, tmp_path):
    """One of a trial's two Ray Train workers is killed (SIGKILL) once Ray Train has registered the
    trial's first epoch checkpoint (a checkpoint counts when every rank has reported it): Ray Train
    restarts the worker group from it (`sweep.max_failures` is its FailureConfig), the trial continues
    its MLflow run and finishes."""
    import subprocess
    import sys
    import time

    import psutil

    repo = make_repo(tmp_path, prepared_root, train={"optim": {"epochs": 4}},
                     **{"sweep.variants": [], "sweep.max_failures": 1,
                        "sweep.resources": {"cpu": 1, "gpu": 0, "workers": 2}})
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline, killed = time.time() + 400, None
    while time.time() < deadline and sweep.poll() is None and killed is None:
        if list((repo / "ray_results").glob("*/train/*/checkpoint_manager_snapshot.json")):  # one registered
            workers = [p for p in psutil.process_iter(["pid", "cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                killed = workers[-1].pid
                workers[-1].kill()
        time.sleep(0.2)
    output, _ = sweep.communicate(timeout=500)
    assert killed, "no worker was found to kill before the trial ended"
    assert sweep.returncode == 0, output[-4000:]
    trials = pd.read_csv(repo / "sweep" / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "FINISHED").all()
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    assert int(runs[0].data.tags["cmmasksd.resumed_from_epoch"]) >= 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/miou")]
    assert sorted(set(steps)) == [1, 2, 3, 4]
