"""The report's figures: grid heatmaps and learning curves (prediction overlays are copied as logged),
and the curves as data files for `dvc plots`.

Figures go into one folder (`reports/figures/`, a DVC output as a whole): a figure a sweep has
nothing for is simply not written, and the report says which were.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from pipeline.contract import SELECT_SPLIT
from pipeline.report.render import AXIS_NAMES
from pipeline.report.tables import BRANCH_ROWS, Section

HEATMAP_CMAP = "viridis"
TITLE_WIDTH = 60  # characters per title line at the heatmap's 5.5 in


@contextlib.contextmanager
def replaced_folder(directory: Path) -> Iterator[Path]:
    """A fresh sibling folder to write into that then replaces `directory`: a report killed midway
    leaves the old files or none, never half a folder in the DVC output."""
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)


def heatmap_values(section: Section) -> tuple[pd.DataFrame, pd.DataFrame, tuple]:
    """Val mIoU (%) mean and std per cell as rows x cols frames, and the best cell's (row, col)."""
    miou = section.table[(section.table["metric"] == "miou") & (section.table["split"] == SELECT_SPLIT)]
    mean = miou.pivot(index="row", columns="col", values="mean") * 100
    std = miou.pivot(index="row", columns="col", values="std") * 100
    best = miou.loc[miou["best"].astype(bool), ["row", "col"]].iloc[0]
    return mean, std, (best["row"], best["col"])


def plot_heatmap(section: Section, path: Path, title: str) -> None:
    """Val mIoU over a grid, every cell annotated, the best one starred and outlined."""
    mean, std, best = heatmap_values(section)
    rows, cols = section.axes
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(mean.to_numpy(dtype=float), cmap=HEATMAP_CMAP, origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="val mIoU (%)")
    ax.set_xticks(range(len(mean.columns)), list(mean.columns))
    ax.set_yticks(range(len(mean.index)), list(mean.index))
    ax.set_xlabel(AXIS_NAMES.get(cols, cols))
    ax.set_ylabel(AXIS_NAMES.get(rows, rows))
    for i, r in enumerate(mean.index):
        for j, c in enumerate(mean.columns):
            if pd.isna(mean.loc[r, c]):
                continue
            is_best = (r, c) == best
            text = ("★ " if is_best else "") + f"{mean.loc[r, c]:.1f}"
            text += f"\n±{std.loc[r, c]:.1f}" if pd.notna(std.loc[r, c]) else ""
            ax.text(j, i, text, ha="center", va="center", fontweight="bold" if is_best else "normal",
                    color="black" if image.norm(mean.loc[r, c]) > 0.6 else "white")
            if is_best:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_title(heatmap_title(title, section.fixed), fontsize="medium")
    fig.savefig(path, dpi=120)


def heatmap_title(title: str, fixed: dict) -> str:
    """The grid, what it holds fixed and the marker's meaning, wrapped to the figure's width (a grid
    fixing several overrides would otherwise run off it)."""
    held = f" ({', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else ""
    return textwrap.fill(f"{title}: val mIoU{held} (★ best)", width=TITLE_WIDTH)


def plot_learning_curves(curves: pd.DataFrame, trials: pd.DataFrame, highlight: dict[str, str], path: Path) -> None:
    """Val mIoU per epoch, mean over seeds: the branch-table variants in colour, the rest in grey."""
    mean = (curves.merge(trials[["run_id", "variant"]], on="run_id")
            .groupby(["variant", "step"])["value"].mean() * 100)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for variant in mean.index.unique("variant").difference(list(highlight)):
        ax.plot(mean[variant].index, mean[variant].to_numpy(), color="0.75", linewidth=1)
    for variant, row in highlight.items():
        if variant in mean.index.unique("variant"):
            ax.plot(mean[variant].index, mean[variant].to_numpy(), marker="o", linewidth=2,
                    **({"color": "black", "linestyle": "--"} if row == BRANCH_ROWS["none"] else {}),
                    label=variant if row == variant else f"{row}: {variant}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%)")
    ax.set_title("Learning curves, mean over seeds (grey: other variants)")
    if highlight:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def write_curve_files(curves: pd.DataFrame, trials: pd.DataFrame, directory: Path) -> int:
    """One CSV per trial (`epoch,val_miou`) under `directory`, declared under `plots:` in dvc.yaml,
    so that `dvc plots diff` draws a line per variant and seed for each experiment. Returns the count."""
    named = curves.merge(trials[["run_id", "variant", "seed"]], on="run_id")
    with replaced_folder(directory) as staging:
        for (variant, seed), rows in named.groupby(["variant", "seed"]):
            file = staging / f"{re.sub(r'[^A-Za-z0-9=._-]+', '_', str(variant))}_seed{int(seed)}.csv"
            table = rows.sort_values("step").rename(columns={"step": "epoch", "value": "val_miou"})
            table[["epoch", "val_miou"]].to_csv(file, index=False)
    return named.groupby(["variant", "seed"]).ngroups
