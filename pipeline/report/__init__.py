"""DVC stage `report`: ablation tables, figures and DVC metrics from one sweep's MLflow runs.

    python -m pipeline.report --sweep-file sweep/sweep.json --out reports

Reads the sweep through the tracking contract only (`load`), groups its trials into the variants
the user wrote and compares each with the CRIS baseline (`tables`, statistics from
`cmmasksd.stats`), and writes into `--out` (`render`, `figures`):

- `ablation.md` / `ablation.tex` / `ablation.csv`: the tables for reading, for the paper
  (booktabs) and in tidy long form (one row per table, split, row, col, metric), the last table
  every variant's mIoU per expression kind (`kinds`);
- `figures/`: a heatmap per grid of `report.grids` the sweep filled (`heatmap_<grid>.png`),
  `learning_curves.png`, and the logged prediction overlays of the baseline and the best variant;
  a figure the sweep has nothing for is not written;
- `curves/<variant>_seed<k>.csv`: each trial's val mIoU per epoch, for `dvc plots diff`;
- `metrics.json`: flat numbers for `dvc metrics show`, also logged on the sweep's parent run.

Each file is written to a temporary name and renamed, so an interrupted stage leaves no half table.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from cmmasksd.catalogue import DATASETS

from pipeline.common import load_params
from pipeline.contract import (
    CODE_DIGEST,
    DEFAULT_GRIDS,
    FIGURES_DIR,
    GIT_COMMIT,
    MASK,
    PRECISION,
    RUNTIME_PARAM,
    SELECT_SPLIT,
    heatmap_file,
)
from pipeline.report import render
from pipeline.report.figures import plot_heatmap, plot_learning_curves, replaced_folder, write_curve_files
from pipeline.report.kinds import kinds_section
from pipeline.report.load import download_overlay, load_curves, load_trials, missing_trials
from pipeline.report.tables import (
    BRANCH_ROWS,
    LONG_COLUMNS,
    Section,
    Sweep,
    axis_sections,
    best_variant,
    last_quarter_rise,
    power,
    variants_section,
)
from pipeline.tracking import experiment_url


def published_table(dataset: str, ours: dict[str, dict[str, float]]) -> pd.DataFrame | None:
    """Published mIoU per split beside ours ({row label: {split: mean mIoU}}); None for datasets the
    papers did not report (RefShapes)."""
    entry = DATASETS.get(dataset)
    published = entry.published_miou if entry else None
    if not published:
        return None
    splits = list(next(iter(published.values())))
    rows = [{"row": name, **{split: f"{value:.2f}" for split, value in numbers.items()}}
            for name, numbers in published.items()]
    for name, numbers in ours.items():
        rows.append({"row": f"ours: {name}",
                     **{s: f"{100 * numbers[s]:.2f}" if pd.notna(numbers.get(s)) else "-" for s in splits}})
    return pd.DataFrame(rows, columns=["row", *splits])


def summary_metrics(sweep: Sweep | None, best, n_trials: int, n_missing: int, val_power: dict | None = None) -> dict:
    """Flat numbers for `dvc metrics show` and the parent run; null where the sweep cannot say.
    `val_power` (`tables.power` on val) gives the seed spread a plan for more seeds starts from."""
    metrics = {"n_trials": n_trials, "n_failed": n_missing}
    for key, name in (("sd_delta", "val_sd_delta"), ("min_detectable_delta", "val_min_detectable_delta")):
        value = (val_power or {}).get(key)
        metrics[name] = None if value is None or pd.isna(value) else float(value)
    base = sweep.baseline if sweep else None

    def get(variant, metric, field="mean", split=SELECT_SPLIT):
        value = sweep.stats(variant, split).get(metric, {}).get(field) if variant is not None else None
        return None if value is None or pd.isna(value) else float(value)

    metrics |= {"n_seeds_baseline": len(base.seeds) if base else 0,
                "baseline_val_miou": get(base, "miou"), "baseline_val_oiou": get(base, "oiou"),
                "best_val_miou": get(best, "miou"), "best_val_oiou": get(best, "oiou"),
                "best_delta_miou": get(best, "miou", "delta"), "best_delta_ci_low": get(best, "miou", "ci_low"),
                "best_delta_ci_high": get(best, "miou", "ci_high"), "best_delta_p": get(best, "miou", "p_value")}
    for split in (sweep.splits if sweep else []):
        if split != SELECT_SPLIT:
            metrics[f"best_{split}_delta_miou"] = get(best, "miou", "delta", split)
    significant = get(best, "miou", "significant")
    metrics["best_delta_significant"] = None if significant is None else bool(significant)
    metrics |= mask_ratios(sweep.default_arm() if sweep else None)
    return metrics


def mask_ratios(variant) -> dict:
    """Where the default CM-MaskSD arm's masks fell in its last epoch, over chance, mean over seeds:
    `mask_coverage_ratio` (LMVSD: share of the object masked / share of the image masked) and
    `word_hit_ratio` (VMLSD: content share of the masked words / what random masks would hit)."""
    def ratio(num: str, den: str) -> float | None:
        trials = variant.trials if variant is not None else pd.DataFrame()
        if not {num, den} <= set(trials.columns):
            return None
        value = (trials[num] / trials[den]).mean()
        return None if pd.isna(value) else float(value)

    return {"mask_coverage_ratio": ratio(f"{MASK}lmvsd_coverage", f"{MASK}lmvsd_coverage_chance"),
            "word_hit_ratio": ratio(f"{MASK}vmlsd_hit", f"{MASK}vmlsd_chance")}


def _write(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a reader never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


MAX_LABELLED_CURVES = 8  # more lines in colour than this cannot be told apart


def curve_labels(sections: list[Section], sweep: Sweep | None) -> dict[str, str]:
    """{variant: legend row} of the learning curves drawn in colour: the branch table's rows; without
    one (arms that differ in more than the branch, as the default's, each at its own learning rate)
    every variant, the baseline as CRIS, when there are few enough to tell apart."""
    branches = next((s for s in sections if s.name == "branches"), None)
    if branches is not None:
        return dict(zip(branches.table["variant"], branches.table["row"]))
    if sweep is None or len(sweep.variants) > MAX_LABELLED_CURVES:
        return {}
    return {v.name: BRANCH_ROWS["none"] if v is sweep.baseline else v.name for v in sweep.variants.values()}


def write_figures(out: Path, sections: list[Section], sweep: Sweep | None, best, client, curves: pd.DataFrame,
                  trials: pd.DataFrame) -> list[str]:
    """Every figure this sweep can draw, into `out/figures/` (replaced whole); their names."""
    with replaced_folder(out / FIGURES_DIR) as folder:
        for section in sections:
            if len(section.axes) == 2 and not section.table.empty:
                title = f"{section.name.replace('_', '-')} grid"
                plot_heatmap(section, folder / Path(heatmap_file(section.name)).name, title)
        highlight = curve_labels(sections, sweep)
        if not curves.empty:
            plot_learning_curves(curves, trials, highlight, folder / "learning_curves.png")
        write_curve_files(curves, trials, out / "curves")
        for file, variant in (("overlays_baseline.png", sweep.baseline if sweep else None), ("overlays_best.png", best)):
            if variant is not None:
                download_overlay(client, variant.trials.sort_values("seed")["run_id"], folder / file)
        return sorted(f"{FIGURES_DIR}/{p.name}" for p in folder.iterdir())


def precision_text(tags: dict[str, str], trials: pd.DataFrame) -> str:
    """What the trials ran in, as each recorded it (`runtime.*` params), else as the sweep decided."""
    device, precision = f"{RUNTIME_PARAM}device", f"{RUNTIME_PARAM}precision"
    if {device, precision} <= set(trials.columns):
        found = sorted({f"{p} on {d}" for p, d in zip(trials[precision], trials[device])})
        mixed = " (mixed: compare within one precision only)" if len(found) > 1 else ""
        return " + ".join(found) + mixed
    return tags.get(PRECISION, "a precision not recorded (logged before cmmasksd recorded it)")


def build_report(tracking_uri: str, parent_run_id: str, out: Path, n_boot: int = 10_000, seed: int = 0,
                 grids=DEFAULT_GRIDS) -> dict:
    """Write every report file into `out`, attach them and the summary to the sweep's parent run."""
    out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri)
    trials = load_trials(tracking_uri, parent_run_id)
    missing = missing_trials(tracking_uri, parent_run_id)
    tags = client.get_run(parent_run_id).data.tags
    sweep = Sweep(trials, n_boot, seed) if not trials.empty else None
    sections = [variants_section(sweep), *axis_sections(sweep, grids)] if sweep else []
    by_kind = kinds_section(sweep) if sweep else None
    sections += [by_kind] if by_kind is not None else []
    splits = sweep.splits if sweep else []
    baseline = sweep.baseline.name if sweep and sweep.baseline else None
    best = best_variant(sweep) if sweep else None
    header = [f"Sweep: parent run `{parent_run_id}`; dataset {tags.get('dataset', '?')}, backbone "
              f"{tags.get('backbone', '?')}; code {tags.get(CODE_DIGEST, '?')[:12]} "
              f"(commit {tags.get(GIT_COMMIT, '?')[:12]}); trained in {precision_text(tags, trials)}.",
              f"Trials: {len(trials)} finished in {len(sweep.variants) if sweep else 0} variants, "
              f"{len(missing)} missing (listed at the end). Baseline: `{baseline}`."]
    if best is not None:
        header.append(f"Best variant on val mIoU (the selection split): `{best.name}`; its test-split deltas "
                      "are the clean estimate of its effect.")

    curves = load_curves(tracking_uri, trials["run_id"]) if not trials.empty else pd.DataFrame(
        columns=["run_id", "step", "value"])
    figures = write_figures(out, sections, sweep, best, client, curves, trials)
    overlays = " (overlays: green ground truth, red prediction)" if any("overlays" in f for f in figures) else ""
    header.append(f"Figures: `{'`, `'.join(figures)}`{overlays}." if figures else
                  "Figures: none (nothing in this sweep to draw).")

    powers = {split: power(sweep, split) for split in splits}
    plateau = last_quarter_rise(curves, sweep.baseline if sweep else None)
    if plateau:
        header.append(render.plateau_text(plateau))
    text = render.markdown(sections, splits, baseline, header, powers, missing, render.legend(n_boot, seed, splits))
    if best is not None and baseline is not None:
        ours = {name: {s: sweep.mean(v, "miou", s) for s in splits}
                for name, v in (("CRIS baseline", sweep.baseline), ("best variant", best))}
        published = published_table(tags.get("dataset", ""), ours)
        if published is not None:
            text += ("\n## Published numbers (mIoU %, for reference)\n\n"
                     + published.to_markdown(index=False, disable_numparse=True)
                     + "\n\nCRIS: CVPR 2022 paper (CLIP RN101). CM-MaskSD: TMM 2024 as quoted by secondary "
                       "sources (their mIoU/oIoU labels are mixed).\n")
    _write(out / "ablation.md", text)
    _write(out / "ablation.tex", render.latex(sections, splits, baseline))
    tables = [s.table for s in sections if not s.table.empty]
    long = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=LONG_COLUMNS)
    _write(out / "ablation.csv", long.to_csv(index=False))
    metrics = summary_metrics(sweep, best, len(trials), len(missing), powers.get(SELECT_SPLIT))
    metrics["baseline_val_last_quarter_rise"] = plateau.get("rise")
    metrics["figures"] = len(figures)
    _write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")

    numbers = [Metric(f"summary/{k}", float(v), 0, 0) for k, v in metrics.items() if v is not None]
    client.log_batch(parent_run_id, metrics=numbers,
                     tags=[RunTag("cmmasksd.best_variant", best.name)] if best is not None else [])
    client.log_artifacts(parent_run_id, str(out), artifact_path="reports")
    return metrics


