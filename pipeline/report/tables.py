"""The report's tables, computed: variants as the user wrote them, each compared with the CRIS baseline.

A variant is one set of overrides (all seeds of it). Tables are families of variants that differ in
the table's axis keys only (any override key, not only `masksd.*`): the branches table, the grids
of `report.grids`, and one table per other key the sweep varies. Every delta is to the plain CRIS
trial (overrides exactly `{masksd.branches: none}`); mIoU and oIoU deltas carry the interval of
`cmmasksd.stats` (two-level seeds x images bootstrap, widened by the seed t-interval).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cmmasksd.metrics import METRIC_NAMES
from cmmasksd.stats import compare_tables, power_line, seed_summary
from pipeline.contract import BASELINE_KEY, COST, DEFAULT_GRIDS, FINAL, MASK, SELECT_SPLIT, grid_name
from pipeline.report.load import typed

DELTA_METRICS = ("miou", "oiou")  # computed from per-expression counts, so they get intervals
COSTS = {name: f"{COST}{name}" for name in ("step_time_s", "peak_mem_mb", "params_total", "params_extra")}
# where the last epoch's training masks fell, against chance (`cmmasksd.model.mask_stats`)
MASK_HITS = {name: f"{MASK}{name}" for name in ("lmvsd_hit", "lmvsd_chance", "lmvsd_coverage",
                                                "lmvsd_coverage_chance", "vmlsd_hit", "vmlsd_chance")}
BRANCH_ROWS = {"none": "CRIS baseline", "lmvsd": "+LMVSD", "vmlsd": "+VMLSD", "both": "+LMVSD +VMLSD",
               "joint": "+joint masked pass (MaskRIS)"}
TITLES = {"masksd.branches": "Branches", "masksd.strategy": "Masking strategy",
          "masksd.weights": "Weight sharing of the masked branches", "masksd.distill_loss": "Distillation loss",
          "masksd.gt_on_masked": "GT supervision on the masked branches",
          "masksd.scorer": "Where the masks come from (scorer)", "masksd.centre": "Centred correlation",
          "masksd.fill": "What masked cells show (fill)", "masksd.recipe": "Recipe: CM-MaskSD against MaskRIS",
          ("masksd.mask_ratio_v", "masksd.mask_ratio_t"): "Mask ratio grid (image x text)",
          ("masksd.lambda_v", "masksd.lambda_t"): "Distillation weight grid (lambda v x lambda t)"}
LONG_COLUMNS = ["table", "split", "row", "col", "variant", "metric", "mean", "std", "n", "delta", "ci_low",
                "ci_high", "p_value", "significant", "seed_variance_measured", "boot_low", "boot_high", "p_boot",
                "t_low", "t_high", "best"]


def label(value) -> str:
    """0.5 -> "0.5", 1.0 -> "1", text unchanged."""
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Variant:
    key: str
    name: str
    overrides: dict
    trials: pd.DataFrame  # one row per seed

    def setting(self, key: str):
        """The value this variant trained with: its override, else the logged config param (lists and
        mappings as JSON text, so they can label a row)."""
        if key in self.overrides:
            value = self.overrides[key]
            return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else typed(value)
        return self.trials[key].iloc[0] if key in self.trials else None

    @property
    def seeds(self) -> list[int]:
        return sorted(self.trials["seed"])


@dataclass
class Section:
    """One table of the report, in long form, and how to show it."""

    name: str
    title: str
    table: pd.DataFrame
    axes: tuple[str, ...] = ()  # (rows,) or (rows, cols) keys; () for the table of all variants
    fixed: dict = field(default_factory=dict)  # the overrides every row shares
    reference: str | None = None  # a one-knob table's row at the base config's value: `miou_vs_ref` rows


class Sweep:
    """The finished trials grouped into variants, every comparison with the baseline computed once."""

    def __init__(self, trials: pd.DataFrame, n_boot: int = 10_000, seed: int = 0):
        self.trials, self.n_boot, self.seed = trials, n_boot, seed
        self.variants = {key: Variant(key, group["variant"].iloc[0], group["overrides"].iloc[0], group)
                         for key, group in trials.groupby("variant_key", sort=False)}
        self.baseline = self.variants.get(BASELINE_KEY)
        found = {c.split("/")[1] for c in trials.columns if c.startswith(FINAL) and c.endswith("/miou")}
        self.splits = sorted(found, key=lambda s: (s != SELECT_SPLIT, s))
        self._stats: dict[tuple[str, str], dict[str, dict]] = {}

    def default_arm(self) -> Variant | None:
        """The CM-MaskSD arm as the base config defines it: the variant that overrides nothing but
        `masksd.branches`, to a branch that masks, and its own recipe (`optim.*`): the default sweep's
        `both` at CM-MaskSD's learning rate."""
        for variant in self.variants.values():
            rest = {k: v for k, v in variant.overrides.items() if k != "masksd.branches" and not k.startswith("optim.")}
            if not rest and variant.overrides.get("masksd.branches", "both") != "none":
                return variant
        return None

    def ordered(self) -> list[Variant]:
        """The baseline first, then by val mIoU, best first."""
        others = sorted((v for v in self.variants.values() if v is not self.baseline),
                        key=lambda v: -self.mean(v, "miou"))
        return ([self.baseline] if self.baseline else []) + others

    def mean(self, variant: Variant, metric: str, split: str = SELECT_SPLIT) -> float:
        column = f"{FINAL}{split}/{metric}"
        return float(variant.trials[column].mean()) if column in variant.trials else math.nan

    def stats(self, variant: Variant, split: str) -> dict[str, dict]:
        """Per metric: mean/std/n over seeds and, against the baseline, the delta with its interval."""
        cached = self._stats.get((variant.key, split))
        if cached is None:
            cached = self._stats[(variant.key, split)] = self._compute(variant, split)
        return cached

    def _compute(self, variant: Variant, split: str) -> dict[str, dict]:
        columns = {**{m: f"{FINAL}{split}/{m}" for m in METRIC_NAMES}, **COSTS, **MASK_HITS}
        base = self.baseline
        records = {}
        for metric, column in columns.items():
            if column not in variant.trials or variant.trials[column].isna().all():
                continue
            mean, std = seed_summary(variant.trials.groupby("seed")[column].mean())
            delta = math.nan
            if base is not None and column in base.trials:
                delta = mean - float(base.trials.groupby("seed")[column].mean().mean())
            records[metric] = {"mean": mean, "std": std, "n": len(variant.seeds), "delta": delta}
        if base is not None and variant is not base:
            for metric, result in self._deltas(base, variant, split).items():
                records[metric].update(
                    delta=result.delta, ci_low=result.ci_low, ci_high=result.ci_high, p_value=result.p_value,
                    significant=result.significant, seed_variance_measured=result.seed_variance_measured,
                    boot_low=result.boot_low, boot_high=result.boot_high, p_boot=result.p_boot,
                    t_low=result.t_low, t_high=result.t_high, per_seed_deltas=result.per_seed_deltas)
        return records

    def compare(self, reference: Variant, variant: Variant, split: str) -> dict:
        """`variant` minus `reference`, paired by seed and image like the deltas against the baseline."""
        return self._deltas(reference, variant, split)

    def _deltas(self, base: Variant, variant: Variant, split: str) -> dict:
        arms = [long_table(v, split) for v in (base, variant)]
        if any(a is None for a in arms):
            return {}
        return compare_tables(*arms, metrics=DELTA_METRICS, n_boot=self.n_boot, seed=self.seed)


