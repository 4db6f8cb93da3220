"""Report stage: ablation tables, figures and DVC metrics from one sweep's MLflow runs.

Reads nothing but the tracking contract (`shared/spec/pipeline.md`): the sweep's parent run id,
its FINISHED child runs (params, `final/*` and `cost/*` metrics, per-epoch `val/miou`) and their
`per_expression/per_expression_<split>.csv` artifacts. Writes into `--out`:

- `ablation.md` / `ablation.tex` / `ablation.csv`: the same tables for reading, for the paper
  (booktabs) and in tidy long form (one row per table, row, col, metric);
- `heatmap_mask_ratio.png`, `heatmap_lambda.png`, `learning_curves.png`;
- `metrics.json`: flat numbers for `dvc metrics show`.

Every table compares variants (trials that share all `masksd.*` params, differing in seed) with
the CRIS baseline (`masksd.branches = none`) on the seeds both have, and tests the mIoU delta with
a paired bootstrap over expressions.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from mlflow import MlflowClient

from cmmasksd.config import MaskSDConfig
from cmmasksd.metrics import METRIC_NAMES

SELECT_BY = "final/val/miou"  # variants are chosen on val only, whatever split a table shows
COSTS = {
    "step_time_s": "cost/step_time_s",
    "peak_mem_mb": "cost/peak_mem_mb",
    "params_total": "cost/params_total",
    "params_extra": "cost/params_extra",
}
BRANCH_ROWS = {"none": "CRIS baseline", "lmvsd": "+LMVSD", "vmlsd": "+VMLSD", "both": "+LMVSD +VMLSD"}
FACTORS = {  # one-knob tables, each shown when the sweep varies the knob
    "masksd.strategy": "Masking strategy",
    "masksd.weights": "Weight sharing of the masked branches",
    "masksd.distill_loss": "Distillation loss",
    "masksd.gt_on_masked": "GT supervision on the masked branches",
}
RATIO_GRID = ("masksd.mask_ratio_v", "masksd.mask_ratio_t")
LAMBDA_GRID = ("masksd.lambda_v", "masksd.lambda_t")
AXIS_NAMES = {
    "masksd.mask_ratio_v": "image ratio",
    "masksd.mask_ratio_t": "text ratio",
    "masksd.lambda_v": "lambda v",
    "masksd.lambda_t": "lambda t",
}
LONG_COLUMNS = ["table", "split", "row", "col", "metric", "mean", "std", "n", "delta",
                "ci_low", "ci_high", "significant", "variant", "best"]


def _typed(value):
    """MLflow stores params as strings; numbers come back as floats so "1" and "1.0" compare equal."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _label(value) -> str:
    """0.5 -> "0.5", 1.0 -> "1", text unchanged."""
    return f"{value:g}" if isinstance(value, float) else str(value)


DEFAULTS = {f"masksd.{k}": _typed(str(v)) for k, v in MaskSDConfig().model_dump().items()}


# --------------------------------------------------------------------------- loading from MLflow

def _child_runs(client: MlflowClient, parent_run_id: str) -> list:
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


def _per_expression(client: MlflowClient, run_id: str, tmp: Path) -> dict[str, pd.Series]:
    """Per-expression IoU per split, indexed by sentence_idx so trials line up expression by expression."""
    if not client.list_artifacts(run_id, "per_expression"):
        return {}
    local = Path(client.download_artifacts(run_id, "per_expression", str(tmp / run_id)))
    return {
        path.stem.removeprefix("per_expression_"): pd.read_csv(path).set_index("sentence_idx")["iou"]
        for path in sorted(local.glob("per_expression_*.csv"))
    }