def main(argv: list[str] | None = None) -> int:
    from pipeline.params_schema import validate_params  # the library's configs (torch): only when run

    parser = argparse.ArgumentParser(description="Ablation tables, figures and DVC metrics from a sweep.")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sweep-file", type=Path, default=Path("sweep/sweep.json"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded table is noise
    params = load_params(args.params) if args.params.exists() else validate_params({})  # none: the defaults
    sweep = json.loads(args.sweep_file.read_text())
    metrics = build_report(sweep["tracking_uri"], sweep["parent_run_id"], args.out,
                           n_boot=params.report.bootstrap_samples, seed=params.report.bootstrap_seed,
                           grids=[tuple(g) for g in params.report.grids])
    print(next_steps(args.out, metrics, sweep))
    return 0


def next_steps(out: Path, metrics: dict, sweep: dict) -> str:
    """What a person needs after the run: where the results are, the headline, how to open MLflow."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    lines = [f"Tables: {out / 'ablation.md'} (also .csv, .tex); figures: {out / FIGURES_DIR}/; "
             f"`dvc metrics show` for the numbers."]
    if metrics.get("baseline_val_miou") is not None:
        headline = f"CRIS baseline val mIoU {pct(metrics['baseline_val_miou'])}"
        if metrics.get("best_val_miou") is not None:
            headline += (f"; best variant {pct(metrics['best_val_miou'])}, delta {pct(metrics['best_delta_miou'])} "
                         f"[{pct(metrics['best_delta_ci_low'])}, {pct(metrics['best_delta_ci_high'])}] points")
        lines.append(headline + f" ({metrics['n_seeds_baseline']} seeds; see the table for what it supports).")
    uri = sweep["tracking_uri"]
    if uri.startswith("sqlite:///"):
        lines.append(f"MLflow: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then open "
                     f"{experiment_url('http://127.0.0.1:5000', sweep['experiment_id'])}")
    else:
        lines.append(f"MLflow: {experiment_url(uri, sweep['experiment_id'])}")
    return "\n".join(lines)
