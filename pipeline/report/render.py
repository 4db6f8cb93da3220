"""The report's tables as text: Markdown for reading, LaTeX (booktabs) for the paper.

Every delta cell shows the point estimate, its 95 % interval and a dagger only when the delta is
significant (interval excludes 0 and both arms have >= 2 seeds). Scores are in %, deltas in points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from pipeline.report.kinds import KINDS_TABLE
from pipeline.report.tables import SELECT_SPLIT, Section, label

AXIS_NAMES = {"masksd.mask_ratio_v": "image ratio", "masksd.mask_ratio_t": "text ratio",
              "masksd.lambda_v": "lambda v", "masksd.lambda_t": "lambda t"}


@dataclass(frozen=True)
class Style:
    """The few marks that differ between Markdown and LaTeX."""

    pm: str
    dagger: str
    delta: str
    bold: str


MD = Style(pm=" ± ", dagger="†", delta="Δ", bold="**{}**")
TEX = Style(pm=r" $\pm$ ", dagger=r"$^\dagger$", delta=r"$\Delta$", bold=r"\textbf{{{}}}")


def split_title(split: str) -> str:
    return f"{split} (selection split)" if split == SELECT_SPLIT else f"{split} (test: the clean estimate)"


def _num(value) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def score(rec, style: Style) -> str:
    """A score in percent: mean, with ± std once there are two seeds."""
    if rec is None or math.isnan(_num(rec["mean"])):
        return ""
    text = f"{100 * rec['mean']:.2f}"
    return text + (f"{style.pm}{100 * rec['std']:.2f}" if not math.isnan(_num(rec["std"])) else "")


def delta(rec, style: Style, interval: bool = True) -> str:
    """Delta in points, its bootstrap interval, and the dagger when significant."""
    if rec is None or math.isnan(_num(rec["delta"])):
        return ""
    text = f"{100 * rec['delta']:+.2f}"
    if interval and not math.isnan(_num(rec.get("ci_low"))):
        text += f" [{100 * rec['ci_low']:+.2f}, {100 * rec['ci_high']:+.2f}]"
    return text + (style.dagger if rec.get("significant") is True else "")


def p_value(rec) -> str:
    p = _num(rec.get("p_value")) if rec is not None else math.nan
    return "" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def t_interval(rec) -> str:
    low = _num(rec.get("t_low")) if rec is not None else math.nan
    return "" if math.isnan(low) else f"[{100 * low:+.2f}, {100 * rec['t_high']:+.2f}]"


def hit_rate(m: dict, branch: str) -> str:
    """`0.41 (0.18)`: the share of a branch's masks on the object (content words), chance in brackets."""
    hit, chance = m.get(f"{branch}_hit"), m.get(f"{branch}_chance")
    if hit is None or chance is None or math.isnan(_num(hit["mean"])):
        return ""
    return f"{hit['mean']:.2f} ({chance['mean']:.2f})"


def _cells(table: pd.DataFrame, split: str) -> dict[tuple, dict]:
    """{(row, col): {metric: record}} for one split."""
    cells: dict[tuple, dict] = {}
    for rec in table[table["split"] == split].to_dict("records"):
        cells.setdefault((rec["row"], rec["col"]), {"variant": rec["variant"]})[rec["metric"]] = rec
    return cells


def variants_frame(table: pd.DataFrame, split: str, baseline: str | None, style: Style) -> pd.DataFrame:
    """One line per variant on one split: scores, deltas with intervals, p, the seed t-interval, cost."""
    lines = []
    for (row, _), m in _cells(table, split).items():
        base = m["variant"] == baseline
        cost = {k: _num(m[k]["mean"]) if k in m else math.nan for k in ("step_time_s", "params_extra")}
        line = {"": row, "n": str(int(m["miou"]["n"])) if "miou" in m else "",
                "mIoU": score(m.get("miou"), style),
                f"{style.delta} mIoU [95% CI]": "baseline" if base else delta(m.get("miou"), style),
                "p": "" if base else p_value(m.get("miou")),
                "oIoU": score(m.get("oiou"), style),
                f"{style.delta} oIoU [95% CI]": "baseline" if base else delta(m.get("oiou"), style),
                "p ": "" if base else p_value(m.get("oiou")),
                f"seed t-int. {style.delta} mIoU": "" if base else t_interval(m.get("miou")),
                **{f"P@0.{t}": score(m.get(f"prec_{t}0"), style) for t in (5, 7, 9)},
                "mask on object (chance)": hit_rate(m, "lmvsd"), "masked content words (chance)": hit_rate(m, "vmlsd"),
                "step (s)": "" if math.isnan(cost["step_time_s"]) else f"{cost['step_time_s']:.3f}",
                "extra params": "" if math.isnan(cost["params_extra"]) else f"{cost['params_extra']:,.0f}"}
        lines.append(line)
    frame = pd.DataFrame(lines)
    optional = [f"seed t-int. {style.delta} mIoU", "mask on object (chance)", "masked content words (chance)"]
    return frame.drop(columns=[c for c in optional if c in frame and not frame[c].any()])


