"""DVC stage `sweep`: a Ray Tune grid over CM-MaskSD variants x seeds, each trial tracked in MLflow.

    python -m pipeline.sweep            (what `dvc repro` runs)

The grid comes from `params.yaml` (`sweep.variants` x `sweep.seeds`, plus the CRIS baseline).
Every trial checkpoints each epoch through Tune; a failed trial is retried from its last
checkpoint (`sweep.max_failures`), and rerunning an interrupted sweep restores it
(`Tuner.restore`) so finished trials are not trained again. The Ray experiment is named after a
hash of everything that can change a result (code, resolved base config with the pretrained
weights' digest, grid, data: see
`pipeline.identity`), so a changed input trains a new experiment instead of restoring stale trials. Ray's storage lives outside the DVC
outputs (`ray.storage`); the stage writes `sweep/trials.csv`, `sweep/sweep.json` (the MLflow
parent run) and `sweep/best_config.yaml`.
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

from cmmasksd.io.digest import file_sha256
from pipeline.common import REPO_ROOT, load_params, repo_path, run_main, section, setup_logging
from pipeline.identity import code_digest, data_digest, git_state, sweep_fingerprint
from pipeline.preflight import check_model, check_prepared, keep_local_ray_on_loopback
from pipeline.storage import RayStorage, check_shared
from pipeline.trial import FINISHED, METRIC, run_trial, trial_config
from pipeline.tracking import (
    CODE_DIGEST,
    GIT_COMMIT,
    GIT_DIRTY,
    check_tracking_server,
    dataset_input,
    ensure_experiment,
    redact,
    resolve_tracking_uri,
    start_sweep_run,
)

# Ray >= 2.59 turns token auth on for local clusters: say so explicitly (Ray reads this when it
# is imported, so before any `import ray`), and let the user's own setting win, e.g.
# RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN for a cluster started with `ray start --head`.
os.environ.setdefault("RAY_AUTH_MODE", "token")

log = logging.getLogger(__name__)
BASELINE = {"masksd.branches": "none"}
OUT_DIR = Path("sweep")


DRIVER_MEMORY = 512 * 2**20  # bytes a multi-worker trial's driver reserves (Python, Ray Train, MLflow client)

SHORT_KEYS = {"masksd.mask_ratio_v": "r_v", "masksd.mask_ratio_t": "r_t", "masksd.lambda_v": "l_v",
              "masksd.lambda_t": "l_t"}


def variant_name(overrides: dict[str, Any], base_branches: str = "both") -> str:
    """A readable name that shows every override: `both r_v=0.25 r_t=0.15`, `cris optim.lr=0.001`.

    It starts with the branches (`cris` for none, else the branches the variant trains) and names
    every other key that differs from the base config, so two different variants never share a name.
    """
    branches = str(overrides.get("masksd.branches", base_branches))
    parts = ["cris" if branches == "none" else branches]
    for key, value in overrides.items():
        if key not in ("masksd.branches", "seed"):
            parts.append(f"{SHORT_KEYS.get(key, key.removeprefix('masksd.'))}={value}")
    return " ".join(parts)


def variant_key(overrides: dict[str, Any]) -> str:
    """The identity of a variant: its overrides without the seed, as canonical JSON."""
    return json.dumps({k: v for k, v in overrides.items() if k != "seed"}, sort_keys=True)


# Relative cost of a training step by branches (measured: both ~2x, one branch ~1.4-1.6x a CRIS step).
_STEP_COST = {"both": 3, "lmvsd": 2, "vmlsd": 2, "none": 1}


def expand_grid(sweep: dict[str, Any], base_branches: str = "both") -> list[dict[str, Any]]:
    """The trials: (variants + the CRIS baseline) x seeds; each its name, variant key and dotted overrides.

    Tune starts trials in list order, so the costliest go first (by `masksd.branches`) and the cheap
    baseline last: every slot stays busy until the end instead of one long trial running alone.
    A variant written twice is an error (its seeds would be counted twice).
    """
    variants = [dict(v) for v in sweep["variants"] if dict(v) != BASELINE] + [BASELINE]
    names: dict[str, dict] = {}
    for variant in variants:
        if "seed" in variant:
            raise ValueError(f"params.yaml: sweep.variants: {variant} sets `seed`; list seeds in `sweep.seeds`")
        name = variant_name(variant, base_branches)
        if name in names:
            raise ValueError(f"params.yaml: sweep.variants lists the variant `{name}` twice ({names[name]} and {variant})")
        names[name] = variant
    variants.sort(key=lambda v: -_STEP_COST.get(str(v.get("masksd.branches", base_branches)), 3))
    return [
        {"name": variant_name(v, base_branches), "key": variant_key(v), "overrides": {**v, "seed": int(seed)}}
        for v in variants
        for seed in sweep["seeds"]
    ]


def base_config(params: dict[str, Any]) -> dict[str, Any]:
    """`train.profile` with `train.overrides` merged in: the raw config every trial starts from."""
    from cmmasksd.config import deep_merge, read_profile

    train = section(params, "train")
    base = deep_merge(read_profile(train["profile"]), train["overrides"])
    model = base.get("model")
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str) and repo_path(model["pretrained"]).is_file():
        base["model"] = {**model, "pretrained": str(repo_path(model["pretrained"]))}  # trials run elsewhere
    return base


def resolved_base(base: dict[str, Any]) -> dict[str, Any]:
    """The validated base config, named model expanded and defaults filled in, without where it runs:
    what the sweep's identity hashes, so a changed model-config JSON or default changes it too."""
    from cmmasksd.config import build_config

    placeholder = trial_config(base, {}, Path("."), Path("."), 1)
    resolved = build_config(placeholder).model_dump(mode="json")
    for key in ("out_dir", "threads"):
        resolved.pop(key)
    resolved["data"].pop("prepared_dir")
    weights = resolved["model"]["pretrained"]
    if weights is not None and Path(weights).is_file():  # the weights' content, wherever they lie
        resolved["model"]["pretrained"] = f"sha256:{file_sha256(Path(weights))}"
    return resolved