def long_table(variant: Variant, split: str) -> pd.DataFrame | None:
    """All seeds' per-expression counts of one split, with a seed column; None when one is missing."""
    column = f"per_expression/{split}"
    if column not in variant.trials:
        return None
    parts = list(zip(variant.trials["seed"], variant.trials[column]))
    if not all(isinstance(t, pd.DataFrame) for _, t in parts):
        return None
    return pd.concat([t.assign(seed=s) for s, t in parts], ignore_index=True)


def _rows(sweep: Sweep, name: str, cells: dict[tuple, Variant]) -> pd.DataFrame:
    """Long rows (every split, every metric) for {(row, col): variant}."""
    records = []
    for split in sweep.splits:
        for (row, col), variant in cells.items():
            for metric, rec in sweep.stats(variant, split).items():
                records.append({"table": name, "split": split, "row": row, "col": col, "variant": variant.name,
                                "metric": metric, "best": False,
                                **{k: v for k, v in rec.items() if k != "per_seed_deltas"}})
    return pd.DataFrame(records).reindex(columns=LONG_COLUMNS)


def families(sweep: Sweep, axes: tuple[str, ...]) -> list[tuple[dict, dict[tuple, Variant]]]:
    """Groups of variants whose overrides agree on every key but `axes`, with >= 2 distinct cells.

    Returns (the shared overrides, {cell: variant}); a cell is the variant's settings of `axes`.
    """
    groups: dict[str, tuple[dict, dict]] = {}
    for variant in sweep.ordered():
        fixed = {k: v for k, v in variant.overrides.items() if k not in axes}
        cell = tuple(variant.setting(k) for k in axes)
        if any(c is None for c in cell):
            continue
        groups.setdefault(json.dumps(fixed, sort_keys=True), (fixed, {}))[1].setdefault(cell, variant)
    return [(fixed, cells) for fixed, cells in groups.values() if len(cells) >= 2]


def _fixed_text(fixed: dict) -> str:
    return ", ".join(f"{k}={label(typed(v))}" for k, v in sorted(fixed.items()))


def variants_section(sweep: Sweep) -> Section:
    cells = {(v.name, ""): v for v in sweep.ordered()}
    return Section("variants", "All variants", _rows(sweep, "variants", cells))