def axis_frame(section: Section, splits: list[str], baseline: str | None, style: Style) -> pd.DataFrame:
    """A one-knob table: one line per value; val (selection) and every test split side by side, each
    against the CRIS baseline and, when the family has one, against its row at the base value."""
    by_split = {split: _cells(section.table, split) for split in splits}
    ref = section.reference
    lines = []
    for (row, col), m in by_split[splits[0]].items():
        line = {label(section.axes[0]): row, "variant": m["variant"], "n": str(int(m["miou"]["n"]))}
        for split in splits:
            cell = by_split[split].get((row, col), {})
            name = split if split != SELECT_SPLIT else f"{split} (sel.)"
            line[f"{name} mIoU"] = score(cell.get("miou"), style)
            line[f"{name} {style.delta} [95% CI]"] = "baseline" if m["variant"] == baseline else delta(cell.get("miou"), style)
            if ref is not None:
                line[f"{name} {style.delta} vs {ref}"] = "reference" if row == ref else delta(cell.get("miou_vs_ref"), style)
        line["mask on object (chance)"] = hit_rate(m, "lmvsd")
        line["masked content words (chance)"] = hit_rate(m, "vmlsd")
        step = m.get("step_time_s")
        line["step (s)"] = f"{step['mean']:.3f}" if step is not None else ""
        lines.append(line)
    frame = pd.DataFrame(lines)
    optional = ["mask on object (chance)", "masked content words (chance)"]
    return frame.drop(columns=[c for c in optional if c in frame and not frame[c].any()])


def kinds_frame(table: pd.DataFrame, split: str, baseline: str | None, style: Style) -> pd.DataFrame:
    """One line per variant: per expression kind, its mIoU and its delta to CRIS on that kind."""
    lines: dict[str, dict] = {}
    for (row, kind), m in _cells(table, split).items():
        line = lines.setdefault(row, {"": row, "n": str(int(m["miou"]["n"]))})
        line[f"{kind} mIoU"] = score(m["miou"], style)
        line[f"{kind} {style.delta} [95% CI]"] = "baseline" if m["variant"] == baseline else delta(m["miou"], style)
    return pd.DataFrame(list(lines.values()))


def grid_frame(section: Section, style: Style) -> pd.DataFrame:
    """A grid on val: mean ± std (n), delta with interval and dagger per cell, the best cell bold."""
    rows, cols = section.axes
    cells = {}
    for (row, col), m in _cells(section.table, SELECT_SPLIT).items():
        miou = m["miou"]
        text = f"{score(miou, style)} (n={int(miou['n'])})"
        if delta(miou, style):
            text += f", {style.delta} {delta(miou, style)}"
        cells[(row, col)] = style.bold.format(text) if bool(miou["best"]) else text
    grid = pd.Series(cells).unstack(fill_value="")
    grid.columns = [f"{AXIS_NAMES.get(cols, cols)} {c}" for c in grid.columns]
    return grid.rename_axis(AXIS_NAMES.get(rows, rows)).reset_index()


def seed_note(table: pd.DataFrame) -> str | None:
    """Said under a table whose comparisons include an arm with one seed."""
    measured = table.loc[table["metric"] == "miou", "seed_variance_measured"].dropna()
    if measured.empty or measured.astype(bool).all():
        return None
    return ("Seed variance not measured: an arm has 1 seed, so these intervals cover test images only "
            "and no delta is marked. Run >= 2 seeds (`sweep.seeds`) for intervals over seeds and images.")


def plateau_text(plateau: dict) -> str:
    """Whether the baseline had stopped improving (the budget's own check; < 0.5 points: plateaued)."""
    rise = 100 * plateau["rise"]
    verdict = "plateaued" if rise < 0.5 else "still rising: a longer budget would change the baseline"
    return (f"Baseline convergence: its per-epoch val mIoU rose {rise:+.2f} points over the last quarter of its "
            f"{plateau['epochs']} epochs (mean over {plateau['n_seeds']} seeds): {verdict}.")


def power_text(power: dict, split: str) -> str:
    """The line under a table: what this number of seeds could have detected."""
    if not power:
        return "Power: no CRIS baseline in this sweep."
    n = power["n_seeds"]
    if n < 2 or math.isnan(_num(power.get("sigma"))):
        return (f"Power ({split}): not measured: the baseline has {n} seed, so its seed std is unknown. "
                "Three or more seeds (`sweep.seeds`) measure it.")
    source = "paired per-seed Δ" if power["paired"] else "Δ of two unpaired arms (√2 σ)"
    return (f"Power ({split}): baseline seed std σ = {100 * power['sigma']:.2f} points over {n} seeds; "
            f"sd of the {source} = {100 * power['sd_delta']:.2f} points. With {n} seeds the smallest Δ "
            f"detectable at 80 % power (α = 0.05) is {100 * power['min_detectable_delta']:.2f} points; "
            f"a 1-point Δ needs {power['seeds_needed']} seeds.")