def init_ray(address: str | None) -> None:
    """A local Ray (default) or an existing cluster; trials import `pipeline` from this repo."""
    import ray

    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    if address:
        context = ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=runtime_env,
                           _node_ip_address="127.0.0.1")  # loopback only: see keep_local_ray_on_loopback
    log.info("Ray cluster at %s (%s)", context.address_info["gcs_address"], "given" if address else "started here")


def trainable(sweep: dict[str, Any]):
    """`run_trial` reserving `sweep.resources` per trial (fractional GPUs allowed). A multi-worker
    trial's driver reserves no CPU, only the memory it uses: its Ray Train workers hold the rest."""
    from ray import tune

    resources = sweep["resources"]
    if resources["workers"] > 1:
        return tune.with_resources(run_trial, {"cpu": 0, "gpu": 0, "memory": DRIVER_MEMORY})
    return tune.with_resources(run_trial, {"cpu": resources["cpu"], "gpu": resources["gpu"]})


def concurrent_trials(sweep: dict[str, Any], cluster: dict[str, float]) -> int:
    """`sweep.max_concurrent`, capped by how many trials the cluster holds at once: Tune does not
    see what a trial's Ray Train workers will ask for, and trials started beyond that would wait on
    each other's workers."""
    resources = sweep["resources"]
    fits = [math.floor(cluster.get("CPU", 0) / (resources["workers"] * resources["cpu"]) + 1e-9)]
    if resources["gpu"] > 0:
        fits.append(math.floor(cluster.get("GPU", 0) / (resources["workers"] * resources["gpu"]) + 1e-9))
    if min(fits) < 1:
        raise ValueError(
            f"params.yaml: sweep.resources: a trial needs {resources['workers']} worker(s) x "
            f"{resources['cpu']} CPU, {resources['gpu']} GPU; the Ray cluster has {cluster.get('CPU', 0):g} CPU, "
            f"{cluster.get('GPU', 0):g} GPU")
    return min(sweep["max_concurrent"], *fits)


