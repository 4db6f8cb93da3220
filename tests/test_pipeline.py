"""The sweep stage for real: local Ray, a `ray start` cluster that loses a node mid-trial, an
interrupted sweep resumed, and `dvc repro` in a git repo (a real `mlflow server`:
`test_tracking_faults.py`).

Each sweep runs as `python -m pipeline.sweep` in a copy of the project's pipeline (as DVC runs it),
on a tiny RefShapes and the debug profile (`helpers.make_repo`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cmmasksd.predict import load_checkpoint
from helpers import TRIALS_COLUMNS, child_runs, make_repo, run_stage
from mlflow_server import free_port

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_sweep_tracks_trials_in_mlflow_and_rerun_retrains_nothing(prepared_root, tmp_path):
    repo = make_repo(tmp_path, prepared_root)
    run_stage(repo, "pipeline.sweep")

    trials = pd.read_csv(repo / "sweep" / "trials.csv")
    assert sorted(trials["variant"]) == ["both", "cris"]
    assert (trials["status"] == "FINISHED").all()
    assert list(trials.columns) == TRIALS_COLUMNS  # what the report reads (a multi-worker sweep writes the same)
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    assert len(runs) == 2
    info = json.loads((repo / "sweep" / "sweep.json").read_text())
    parent = client.get_run(info["parent_run_id"])
    assert parent.data.tags["cmmasksd.role"] == "sweep" and parent.data.tags["dataset"] == "refshapes"
    assert parent.info.status == "FINISHED"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["masksd.branches"] in {"none", "both"}
        assert run.data.params["model.clip"] == "tiny-rn"
        # what the machine decided for the trial: a CPU trial at the threads it reserved (sweep.resources.cpu)
        assert run.data.params["runtime.device"] == "cpu" and run.data.params["runtime.threads"] == "1"
        assert run.data.params["runtime.precision"] in {"bf16", "fp32"}
        assert run.data.tags["cmmasksd.precision"] == f"{run.data.params['runtime.precision']} on cpu"
        assert {"final/val/miou", "final/testA/oiou", "cost/step_time_s", "best_epoch"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "val/miou")
        assert [m.step for m in history] == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"per_expression", "figures", "results.json"} <= artifacts
        checkpoint = Path(run.data.tags["checkpoint_path"])  # in Ray's storage, not its staging folder
        assert checkpoint.name == "best.pt" and checkpoint.is_relative_to(repo / "ray_results")
        assert load_checkpoint(checkpoint).config.masksd.branches == run.data.params["masksd.branches"]
        assert not (checkpoint.parent / "last.pt").exists()  # resume state lives in Tune's checkpoint only
        baseline = run.data.params["masksd.branches"] == "none"
        assert (run.data.metrics["cost/params_extra"] == 0) == baseline  # mask tokens only with distillation
    best = yaml.safe_load((repo / "sweep" / "best_config.yaml").read_text())
    top = max(r.data.metrics["final/val/miou"] for r in runs)  # tiny runs may tie
    winners = {r.data.params["masksd.branches"] for r in runs if r.data.metrics["final/val/miou"] == top}
    assert best["masksd"]["branches"] in winners  # chosen on val mIoU

    code = parent.data.tags["cmmasksd.code_digest"]
    assert len(code) == 64 and parent.data.tags["mlflow.source.git.commit"] == "unknown"  # not a git repo
    assert all(r.data.tags["cmmasksd.code_digest"] == code for r in runs)
    assert {r.data.tags["cmmasksd.overrides"] for r in runs} == {'{"masksd.branches": "none"}', '{"masksd.branches": "both"}'}
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["refshapes"]

    end_times = {r.info.run_id: r.info.end_time for r in runs}
    run_stage(repo, "pipeline.sweep")  # a rerun restores the finished sweep instead of training again
    client, again = child_runs(repo / "sweep" / "sweep.json")
    assert {r.info.run_id: r.info.end_time for r in again} == end_times
    for run in again:
        assert len(client.get_metric_history(run.info.run_id, "val/miou")) == 2

    shown = run_stage(repo, "pipeline.report", "--sweep-file", "sweep/sweep.json", "--out", "reports").stdout
    assert "Tables: reports/ablation.md" in shown and "CRIS baseline val mIoU" in shown  # next steps, not a dump
    assert f"mlflow ui --backend-store-uri {info['tracking_uri']}" in shown
    assert f"/#/experiments/{info['experiment_id']}?workflowType=machine_learning" in shown
    long = pd.read_csv(repo / "reports" / "ablation.csv")
    val = long[(long.table == "variants") & (long.split == "val") & (long.metric == "miou")].set_index("variant")
    logged = {r.data.tags["cmmasksd.variant"]: r.data.metrics["final/val/miou"] for r in runs}
    assert val["mean"].to_dict() == pytest.approx(logged)  # the report shows what the trials measured
    assert val.loc["both", "delta"] == pytest.approx(logged["both"] - logged["cris"])
    assert not val["significant"].fillna(False).astype(bool).any()  # one seed: never marked
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["n_trials"] == 2 and metrics["n_failed"] == 0
    # no grid in this sweep, so no heatmap; the trials logged overlays (run.num_overlays: 1)
    figures = sorted(p.name for p in (repo / "reports" / "figures").iterdir())
    assert figures == ["learning_curves.png", "overlays_baseline.png", "overlays_best.png"]
    assert metrics["figures"] == 3

    # a change to the code, even a comment, is a new experiment: trained again, never restored
    with (repo / "cmmasksd" / "losses.py").open("a") as f:
        f.write("# a comment changes the code identity\n")
    run_stage(repo, "pipeline.sweep")
    info_after = json.loads((repo / "sweep" / "sweep.json").read_text())
    assert info_after["ray_experiment"] != info["ray_experiment"]
    assert info_after["parent_run_id"] != info["parent_run_id"]
    client, retrained = child_runs(repo / "sweep" / "sweep.json")
    assert len(retrained) == 2 and not {r.info.run_id for r in retrained} & set(end_times)
    assert all(len(client.get_metric_history(r.info.run_id, "val/miou")) == 2 for r in retrained)
    assert {r.data.tags["cmmasksd.code_digest"] for r in retrained} == {info_after["code_digest"]} != {code}


def finished_trial_runs(db: Path) -> list[str]:
    """Run ids of finished trials, read without MLflow: a client would race the sweep creating the tables."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute("SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                               "WHERE r.status = 'FINISHED' AND t.key = 'cmmasksd.role' AND t.value = 'trial'")
            return [row[0] for row in rows]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


