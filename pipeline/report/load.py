"""Read one sweep back from MLflow, through the tracking contract only (`pipeline/tracking.py`).

A trial's variant is its `cmmasksd.overrides` tag (the overrides it ran with, without the seed):
trials that share it are seeds of one variant; trials that differ in any override, `masksd.*` or
not, are different variants.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pipeline.tracking import OVERRIDES, VARIANT

PER_EXPRESSION_COLUMNS = ["sentence_idx", "image_id", "inter", "union"]
KIND_COLUMN = "kind"  # the expression's kind (`cmmasksd.data.kinds`); absent in runs logged before it


def typed(value):
    """MLflow stores params as strings; numbers come back as floats so "1" and "1.0" compare equal."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def child_runs(client: MlflowClient, parent_run_id: str) -> list:
    """All active child runs of the sweep, every status, paging through the search."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _per_expression(client: MlflowClient, run, tmp: Path) -> dict[str, pd.DataFrame]:
    """Per split, the trial's intersections and unions per expression with their image ids (and kinds)."""
    run_id = run.info.run_id
    if not client.list_artifacts(run_id, "per_expression"):
        return {}
    local = Path(client.download_artifacts(run_id, "per_expression", str(tmp / run_id)))
    tables = {}
    for path in sorted(local.glob("per_expression_*.csv")):
        table = pd.read_csv(path)
        missing = set(PER_EXPRESSION_COLUMNS) - set(table.columns)
        if missing:
            raise ValueError(f"run {run_id} ({run.data.tags.get(VARIANT)}): {path.name} lacks columns "
                             f"{sorted(missing)}; expected {PER_EXPRESSION_COLUMNS} (rerun the sweep)")
        columns = PER_EXPRESSION_COLUMNS + ([KIND_COLUMN] if KIND_COLUMN in table.columns else [])
        tables[path.stem.removeprefix("per_expression_")] = table[columns]
    return tables


def load_trials(tracking_uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per FINISHED trial: run_id, variant (name), variant_key, overrides, seed, every param
    (typed), final/cost metrics, and `per_expression/<split>` (a DataFrame per trial, or None)."""
    client = MlflowClient(tracking_uri)
    runs = [r for r in child_runs(client, parent_run_id) if r.info.status == "FINISHED"]
    if not runs:
        return pd.DataFrame(columns=["run_id", "variant", "variant_key", "overrides", "seed"])
    rows = []
    for r in runs:
        if OVERRIDES not in r.data.tags:
            raise ValueError(f"run {r.info.run_id}: no `{OVERRIDES}` tag, so its variant is unknown "
                             "(logged by an older cmmasksd; rerun the sweep)")
        rows.append({
            "run_id": r.info.run_id,
            "variant": r.data.tags.get(VARIANT, r.info.run_name),
            "variant_key": r.data.tags[OVERRIDES],
            "overrides": json.loads(r.data.tags[OVERRIDES]),
            **{k: typed(v) for k, v in r.data.params.items()},
            # final/ and cost/ once per trial; mask/ per epoch, of which MLflow keeps the last here
            **{k: v for k, v in r.data.metrics.items() if k.startswith(("final/", "cost/", "mask/"))
               or k == "best_epoch"},
        })
    trials = pd.DataFrame(rows)
    trials["seed"] = trials["seed"].astype(int)
    with tempfile.TemporaryDirectory() as tmp:
        tables = [_per_expression(client, r, Path(tmp)) for r in runs]
    for split in sorted({s for t in tables for s in t}):
        trials[f"per_expression/{split}"] = [t.get(split) for t in tables]
    return trials


def missing_trials(tracking_uri: str, parent_run_id: str) -> pd.DataFrame:
    """Child runs that did not finish (FAILED, RUNNING, KILLED): listed in the report, never used."""
    runs = child_runs(MlflowClient(tracking_uri), parent_run_id)
    return pd.DataFrame(
        [{"run_id": r.info.run_id, "variant": r.data.tags.get(VARIANT, r.info.run_name),
          "status": r.info.status} for r in runs if r.info.status != "FINISHED"],
        columns=["run_id", "variant", "status"],
    )


def load_curves(tracking_uri: str, run_ids, key: str = "val/miou") -> pd.DataFrame:
    """Per-epoch history of one metric: columns run_id, step (epoch), value."""
    client = MlflowClient(tracking_uri)
    return pd.DataFrame(
        [{"run_id": run_id, "step": m.step, "value": m.value}
         for run_id in run_ids for m in client.get_metric_history(run_id, key)],
        columns=["run_id", "step", "value"],
    )


def download_overlay(client: MlflowClient, run_ids, path: Path) -> bool:
    """Copy the first of these runs' `figures/overlays_val.png` to `path`; False when none logged one."""
    for run_id in run_ids:
        if any(a.path == "figures/overlays_val.png" for a in client.list_artifacts(run_id, "figures")):
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(client.download_artifacts(run_id, "figures/overlays_val.png", tmp), path)
            return True
    return False
