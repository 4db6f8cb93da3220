"""MLflow glue: the tracking contract of `shared/spec/pipeline.md`, written in one place.

Parent run per sweep (tags `cmmasksd.role=sweep`, dataset, backbone, and the identity of the code
and data: `cmmasksd.code_digest`, `mlflow.source.git.commit`, `cmmasksd.git_dirty`, `data_hash`),
child run per trial (tags `cmmasksd.role=trial`, `cmmasksd.trial_id`, `cmmasksd.variant`,
`cmmasksd.overrides` = the trial's overrides without its seed, as JSON: what defines its variant,
and the same identity tags). Both carry the prepared data as an MLflow dataset input.
The names both the sweep and the report read (tags, metric names and prefixes) live in
`pipeline.contract`. Metrics:
- per epoch (step = epoch): `train/loss`, `train/seg`, `train/lmvsd`, `train/vmlsd`,
  `val/miou`, `val/oiou`, `val/prec_50..90`, `lr`, `epoch_time_s`, `step_time_s`, and where the
  branches' masks fell: `mask/lmvsd_hit`, `mask/lmvsd_chance`, `mask/vmlsd_hit`, `mask/vmlsd_chance`;
- final, with the val-selected weights: `final/<split>/<metric>`, `cost/step_time_s`,
  `cost/peak_mem_mb`, `cost/params_total`, `cost/params_baseline`, `cost/params_extra`, `cost/bf16`,
  `best_epoch`.
Params: every config value, and `runtime.device`, `runtime.precision`, `runtime.threads` (what the
machine decided). Artifacts: `per_expression/per_expression_<split>.csv`, `figures/*.png`, `results.json`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from pipeline.common import REPO_ROOT
from pipeline.contract import OVERRIDES, ROLE, TRIAL_ID, VARIANT

# MLflow 3 picks an experiment's page from this tag; without it a new experiment opens on the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: str | None, repo_root: Path = REPO_ROOT) -> str:
    """The configured URI, else an absolute sqlite file in the repo (relative paths break in Ray workers)."""
    if configured:
        if configured.startswith("sqlite:///") and not configured.startswith("sqlite:////"):
            return "sqlite:///" + str((repo_root / configured.removeprefix("sqlite:///")).resolve())
        return configured
    return f"sqlite:///{(repo_root / 'mlflow.db').resolve()}"


def redact(uri: str) -> str:
    """The URI without `user:password@`, for messages and logs."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def check_tracking_server(uri: str, wait_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, when an `http(s)://` tracking server does not answer: MLflow's
    own client would retry each request for minutes, and every trial would fail the same way.
    A server still starting gets `wait_s`; any HTTP answer (even 401) means one is there."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            reason = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            reason = str(getattr(err, "reason", err))
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"mlflow.tracking_uri: no MLflow server answers at {redact(uri)} ({reason}); start it "
                f"(`mlflow server --host 127.0.0.1 --port <port>`) or point params.yaml at a running one")
        time.sleep(1.0)


def experiment_url(server: str, experiment_id: str) -> str:
    """The link that opens an experiment on its runs: MLflow 3.17's UI chooses between its GenAI
    overview and the runs table from a global switch (default GenAI), which this URL parameter sets."""
    return f"{redact(server).rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def artifact_location(tracking_uri: str) -> str | None:
    """For a sqlite store, artifacts go to `mlartifacts/` beside the db (MLflow's default is the cwd's
    `./mlruns`, which differs per Ray worker); a server decides for itself."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the store and experiment on the driver, before any trial touches it (first use races)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        return mlflow.create_experiment(name, artifact_location=artifact_location(tracking_uri), tags=EXPERIMENT_KIND)
    if not set(EXPERIMENT_KIND) <= set(experiment.tags):  # made by an older version, or by hand
        for key, value in EXPERIMENT_KIND.items():
            MlflowClient(tracking_uri).set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def dataset_input(name: str, digest: str, path: Path, profile: dict[str, Any]) -> DatasetInput:
    """The prepared data as an MLflow dataset (the runs table's Dataset column): name, digest, where it is."""
    dataset = Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": str(path)}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(values.items())]


def _metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


def start_sweep_run(client: MlflowClient, experiment_id: str, name: str, params: dict[str, Any],
                    tags: dict[str, str], dataset: DatasetInput) -> str:
    run = client.create_run(experiment_id, run_name=name, tags={ROLE: "sweep", **tags})
    client.log_batch(run.info.run_id, params=_params(flatten(params)))
    client.log_inputs(run.info.run_id, datasets=[dataset])
    return run.info.run_id


class TrialRun:
    """One trial's child run; a retried or resumed trial finds and continues its own run."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str, variant: str,
                 overrides: dict[str, Any], identity: dict[str, str], dataset: DatasetInput):
        self.client = MlflowClient(tracking_uri)
        found = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_ID}` = '{trial_id}'",
        )
        # A run already FINISHED belongs to a trial stopped after it logged everything but before
        # Tune recorded it as done: it is left as it is (`finished`), not trained or logged again.
        self.finished = bool(found) and found[0].info.status == RunStatus.to_string(RunStatus.FINISHED)
        if found:
            self.run_id = found[0].info.run_id
            if not self.finished:
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            self.resumed = True
        else:
            tags = {"mlflow.parentRunId": parent_run_id, ROLE: "trial", TRIAL_ID: trial_id, VARIANT: variant,
                    OVERRIDES: json.dumps(overrides, sort_keys=True), **identity}
            self.run_id = self.client.create_run(experiment_id, run_name=variant, tags=tags).info.run_id
            self.client.log_inputs(self.run_id, datasets=[dataset])
            self.resumed = False

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "TrialRun":
        """The run another process opened (a Ray Train worker logging its driver's trial)."""
        run = cls.__new__(cls)
        run.client, run.run_id, run.finished, run.resumed = MlflowClient(tracking_uri), run_id, False, True
        return run

    def log_config(self, config: dict[str, Any]) -> None:
        if not self.resumed:  # params are immutable in MLflow; a resumed run logged them already
            self.client.log_batch(self.run_id, params=_params(flatten(config)))

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.client.log_batch(self.run_id, metrics=_metrics(metrics, epoch))

    def log_final(self, metrics: dict[str, float], artifacts: dict[str, list[Path]]) -> None:
        self.client.log_batch(self.run_id, metrics=_metrics(metrics, 0))
        for folder, paths in artifacts.items():
            for path in paths:
                self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def finish(self, ok: bool) -> None:
        status = RunStatus.FINISHED if ok else RunStatus.FAILED
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(status))