def test_interrupted_sweep_resumes_without_retraining_finished_trials(prepared_root, tmp_path):
    storage = tmp_path / "shared" / "ray"  # as a URI, as for s3:// or gs:// storage: pyarrow's filesystem
    repo = make_repo(tmp_path, prepared_root, train={"optim": {"epochs": 3}},
                     **{"sweep.max_concurrent": 1, "ray.storage": f"file://{storage}"})
    tracking = f"sqlite:///{repo / 'mlflow.db'}"
    sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and sweep.poll() is None and not finished:
        time.sleep(1)
        finished = finished_trial_runs(repo / "mlflow.db")
    assert finished, "no trial finished before the deadline"
    os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C, as a user (or DVC) would
    sweep.communicate(timeout=120)
    client = MlflowClient(tracking)
    first = client.get_run(finished[0])

    run_stage(repo, "pipeline.sweep")
    trials = pd.read_csv(repo / "sweep" / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "FINISHED").all()
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    assert len(runs) == 2
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time  # not trained again
    assert len(client.get_metric_history(first.info.run_id, "val/miou")) == 3
    assert all(Path(c).is_relative_to(storage) and Path(c).is_file() for c in trials["checkpoint"])


BLOCK_HEAD = """
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
blocker = ray.remote(num_cpus=1)(type("Blocker", (), {"ping": lambda self: True})).options(
    name="blocker", lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(blocker.ping.remote(), timeout=60)
"""
FREE_HEAD = 'ray.kill(ray.get_actor("blocker"))'