def axis_sections(sweep: Sweep, grids=DEFAULT_GRIDS) -> list[Section]:
    """Branches first, then the grids, then one table per other override key the sweep varies."""
    grid_keys = {k for grid in grids for k in grid}
    varied = sorted({k for v in sweep.variants.values() for k in v.overrides} - grid_keys - {"masksd.branches"},
                    key=lambda k: (k not in TITLES, k))
    sections = []
    for axes in [("masksd.branches",), *[tuple(g) for g in grids], *[(k,) for k in varied]]:
        for i, (fixed, cells) in enumerate(families(sweep, axes)):
            name = grid_name(axes)
            name += f"_{i + 1}" if i else ""
            title = TITLES.get(axes[0] if len(axes) == 1 else axes, " x ".join(axes))
            if fixed:
                title += f" (with {_fixed_text(fixed)})"
            if len(axes) == 1:
                labelled = {(BRANCH_ROWS.get(c[0], label(c[0])) if axes[0] == "masksd.branches" else label(c[0]), ""): v
                            for c, v in cells.items()}
            else:
                labelled = {(label(c[0]), label(c[1])): v for c, v in cells.items()}
            table = _rows(sweep, name, labelled)
            reference = None
            if len(axes) == 2:
                table = _mark_best(table)
            elif axes[0] != "masksd.branches":
                reference, extra = _against_reference(sweep, name, labelled, axes[0])
                table = pd.concat([table, extra], ignore_index=True) if not extra.empty else table
            sections.append(Section(name, title, table, axes, fixed, reference))
    return sections


def _against_reference(sweep: Sweep, name: str, cells: dict[tuple, Variant], key: str) -> tuple[str | None, pd.DataFrame]:
    """The row the family shares with the base config (its variant leaves `key` unset) and every other
    row's mIoU minus it, per split (metric `miou_vs_ref`): corr_top against random directly."""
    found = [(cell, v) for cell, v in cells.items() if key not in v.overrides]
    if not found:
        return None, pd.DataFrame(columns=LONG_COLUMNS)
    (ref_row, _), reference = found[0]
    records = []
    for split in sweep.splits:
        for (row, col), variant in cells.items():
            result = None if variant is reference else sweep.compare(reference, variant, split).get("miou")
            if result is None:
                continue
            records.append({"table": name, "split": split, "row": row, "col": col, "variant": variant.name,
                            "metric": "miou_vs_ref", "n": len(variant.seeds), "delta": result.delta,
                            "ci_low": result.ci_low, "ci_high": result.ci_high, "p_value": result.p_value,
                            "significant": result.significant,
                            "seed_variance_measured": result.seed_variance_measured, "boot_low": result.boot_low,
                            "boot_high": result.boot_high, "p_boot": result.p_boot, "t_low": result.t_low,
                            "t_high": result.t_high, "best": False})
    return ref_row, pd.DataFrame(records).reindex(columns=LONG_COLUMNS)


def _mark_best(table: pd.DataFrame) -> pd.DataFrame:
    """The cell with the best mean val mIoU (chosen on val only, marked on every split's rows)."""
    val = table[(table["split"] == SELECT_SPLIT) & (table["metric"] == "miou")]
    if val.empty:
        return table
    best = val.loc[val["mean"].idxmax(), ["row", "col"]]
    table["best"] = (table["row"] == best["row"]) & (table["col"] == best["col"])
    return table


def best_variant(sweep: Sweep) -> Variant | None:
    """The non-baseline variant with the best mean val mIoU (selected on val: its test deltas are clean)."""
    candidates = [v for v in sweep.ordered() if v is not sweep.baseline]
    return max(candidates, key=lambda v: sweep.mean(v, "miou")) if candidates else None


def power(sweep: Sweep, split: str) -> dict:
    """What this sweep could detect on a split: the baseline's seed std, the paired per-seed delta sd
    pooled over the variants (when seeds are paired), and the seed counts (see `cmmasksd.stats.power_line`)."""
    base = sweep.baseline
    if base is None:
        return {}
    n = len(base.seeds)
    sigma = sweep.stats(base, split).get("miou", {}).get("std", math.nan)
    paired = [np.var(d, ddof=1) for v in sweep.variants.values() if v is not base
              for d in [sweep.stats(v, split).get("miou", {}).get("per_seed_deltas", ())] if len(d) >= 2]
    sd_delta = math.sqrt(float(np.mean(paired))) if paired else math.sqrt(2) * sigma
    result = {"n_seeds": n, "sigma": sigma, "sd_delta": sd_delta, "paired": bool(paired)}
    if n >= 2 and np.isfinite(sd_delta):
        result |= power_line(sd_delta, n)
    return result


def last_quarter_rise(curves: pd.DataFrame, variant: Variant | None) -> dict:
    """How much a variant's per-epoch val mIoU still rose over the last quarter of its epochs
    (last value minus the value a quarter of the epochs earlier), mean over seeds: < 0.5 points
    is the spec's "plateaued". Empty without a curve of at least 2 epochs."""
    if variant is None or curves.empty:
        return {}
    rises = []
    for run_id in variant.trials["run_id"]:
        values = curves[curves["run_id"] == run_id].sort_values("step")["value"].to_numpy()
        if len(values) >= 2:
            rises.append(float(values[-1] - values[-1 - max(1, len(values) // 4)]))
    if not rises:
        return {}
    return {"rise": float(np.mean(rises)), "n_seeds": len(rises), "epochs": len(values)}
