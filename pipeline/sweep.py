"""DVC stage `sweep`: a Ray Tune grid over CM-MaskSD variants x seeds, each trial tracked in MLflow.

    python -m pipeline.sweep            (what `dvc repro` runs)

The grid comes from `params.yaml` (`sweep.variants` x `sweep.seeds`, plus the CRIS baseline), each
cell a typed `Trial`, all sharing one `SweepSpec` (`pipeline.trial`). Every trial checkpoints each
epoch through Tune; a failed trial is retried from its last checkpoint (`sweep.max_failures`), and
rerunning an interrupted sweep restores it (`Tuner.restore`) so finished trials are not trained
again. The Ray experiment is named after the digest of everything that can change a result: the
code the stage imports and each trial's identity (config, data and weights by content, device,
precision and threads as this machine decides them, library versions; `pipeline.identity`), so a
changed input trains a new experiment instead of restoring stale trials. Ray's storage lives
outside the DVC outputs (`ray.storage`); the stage writes `sweep/trials.csv`, `sweep/sweep.json`
(the MLflow parent run) and `sweep/best_config.yaml`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pipeline.common import REPO_ROOT, load_params, repo_path, run_main, setup_logging
from pipeline.contract import (
    BASELINE,
    CODE_DIGEST,
    FINAL,
    FINISHED,
    GIT_COMMIT,
    GIT_DIRTY,
    METRIC,
    PRECISION,
    RUN_ID,
    variant_key,
    variant_name,
)
from pipeline.identity import code_digest, git_state, sweep_identity
from pipeline.params_schema import Params, ResourcesParams, SweepParams, TrainParams
from pipeline.preflight import check_fits, check_model, check_prepared, keep_local_ray_on_loopback
from pipeline.storage import RayStorage, check_shared
from pipeline.tracking import (
    check_tracking_server,
    dataset_input,
    ensure_experiment,
    redact,
    resolve_tracking_uri,
    start_sweep_run,
)
from pipeline.trial import SweepSpec, Trial, run_trial, trial_config

# Ray >= 2.59 turns token auth on for local clusters: say so explicitly (Ray reads this when it
# is imported, so before any `import ray`), and let the user's own setting win, e.g.
# RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN for a cluster started with `ray start --head`.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Tune's automatic result loggers: only its JSON one is kept (`build_tuner`, which Tune's results read);
# MLflow is this project's record, and Tune's TensorBoard logger would ask for tensorboardX on every run.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# `CheckpointConfig(num_to_keep=1)` (a trial keeps one checkpoint, so a sweep's disk use stays that of
# its trials) makes Tune snapshot the experiment state after every trial checkpoint, so that a restored
# sweep never points at a deleted one. Tune warns when two such snapshots fall within 5 s, a concern
# for slow cloud uploads; the snapshot is a small file, so the warning is off unless the user sets it.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

log = logging.getLogger(__name__)
OUT_DIR = Path("sweep")
DRIVER_MEMORY = 512 * 2**20  # bytes a multi-worker trial's driver reserves (Python, Ray Train, MLflow client)

# Relative cost of a training step by branches (measured: both ~2x, one branch ~1.4-1.6x a CRIS step).
_STEP_COST = {"both": 3, "lmvsd": 2, "vmlsd": 2, "joint": 2, "none": 1}


def expand_grid(sweep: SweepParams, base_branches: str = "both") -> list[Trial]:
    """The trials: (variants + the CRIS baseline) x seeds.

    Tune starts trials in list order, so the costliest go first (by `masksd.branches`) and the cheap
    baseline last: every slot stays busy until the end instead of one long trial running alone.
    A variant written twice is an error (its seeds would be counted twice).
    """
    variants = [dict(v) for v in sweep.variants if dict(v) != BASELINE] + [BASELINE]
    names: dict[str, dict] = {}
    for variant in variants:
        if "seed" in variant:
            raise ValueError(f"params.yaml: sweep.variants: {variant} sets `seed`; list seeds in `sweep.seeds`")
        name = variant_name(variant, base_branches)
        if name in names:
            raise ValueError(f"params.yaml: sweep.variants lists the variant `{name}` twice ({names[name]} and {variant})")
        names[name] = variant
    def branches(v: dict) -> str:
        return "joint" if v.get("masksd.recipe") == "maskris" else str(v.get("masksd.branches", base_branches))

    variants.sort(key=lambda v: -_STEP_COST.get(branches(v), 3))
    return [Trial(variant_name(v, base_branches), variant_key(v), v, int(seed)) for v in variants for seed in sweep.seeds]


def base_config(train: TrainParams) -> dict[str, Any]:
    """`train.profile` with `train.overrides` merged in: the raw config every trial starts from."""
    from cmmasksd.config import deep_merge, read_profile

    base = deep_merge(read_profile(train.profile), train.overrides)
    model = base.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and repo_path(model["pretrained"]).is_file():
        base["model"] = {**model, "pretrained": str(repo_path(model["pretrained"]))}  # trials run elsewhere
    return base


def trial_device(device: str, resources: ResourcesParams) -> str:
    """The device type the trials compute on: the config's, or for `auto` what they reserve."""
    if device != "auto":
        return device.split(":")[0]
    return "cuda" if resources.gpu > 0 else "cpu"