def driver(code: str, port: int, env: dict) -> None:
    """Run `code` as a Ray driver of the cluster at `port` (its own process: Ray reads the token when imported)."""
    script = f"import ray\nray.init(address='127.0.0.1:{port}', namespace='cmmasksd-test', log_to_driver=False)\n{code}"
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=120,
                   env={**os.environ, **env})


def _raylet(node_manager_port: int) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("raylet") and f"--node_manager_port={node_manager_port}" in cmdline:
            return proc
    raise AssertionError(f"no raylet with node manager port {node_manager_port}")


def test_sweep_on_a_ray_start_cluster_survives_losing_a_node(prepared_root, tmp_path):
    """A `ray start` cluster of two nodes: the head (1 CPU, held at first) and a second node (1 CPU)
    where the trial lands. The second node's raylet and processes are killed mid-trial, as a
    lost machine: the trial is retried from its last checkpoint on the head and continues its MLflow
    run, and the table is complete."""
    port, second_port = free_port(), free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray = str(BIN / "ray")
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", *common],
                   check=True, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    try:
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--node-manager-port", str(second_port),
                        *common], check=True, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        driver(BLOCK_HEAD, port, env)  # the head's CPU is taken: the trials go to the second node

        repo = make_repo(tmp_path, prepared_root, train={"optim": {"epochs": 4}},
                         **{"ray.address": f"127.0.0.1:{port}", "sweep.max_failures": 2, "sweep.variants": []})
        sweep = subprocess.Popen([sys.executable, "-m", "pipeline.sweep"], cwd=repo, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
        deadline, lost = time.time() + 300, False
        while time.time() < deadline and sweep.poll() is None and not lost:
            if list((repo / "ray_results").glob("*/*/checkpoint_000001")):
                driver(FREE_HEAD, port, env)  # the head has room for the retry
                raylet = _raylet(second_port)
                for proc in [*raylet.children(recursive=True), raylet]:  # the machine is gone
                    proc.kill()
                lost = True
            time.sleep(0.2)
        output, _ = sweep.communicate(timeout=500)
        assert lost, "the trial never reached its second checkpoint"
        assert sweep.returncode == 0, output[-4000:]
        assert re.search(rf"Ray cluster at [\d.]+:{port} \(given\)", output)

        trials = pd.read_csv(repo / "sweep" / "trials.csv")
        assert len(trials) == 1 and (trials["status"] == "FINISHED").all()
        client, runs = child_runs(repo / "sweep" / "sweep.json")
        assert len(runs) == 1  # the retried trial continued its own MLflow run
        retried = [r for r in runs if "cmmasksd.resumed_from_epoch" in r.data.tags]
        assert len(retried) == 1 and int(retried[0].data.tags["cmmasksd.resumed_from_epoch"]) >= 1
        assert Path(trials["checkpoint"].iloc[0]).is_file()
        steps = [m.step for m in client.get_metric_history(retried[0].info.run_id, "val/miou")]
        assert sorted(set(steps)) == [1, 2, 3, 4]
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env={**os.environ, **env}, timeout=120)


