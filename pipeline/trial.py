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
from pathlib import Path
from typing import Any

from pipeline.tracking import TrialRun, dataset_input

METRIC = "val/miou"
# In a trial's last report: it trained to the end. Not Tune's own `done`, which makes Tune end the
# trial at once: a Ray Train driver would be killed while its workers shut down, leaking their resources.
FINISHED = "trial_finished"
EPOCH_FILE = "epoch.json"  # beside last.pt in every checkpoint: the epoch it resumes after


def trial_config(base: dict[str, Any], overrides: dict[str, Any], prepared_dir: Path, out_dir: Path,
                 threads: int) -> dict[str, Any]:
    """The raw config of one trial: the base, where it runs (`threads` = what it reserved), its overrides."""
    from cmmasksd.config import apply_overrides

    placed = {"data.prepared_dir": str(prepared_dir), "out_dir": str(out_dir), "threads": threads}
    return apply_overrides(base, {**placed, **overrides})


def _build(spec: dict[str, Any], out_dir: Path):
    from cmmasksd.config import build_config

    return build_config(trial_config(spec["base"], spec["trial"]["overrides"], Path(spec["prepared_dir"]),
                                     out_dir, spec["threads"]))


def _open_run(spec: dict[str, Any], trial_id: str) -> TrialRun:
    overrides = {k: v for k, v in spec["trial"]["overrides"].items() if k != "seed"}
    return TrialRun(spec["tracking_uri"], spec["experiment_id"], spec["parent_run_id"], trial_id,
                    spec["trial"]["name"], overrides, spec["identity"], dataset_input(**spec["dataset"]))


def _logged_final(run: TrialRun, epochs: int) -> dict[str, Any]:
    """The final report of a trial whose MLflow run FINISHED: what it logged."""
    logged = run.client.get_run(run.run_id).data.metrics
    final = {k: v for k, v in logged.items() if k.startswith(("final/", "cost/"))}
    return {**final, METRIC: logged[f"final/{METRIC}"], "epoch": epochs, "mlflow_run_id": run.run_id, FINISHED: True}


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


def run_trial(spec: dict[str, Any]) -> None:
    """Ray Tune trainable: one training run, resumed from its last checkpoint after a failure."""
    if spec["workers"] > 1:
        return _drive_torch_trainer(spec)
    from ray import tune

    from cmmasksd.train import CHECKPOINT_DIR, LAST, train

    trial_id = tune.get_context().get_trial_id()
    # Tune runs each trial in its own working folder, which it does not copy to storage: the run's
    # files stay on its node, and only Tune's checkpoints (and MLflow) carry them off it.
    out_dir = Path.cwd() / "run"
    ckpt_dir = out_dir / CHECKPOINT_DIR
    checkpoint = tune.get_checkpoint()
    resumed_epoch = _restore(checkpoint, ckpt_dir)
    config = _build(spec, out_dir)
    run = _open_run(spec, trial_id)
    if run.finished:
        (ckpt_dir / LAST).unlink(missing_ok=True)
        tune.report(_logged_final(run, config.optim.epochs), checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
        shutil.rmtree(out_dir)
        return
    run.log_config(config.model_dump(mode="json"))
    if checkpoint is not None:
        run.client.set_tag(run.run_id, "cmmasksd.resumed_from_epoch", str(resumed_epoch))

    def on_epoch(report) -> None:
        run.log_epoch(report.metrics, report.epoch)
        (report.checkpoint_dir / EPOCH_FILE).write_text(json.dumps({"epoch": report.epoch}))
        tune.report({**report.metrics, "epoch": report.epoch},
                    checkpoint=tune.Checkpoint.from_directory(str(report.checkpoint_dir)))

    try:
        result = train(config, on_epoch=on_epoch)
    except BaseException:
        run.finish(ok=False)
        raise
    final = _log_result(run, result)
    # The last checkpoint Tune keeps (`num_to_keep=1`) is the best weights alone: a finished trial
    # needs no resume state, and the driver tags the MLflow run with where they were stored.
    (ckpt_dir / LAST).unlink()
    tune.report({**final, METRIC: result.best_val_miou, "epoch": config.optim.epochs,
                 "mlflow_run_id": run.run_id, FINISHED: True},
                checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))
    shutil.rmtree(out_dir)  # everything in it is in MLflow or in Tune's storage now


def _drive_torch_trainer(spec: dict[str, Any]) -> None:
    """The trial as a Ray Train driver: `spec["workers"]` workers, each `spec["worker_resources"]`."""
    from ray import train, tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    run = _open_run(spec, trial_id)  # here, not in a worker: a retried trial finds it again
    if run.finished:
        tune.report(_logged_final(run, _build(spec, Path(".")).optim.epochs))
        return
    run.log_config(_build(spec, Path.cwd() / "run").model_dump(mode="json"))  # rank 0 trains in a folder of its own
    resources = spec["worker_resources"]
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={**spec, "trial_id": trial_id, "mlflow_run_id": run.run_id},
        scaling_config=train.ScalingConfig(num_workers=spec["workers"], use_gpu=resources["gpu"] > 0,
                                           resources_per_worker={"CPU": resources["cpu"], "GPU": resources["gpu"]}),
        run_config=train.RunConfig(
            name=trial_id, storage_path=spec["train_storage"],
            failure_config=train.FailureConfig(max_failures=spec["max_failures"]),
            checkpoint_config=train.CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    )
    try:
        trainer.fit()
    except BaseException:
        run.finish(ok=False)
        raise


def _train_worker(spec: dict[str, Any]) -> None:
    """One Ray Train worker: the process group is set up; `train` takes its share of each batch."""
    from ray import train as ray_train

    from cmmasksd.train import CHECKPOINT_DIR, LAST, train

    context = ray_train.get_context()
    rank = context.get_world_rank()
    out_dir = Path(tempfile.mkdtemp(prefix=f"cmmasksd-{spec['trial_id']}-rank{rank}-"))  # this node's copy
    ckpt_dir = out_dir / CHECKPOINT_DIR
    resumed_epoch = _restore(ray_train.get_checkpoint(), ckpt_dir)
    config = _build(spec, out_dir)
    run = TrialRun.attach(spec["tracking_uri"], spec["mlflow_run_id"]) if rank == 0 else None
    if run is not None and resumed_epoch:
        run.client.set_tag(run.run_id, "cmmasksd.resumed_from_epoch", str(resumed_epoch))

    def on_epoch(report) -> None:
        checkpoint = None
        if run is not None:
            run.log_epoch(report.metrics, report.epoch)
            (report.checkpoint_dir / EPOCH_FILE).write_text(json.dumps({"epoch": report.epoch}))
            checkpoint = ray_train.Checkpoint.from_directory(str(report.checkpoint_dir))
        ray_train.report({**report.metrics, "epoch": report.epoch}, checkpoint=checkpoint)  # every rank reports

    result = train(config, on_epoch=on_epoch)
    final = result.flat_metrics()
    checkpoint = None
    if run is not None:
        final = _log_result(run, result)
        (ckpt_dir / LAST).unlink()  # the finished run's checkpoint: its best weights alone
        checkpoint = ray_train.Checkpoint.from_directory(str(ckpt_dir))
    ray_train.report({**final, METRIC: result.best_val_miou, "epoch": config.optim.epochs,
                      "mlflow_run_id": spec["mlflow_run_id"], FINISHED: True}, checkpoint=checkpoint)
    shutil.rmtree(out_dir, ignore_errors=True)