def trial_identities(spec_base: dict[str, Any], trials: list[Trial], prepared_dir: Path, threads: int,
                     resources: ResourcesParams) -> list[dict[str, Any]]:
    """Each trial's `run_identity`, as the machine running this stage decides device and precision."""
    from cmmasksd.config import build_config
    from cmmasksd.identity import run_identity

    identities = []
    for trial in trials:
        config = build_config(trial_config(spec_base, trial.settings, prepared_dir, Path("."), threads))
        identities.append(run_identity(config, trial_device(config.device, resources)))
    return identities


def precision_label(identities: list[dict[str, Any]]) -> str:
    """What the trials run in, e.g. `bf16 on cpu` (both, where variants set `optim.amp` apart)."""
    found = sorted({f"{i['runtime']['precision']} on {i['runtime']['device']}" for i in identities})
    return " + ".join(found)


def _with_precision(identities: list[dict[str, Any]], precision: str) -> list[dict[str, Any]]:
    return [{**i, "runtime": {**i["runtime"], "precision": precision}} for i in identities]


def warn_other_precision(sweep: SweepParams, identities, scheduling, code: str, storage: RayStorage) -> None:
    """Say so when this sweep already ran in the other precision (on a machine that decides otherwise):
    it becomes a separate experiment here instead of mixing the two."""
    from cmmasksd.identity import digest

    mine = {i["runtime"]["precision"] for i in identities}
    for other in {"bf16", "fp32"} - mine:
        name = f"{sweep.name}-{digest(sweep_identity(_with_precision(identities, other), scheduling, code))}"
        if storage.read_text(f"{name}/cmmasksd_sweep.json") is not None:
            how = ("set train.overrides.optim.amp: false to continue that fp32 sweep here" if other == "fp32"
                   else "it can continue only on a machine with native bf16")
            log.warning("this sweep ran in %s before (%s); this machine runs %s, so it starts a separate sweep "
                        "rather than mixing precisions (%s)", other, storage.join(name), " + ".join(sorted(mine)), how)


def init_ray(address: str | None) -> None:
    """A local Ray (default) or an existing cluster; trials import `pipeline` from this repo."""
    import ray

    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        runtime_env["worker_process_setup_hook"] = "pipeline.common.quiet_state_api_checks"  # no dashboard here
        context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                           _node_ip_address="127.0.0.1")  # loopback only: see keep_local_ray_on_loopback
    log.info("Ray cluster at %s (%s)", context.address_info["gcs_address"], "given" if address else "started here")


def trainable(sweep: SweepParams):
    """`run_trial` reserving `sweep.resources` per trial (fractional GPUs allowed). A multi-worker
    trial's driver reserves no CPU, only the memory it uses: its Ray Train workers hold the rest."""
    from ray import tune

    resources = sweep.resources
    if resources.workers > 1:
        return tune.with_resources(run_trial, {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY})
    return tune.with_resources(run_trial, {"cpu": resources.cpu, "gpu": resources.gpu})


def concurrent_trials(sweep: SweepParams, cluster: dict[str, float]) -> int:
    """`sweep.max_concurrent`, capped by how many trials the cluster holds at once: Tune does not
    see what a trial's Ray Train workers will ask for, and trials started beyond that would wait on
    each other's workers."""
    resources = sweep.resources
    fits = [math.floor(cluster.get("CPU", 0) / (resources.workers * resources.cpu) + 1e-9)]
    if resources.gpu > 0:
        fits.append(math.floor(cluster.get("GPU", 0) / (resources.workers * resources.gpu) + 1e-9))
    if min(fits) < 1:
        raise ValueError(
            f"params.yaml: sweep.resources: a trial needs {resources.workers} worker(s) x "
            f"{resources.cpu} CPU, {resources.gpu} GPU; the Ray cluster has {cluster.get('CPU', 0):g} CPU, "
            f"{cluster.get('GPU', 0):g} GPU")
    return min(sweep.max_concurrent, *fits)