def test_dvc_repro_runs_every_stage_then_does_nothing(tmp_path):
    repo = make_repo(tmp_path, None)
    git_env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
    env = {**os.environ, **git_env, "PATH": f"{BIN}:{os.environ['PATH']}"}

    def sh(*cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=timeout)
        assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    (repo / ".gitignore").write_text("/ray_results/\n/mlflow.db\n/mlartifacts/\n")
    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh("dvc", "repro")
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    client, runs = child_runs(repo / "sweep" / "sweep.json")
    cris = next(r for r in runs if r.data.params["masksd.branches"] == "none")
    assert metrics["n_trials"] == 2 and metrics["baseline_val_miou"] == pytest.approx(cris.data.metrics["final/val/miou"])
    commit = sh("git", "rev-parse", "HEAD").stdout.strip()
    assert {r.data.tags["mlflow.source.git.commit"] for r in runs} == {commit}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch@refshapes", "preprocess@refshapes", "pretrain", "sweep", "report"}
    pretrained = str((repo / "data" / "pretrained" / "tiny-rn-refshapes.pt").resolve())
    assert {r.data.params["model.pretrained"] for r in runs} == {pretrained}  # every trial starts from it
    assert sorted(p.name for p in (repo / "reports" / "curves").glob("*.csv")) == ["both_seed0.csv", "cris_seed0.csv"]
    assert "reports/curves" in sh("dvc", "plots", "show", "--json").stdout

    again = sh("dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout
    shown = sh("dvc", "metrics", "show", "--json")
    (workspace,) = json.loads(shown.stdout).values()  # keyed by revision: "" is the workspace
    known = {k: v for k, v in metrics.items() if v is not None}  # DVC leaves out what the sweep could not say
    assert workspace["data"]["reports/metrics.json"]["data"] == known
    assert workspace["data"]["reports/pretrain.json"]["data"]["pretrained"]["object_top1"] >= 0

    # `dvc repro` killed while the report stage writes its files: the rerun finishes the report,
    # and no output is left half written (each is written aside, then renamed)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["report"]["bootstrap_seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the report draws its figures into a staging folder that then replaces reports/figures
    staging = repo / "reports" / ".figures.tmp"
    assert (repo / "reports" / "figures" / "learning_curves.png").is_file() and not staging.exists()

    def rewritten() -> bool:
        return staging.exists() and any(staging.iterdir())  # the report has begun writing its figures

    repro = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and repro.poll() is None and not rewritten():
        time.sleep(0.02)
    os.killpg(repro.pid, signal.SIGKILL)  # the report has begun writing: its first figure is drawn
    assert repro.wait(timeout=60) == -signal.SIGKILL, "the report finished before it could be killed"
    assert "report" in sh("dvc", "status").stdout
    reports = repo / "reports"
    if (reports / "metrics.json").exists():  # each output is absent or whole, never half written
        json.loads((reports / "metrics.json").read_text())
    if (reports / "ablation.csv").exists():
        assert not pd.read_csv(reports / "ablation.csv").empty
    if (reports / "ablation.md").exists():
        assert (reports / "ablation.md").read_text().endswith("\n")
    if (reports / "curves").exists():
        assert len(list((reports / "curves").glob("*.csv"))) == 2
    if (reports / "figures").exists():  # the old folder, whole, or none: never a half-drawn one
        assert (reports / "figures" / "learning_curves.png").is_file()
    resumed = sh("dvc", "repro")
    assert "Running stage 'report'" in resumed.stdout and "Running stage 'sweep'" not in resumed.stdout
    assert "Data and pipelines are up to date" in sh("dvc", "status").stdout
    assert sorted(p.name for p in (repo / "reports" / "curves").glob("*.csv")) == ["both_seed0.csv", "cris_seed0.csv"]
    assert not list((repo / "reports").glob(".*.tmp*"))  # the rerun left no staging files behind
    assert (repo / "reports" / "figures" / "learning_curves.png").is_file()
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["n_trials"] == 2

    # an experiment with a changed sweep param: only the sweep and report stages run again; variants
    # that differ outside masksd.* stay apart, and one seed marks nothing
    variants = "sweep.variants=[{masksd.branches: vmlsd}, {masksd.branches: none, optim.lr: 0.001}]"
    experiment = sh("dvc", "exp", "run", "-S", variants)
    assert "Running stage 'sweep'" in experiment.stdout and "Running stage 'fetch" not in experiment.stdout
    assert json.loads((repo / "reports" / "metrics.json").read_text())["n_trials"] == 3
    long = pd.read_csv(repo / "reports" / "ablation.csv")
    rows = long[(long.table == "variants") & (long.metric == "miou") & (long.split == "val")]
    assert sorted(rows["variant"]) == ["cris", "cris optim.lr=0.001", "vmlsd"] and set(rows["n"]) == {1}
    assert not long["significant"].fillna(False).astype(bool).any()
    table_lines = [line for line in (repo / "reports" / "ablation.md").read_text().splitlines() if line.startswith("|")]
    assert len(table_lines) > 6 and not any("†" in line for line in table_lines)  # the legend names the mark
    listed = sh("dvc", "exp", "list", "--name-only").stdout.split()
    assert len(listed) == 1  # the experiment is recorded, for `dvc exp show` / `dvc exp apply`
