"""A trial restarted after it had finished its MLflow run but before Tune recorded it done.

The window is a few lines of code (between `run.finish` and the last `tune.report`), too short to
hit with a kill; here `run_trial` runs in-process with Tune's context calls replaced, so the
restart meets a FINISHED MLflow run for sure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import debug_config
from mlflow.tracking import MlflowClient

import pipeline.trial as trial_stage
from pipeline.contract import FINISHED, METRIC, ROLE, RUN_ID, TRIAL_ID, variant_key
from pipeline.tracking import ensure_experiment
from pipeline.trial import SweepSpec, Trial


def trial_space(prepared_root: Path, uri: str, experiment_id: str, parent: str, branches: str) -> dict:
    """What Tune hands a one-worker trial: the sweep's `SweepSpec` and the trial's `Trial`."""
    spec = SweepSpec(
        base=debug_config(prepared_root, ".", optim__epochs=2), prepared_dir=str(prepared_root), threads=1,
        tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent, tags={},
        dataset={"name": "refshapes", "digest": "0" * 64, "path": str(prepared_root), "profile": {}})
    overrides = {"masksd.branches": branches}
    return {"spec": spec, "trial": Trial(branches, variant_key(overrides), overrides, seed=0)}


class FakeTune:
    """What `run_trial` calls on `ray.tune`: a trial id, a checkpoint to restore, and `report`."""

    def __init__(self, trial_id: str, checkpoint_dir: Path):
        from ray import tune

        self.trial_id = trial_id
        self.checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        self.reports: list[tuple[dict, list[str]]] = []

    def get_context(self):
        trial_id = self.trial_id
        return type("Context", (), {"get_trial_id": staticmethod(lambda: trial_id)})()

    def get_checkpoint(self):
        return self.checkpoint

    def report(self, metrics, checkpoint=None):
        files = sorted(p.name for p in Path(checkpoint.path).iterdir()) if checkpoint else []
        self.reports.append((dict(metrics), files))


def test_a_trial_whose_mlflow_run_finished_reports_it_and_trains_nothing(prepared_root, tmp_path, monkeypatch):
    from ray import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "restart")
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, tags={ROLE: "sweep"}).info.run_id
    finished = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, ROLE: "trial",
                                                      TRIAL_ID: "trial_00000"}).info.run_id
    client.log_metric(finished, "final/val/miou", 0.42)
    client.log_metric(finished, "final/testA/miou", 0.40)
    client.log_metric(finished, "cost/step_time_s", 0.1)
    client.set_terminated(finished, "FINISHED")
    end_time = client.get_run(finished).info.end_time

    restored = tmp_path / "restored"  # the trial's last epoch checkpoint, as Tune stored it
    restored.mkdir()
    for name in ("best.pt", "last.pt"):
        torch.save({"weights": torch.zeros(2)}, restored / name)
    (restored / "epoch.json").write_text(json.dumps({"epoch": 2}))

    fake = FakeTune("trial_00000", restored)
    for name in ("get_context", "get_checkpoint", "report"):
        monkeypatch.setattr(tune, name, getattr(fake, name))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr("cmmasksd.train.train", no_training)
    monkeypatch.chdir(tmp_path)
    trial_stage.run_trial(trial_space(prepared_root, uri, experiment_id, parent, "both"))

    assert len(fake.reports) == 1
    metrics, files = fake.reports[0]
    assert metrics[FINISHED] is True and metrics[RUN_ID] == finished
    assert metrics[METRIC] == pytest.approx(0.42) and metrics["epoch"] == 2
    assert metrics["final/testA/miou"] == pytest.approx(0.40) and "cost/step_time_s" in metrics
    assert files == ["best.pt", "epoch.json"]  # the finished trial keeps its best weights, not its resume state
    run = client.get_run(finished)
    assert run.info.status == "FINISHED" and run.info.end_time == end_time  # left as it was
    assert len(client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID}` = 'trial_00000'")) == 1
    assert not (tmp_path / "run").exists()  # the working folder is cleaned up as after training


def test_the_same_trial_with_an_unfinished_run_trains(prepared_root, tmp_path, monkeypatch):
    """The control: without a FINISHED run the same call does train (and so would fail here)."""
    from ray import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(uri, "restart")
    client = MlflowClient(uri)
    parent = client.create_run(experiment_id, tags={ROLE: "sweep"}).info.run_id
    fake = FakeTune("trial_00001", tmp_path)
    fake.checkpoint = None
    for name in ("get_context", "get_checkpoint", "report"):
        monkeypatch.setattr(tune, name, getattr(fake, name))

    class Trained(Exception):
        pass

    def training(*args, **kwargs):
        raise Trained

    monkeypatch.setattr("cmmasksd.train.train", training)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Trained):
        trial_stage.run_trial(trial_space(prepared_root, uri, experiment_id, parent, "none"))
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_ID}` = 'trial_00001'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert fake.reports == []
    params = runs[0].data.params  # the config as logged before training, with what this machine decided for it
    assert params["masksd.branches"] == "none" and params["seed"] == "0" and params["threads"] == "1"
    assert (params["runtime.device"], params["runtime.threads"]) == ("cpu", "1")
    assert params["runtime.precision"] in {"bf16", "fp32"}
