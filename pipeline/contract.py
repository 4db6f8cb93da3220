"""The sweep <-> report contract: every name that the writing side (sweep, trial, MLflow glue) and the
reading side (report) must agree on, in one module both import.

Metric names (a trial logs them to MLflow and reports them to Tune; documented in `docs/tracking.md`):
- per epoch (step = epoch): `train/*`, `val/<metric>`, `mask/*`, `lr`, `epoch_time_s`, `step_time_s`;
- once, with the val-selected weights: `final/<split>/<metric>`, `cost/*`, `best_epoch`.
A variant is the overrides a trial ran with, without its seed; the CRIS baseline is `BASELINE`.
A report grid is a pair of override keys; its table and figure are named by `grid_name`.
"""

from __future__ import annotations

import json
import os
from typing import Any

SELECT_SPLIT = "val"  # checkpoints, variants and grid cells are chosen on this split only
METRIC = f"{SELECT_SPLIT}/miou"  # the selection metric: per epoch in MLflow, and Tune's
FINAL, COST, MASK = "final/", "cost/", "mask/"  # prefixes of the metrics the report reads
BEST_EPOCH = "best_epoch"
# In a trial's last report: it trained to the end. Not Tune's own `done`, which makes Tune end the
# trial at once: a Ray Train driver would be killed while its workers shut down, leaking their resources.
FINISHED = "trial_finished"
RUN_ID = "mlflow_run_id"  # in a trial's last report: the MLflow run that holds its results

# MLflow tags
ROLE = "cmmasksd.role"  # "sweep" (the parent run) or "trial"
TRIAL_ID = "cmmasksd.trial_id"
VARIANT = "cmmasksd.variant"  # the variant's readable name
OVERRIDES = "cmmasksd.overrides"  # the variant's overrides as canonical JSON: what defines it
CODE_DIGEST = "cmmasksd.code_digest"
GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own tag: the UI shows it as the run's source version
GIT_DIRTY = "cmmasksd.git_dirty"
PRECISION = "cmmasksd.precision"  # what the machine decided: bf16 or fp32 (and the device type)
RUNTIME_PARAM = "runtime."  # trial params: `runtime.device`, `runtime.precision`, `runtime.threads`

BASELINE: dict[str, Any] = {"masksd.branches": "none"}  # the CRIS trial every delta is taken against
SHORT_KEYS = {"masksd.mask_ratio_v": "r_v", "masksd.mask_ratio_t": "r_t", "masksd.lambda_v": "l_v",
              "masksd.lambda_t": "l_t"}
DEFAULT_GRIDS: list[tuple[str, str]] = [("masksd.mask_ratio_v", "masksd.mask_ratio_t"),
                                        ("masksd.lambda_v", "masksd.lambda_t")]
FIGURES_DIR = "figures"  # under the report's folder: a figure a sweep cannot draw is not written


def final_metric(split: str, metric: str) -> str:
    return f"{FINAL}{split}/{metric}"


def variant_key(overrides: dict[str, Any]) -> str:
    """The identity of a variant: its overrides without the seed, as canonical JSON."""
    return json.dumps({k: v for k, v in overrides.items() if k != "seed"}, sort_keys=True)


BASELINE_KEY = variant_key(BASELINE)


def variant_name(overrides: dict[str, Any], base_branches: str = "both") -> str:
    """A readable name that shows every override: `both r_v=0.25 r_t=0.15`, `cris optim.lr=0.001`.

    It starts with the recipe where one is set (`maskris`), else the branches (`cris` for none, else
    the branches the variant trains), and names every other key that differs from the base config,
    so two different variants never share a name.
    """
    recipe = overrides.get("masksd.recipe", "cmmasksd")
    branches = str(overrides.get("masksd.branches", base_branches))
    first = "masksd.recipe" if recipe != "cmmasksd" else "masksd.branches"
    parts = [recipe if recipe != "cmmasksd" else "cris" if branches == "none" else branches]
    for key, value in overrides.items():
        if key not in (first, "seed"):
            parts.append(f"{SHORT_KEYS.get(key, key.removeprefix('masksd.'))}={value}")
    return " ".join(parts)


def grid_name(axes: tuple[str, ...]) -> str:
    """A table's name from its axis keys: a pair's common stem (`mask_ratio` for `masksd.mask_ratio_v`
    x `masksd.mask_ratio_t`), else the keys joined (`strategy`, `optim.lr`), `masksd.` left out."""
    leaves = [key.removeprefix("masksd.") for key in axes]
    stem = os.path.commonprefix(leaves).rstrip("_.") if len(leaves) > 1 else ""
    return stem or "_".join(leaves)


def heatmap_file(name: str) -> str:
    """The figure of grid `name`, relative to the report's folder."""
    return f"{FIGURES_DIR}/heatmap_{name}.png"