def build_tuner(spec_base: dict[str, Any], trials: list[dict[str, Any]], sweep: dict[str, Any], epochs: int,
                exp_name: str, storage: RayStorage, max_concurrent: int | None = None):
    """A new sweep's Tuner; ASHA stops trials by epoch, up to the `epochs` of the resolved base config."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    asha = sweep["asha"]
    scheduler = None
    if asha["enabled"]:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=asha["grace_period"],
                                  reduction_factor=asha["reduction_factor"])
    return tune.Tuner(
        trainable(sweep),
        param_space={**spec_base, "trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=max_concurrent or sweep["max_concurrent"]),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=storage.uri,
            failure_config=tune.FailureConfig(max_failures=sweep["max_failures"]),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )


def run_sweep(params: dict[str, Any], out_dir: Path = OUT_DIR) -> pd.DataFrame:
    """Start or resume the sweep; returns the trials table (also written to `out_dir`)."""
    keep_local_ray_on_loopback(section(params, "ray", "address"))
    tracking_uri = resolve_tracking_uri(section(params, "mlflow", "tracking_uri"))
    check_tracking_server(tracking_uri)
    from mlflow.tracking import MlflowClient
    from ray import tune

    sweep = section(params, "sweep")
    dataset = sweep["dataset"]
    prepared_dir = repo_path(Path("data/prepared") / dataset)
    check_prepared(prepared_dir, dataset, section(params, "preprocess", dataset))
    storage = RayStorage.from_param(section(params, "ray", "storage"), REPO_ROOT)
    base = base_config(params)
    check_model(trial_config(base, {}, prepared_dir, Path("."), 1))
    resolved = resolved_base(base)
    trials = expand_grid(sweep, resolved["masksd"]["branches"])
    code, data = code_digest(), data_digest(prepared_dir)
    fingerprint = sweep_fingerprint(resolved, sweep, data, code)
    exp_name = f"{sweep['name']}-{fingerprint}"
    exp_path = storage.join(exp_name)
    experiment_id = ensure_experiment(tracking_uri, section(params, "mlflow", "experiment"))
    client = MlflowClient(tracking_uri)
    git = git_state()
    identity = {CODE_DIGEST: code, GIT_COMMIT: git["commit"], GIT_DIRTY: git["dirty"]}
    dataset_info = {"name": dataset, "digest": data, "path": str(prepared_dir),
                    "profile": _data_profile(prepared_dir)}
    backbone = base["model"] if isinstance(base.get("model"), str) else resolved["model"]["clip"]

    parent_file = f"{exp_name}/cmmasksd_sweep.json"
    saved = storage.read_text(parent_file)
    if saved is not None:
        parent_run_id = json.loads(saved)["parent_run_id"]
        log.info("resuming sweep %s (MLflow parent run %s)", exp_path, parent_run_id)
    else:
        log.info("new sweep %s (code %s, data %s)", exp_path, code[:12], data[:12])
        tags = {**identity, "dataset": dataset, "backbone": str(backbone), "data_hash": data,
                "ray_experiment": exp_path, "n_trials": str(len(trials))}
        run_name = f"{sweep['name']} · {dataset} · {backbone} · {len(trials)} trials · {fingerprint[:6]}"
        parent_run_id = start_sweep_run(client, experiment_id, run_name,
                                        {"sweep": sweep, "train": params["train"], "base": base}, tags,
                                        dataset_input(**dataset_info))
        storage.write_text(parent_file, json.dumps({"parent_run_id": parent_run_id}))

    spec_base = {
        "base": base, "prepared_dir": str(prepared_dir), "tracking_uri": tracking_uri,
        "experiment_id": experiment_id, "parent_run_id": parent_run_id, "identity": identity,
        "dataset": dataset_info, "threads": max(1, int(sweep["resources"]["cpu"])),
        "workers": sweep["resources"]["workers"], "worker_resources": sweep["resources"],
        "train_storage": storage.join(exp_name, "train"), "max_failures": sweep["max_failures"],
    }
    init_ray(section(params, "ray", "address"))
    import ray

    check_shared(storage, tracking_uri, ray.nodes())
    max_concurrent = concurrent_trials(sweep, ray.cluster_resources())
    log.info("at most %d trial(s) at once, each %d worker(s)", max_concurrent, sweep["resources"]["workers"])
    if tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable(sweep), resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = build_tuner(spec_base, trials, sweep, resolved["optim"]["epochs"], exp_name, storage, max_concurrent)
    results = tuner.fit()

    table = trials_table(results, storage.scheme)
    for row in table.itertuples():
        if row.status == "FINISHED":
            client.set_tag(row.mlflow_run_id, "checkpoint_path", row.checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "trials.csv", index=False)
    (out_dir / "sweep.json").write_text(json.dumps({
        "experiment": section(params, "mlflow", "experiment"), "experiment_id": experiment_id,
        "parent_run_id": parent_run_id, "tracking_uri": redact(tracking_uri), "ray_experiment": exp_path,
        "code_digest": code, "n_trials": len(table), "n_failed": int((table["status"] != "FINISHED").sum()),
    }, indent=2))
    best = table[table["status"] == "FINISHED"].sort_values(f"final/{METRIC}", ascending=False).head(1)
    if not best.empty:
        row = best.iloc[0]
        config = trial_config(spec_base["base"], row["overrides"], prepared_dir, Path("runs/best"), spec_base["threads"])
        (out_dir / "best_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    client.log_artifact(parent_run_id, str(out_dir / "trials.csv"))
    client.set_terminated(parent_run_id, status="FINISHED" if table["status"].eq("FINISHED").all() else "FAILED")
    return table


def trials_table(results, scheme: str | None = None) -> pd.DataFrame:
    """One row per trial: its variant, seed, status, MLflow run, best weights and final metrics."""
    rows = []
    for result in results:
        trial = result.config["trial"]
        metrics = result.metrics or {}
        done = bool(metrics.get(FINISHED)) and result.error is None
        rows.append({
            "variant": trial["name"], "variant_key": trial["key"], "seed": trial["overrides"]["seed"],
            "status": "FINISHED" if done else "FAILED",
            "mlflow_run_id": metrics.get("mlflow_run_id", ""),
            "checkpoint": _best_weights(result, metrics, scheme) if done else "",
            **{k: metrics.get(k) for k in sorted(metrics) if k.startswith(("final/", "cost/"))},
            "overrides": trial["overrides"],
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