def build_tuner(spec: SweepSpec, trials: list[Trial], sweep: SweepParams, epochs: int, exp_name: str,
                storage: RayStorage, max_concurrent: int | None = None):
    """A new sweep's Tuner; ASHA stops trials by epoch, up to the `epochs` of the resolved base config."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    asha = sweep.asha
    scheduler = None
    if asha.enabled:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=asha.grace_period,
                                  reduction_factor=asha.reduction_factor)
    return tune.Tuner(
        trainable(sweep),
        param_space={"spec": spec, "trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent or sweep.max_concurrent),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=storage.uri,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[JsonLoggerCallback()],
            verbose=1,
        ),
    )


def run_sweep(params: Params, out_dir: Path = OUT_DIR) -> pd.DataFrame:
    """Start or resume the sweep; returns the trials table (also written to `out_dir`)."""
    sweep, ray_params, mlflow_params = params.need("sweep"), params.need("ray"), params.need("mlflow")
    keep_local_ray_on_loopback(ray_params.address)
    tracking_uri = resolve_tracking_uri(mlflow_params.tracking_uri)
    check_tracking_server(tracking_uri)
    from mlflow.tracking import MlflowClient
    from ray import tune

    from cmmasksd.config import build_config
    from cmmasksd.identity import digest, prepared_digest

    dataset = sweep.dataset
    prepared_dir = repo_path(Path("data/prepared") / dataset)
    if dataset not in params.preprocess:
        raise KeyError(f"params.yaml: missing `preprocess.{dataset}`")
    check_prepared(prepared_dir, dataset, params.preprocess[dataset])
    storage = RayStorage.from_param(ray_params.storage, REPO_ROOT)
    base = base_config(params.need("train"))
    threads = max(1, int(sweep.resources.cpu))
    check_model(trial_config(base, {}, prepared_dir, Path("."), threads))
    resolved = build_config(trial_config(base, {}, prepared_dir, Path("."), threads))
    trials = expand_grid(sweep, resolved.masksd.branches)
    settings = params.preprocess[dataset]
    check_fits({t.name: build_config(trial_config(base, t.settings, prepared_dir, Path("."), threads)) for t in trials},
               sweep.resources, settings.size, settings.word_len)
    identities = trial_identities(base, trials, prepared_dir, threads, sweep.resources)
    scheduling = {"workers": sweep.resources.workers, "asha": sweep.asha.model_dump()}  # they change numbers
    code, data = code_digest(), prepared_digest(prepared_dir)
    exp_name = f"{sweep.name}-{digest(sweep_identity(identities, scheduling, code))}"
    exp_path = storage.join(exp_name)
    precision = precision_label(identities)
    experiment_id = ensure_experiment(tracking_uri, mlflow_params.experiment)
    client = MlflowClient(tracking_uri)
    git = git_state()
    tags = {CODE_DIGEST: code, GIT_COMMIT: git["commit"], GIT_DIRTY: git["dirty"], PRECISION: precision}
    dataset_info = {"name": dataset, "digest": data, "path": str(prepared_dir), "profile": _data_profile(prepared_dir)}
    backbone = base["model"] if isinstance(base.get("model"), str) else resolved.model.clip

    parent_file = f"{exp_name}/cmmasksd_sweep.json"
    saved = storage.read_text(parent_file)
    if saved is not None:
        parent_run_id = json.loads(saved)["parent_run_id"]
        log.info("resuming sweep %s (MLflow parent run %s)", exp_path, parent_run_id)
    else:
        log.info("new sweep %s (code %s, data %s, %s)", exp_path, code[:12], data[:12], precision)
        warn_other_precision(sweep, identities, scheduling, code, storage)
        run_tags = {**tags, "dataset": dataset, "backbone": str(backbone), "data_hash": data,
                    "ray_experiment": exp_path, "n_trials": str(len(trials))}
        run_name = f"{sweep.name} · {dataset} · {backbone} · {len(trials)} trials · {exp_name[-6:]}"
        parent_run_id = start_sweep_run(
            client, experiment_id, run_name,
            {"sweep": sweep.model_dump(mode="json"), "train": params.need("train").model_dump(mode="json"),
             "base": base}, run_tags, dataset_input(**dataset_info))
        storage.write_text(parent_file, json.dumps({"parent_run_id": parent_run_id, "precision": precision}))

    spec = SweepSpec(
        base=base, prepared_dir=str(prepared_dir), threads=threads, tracking_uri=tracking_uri,
        experiment_id=experiment_id, parent_run_id=parent_run_id, tags=tags, dataset=dataset_info,
        workers=sweep.resources.workers, worker_resources={"cpu": sweep.resources.cpu, "gpu": sweep.resources.gpu},
        train_storage=storage.join(exp_name, "train"), max_failures=sweep.max_failures,
    )
    init_ray(ray_params.address)
    import ray

    check_shared(storage, tracking_uri, ray.nodes())
    max_concurrent = concurrent_trials(sweep, ray.cluster_resources())
    log.info("at most %d trial(s) at once, each %d worker(s)", max_concurrent, sweep.resources.workers)
    if tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable(sweep), resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = build_tuner(spec, trials, sweep, resolved.optim.epochs, exp_name, storage, max_concurrent)
    results = tuner.fit()

    table = trials_table(results, storage.scheme)
    for row in table.itertuples():
        if row.status == "FINISHED":
            client.set_tag(row.mlflow_run_id, "checkpoint_path", row.checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "trials.csv", index=False)
    (out_dir / "sweep.json").write_text(json.dumps({
        "experiment": mlflow_params.experiment, "experiment_id": experiment_id,
        "parent_run_id": parent_run_id, "tracking_uri": redact(tracking_uri), "ray_experiment": exp_path,
        "code_digest": code, "precision": precision, "n_trials": len(table),
        "n_failed": int((table["status"] != "FINISHED").sum()),
    }, indent=2))
    best = table[table["status"] == "FINISHED"].sort_values(f"{FINAL}{METRIC}", ascending=False).head(1)
    if not best.empty:
        config = trial_config(base, best.iloc[0]["overrides"], prepared_dir, Path("runs/best"), threads)
        (out_dir / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    client.log_artifact(parent_run_id, str(out_dir / "trials.csv"))
    client.set_terminated(parent_run_id, status="FINISHED" if table["status"].eq("FINISHED").all() else "FAILED")
    return table


def trials_table(results, scheme: str | None = None) -> pd.DataFrame:
    """One row per trial: its variant, seed, status, MLflow run, best weights and final metrics."""
    rows = []
    for result in results:
        trial: Trial = result.config["trial"]
        metrics = result.metrics or {}
        done = bool(metrics.get(FINISHED)) and result.error is None
        rows.append({
            "variant": trial.name, "variant_key": trial.key, "seed": trial.seed,
            "status": "FINISHED" if done else "FAILED",
            "mlflow_run_id": metrics.get(RUN_ID, ""),
            "checkpoint": _best_weights(result, metrics, scheme) if done else "",
            **{k: metrics.get(k) for k in sorted(metrics) if k.startswith((FINAL, "cost/"))},
            "overrides": trial.settings,
            "error": "" if result.error is None else str(result.error).splitlines()[0][:200],
        })
    return pd.DataFrame(rows).sort_values(["variant", "seed"]).reset_index(drop=True)


def _best_weights(result, metrics: dict[str, Any], scheme: str | None) -> str:
    """Where a finished trial's best.pt was stored: Tune's checkpoint, or (multi-worker) Ray Train's;
    a URI for remote storage (pyarrow gives the path inside the bucket)."""
    from cmmasksd.train import BEST

    folder = result.checkpoint.path if result.checkpoint else metrics.get("checkpoint_path")
    if not folder:
        return ""
    if scheme not in (None, "file") and "://" not in folder:
        folder = f"{scheme}://{folder}"
    return f"{folder.rstrip('/')}/{BEST}"


def _data_profile(prepared_dir: Path) -> dict[str, Any]:
    """Per split: images, objects and expressions, from the manifests (shown with the MLflow dataset)."""
    return {manifest.parent.name: json.loads(manifest.read_text()).get("counts", {})
            for manifest in sorted(prepared_dir.glob("*/manifest.json"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO_ROOT / "params.yaml"))
    parser.add_argument("--out", default=str(OUT_DIR))
    args = parser.parse_args(argv)
    setup_logging()
    table = run_sweep(load_params(args.params), Path(args.out))
    print(table.drop(columns=["overrides"]).to_string(index=False))
    if not table["status"].eq("FINISHED").any():
        raise SystemExit("sweep: no trial finished; see the errors above and in sweep/trials.csv")


if __name__ == "__main__":
    run_main(main)
