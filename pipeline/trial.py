"""What one Ray Tune trial runs: a training run, tracked in its own MLflow child run.

- `sweep.resources.workers: 1`: the trial trains in its own process and checkpoints every epoch
  through Tune; a retried trial restores Tune's last checkpoint.
- `workers: N`: the trial is a Ray Train driver (Ray's Tune + Train V2 pattern). It builds and
  fits a `TorchTrainer` whose N workers train data-parallel (`cmmasksd.distributed`; gloo on the
  CPU, nccl on GPUs). Rank 0 logs to the trial's MLflow run and checkpoints through Ray Train;
  the Train run is named after the trial, so a retried trial (its node lost, say) resumes from
  that run's latest checkpoint. `TuneReportCallback` hands rank 0's metrics to Tune.

Either way a trial whose MLflow run already FINISHED (stopped after logging everything, before
Tune recorded it) reports what it logged and trains nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.contract import COST, FINAL, FINISHED, METRIC, RUN_ID, RUNTIME_PARAM
from pipeline.tracking import TrialRun, dataset_input

EPOCH_FILE = "epoch.json"  # beside last.pt in every checkpoint: the epoch it resumes after


@dataclass(frozen=True)
class Trial:
    """One cell of the grid: a variant (its overrides, without the seed) at one seed."""

    name: str  # `contract.variant_name`
    key: str  # `contract.variant_key`: what defines the variant
    overrides: dict[str, Any]  # dotted `TrainConfig` keys, without `seed`
    seed: int

    @property
    def settings(self) -> dict[str, Any]:
        """Every override the trial trains with, its seed included."""
        return {**self.overrides, "seed": self.seed}


@dataclass(frozen=True)
class SweepSpec:
    """What every trial of one sweep shares: the base config, where it runs and where it reports."""

    base: dict[str, Any]  # the profile with `train.overrides` merged in (raw, dotted overrides apply to it)
    prepared_dir: str
    threads: int  # torch CPU threads per worker (= `sweep.resources.cpu`): part of the result
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]  # the sweep's identity tags, copied onto every trial's run
    dataset: dict[str, Any]  # `tracking.dataset_input`'s fields
    workers: int = 1  # > 1: a Ray Train run of that many data-parallel workers
    worker_resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    train_storage: str = ""  # Ray Train's runs (multi-worker trials)
    max_failures: int = 0

    def raw_config(self, trial: Trial, out_dir: Path) -> dict[str, Any]:
        return trial_config(self.base, trial.settings, Path(self.prepared_dir), out_dir, self.threads)

    def config(self, trial: Trial, out_dir: Path):
        from cmmasksd.config import build_config

        return build_config(self.raw_config(trial, out_dir))


def trial_config(base: dict[str, Any], overrides: dict[str, Any], prepared_dir: Path, out_dir: Path,
                 threads: int) -> dict[str, Any]:
    """The raw config of one trial: the base, its data and threads, where it writes, its overrides."""
    from cmmasksd.config import apply_overrides

    placed = {"data.prepared_dir": str(prepared_dir), "run.out_dir": str(out_dir), "threads": threads}
    return apply_overrides(base, {**placed, **overrides})


def _open_run(spec: SweepSpec, trial: Trial, trial_id: str) -> TrialRun:
    return TrialRun(spec.tracking_uri, spec.experiment_id, spec.parent_run_id, trial_id, trial.name,
                    trial.overrides, spec.tags, dataset_input(**spec.dataset))


def _log_config(run: TrialRun, config) -> None:
    """Every config value, and what this machine decided for it (`runtime.device`, `.precision`, `.threads`)."""
    from cmmasksd.identity import runtime

    decided = {f"{RUNTIME_PARAM}{k}": v for k, v in runtime(config).items()}
    run.log_config({**config.model_dump(mode="json"), **decided})


def _logged_final(run: TrialRun, epochs: int) -> dict[str, Any]:
    """The final report of a trial whose MLflow run FINISHED: what it logged."""
    logged = run.client.get_run(run.run_id).data.metrics
    final = {k: v for k, v in logged.items() if k.startswith((FINAL, COST))}
    return {**final, METRIC: logged[f"{FINAL}{METRIC}"], "epoch": epochs, RUN_ID: run.run_id,
            FINISHED: True}


def _restore(checkpoint, ckpt_dir: Path) -> int:
    """Copy a Ray checkpoint into `ckpt_dir`; the epoch it holds (0 for none)."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the checkpoint, not local leftovers, is the truth
    ckpt_dir.mkdir(parents=True)
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as restored:
        for file in Path(restored).iterdir():
            shutil.copy2(file, ckpt_dir / file.name)
    epoch_file = ckpt_dir / EPOCH_FILE
    return int(json.loads(epoch_file.read_text())["epoch"]) if epoch_file.exists() else 0


def _log_result(run: TrialRun, result) -> dict[str, float]:
    final = result.flat_metrics()
    run.log_final(final, artifacts={"per_expression": list(result.per_expression.values()),
                                    "figures": result.figures, "": [result.out_dir / "results.json"]})
    run.finish(ok=True)
    return final