def legend(n_boot: int, seed: int, splits: list[str]) -> str:
    return "\n".join([
        "## How to read the tables",
        "",
        "- **mIoU**: mean over expressions of IoU (both-empty counts as 1); **oIoU**: sum of intersections / "
        "sum of unions; **P@X**: fraction of expressions with IoU >= X. In %, with the best-on-val weights; "
        "**mean ± std** over seeds (std from 2 seeds on), **n** = seeds.",
        f"- **Splits**: `{SELECT_SPLIT}` is the selection split (checkpoints, variants and the best grid cell "
        "are chosen on it, so its deltas favour the chosen); the test splits "
        f"({', '.join(s for s in splits if s != SELECT_SPLIT) or 'none in this sweep'}) are the clean estimate.",
        "- **Δ**: variant minus the CRIS baseline (the plain `masksd.branches: none` trial), in points, "
        "mean over each arm's seeds. **Δ vs <value>** (one-knob tables): against the table's row at the base "
        "config's value (e.g. random masks against corr_top), with the same interval (`miou_vs_ref` in the CSV).",
        f"- **[95% CI]**: covers training seeds and test images. It is the union of a two-level paired "
        f"bootstrap (B = {n_boot}, seed {seed}; each replicate redraws the seeds, one draw for both arms "
        "when they ran the same seeds, and the test images, all expressions of a drawn image together, "
        "then recomputes mIoU and oIoU) and the t-interval over seeds (**seed t-int.**: paired per-seed "
        "Δ, or Welch for unpaired arms), because with few seeds the bootstrap alone is too narrow "
        "(`cmmasksd/stats.py`). With 1 seed in an arm it is the bootstrap over images only. **p**: the "
        "probability that Δ has the other sign (P(Δ <= 0) for a positive Δ), the larger of the bootstrap's "
        "and the t-test's. **†**: significant, i.e. the interval excludes 0 and both arms have >= 2 seeds.",
        "- **mask on object (chance)**: share of the LMVSD-masked image area on the referred object in the "
        "last training epoch, and the object's share of the image (what random masking hits); **masked "
        "content words (chance)**: the same for VMLSD's masked words. Above chance = the masks are guided.",
        "- **mIoU per expression kind** (RefShapes): `attribute` expressions name the object by what it looks "
        "like, `positional` by an extreme position, `relational` by another object; each Δ is against CRIS on "
        "the same kind, with the interval computed on that kind's expressions alone.",
        "- A row is one variant: every seed of the same overrides, nothing else. `ablation.csv` holds every "
        "table, split and metric in long form (scores as fractions).",
    ])


def to_latex(display: pd.DataFrame, caption: str, label_: str) -> str:
    """booktabs table; free text (row labels, variant names) is escaped, the marks we wrote are not."""
    text = [c for c in display.columns[:2] if c in (display.columns[0], "variant")]
    styler = display.style.hide(axis="index").format(escape="latex", subset=text)
    return styler.to_latex(hrules=True, caption=caption, label=label_, position="htbp",
                           column_format="l" * len(text) + "r" * (len(display.columns) - len(text)))


def section_frame(section: Section, splits: list[str], baseline: str | None, style: Style,
                  split: str = SELECT_SPLIT) -> pd.DataFrame:
    if section.name == KINDS_TABLE:
        return kinds_frame(section.table, split, baseline, style)
    if not section.axes:
        return variants_frame(section.table, split, baseline, style)
    if len(section.axes) == 2:
        return grid_frame(section, style)
    return axis_frame(section, splits, baseline, style)


def markdown(sections: list[Section], splits: list[str], baseline: str | None, header: list[str],
             powers: dict[str, dict], missing: pd.DataFrame, legend_text: str) -> str:
    """The whole Markdown report: the variants per split, then the axis tables, then missing trials."""
    parts = ["# CM-MaskSD ablation report", "", *header, "", legend_text]
    if not sections:
        parts += ["", "No finished trial in this sweep: nothing to tabulate."]
    for section in sections:
        for split in (splits if not section.axes else [SELECT_SPLIT]):
            title = f"{section.title}: {split_title(split)}" if not section.axes else section.title
            if len(section.axes) == 2:
                title += f" ({split_title(SELECT_SPLIT)}; test splits in `ablation.csv`)"
            parts += ["", f"## {title}", "",
                      section_frame(section, splits, baseline, MD, split).to_markdown(index=False, disable_numparse=True)]
            if len(section.axes) == 2:
                parts += ["", "Bold: best mean val mIoU in the grid."]
            note = seed_note(section.table[section.table["split"] == split])
            parts += ["", *([note] if note else []), power_text(powers.get(split, {}), split)]
    parts += ["", "## Missing trials", ""]
    parts.append(missing.to_markdown(index=False) if not missing.empty else "None: every trial finished.")
    return "\n".join(parts) + "\n"


def latex(sections: list[Section], splits: list[str], baseline: str | None) -> str:
    tables = []
    for section in sections:
        for split in (splits if not section.axes else [SELECT_SPLIT]):
            caption = f"{section.title}, {split_title(split)}" if not section.axes else section.title
            tables.append(to_latex(section_frame(section, splits, baseline, TEX, split), caption,
                                   f"tab:{section.name}" + (f"_{split}" if not section.axes else "")))
    return "% generated by pipeline/report; needs \\usepackage{booktabs}\n" + "\n".join(tables)