def load_trials(tracking_uri: str, parent_run_id: str) -> pd.DataFrame:
    """One row per FINISHED trial: run_id, variant, params (typed), final/cost metrics, IoU series.

    Columns `per_expression/<split>` hold a `pd.Series` of IoUs per trial (None when missing).
    `variant` is the trial's `cmmasksd.variant` tag, made identical over trials that share every
    `masksd.*` param, so grouping by it groups seeds of one configuration.
    """
    client = MlflowClient(tracking_uri)
    runs = [r for r in _child_runs(client, parent_run_id) if r.info.status == "FINISHED"]
    if not runs:
        return pd.DataFrame(columns=["run_id", "variant", "seed"])
    trials = pd.DataFrame([
        {
            "run_id": r.info.run_id,
            "variant": r.data.tags.get("cmmasksd.variant", r.info.run_name),
            **{k: _typed(v) for k, v in r.data.params.items()},
            **{k: v for k, v in r.data.metrics.items() if k.startswith(("final/", "cost/")) or k == "best_epoch"},
        }
        for r in runs
    ])
    config = [c for c in trials.columns if c.startswith("masksd.")]
    if config:
        trials["variant"] = trials.groupby(config, dropna=False)["variant"].transform("first")
    with tempfile.TemporaryDirectory() as tmp:
        ious = [_per_expression(client, r.info.run_id, Path(tmp)) for r in runs]
    for split in sorted({s for d in ious for s in d}):
        trials[f"per_expression/{split}"] = [d.get(split) for d in ious]
    return trials