def _train_and_report(config, run: TrialRun | None, run_id: str, api) -> None:
    """Train `config`; every epoch and the end reported through `api` (`ray.tune` for a one-worker
    trial, `ray.train` in a worker). The process that logs (`run`; None on ranks > 0) also checkpoints:
    the last checkpoint a finished trial keeps is its best weights alone (it needs no resume state)."""
    from cmmasksd.train import CHECKPOINT_DIR, LAST, train

    ckpt_dir = Path(config.run.out_dir) / CHECKPOINT_DIR

    def on_epoch(report) -> None:
        checkpoint = None
        if run is not None:
            run.log_epoch(report.metrics, report.epoch)
            (report.checkpoint_dir / EPOCH_FILE).write_text(json.dumps({"epoch": report.epoch}))
            checkpoint = api.Checkpoint.from_directory(str(report.checkpoint_dir))
        api.report({**report.metrics, "epoch": report.epoch}, checkpoint=checkpoint)  # every rank reports

    result = train(config, on_epoch=on_epoch)
    final, checkpoint = result.flat_metrics(), None
    if run is not None:
        final = _log_result(run, result)
        (ckpt_dir / LAST).unlink()
        checkpoint = api.Checkpoint.from_directory(str(ckpt_dir))
    api.report({**final, METRIC: result.best_val_miou, "epoch": config.optim.epochs, RUN_ID: run_id,
                FINISHED: True}, checkpoint=checkpoint)


def run_trial(space: dict[str, Any]) -> None:
    """Ray Tune trainable (`{"spec": SweepSpec, "trial": Trial}`): one training run, resumed from its
    last checkpoint after a failure; with `workers` > 1 a Ray Train run of that many workers."""
    spec, trial = space["spec"], space["trial"]
    if spec.workers > 1:
        return _drive_torch_trainer(spec, trial)
    from ray import tune

    from cmmasksd.train import CHECKPOINT_DIR, LAST

    # Tune runs each trial in its own working folder, which it does not copy to storage: the run's
    # files stay on its node, and only Tune's checkpoints (and MLflow) carry them off it.
    out_dir = Path.cwd() / "run"
    ckpt_dir = out_dir / CHECKPOINT_DIR
    checkpoint = tune.get_checkpoint()
    resumed_epoch = _restore(checkpoint, ckpt_dir)
    config = spec.config(trial, out_dir)
    run = _open_run(spec, trial, tune.get_context().get_trial_id())
    if run.finished:
        (ckpt_dir / LAST).unlink(missing_ok=True)
        tune.report(_logged_final(run, config.optim.epochs), checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        shutil.rmtree(out_dir)
        return
    _log_config(run, config)
    if checkpoint is not None:
        run.client.set_tag(run.run_id, "cmmasksd.resumed_from_epoch", str(resumed_epoch))
    try:
        _train_and_report(config, run, run.run_id, tune)
    except BaseException:
        run.finish(ok=False)
        raise
    shutil.rmtree(out_dir)  # everything in it is in MLflow or in Tune's storage now


def _drive_torch_trainer(spec: SweepSpec, trial: Trial) -> None:
    """The trial as a Ray Train driver: `spec.workers` workers, each `spec.worker_resources`."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    run = _open_run(spec, trial, trial_id)  # here, not in a worker: a retried trial finds it again
    if run.finished:
        tune.report(_logged_final(run, spec.config(trial, Path(".")).optim.epochs))
        return
    _log_config(run, spec.config(trial, Path.cwd() / "run"))  # rank 0 trains in a folder of its own
    resources = spec.worker_resources
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"spec": spec, "trial": trial, "trial_id": trial_id, RUN_ID: run.run_id},
        scaling_config=train.ScalingConfig(num_workers=spec.workers, use_gpu=resources["gpu"] > 0,
                                           resources_per_worker={"CPU": resources["cpu"], "GPU": resources["gpu"]}),
        run_config=train.RunConfig(
            name=trial_id, storage_path=spec.train_storage,
            failure_config=train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except BaseException:
        run.finish(ok=False)
        raise


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is set up; `train` takes its share of each batch."""
    from ray import train as ray_train

    from cmmasksd.train import CHECKPOINT_DIR

    spec, trial, run_id = loop_config["spec"], loop_config["trial"], loop_config[RUN_ID]
    rank = ray_train.get_context().get_world_rank()
    out_dir = Path(tempfile.mkdtemp(prefix=f"cmmasksd-{loop_config['trial_id']}-rank{rank}-"))  # this node's copy
    resumed_epoch = _restore(ray_train.get_checkpoint(), out_dir / CHECKPOINT_DIR)
    run = TrialRun.attach(spec.tracking_uri, run_id) if rank == 0 else None
    if run is not None and resumed_epoch:
        run.client.set_tag(run.run_id, "cmmasksd.resumed_from_epoch", str(resumed_epoch))
    _train_and_report(spec.config(trial, out_dir), run, run_id, ray_train)
    shutil.rmtree(out_dir, ignore_errors=True)
