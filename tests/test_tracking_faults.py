"""The sweep against a real `mlflow server` that is not there, or goes away mid-sweep and comes back."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from helpers import child_runs, make_repo, rest, run_stage
from mlflow_server import MlflowServer, free_port

pytestmark = pytest.mark.slow


def ray_processes_of(pid: int) -> list[str]:
    """Ray's own processes started by the process `pid` (its driver, raylet, GCS, workers)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [" ".join(p.cmdline()[:2]) for p in children if "ray" in " ".join(p.cmdline())]


def test_unreachable_tracking_server_stops_the_sweep_before_ray(prepared_root, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    repo = make_repo(tmp_path, prepared_root, **{"mlflow.tracking_uri": uri})
    start = time.monotonic()
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    started_ray = []
    while sweep.poll() is None and time.monotonic() - start < 60:
        started_ray += ray_processes_of(sweep.pid)
        time.sleep(0.5)
    stdout, stderr = sweep.communicate(timeout=30)
    elapsed = time.monotonic() - start
    assert sweep.returncode == 2 and elapsed < 30, (elapsed, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: mlflow.tracking_uri: no MLflow server answers at " + uri), stderr[-2000:]
    assert "Traceback" not in stderr and "mlflow server --host 127.0.0.1" in lines[-1]
    assert not started_ray and not (repo / "ray_results").exists()  # no trial, not even Ray, started


def metric_steps(db, key: str) -> dict[str, list[int]]:
    """For each run, the steps logged for metric `key`, read straight from the server's store."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        rows = connection.execute("select run_uuid, step from metrics where key = ? order by step", (key,)).fetchall()
    steps: dict[str, list[int]] = {}
    for run, step in rows:
        steps.setdefault(run, []).append(step)
    return steps


def test_tracking_server_down_mid_sweep_loses_nothing(prepared_root, tmp_path):
    """A sweep logging to a real `mlflow server`, which stops while the trials train epoch 2 of 2 and
    comes back 20 s later, on the same port and store. MLflow's client retries each request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default
    7, about two minutes with backoff); longer outages fail the trial and Tune retries it from its
    checkpoint into its own run. Either way: nothing lost, nothing trained or logged twice, and the
    server shows the sweep as the UI reads it."""
    server = MlflowServer(tmp_path / "server")
    (tmp_path / "server").mkdir()
    server.start()
    epochs = 2
    repo = make_repo(tmp_path, prepared_root, train={"optim": {"epochs": epochs}},
                     **{"mlflow.tracking_uri": server.uri})
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        db = tmp_path / "server" / "server.db"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and sweep.poll() is None:
            if db.exists() and any(steps for steps in metric_steps(db, "val/miou").values()):
                break  # a trial has finished epoch 1: the next writes come while the server is down
            time.sleep(0.5)
        assert sweep.poll() is None, "the sweep ended before the outage"
        server.stop()
        down_at = time.monotonic()
        time.sleep(20)
        server.start()
        outage_s = time.monotonic() - down_at
        output, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    try:
        assert sweep.returncode == 0, output[-4000:]
        trials = pd.read_csv(repo / "sweep" / "trials.csv")
        assert (trials["status"] == "FINISHED").all() and len(trials) == 2
        client, runs = child_runs(repo / "sweep" / "sweep.json")
        assert len(runs) == 2  # no child run duplicated
        for run in runs:
            history = client.get_metric_history(run.info.run_id, "val/miou")
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), run.data.tags  # none lost or twice
            assert run.data.params["masksd.branches"] in {"none", "both"}
            assert {"per_expression", "figures", "results.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
            assert "final/val/miou" in run.data.metrics and run.info.status == "FINISHED"
        run_stage(repo, "pipeline.report", "--sweep-file", "sweep/sweep.json", "--out", "reports")
        metrics = json.loads((repo / "reports" / "metrics.json").read_text())
        assert (metrics["n_trials"], metrics["n_failed"]) == (2, 0)
        assert_the_ui_reads_the_sweep(server.uri, repo, metrics, tmp_path)
        print(f"server down {outage_s:.0f} s")
    finally:
        server.stop()


def assert_the_ui_reads_the_sweep(uri: str, repo: Path, report_metrics: dict, tmp_path: Path) -> None:
    """What the UI reads through the REST API: the experiment opens on its runs, the parent nests its
    trials, carries the sweep's summary and the dataset, and every run says which code made it."""
    info = json.loads((repo / "sweep" / "sweep.json").read_text())
    assert info["tracking_uri"] == uri
    experiment = rest(uri, "experiments/get-by-name?experiment_name=cmmasksd")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    runs = rest(uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    parent = next(r for r in runs if r["info"]["run_id"] == info["parent_run_id"])
    children = [r for r in runs if {"key": "mlflow.parentRunId", "value": info["parent_run_id"]} in r["data"]["tags"]]
    assert len(children) == 2 and len(runs) == 3
    assert parent["info"]["run_name"].startswith("default · refshapes · tiny-rn · 2 trials · ")
    summary = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert summary["summary/baseline_val_miou"] == pytest.approx(report_metrics["baseline_val_miou"])
    assert summary["summary/best_delta_miou"] == pytest.approx(report_metrics["best_delta_miou"])
    for run in [parent, *children]:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["cmmasksd.code_digest"] == info["code_digest"]
        (dataset,) = run["inputs"]["dataset_inputs"]
        assert dataset["dataset"]["name"] == "refshapes" and len(dataset["dataset"]["digest"]) >= 16
    client, found = child_runs(repo / "sweep" / "sweep.json")
    run = found[0]
    assert "masksd.mask_ratio_v" in run.data.params
    local = client.download_artifacts(run.info.run_id, "per_expression", str(tmp_path / "dl"))
    csvs = sorted(p.name for p in Path(local).iterdir())
    assert csvs == ["per_expression_testA.csv", "per_expression_testB.csv", "per_expression_val.csv"]
    assert not (repo / "mlflow.db").exists()  # nothing went to the default local store
