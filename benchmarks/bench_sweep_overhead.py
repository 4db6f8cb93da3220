"""Orchestration overhead of the sweep: one trial through Ray Tune + MLflow against a bare `train(config)`.

    .venv/bin/python benchmarks/bench_sweep_overhead.py --json benchmarks/bench_sweep_overhead.json

The same trial both ways: the embedded default's base config (`params.yaml`), CRIS, seed 0,
`--epochs` epochs, 1 thread (what `sweep.resources.cpu: 1` gives a trial), on the prepared
default data (`dvc repro preprocess@refshapes` first). Both run as a user runs them, each a fresh
process from the repo root: `cmmasksd train --config` for the bare run, and `python -m
pipeline.sweep` with a one-trial grid, in temporary Ray storage and a temporary sqlite MLflow
store. Reported: both wall times and the sweep's overhead (its wall time over the bare one, minus 1:
Ray start-up, the MLflow parent run and the preflight checks included); for where it goes, the
trial's MLflow run from start to end (the trial's own part).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `pipeline/` is not installed: DVC runs the stages from the repo root


def timed(command: list[str]) -> float:
    """Wall seconds of a command run from the repo root, as DVC runs a stage (output discarded)."""
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-train-objects", type=int, help="default: every training object")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from pipeline.common import load_params
    from pipeline.sweep import base_config
    from pipeline.trial import trial_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())  # edited as written, validated below
    overrides = {"optim": {"epochs": args.epochs, "milestones": []}}
    if args.max_train_objects:
        overrides["data"] = {"max_train_objects": args.max_train_objects}
    params["train"]["overrides"] = overrides
    dataset = params["sweep"]["dataset"]
    prepared = REPO / "data" / "prepared" / dataset
    if not (prepared / "train" / "manifest.json").exists():
        raise SystemExit(f"error: {prepared}: not prepared; run `dvc repro preprocess@{dataset}`")

    with tempfile.TemporaryDirectory(prefix="cmmasksd-overhead-") as tmp:
        tmp = Path(tmp)
        params["sweep"].update(variants=[], seeds=[0], max_concurrent=1)
        params["sweep"]["asha"]["enabled"] = False
        params["ray"].update(storage=str(tmp / "ray"), address=None)
        params["mlflow"].update(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="overhead")
        (tmp / "params.yaml").write_text(yaml.safe_dump(params))
        base = base_config(load_params(tmp / "params.yaml").need("train"))
        config = trial_config(base, {"masksd.branches": "none", "seed": 0}, prepared, tmp / "bare", 1)
        (tmp / "bare.yaml").write_text(yaml.safe_dump(config))
        bare = timed([sys.executable, "-m", "cmmasksd.cli", "train", "--config", str(tmp / "bare.yaml")])
        print(f"bare `cmmasksd train`: {bare:.1f} s", flush=True)

        swept = timed([sys.executable, "-m", "pipeline.sweep", "--params", str(tmp / "params.yaml"),
                       "--out", str(tmp / "sweep")])
        run_id = json.loads((tmp / "sweep" / "sweep.json").read_text())["parent_run_id"]
        client = MlflowClient(params["mlflow"]["tracking_uri"])
        run = client.search_runs([client.get_run(run_id).info.experiment_id],
                                 filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")[0]
        trial = (run.info.end_time - run.info.start_time) / 1000
        print(f"sweep stage (Ray Tune + MLflow): {swept:.1f} s, its trial's MLflow run {trial:.1f} s", flush=True)

    summary = {
        "command": "benchmarks/bench_sweep_overhead.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                    vars(args).items() if v and k != "json"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "trial": {"epochs": args.epochs, "branches": "none", "threads": 1,
                  "max_train_objects": args.max_train_objects},
        "bare_s": round(bare, 2), "sweep_s": round(swept, 2), "trial_run_s": round(trial, 2),
        "sweep_overhead": round(swept / bare - 1, 4),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