def missing_trials(tracking_uri: str, parent_run_id: str) -> pd.DataFrame:
    """Child runs that did not finish (FAILED, RUNNING, KILLED): listed in the report, never used."""
    runs = _child_runs(MlflowClient(tracking_uri), parent_run_id)
    return pd.DataFrame(
        [{"run_id": r.info.run_id, "variant": r.data.tags.get("cmmasksd.variant", r.info.run_name),
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


# --------------------------------------------------------------------------- statistics

def paired_bootstrap_ci(diff, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the mean per-expression difference; resampling expressions keeps the pairs."""
    diff = np.asarray(diff, dtype=float)
    if diff.size < 2:
        return math.nan, math.nan
    result = scipy.stats.bootstrap(
        (diff,), np.mean, n_resamples=n_boot, confidence_level=level,
        method="percentile", vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _seed_mean_ious(group: pd.DataFrame, seeds, split: str) -> pd.Series | None:
    """Per-expression IoU averaged over the given seeds, or None when an artifact is missing."""
    column = f"per_expression/{split}"
    if column not in group:
        return None
    series = group.loc[group["seed"].isin(seeds), column].tolist()
    if not series or not all(isinstance(s, pd.Series) for s in series):
        return None
    return pd.concat(series, axis=1).mean(axis=1)


def _metric_columns(split: str) -> dict[str, str]:
    return {**{m: f"final/{split}/{m}" for m in METRIC_NAMES}, **COSTS}


def compare(group: pd.DataFrame, baseline: pd.DataFrame | None, split: str,
            n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One variant vs the baseline, per metric: mean/std/n over seeds, delta on shared seeds, mIoU CI."""
    shared = sorted(set(group["seed"]) & set(baseline["seed"])) if baseline is not None else []
    records = []
    for metric, column in _metric_columns(split).items():
        if column not in group or group[column].isna().all():
            continue
        per_seed = group.groupby("seed")[column].mean()
        record = {"metric": metric, "mean": per_seed.mean(), "std": per_seed.std(), "n": len(per_seed),
                  "delta": math.nan}
        if shared:
            base = baseline.groupby("seed")[column].mean()
            record["delta"] = (per_seed[shared] - base[shared]).mean()
        if metric == "miou":
            record |= _miou_delta_ci(group, baseline, shared, split, n_boot, seed)
        records.append(record)
    return pd.DataFrame(records).reindex(
        columns=["metric", "mean", "std", "n", "delta", "ci_low", "ci_high", "significant"])


def _miou_delta_ci(group, baseline, shared, split, n_boot, seed) -> dict:
    """CI of the mIoU delta and whether it excludes 0; empty when per-expression IoUs are missing."""
    variant_ious = _seed_mean_ious(group, shared, split)
    base_ious = _seed_mean_ious(baseline, shared, split) if shared else None
    if variant_ious is None or base_ious is None:
        return {}
    low, high = paired_bootstrap_ci((variant_ious - base_ious).dropna(), n_boot, seed)
    return {"ci_low": low, "ci_high": high, "significant": None if math.isnan(low) else bool(low > 0 or high < 0)}


# --------------------------------------------------------------------------- choosing variants

def _pick(candidates: pd.DataFrame, free) -> pd.DataFrame | None:
    """Trials of the variant closest to the default settings on every knob not in `free`.

    Ties (several variants equally close) go to the best mean val mIoU; the table names the
    variant, so the choice is visible.
    """
    if candidates.empty:
        return None
    knobs = [c for c in candidates.columns if c in DEFAULTS and c not in free]
    off_default = sum((candidates[c] != DEFAULTS[c]).astype(int) for c in knobs)
    scored = candidates.assign(_off=off_default, _score=candidates[SELECT_BY])
    ranking = scored.groupby("variant").agg(off=("_off", "first"), score=("_score", "mean"))
    best = ranking.sort_values(["off", "score"], ascending=[True, False]).index[0]
    return candidates[candidates["variant"] == best]


def baseline_trials(trials: pd.DataFrame) -> pd.DataFrame | None:
    """The CRIS baseline (branches none) that every delta is taken against."""
    if "masksd.branches" not in trials:
        return None
    return _pick(trials[trials["masksd.branches"] == "none"], free=["masksd.branches"])


def _both(trials: pd.DataFrame) -> pd.DataFrame:
    """Grids and factor tables are about the full method (both branches)."""
    return trials[trials["masksd.branches"] == "both"] if "masksd.branches" in trials else trials.iloc[0:0]


def _rows(table: str, split: str, picks: dict, baseline, n_boot: int, seed: int) -> pd.DataFrame:
    """Long table from {(row, col): trials of the chosen variant}."""
    parts = [
        compare(group, baseline, split, n_boot, seed).assign(
            table=table, split=split, row=row, col=col, variant=group["variant"].iloc[0], best=False)
        for (row, col), group in picks.items() if group is not None
    ]
    if not parts:
        return pd.DataFrame(columns=LONG_COLUMNS)
    return pd.concat(parts, ignore_index=True)[LONG_COLUMNS]


def branch_table(trials: pd.DataFrame, split: str = "val", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Baseline vs +LMVSD vs +VMLSD vs both, each at default settings where the sweep has them."""
    if "masksd.branches" not in trials:
        return pd.DataFrame(columns=LONG_COLUMNS)
    picks = {
        (label, ""): _pick(trials[trials["masksd.branches"] == value], free=["masksd.branches"])
        for value, label in BRANCH_ROWS.items()
    }
    return _rows("branches", split, picks, baseline_trials(trials), n_boot, seed)


def grid_table(trials: pd.DataFrame, rows: str = "masksd.mask_ratio_v", cols: str = "masksd.mask_ratio_t",
               split: str = "val", n_boot: int = 1000, seed: int = 0, name: str = "mask_ratio") -> pd.DataFrame:
    """A rows x cols grid over branches=both trials, other knobs at defaults; best mean mIoU marked."""
    both = _both(trials)
    if both.empty or rows not in both or cols not in both or len(both.groupby([rows, cols])) < 2:
        return pd.DataFrame(columns=LONG_COLUMNS)
    picks = {key: _pick(cell, free=["masksd.branches", rows, cols]) for key, cell in both.groupby([rows, cols])}
    table = _rows(name, split, picks, baseline_trials(trials), n_boot, seed)
    miou = table[table["metric"] == "miou"]
    best = miou.loc[miou["mean"].idxmax(), ["row", "col"]]
    table["best"] = (table["row"] == best["row"]) & (table["col"] == best["col"])
    return table


def factor_table(trials: pd.DataFrame, param: str, split: str = "val",
                 n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One knob varied over branches=both trials, the others at defaults; empty if not varied."""
    both = _both(trials)
    if param not in both or both[param].nunique() < 2:
        return pd.DataFrame(columns=LONG_COLUMNS)
    picks = {(str(value), ""): _pick(group, free=["masksd.branches", param]) for value, group in both.groupby(param)}
    return _rows(param.removeprefix("masksd."), split, picks, baseline_trials(trials), n_boot, seed)


def strategy_table(trials: pd.DataFrame, split: str = "val", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """All one-knob tables (strategy, weight sharing, distill loss, GT on masked) the sweep allows, stacked."""
    parts = [factor_table(trials, param, split, n_boot, seed) for param in FACTORS]
    return pd.concat([p for p in parts if not p.empty] or [pd.DataFrame(columns=LONG_COLUMNS)], ignore_index=True)


def best_variant(trials: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> tuple[str, pd.DataFrame]:
    """The variant with the best mean val mIoU over the whole sweep, compared with the baseline on val."""
    name = trials.groupby("variant")[SELECT_BY].mean().idxmax()
    return name, compare(trials[trials["variant"] == name], baseline_trials(trials), "val", n_boot, seed)


# --------------------------------------------------------------------------- rendering

@dataclass(frozen=True)
class Style:
    """The few marks that differ between Markdown and LaTeX."""

    pm: str
    dagger: str
    delta: str
    bold: str


MD = Style(pm=" ± ", dagger="†", delta="Δ", bold="**{}**")
TEX = Style(pm=r" $\pm$ ", dagger=r"$^\dagger$", delta=r"$\Delta$", bold=r"\textbf{{{}}}")


def _pct_pm(rec, style: Style) -> str:
    """A score in percent: mean, with ± std once there are two seeds."""
    if rec is None or pd.isna(rec["mean"]):
        return ""
    text = f"{100 * rec['mean']:.2f}"
    return text + (f"{style.pm}{100 * rec['std']:.2f}" if pd.notna(rec["std"]) else "")


def _pct_delta(rec, style: Style, ci: bool = False) -> str:
    """Delta to the baseline in points, the CI if asked, and a dagger when significant."""
    if rec is None or pd.isna(rec["delta"]):
        return ""
    text = f"{100 * rec['delta']:+.2f}"
    if ci and pd.notna(rec["ci_low"]):
        text += f" [{100 * rec['ci_low']:+.2f}, {100 * rec['ci_high']:+.2f}]"
    return text + (style.dagger if rec["significant"] == True else "")  # noqa: E712 (NaN when untested)


def _by_metric(cell: pd.DataFrame) -> dict:
    return {r["metric"]: r for _, r in cell.iterrows()}


def display_rows(table: pd.DataFrame, style: Style, is_baseline) -> pd.DataFrame:
    """Display frame (all strings) of a one-dimensional table: one line per row label."""
    lines = []
    for row, cell in table.groupby("row", sort=False):
        m = _by_metric(cell)
        base = is_baseline(cell["variant"].iloc[0])
        cost = {k: m[k]["mean"] if k in m else math.nan for k in ("step_time_s", "peak_mem_mb", "params_extra")}
        lines.append({
            "": row,
            "variant": cell["variant"].iloc[0],
            "n": str(int(cell["n"].max())),
            "mIoU": _pct_pm(m.get("miou"), style),
            f"{style.delta} mIoU [CI]": "baseline" if base else _pct_delta(m.get("miou"), style, ci=True),
            "oIoU": _pct_pm(m.get("oiou"), style),
            f"{style.delta} oIoU": "" if base else _pct_delta(m.get("oiou"), style),
            **{f"P@0.{t}": _pct_pm(m.get(f"prec_{t}0"), style) for t in (5, 7, 9)},
            "step (s)": f"{cost['step_time_s']:.3f}",
            "peak mem (MB)": f"{cost['peak_mem_mb']:.0f}",
            "extra params": f"{cost['params_extra']:,.0f}",
        })
    return pd.DataFrame(lines).replace("nan", "")


def display_grid(table: pd.DataFrame, rows: str, cols: str, style: Style) -> pd.DataFrame:
    """Display frame of a grid: mean ± std (n), delta and dagger per cell, best in bold, step time per row."""
    cells = {}
    for (row, col), cell in table.groupby(["row", "col"]):
        miou = _by_metric(cell)["miou"]
        text = f"{_pct_pm(miou, style)} (n={int(miou['n'])})"
        if pd.notna(miou["delta"]):
            text += f", {style.delta} {_pct_delta(miou, style)}"
        cells[(row, col)] = style.bold.format(text) if cell["best"].iloc[0] else text
    grid = pd.Series(cells).unstack(fill_value="")
    step = table[table["metric"] == "step_time_s"].groupby("row")["mean"].mean()
    grid.columns = [f"{AXIS_NAMES.get(cols, cols)} {_label(c)}" for c in grid.columns]
    grid["step (s)"] = [f"{step.get(r, math.nan):.3f}" for r in grid.index]
    grid.index = [_label(r) for r in grid.index]
    return grid.rename_axis(AXIS_NAMES.get(rows, rows)).reset_index()


def to_latex(display: pd.DataFrame, caption: str, label: str) -> str:
    """booktabs table; free text (row labels, variant names) is escaped, the marks we wrote are not."""
    text = [c for c in display.columns[:2] if c in (display.columns[0], "variant")]
    styler = display.style.hide(axis="index").format(escape="latex", subset=text)
    return styler.to_latex(hrules=True, caption=caption, label=label, position="htbp",
                           column_format="l" * len(text) + "r" * (len(display.columns) - len(text)))


# --------------------------------------------------------------------------- figures

def _save_note(path: Path, note: str) -> None:
    """DVC expects every declared figure; when there is nothing to plot, the figure says why."""
    fig = Figure(figsize=(5, 2))
    fig.text(0.5, 0.5, note, ha="center", va="center")
    fig.savefig(path, dpi=120)


def copy_overlays(client: MlflowClient, trials: pd.DataFrame, variant: str | None, path: Path) -> None:
    """The val prediction overlays (ground truth vs prediction) of one variant's first seed, as logged
    by its trial; a note when the variant or its figure is missing."""
    seeds = trials[trials["variant"] == variant].sort_values("seed") if variant else []
    for run_id in getattr(seeds, "run_id", []):
        if any(a.path == "figures/overlays_val.png" for a in client.list_artifacts(run_id, "figures")):
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copyfile(client.download_artifacts(run_id, "figures/overlays_val.png", tmp), path)
            return
    _save_note(path, f"No prediction overlays logged for {variant or 'this variant'}.")


def plot_heatmap(table: pd.DataFrame, rows: str, cols: str, path: Path, title: str) -> None:
    """Val mIoU over a grid, every cell annotated, the best one starred and outlined."""
    miou = table[table["metric"] == "miou"]
    if miou.empty:
        _save_note(path, f"No {title} in this sweep.")
        return
    mean = miou.pivot(index="row", columns="col", values="mean") * 100
    std = miou.pivot(index="row", columns="col", values="std") * 100
    best = miou.loc[miou["best"].astype(bool)].iloc[0]
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mean.to_numpy(dtype=float), cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="val mIoU (%)")
    ax.set_xticks(range(len(mean.columns)), [_label(c) for c in mean.columns])
    ax.set_yticks(range(len(mean.index)), [_label(r) for r in mean.index])
    ax.set_xlabel(AXIS_NAMES.get(cols, cols))
    ax.set_ylabel(AXIS_NAMES.get(rows, rows))
    for i, r in enumerate(mean.index):
        for j, c in enumerate(mean.columns):
            if pd.isna(mean.loc[r, c]):
                continue
            is_best = r == best["row"] and c == best["col"]
            text = ("★ " if is_best else "") + f"{mean.loc[r, c]:.1f}"
            text += f"\n±{std.loc[r, c]:.1f}" if pd.notna(std.loc[r, c]) else ""
            ax.text(j, i, text, ha="center", va="center", fontweight="bold" if is_best else "normal",
                    color="black" if image.norm(mean.loc[r, c]) > 0.6 else "white")
            if is_best:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_title(f"{title}: val mIoU, branches=both (★ best)")
    fig.savefig(path, dpi=120)


def plot_learning_curves(curves: pd.DataFrame, trials: pd.DataFrame, highlight: dict[str, str], path: Path) -> None:
    """Val mIoU per epoch, mean over seeds: the branch-table variants in colour, the rest in grey."""
    if curves.empty:
        _save_note(path, "No val/miou history in this sweep.")
        return
    mean = (curves.merge(trials[["run_id", "variant"]], on="run_id")
            .groupby(["variant", "step"])["value"].mean() * 100)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for variant in mean.index.unique("variant").difference(list(highlight)):
        ax.plot(mean[variant].index, mean[variant].to_numpy(), color="0.75", linewidth=1)
    for variant, label in highlight.items():
        if variant in mean.index.unique("variant"):
            ax.plot(mean[variant].index, mean[variant].to_numpy(), marker="o", linewidth=2,
                    **({"color": "black", "linestyle": "--"} if label == BRANCH_ROWS["none"] else {}),
                    label=f"{label}: {variant}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Learning curves, mean over seeds (grey: other variants)")
    if highlight:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------- the report

@dataclass
class Section:
    """One table of the report: its long form and how to show it."""

    name: str
    title: str
    table: pd.DataFrame
    grid: tuple[str, str] | None = None  # (rows, cols) params of a grid
    empty_note: str = "Not in this sweep."

    def display(self, style: Style, baseline_name) -> pd.DataFrame:
        if self.grid:
            return display_grid(self.table, *self.grid, style)
        return display_rows(self.table, style, lambda variant: variant == baseline_name)


# Published mIoU (%) from shared/spec/method.md: CRIS (CVPR 2022, CLIP RN101) and CM-MaskSD (TMM 2024,
# secondary sources, labels there are mixed). Shown beside ours when the sweep ran on a real dataset.
PUBLISHED_MIOU = {
    "refcoco": {"CRIS (RN101)": {"val": 70.47, "testA": 73.18, "testB": 66.10},
                "CM-MaskSD": {"val": 74.89, "testA": 77.54, "testB": 71.28}},
    "refcoco+": {"CRIS (RN101)": {"val": 62.27, "testA": 68.08, "testB": 53.68},
                 "CM-MaskSD": {"val": 67.47, "testA": 71.80, "testB": 59.91}},
    "refcocog": {"CRIS (RN101)": {"val": 59.87, "test": 60.36},
                 "CM-MaskSD": {"val": 66.53, "test": 66.63}},
}


def published_table(dataset: str, ours: pd.DataFrame) -> pd.DataFrame | None:
    """Published mIoU per split beside ours (baseline and best variant, mean over seeds); None for
    datasets the papers did not report (RefShapes)."""
    published = PUBLISHED_MIOU.get(dataset)
    if not published:
        return None
    splits = list(next(iter(published.values())))
    rows = [{"row": name, **{split: f"{value:.2f}" for split, value in numbers.items()}}
            for name, numbers in published.items()]
    for _, rec in ours.iterrows():
        rows.append({"row": f"ours: {rec['row']}", **{
            split: (f"{100 * rec[split]:.2f}" if pd.notna(rec.get(split)) else "-") for split in splits}})
    return pd.DataFrame(rows, columns=["row", *splits])


def _ours_by_split(sections: list[Section], names: dict[str, str]) -> pd.DataFrame:
    """Mean mIoU per split of the named variants (row label -> variant), from the branch tables."""
    rows = []
    for label, variant in names.items():
        rec = {"row": label}
        for section in sections:
            if section.name.startswith("branches_"):
                t = section.table
                hit = t[(t["variant"] == variant) & (t["metric"] == "miou")]
                rec[section.name.removeprefix("branches_")] = float(hit["mean"].iloc[0]) if not hit.empty else None
        rows.append(rec)
    return pd.DataFrame(rows)


def legend(n_boot: int, seed: int, splits: list[str]) -> str:
    defaults = ", ".join(f"{k.removeprefix('masksd.')}={_label(v)}" for k, v in DEFAULTS.items())
    return "\n".join([
        "## Legend",
        "",
        "- **mIoU**: mean over expressions of IoU (both-empty counts as 1); **oIoU**: sum of intersections / "
        "sum of unions; **P@X**: fraction of expressions with IoU >= X. All in %, with the best-on-val weights.",
        f"- **Split**: `val` unless the heading says otherwise (evaluated: {', '.join(splits)}). "
        "Variants are always chosen on val mIoU.",
        "- **mean ± std** over seeds; std only when n >= 2; **n** = number of seeds.",
        "- **Δ**: difference to the CRIS baseline in points, averaged over the seeds both have.",
        f"- **[CI]**: 95% percentile CI of the mIoU Δ from a paired bootstrap over expressions "
        f"(B={n_boot}, seed {seed}) on per-expression IoU differences averaged over the shared seeds; "
        "**†** = the CI excludes 0. Grid cells show Δ and †; their CIs are in `ablation.csv`.",
        "- **Cost**: step time (s/step), peak memory (MB) and parameters added to the baseline, mean over seeds.",
        f"- **Defaults**: {defaults}. A row takes the variant closest to these on the other knobs; "
        "ties go to the best val mIoU (named in `variant`). Grids and one-knob tables use branches=both.",
        "- `ablation.csv` holds every metric (all P@X, params_total) in long form, scores as fractions.",
    ])


def render_markdown(sections: list[Section], header: list[str], baseline_name, missing: pd.DataFrame,
                    legend_text: str) -> str:
    parts = ["# CM-MaskSD ablation report", "", *header, "", legend_text]
    if not sections:
        parts += ["", "No finished trial in this sweep: nothing to tabulate."]
    for section in sections:
        parts += ["", f"## {section.title}", ""]
        if section.table.empty:
            parts.append(section.empty_note)
            continue
        parts.append(section.display(MD, baseline_name).to_markdown(index=False, disable_numparse=True))
        if section.grid:
            parts += ["", "Bold: best mean val mIoU in the grid."]
    parts += ["", "## Missing trials", ""]
    parts.append(missing.to_markdown(index=False) if not missing.empty else "None: every trial finished.")
    return "\n".join(parts) + "\n"


def render_latex(sections: list[Section], baseline_name) -> str:
    tables = [
        to_latex(s.display(TEX, baseline_name), caption=s.title, label=f"tab:{s.name}")
        for s in sections if not s.table.empty
    ]
    return "% generated by pipeline/report.py; needs \\usepackage{booktabs}\n" + "\n".join(tables)


def _splits(trials: pd.DataFrame) -> list[str]:
    """Evaluated splits, val first."""
    found = {c.split("/")[1] for c in trials.columns if c.startswith("final/") and c.endswith("/miou")}
    return sorted(found, key=lambda s: (s != "val", s))


def _metrics(n_trials: int, n_missing: int, baseline: pd.DataFrame | None, best: pd.DataFrame | None) -> dict:
    """Flat numbers for `dvc metrics show`; null where the sweep cannot say."""
    def value(frame, metric, field="mean"):
        row = frame[frame["metric"] == metric] if frame is not None else pd.DataFrame()
        return None if row.empty or pd.isna(row[field].iloc[0]) else float(row[field].iloc[0])

    return {
        "n_trials": n_trials,
        "n_failed": n_missing,
        "baseline_val_miou": value(baseline, "miou"),
        "baseline_val_oiou": value(baseline, "oiou"),
        "best_val_miou": value(best, "miou"),
        "best_val_oiou": value(best, "oiou"),
        "best_delta_miou": value(best, "miou", "delta"),
        "best_delta_ci_low": value(best, "miou", "ci_low"),
        "best_delta_ci_high": value(best, "miou", "ci_high"),
    }


def build_sections(trials: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> list[Section]:
    """Every table of the report, in reading order: branches per split, the two grids, one-knob tables."""
    kw = dict(n_boot=n_boot, seed=seed)
    sections = [Section(f"branches_{split}", f"Branches ({split})", branch_table(trials, split, **kw))
                for split in _splits(trials)]
    for name, title, grid in [("mask_ratio", "Mask ratio grid", RATIO_GRID),
                              ("lambda", "Distillation weight grid", LAMBDA_GRID)]:
        sections.append(Section(
            name, f"{title} (val mIoU, branches=both)", grid_table(trials, *grid, name=name, **kw), grid=grid,
            empty_note=f"No {title.lower()} in this sweep (needs two cells with branches=both)."))
    one_knob = strategy_table(trials, **kw)
    for param, title in FACTORS.items():
        name = param.removeprefix("masksd.")
        sections.append(Section(name, f"{title} (val, branches=both)", one_knob[one_knob["table"] == name],
                                empty_note=f"`{name}` is not varied in this sweep."))
    return sections


def build_report(tracking_uri: str, parent_run_id: str, out: Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write every report file into `out` and attach them to the sweep's parent run; returns metrics.json."""
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    trials = load_trials(tracking_uri, parent_run_id)
    missing = missing_trials(tracking_uri, parent_run_id)
    tags = client.get_run(parent_run_id).data.tags
    header = [f"Sweep: parent run `{parent_run_id}`; dataset {tags.get('dataset', '?')}, "
              f"backbone {tags.get('backbone', '?')}, commit {tags.get('git_commit', '?')}.",
              f"Trials: {len(trials)} finished, {len(missing)} missing (listed at the end)."]
    sections = build_sections(trials, n_boot, seed) if not trials.empty else []
    baseline = baseline_trials(trials)
    baseline_name = baseline["variant"].iloc[0] if baseline is not None else None
    best, best_name = None, None
    if sections:
        best_name, best = best_variant(trials, n_boot, seed)
        header.append(f"Best variant on val mIoU: `{best_name}`.")
    header.append("Figures: `heatmap_mask_ratio.png`, `heatmap_lambda.png`, `learning_curves.png`, and val "
                  "predictions (green: ground truth, red: prediction) of the baseline (`overlays_baseline.png`) "
                  "and the best variant (`overlays_best.png`).")
    legend_text = legend(n_boot, seed, _splits(trials))
    markdown = render_markdown(sections, header, baseline_name, missing, legend_text)
    ours = {label: name for label, name in (("CRIS baseline", baseline_name), ("best variant", best_name)) if name}
    published = published_table(tags.get("dataset", ""), _ours_by_split(sections, ours))
    if published is not None:
        markdown += ("\n## Published numbers (mIoU %, for reference)\n\n"
                     + published.to_markdown(index=False, disable_numparse=True)
                     + "\n\nCRIS: CVPR 2022 paper (CLIP RN101). CM-MaskSD: TMM 2024 as quoted by secondary "
                       "sources (their mIoU/oIoU labels are mixed).\n")
    (out / "ablation.md").write_text(markdown)
    (out / "ablation.tex").write_text(render_latex(sections, baseline_name))
    tables = [s.table for s in sections if not s.table.empty]
    (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=LONG_COLUMNS)).to_csv(
        out / "ablation.csv", index=False)

    by_name = {s.name: s.table for s in sections}
    empty = pd.DataFrame(columns=LONG_COLUMNS)
    plot_heatmap(by_name.get("mask_ratio", empty), *RATIO_GRID, out / "heatmap_mask_ratio.png", "mask-ratio grid")
    plot_heatmap(by_name.get("lambda", empty), *LAMBDA_GRID, out / "heatmap_lambda.png", "lambda grid")
    branches = by_name.get("branches_val", empty)
    highlight = dict(zip(branches["variant"], branches["row"]))
    plot_learning_curves(load_curves(tracking_uri, trials["run_id"]), trials, highlight, out / "learning_curves.png")
    copy_overlays(client, trials, baseline_name, out / "overlays_baseline.png")
    copy_overlays(client, trials, best_name, out / "overlays_best.png")

    base_row = branches[branches["variant"] == baseline_name] if baseline_name else None
    metrics = _metrics(len(trials), len(missing), base_row, best)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    client.log_artifacts(parent_run_id, str(out), artifact_path="reports")
    return metrics


def _report_params(path: Path) -> dict:
    """The `report:` section of params.yaml (bootstrap_samples, bootstrap_seed); empty if absent."""
    if not path.exists():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("report") or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ablation tables, figures and DVC metrics from a sweep.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sweep-file", type=Path, default=Path("sweep/sweep.json"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    params = _report_params(args.params)
    sweep = json.loads(args.sweep_file.read_text())
    metrics = build_report(sweep["tracking_uri"], sweep["parent_run_id"], args.out,
                           n_boot=int(params.get("bootstrap_samples", 1000)),
                           seed=int(params.get("bootstrap_seed", 0)))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
