"""The report stage end to end on a synthetic sweep logged through MlflowClient per the tracking contract.

Per-expression counts are planted so that the answers are known. 200 expressions sit in 50 images
(4 each). The four branch variants and the baseline ran 3 seeds with seed noise; `+LMVSD +VMLSD`
(+5 points) and `+VMLSD` (+3 points) beat the baseline well beyond it, `+LMVSD` differs from it by
a zero-mean pattern only. The other variants ran one seed: however large their planted effect, no
cell may mark them significant. Two variants differ from others only outside `masksd.*` (a
learning rate), and must stay separate rows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from matplotlib import colormaps
from matplotlib.colors import Normalize
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from cmmasksd.config import MaskSDConfig
from cmmasksd.metrics import summarize
from cmmasksd.stats import compare_tables
from pipeline.contract import MASK
from pipeline.report import curve_labels, main, mask_ratios, next_steps, published_table
from pipeline.report.figures import heatmap_title, heatmap_values
from pipeline.report.load import load_trials
from pipeline.report.tables import Sweep, axis_sections

N_EXPR, N_IMAGES, UNION, N_BOOT = 200, 50, 1000, 2000
IMAGE_ID = np.repeat(np.arange(N_IMAGES) + 500, N_EXPR // N_IMAGES)
SEED_OFFSET = {0: 0.0, 1: 0.012, 2: -0.008}
RNG = np.random.default_rng(0)
BASE_IOU = RNG.uniform(0.2, 0.8, N_EXPR)
ZERO_MEAN = 0.1 * RNG.permutation(np.repeat([1.0, -1.0], N_EXPR // 2))
SEEDS = [0, 1, 2]
KINDS = np.array(["attribute"] * 100 + ["positional"] * 60 + ["relational"] * 40)  # RefShapes' expression kinds

# (variant name, overrides, per-expression effect, seeds)
VARIANTS = [
    ("cris", {"masksd.branches": "none"}, 0.0, SEEDS),
    ("lmvsd", {"masksd.branches": "lmvsd"}, ZERO_MEAN, SEEDS),
    ("vmlsd", {"masksd.branches": "vmlsd"}, 0.03 + 0.1 * ZERO_MEAN, SEEDS),
    ("both", {"masksd.branches": "both"}, 0.05 + 0.2 * ZERO_MEAN, SEEDS),
    ("both r_v=0.25 r_t=0.15", {"masksd.branches": "both", "masksd.mask_ratio_v": 0.25, "masksd.mask_ratio_t": 0.15},
     0.03, [0]),
    ("both r_v=0.25", {"masksd.branches": "both", "masksd.mask_ratio_v": 0.25}, 0.08, [0]),  # best ratio cell
    ("both l_v=0.5 l_t=0.5", {"masksd.branches": "both", "masksd.lambda_v": 0.5, "masksd.lambda_t": 0.5}, 0.01, [0]),
    ("both l_t=0.5", {"masksd.branches": "both", "masksd.lambda_t": 0.5}, 0.06, [0]),  # best lambda cell
    ("both strategy=random", {"masksd.branches": "both", "masksd.strategy": "random"}, 0.0, [0]),
    ("cris optim.lr=0.001", {"masksd.branches": "none", "optim.lr": 0.001}, 0.2, [0]),  # large, but one seed
]
FAILED = ("both r_v=0.75", {"masksd.branches": "both", "masksd.mask_ratio_v": 0.75}, 0.0, [0])


def planted_ious(effect, seed: int, name: str) -> np.ndarray:
    """IoUs on a 1/1000 grid, so the logged intersections and unions reproduce them exactly; each
    (variant, seed) has its own offset of a few tenths of a point, so per-seed deltas vary."""
    jitter = 0.004 * ((sum(map(ord, name)) * (seed + 1)) % 5 - 2)
    return np.round(np.clip(BASE_IOU + effect + SEED_OFFSET[seed] + jitter, 0, 1) * UNION) / UNION


def planted(name: str) -> pd.Series:
    """Planted val mIoU per seed of one variant."""
    _, _, effect, seeds = next(v for v in VARIANTS if v[0] == name)
    return pd.Series({s: planted_ious(effect, s, name).mean() for s in seeds})


def per_expression(variant, seed: int, shift: int = 0) -> pd.DataFrame:
    inter = np.round(planted_ious(variant[2], seed, variant[0]) * UNION).astype(int) - shift
    return pd.DataFrame({"sentence_idx": np.arange(N_EXPR), "sent_id": np.arange(N_EXPR) + 1000,
                         "ref_id": np.arange(N_EXPR) // 2, "object_idx": np.arange(N_EXPR) // 2,
                         "image_id": IMAGE_ID, "kind": KINDS, "inter": inter, "union": UNION, "iou": inter / UNION})


def log_trial(client, experiment_id, parent_id, tmp_path, variant, status="FINISHED", seed=0):
    name, overrides, effect, _ = variant
    run = client.create_run(experiment_id, run_name=name, tags={
        "mlflow.parentRunId": parent_id, "cmmasksd.role": "trial", "cmmasksd.variant": name,
        "cmmasksd.overrides": json.dumps(overrides, sort_keys=True)})
    run_id = run.info.run_id
    masksd = {f"masksd.{k}": v for k, v in MaskSDConfig().model_dump().items()}
    params = {**masksd, "optim.lr": 0.002, **overrides, "seed": seed, "model.clip": "tiny",
              "runtime.device": "cpu", "runtime.precision": "fp32", "runtime.threads": 1}
    tables = {"val": per_expression(variant, seed), "testA": per_expression(variant, seed, shift=10)}
    final = {f"final/{split}/{k}": v for split, t in tables.items()
             for k, v in summarize(t["inter"].to_numpy(), t["union"].to_numpy()).items()}
    extra = 0 if overrides["masksd.branches"] == "none" else 256
    if overrides["masksd.branches"] in ("lmvsd", "both"):
        final |= {"mask/lmvsd_hit": 0.4 + 0.01 * seed, "mask/lmvsd_chance": 0.2}
    final |= {"cost/step_time_s": 0.5 + extra / 512, "cost/peak_mem_mb": 900.0 + extra,
              "cost/params_total": 1e6 + extra, "cost/params_baseline": 1e6, "cost/params_extra": extra,
              "best_epoch": 3}
    now = int(time.time() * 1000)
    curve = [Metric("val/miou", final["final/val/miou"] * f, now, epoch) for epoch, f in enumerate((0.6, 0.85, 1.0), 1)]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=curve + [Metric(k, float(v), now, 0) for k, v in final.items()])
    folder = tmp_path / f"per_expression_{run_id}"
    folder.mkdir()
    for split, table in tables.items():
        table.to_csv(folder / f"per_expression_{split}.csv", index=False)
    client.log_artifacts(run_id, str(folder), artifact_path="per_expression")
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Log the sweep into a fresh sqlite store, run the stage's main(), return the output folder."""
    tmp_path = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("cmmasksd", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={
        "cmmasksd.role": "sweep", "mlflow.source.git.commit": "abc123", "cmmasksd.code_digest": "f00d" * 16,
        "dataset": "refshapes", "backbone": "tiny"})
    parent_id = parent.info.run_id
    for variant in VARIANTS:
        for seed in variant[3]:
            log_trial(client, experiment_id, parent_id, tmp_path, variant, seed=seed)
    failed_id = log_trial(client, experiment_id, parent_id, tmp_path, FAILED, status="FAILED")
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"experiment": "cmmasksd", "experiment_id": experiment_id,
                                      "parent_run_id": parent_id, "tracking_uri": uri}))  # as the sweep writes it
    out = tmp_path / "reports"
    (tmp_path / "params.yaml").write_text(f"report:\n  bootstrap_samples: {N_BOOT}\n  bootstrap_seed: 3\n")
    assert main(["--sweep-file", str(sweep_file), "--out", str(out), "--params", str(tmp_path / "params.yaml")]) == 0
    return SimpleNamespace(out=out, failed_id=failed_id, uri=uri, parent_id=parent_id, tmp=tmp_path,
                           experiment_id=experiment_id)


def sweep_file_for(report, parent_id: str, tmp_path) -> Path:
    """A `sweep.json` as the sweep stage writes it, for another parent run in the report's store."""
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"experiment": "cmmasksd", "experiment_id": report.experiment_id,
                                "parent_run_id": parent_id, "tracking_uri": report.uri}))
    return path


@pytest.fixture(scope="module")
def long(report):
    return pd.read_csv(report.out / "ablation.csv")


def cell(long, table, row, col=None, metric="miou", split="val"):
    rows = long[(long.table == table) & (long.split == split) & (long.row.astype(str) == row) & (long.metric == metric)]
    if col is not None:
        rows = rows[rows.col.astype(str) == col]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_every_variant_is_its_own_row_with_its_own_seeds(long):
    rows = long[(long.table == "variants") & (long.split == "val") & (long.metric == "miou")]
    assert sorted(rows["row"]) == sorted(v[0] for v in VARIANTS)
    for name, _, _, seeds in VARIANTS:
        got = cell(long, "variants", name)
        assert got.n == len(seeds)
        assert got["mean"] == pytest.approx(planted(name).mean(), abs=1e-9)
        if len(seeds) > 1:
            assert got["std"] == pytest.approx(planted(name).std(), abs=1e-9)
        assert got.delta == pytest.approx(planted(name).mean() - planted("cris").mean(), abs=1e-9)


def test_the_baseline_is_the_plain_cris_trial_not_a_cris_variant(long):
    lr = cell(long, "variants", "cris optim.lr=0.001")
    assert lr.delta == pytest.approx(planted("cris optim.lr=0.001").mean() - planted("cris").mean(), abs=1e-9)
    table = long[(long.table == "optim.lr") & (long.split == "val") & (long.metric == "miou")]
    assert sorted(zip(table["row"].astype(float), table["variant"])) == [(0.001, "cris optim.lr=0.001"), (0.002, "cris")]


def test_intervals_are_the_two_level_bootstrap_of_the_library(report, long):
    both = cell(long, "variants", "both", split="testA", metric="oiou")
    arms = [pd.concat([per_expression(v, s, shift=10).assign(seed=s) for s in v[3]])
            for v in (VARIANTS[0], VARIANTS[3])]
    expected = compare_tables(*arms, metrics=("miou", "oiou"), n_boot=N_BOOT, seed=3)["oiou"]
    assert (both.delta, both.ci_low, both.ci_high, both.p_value) == pytest.approx(
        (expected.delta, expected.ci_low, expected.ci_high, expected.p_value))
    assert both.t_low == pytest.approx(expected.t_low) and both.t_high == pytest.approx(expected.t_high)


def test_significance_needs_two_seeds_and_an_interval_that_excludes_zero(long):
    for name in ("vmlsd", "both"):
        got = cell(long, "variants", name)
        assert got.significant == True and got.seed_variance_measured == True  # noqa: E712 (read back as bool)
        assert 0 < got.ci_low <= got.delta <= got.ci_high
    lmvsd = cell(long, "variants", "lmvsd")
    assert lmvsd.significant == False and lmvsd.ci_low < 0 < lmvsd.ci_high  # noqa: E712
    big = cell(long, "variants", "cris optim.lr=0.001")  # +20 points, one seed: images only, never marked
    assert big.ci_low > 0 and big.significant == False and big.seed_variance_measured == False  # noqa: E712
    assert np.isnan(big.t_low)


def test_markdown_marks_only_significant_cells_and_says_where_seed_variance_is_missing(report):
    md = (report.out / "ablation.md").read_text()
    section = md.split("## All variants: val (selection split)")[1].split("\n## ")[0]
    lines = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert "†" in lines["both"] and "†" in lines["vmlsd"]
    assert "†" not in lines["lmvsd"] and "†" not in lines["cris optim.lr=0.001"]
    assert "Seed variance not measured" in section
    assert "## All variants: testA (test: the clean estimate)" in md


def test_power_line_uses_the_baseline_seed_spread(report):
    md = (report.out / "ablation.md").read_text()
    sigma = 100 * planted("cris").std()
    assert f"baseline seed std σ = {sigma:.2f} points over 3 seeds" in md
    deltas = [planted(name) - planted("cris") for name in ("lmvsd", "vmlsd", "both")]
    sd_delta = 100 * np.sqrt(np.mean([d.var(ddof=1) for d in deltas]))  # pooled over the paired variants
    needed = int(np.ceil(((1.959964 + 0.841621) * sd_delta / 1.0) ** 2))
    assert f"sd of the paired per-seed Δ = {sd_delta:.2f} points" in md
    assert f"smallest Δ detectable at 80 % power (α = 0.05) is {2.801585 * sd_delta / np.sqrt(3):.2f} points" in md
    assert f"a 1-point Δ needs {max(2, needed)} seeds" in md


def test_mask_hit_rates_are_summarised_per_variant(report, long):
    assert cell(long, "variants", "both", metric="lmvsd_hit")["mean"] == pytest.approx(0.41)  # seeds 0, 1, 2
    assert cell(long, "variants", "both", metric="lmvsd_chance")["mean"] == pytest.approx(0.2)
    section = (report.out / "ablation.md").read_text().split("## All variants: val (selection split)")[1]
    lines = {line.split("|")[1].strip(): line for line in section.split("\n## ")[0].splitlines() if line.startswith("| ")}
    assert "| 0.41 (0.20) " in lines["both"] and "(0.20)" not in lines["vmlsd"]
    assert "masked content words (chance)" not in section.split("\n## ")[0]  # no VMLSD diagnostics logged


def test_mious_per_expression_kind_with_intervals_on_that_kinds_expressions(report, long):
    for kind in ("attribute", "positional", "relational"):
        arms = [pd.concat([per_expression(v, s).assign(seed=s) for s in v[3]]) for v in (VARIANTS[0], VARIANTS[3])]
        arms = [a[a["kind"] == kind] for a in arms]
        expected = compare_tables(*arms, metrics=("miou",), n_boot=N_BOOT, seed=3)["miou"]
        got = cell(long, "kinds", "both", col=kind)
        assert got["mean"] == pytest.approx(arms[1].groupby("seed")["iou"].mean().mean())
        assert (got.delta, got.ci_low, got.ci_high, got.p_value) == pytest.approx(
            (expected.delta, expected.ci_low, expected.ci_high, expected.p_value))
        assert np.isnan(cell(long, "kinds", "cris", col=kind).delta)
    md = (report.out / "ablation.md").read_text()
    section = md.split("## mIoU per expression kind: val (selection split)")[1].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| "))
    assert "attribute mIoU" in header and "relational Δ [95% CI]" in header
    assert "## mIoU per expression kind: testA (test: the clean estimate)" in md


def test_no_kind_table_for_one_kind_or_runs_logged_before_kinds(report):
    from pipeline.report.kinds import kinds_section

    trials = load_trials(report.uri, report.parent_id)
    columns = [c for c in trials.columns if c.startswith("per_expression/")]
    for change in (lambda t: t.drop(columns="kind"), lambda t: t.assign(kind="all")):
        changed = trials.copy()
        changed[columns] = changed[columns].apply(lambda col: col.map(change))
        assert kinds_section(Sweep(changed, n_boot=100)) is None
    assert kinds_section(Sweep(trials, n_boot=100)) is not None


def test_one_knob_tables_compare_with_their_row_at_the_base_value(report, long):
    # the strategy family: random against corr_top directly (corr_top is `both`, which leaves it unset)
    vs = long[(long.table == "strategy") & (long.metric == "miou_vs_ref") & (long.split == "val")]
    assert list(vs["variant"]) == ["both strategy=random"]
    expected = planted("both strategy=random").mean() - planted("both").mean()
    assert vs.iloc[0]["delta"] == pytest.approx(expected, abs=1e-9)
    assert vs.iloc[0]["ci_low"] < vs.iloc[0]["delta"] < vs.iloc[0]["ci_high"]
    section = (report.out / "ablation.md").read_text().split("## Masking strategy")[1].split("\n## ")[0]
    header, _, *rows = [line for line in section.splitlines() if line.startswith("|")]
    assert "val (sel.) Δ vs corr_top" in header and "mask on object (chance)" in header
    corr_top = next(r for r in rows if r.split("|")[1].strip() == "corr_top")
    assert "reference" in corr_top and "0.41 (0.20)" in corr_top


def test_cost_and_other_splits_are_reported(long):
    assert cell(long, "variants", "both", metric="params_extra")["mean"] == 256
    assert cell(long, "variants", "both", metric="step_time_s").delta == pytest.approx(0.5)
    test_a = cell(long, "variants", "both", split="testA")
    assert test_a["mean"] == pytest.approx(planted("both").mean() - 0.01)
    assert test_a.ci_low < test_a.delta < test_a.ci_high


def test_branch_table_holds_the_four_rows(long):
    rows = long[(long.table == "branches") & (long.split == "val") & (long.metric == "miou")]
    assert dict(zip(rows["row"], rows["variant"])) == {
        "CRIS baseline": "cris", "+LMVSD": "lmvsd", "+VMLSD": "vmlsd", "+LMVSD +VMLSD": "both"}


def test_grids_mark_their_best_cell(report, long):
    ratio = long[(long.table == "mask_ratio") & (long.metric == "miou") & (long.split == "val")]
    assert len(ratio) == 3
    assert ratio.loc[ratio.best, ["row", "col"]].astype(float).values.tolist() == [[0.25, 0.3]]
    lam = long[(long.table == "lambda") & (long.metric == "miou") & (long.split == "val")]
    assert lam.loc[lam.best, ["row", "col"]].astype(float).values.tolist() == [[1.0, 0.5]]
    md = (report.out / "ablation.md").read_text()
    assert f"**{100 * planted('both r_v=0.25').mean():.2f} (n=1)" in md


def test_heatmap_shows_the_planted_cells_in_their_colours(report):
    """The PNG holds a patch of each cell's viridis colour, so it is the grid and not a placeholder."""
    trials = load_trials(report.uri, report.parent_id)
    sections = {s.name: s for s in axis_sections(Sweep(trials, n_boot=200))}
    mean, _, best = heatmap_values(sections["mask_ratio"])
    assert best == ("0.25", "0.3")
    assert mean.loc["0.25", "0.3"] == pytest.approx(100 * planted("both r_v=0.25").mean())
    pixels = np.asarray(Image.open(report.out / "figures" / "heatmap_mask_ratio.png").convert("RGB"))
    pixels = pixels.reshape(-1, 3).astype(int)
    values = mean.to_numpy(dtype=float)
    norm = Normalize(np.nanmin(values), np.nanmax(values))
    for value in values[~np.isnan(values)]:
        colour = (np.array(colormaps["viridis"](norm(value))[:3]) * 255).round()
        assert (np.abs(pixels - colour).max(axis=1) <= 3).sum() > 500, f"no patch of the colour of {value:.1f}"


def test_markdown_lists_missing_runs_and_the_bootstrap_it_used(report):
    md = (report.out / "ablation.md").read_text()
    assert f"B = {N_BOOT}, seed 3" in md  # the params file's values, not the defaults
    missing = md.split("## Missing trials")[1]
    assert report.failed_id in missing and "FAILED" in missing
    assert "f00df00df00d" in md and "abc123" in md  # the code identity behind the numbers
    assert "trained in fp32 on cpu." in md  # as the trials recorded it (`runtime.*` params)


def test_latex_is_one_booktabs_tabular_per_table(report):
    tex = (report.out / "ablation.tex").read_text()
    # variants on val + testA, branches, two grids, strategy, optim.lr, kinds on val + testA
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 9
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 9
    both = planted("both")
    assert f"{100 * both.mean():.2f}" + r" $\pm$ " + f"{100 * both.std():.2f}" in tex
    assert r"both strategy=random" in tex and r"\label{tab:mask_ratio}" in tex and r"\label{tab:kinds_val}" in tex
    assert r"cris optim.lr=0.001" in tex


def test_reports_and_summary_are_attached_to_the_sweep_run(report):
    client = MlflowClient(report.uri)
    names = {f.path for f in client.list_artifacts(report.parent_id, "reports")}
    assert {"reports/ablation.md", "reports/metrics.json", "reports/figures"} <= names
    figures = {f.path for f in client.list_artifacts(report.parent_id, "reports/figures")}
    assert {"reports/figures/heatmap_lambda.png", "reports/figures/heatmap_mask_ratio.png"} <= figures
    parent = client.get_run(report.parent_id)
    assert parent.data.metrics["summary/baseline_val_miou"] == pytest.approx(planted("cris").mean())
    assert parent.data.tags["cmmasksd.best_variant"] == "cris optim.lr=0.001"
    assert parent.data.metrics["summary/best_delta_significant"] == 0.0


def test_metrics_json_for_dvc(report):
    metrics = json.loads((report.out / "metrics.json").read_text())
    baseline, best = planted("cris"), planted("cris optim.lr=0.001")
    assert metrics["n_trials"] == 18 and metrics["n_failed"] == 1 and metrics["n_seeds_baseline"] == 3
    assert metrics["baseline_val_miou"] == pytest.approx(baseline.mean())
    assert metrics["best_val_miou"] == pytest.approx(best.mean())
    assert metrics["best_delta_miou"] == pytest.approx(best.mean() - baseline.mean())
    assert metrics["best_delta_ci_low"] > 0 and metrics["best_delta_significant"] is False
    assert metrics["figures"] == 3  # two grid heatmaps and the learning curves: no overlays were logged
    deltas = [planted(name) - planted("cris") for name in ("lmvsd", "vmlsd", "both")]
    sd_delta = np.sqrt(np.mean([d.var(ddof=1) for d in deltas]))  # what the power line says, for `pipeline.plan`
    assert metrics["val_sd_delta"] == pytest.approx(sd_delta)
    assert metrics["val_min_detectable_delta"] == pytest.approx(2.801585 * sd_delta / np.sqrt(3), rel=1e-5)
    # planted curves end 0.85, 1.0 x the final mIoU: the last quarter of 3 epochs is the last epoch
    assert metrics["baseline_val_last_quarter_rise"] == pytest.approx(0.15 * baseline.mean())
    assert f"rose {100 * 0.15 * baseline.mean():+.2f} points" in (report.out / "ablation.md").read_text()


def test_figures_are_what_the_sweep_can_draw_and_nothing_else(report):
    """One heatmap per two-key grid table with cells, the learning curves; no overlay was logged, so
    none is written (no placeholder either)."""
    figures = sorted(p.name for p in (report.out / "figures").iterdir())
    assert figures == ["heatmap_lambda.png", "heatmap_mask_ratio.png", "learning_curves.png"]
    assert all(Image.open(report.out / "figures" / name).format == "PNG" for name in figures)
    md = (report.out / "ablation.md").read_text()
    assert "Figures: `figures/heatmap_lambda.png`, `figures/heatmap_mask_ratio.png`, `figures/learning_curves.png`" in md
    assert "overlays" not in md.split("Figures:")[1].split("\n")[0]
    assert not list(report.out.glob("*.png"))  # nothing beside the folder


def test_a_sweep_with_no_finished_trial_still_reports(report, tmp_path):
    client = MlflowClient(report.uri)
    experiment_id = client.get_experiment_by_name("cmmasksd").experiment_id
    parent_id = client.create_run(experiment_id, run_name="empty sweep").info.run_id
    failed_id = log_trial(client, experiment_id, parent_id, tmp_path, FAILED, status="FAILED")
    sweep_file = sweep_file_for(report, parent_id, tmp_path)
    assert main(["--sweep-file", str(sweep_file), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_trials"] == 0 and metrics["n_failed"] == 1 and metrics["best_val_miou"] is None
    assert metrics["figures"] == 0 and list((tmp_path / "out" / "figures").iterdir()) == []  # nothing drawn
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert failed_id in md and "Figures: none (nothing in this sweep to draw)." in md


def test_published_numbers_sit_beside_ours_on_real_datasets_only(report):
    ours = {"CRIS baseline": {"val": 0.5012, "testA": 0.6, "testB": None}}
    table = published_table("refcoco", ours)
    assert list(table.columns) == ["row", "val", "testA", "testB"]
    assert table.set_index("row").loc["CM-MaskSD", "val"] == "74.89"
    assert table.set_index("row").loc["ours: CRIS baseline"].tolist() == ["50.12", "60.00", "-"]
    assert list(published_table("refcocog", ours).columns) == ["row", "val", "test"]
    assert published_table("refshapes", ours) is None
    assert "Published numbers" not in (report.out / "ablation.md").read_text()  # the fixture is RefShapes


def test_overlays_of_a_variant_are_copied_from_its_first_seed(report, tmp_path, capsys):
    client = MlflowClient(report.uri)
    trials = load_trials(report.uri, report.parent_id)
    first = trials[trials["variant"] == "cris"].sort_values("seed")["run_id"].iloc[0]
    figure = tmp_path / "overlays_val.png"
    Image.new("RGB", (40, 20), (0, 200, 0)).save(figure)
    client.log_artifact(first, str(figure), artifact_path="figures")
    out = tmp_path / "out"
    sweep_file = sweep_file_for(report, report.parent_id, tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("report:\n  bootstrap_samples: 200\n")
    capsys.readouterr()
    assert main(["--sweep-file", str(sweep_file), "--out", str(out), "--params", str(params)]) == 0
    assert (out / "figures" / "overlays_baseline.png").read_bytes() == figure.read_bytes()
    assert not (out / "figures" / "overlays_best.png").exists()  # the best variant logged none: not drawn
    md = (out / "ablation.md").read_text()
    listed = md.split("Figures:")[1].split("\n")[0]
    assert "`figures/overlays_baseline.png`" in listed and "overlays_best" not in listed

    # what the stage prints: where the results are, the headline, and how to open the runs in MLflow
    printed = capsys.readouterr().out
    assert f"Tables: {out / 'ablation.md'} (also .csv, .tex); figures: {out / 'figures'}/" in printed
    assert f"CRIS baseline val mIoU {100 * planted('cris').mean():.1f}" in printed
    assert f"mlflow ui --backend-store-uri {report.uri} --host 127.0.0.1 --port 5000" in printed
    assert (f"http://127.0.0.1:5000/#/experiments/{report.experiment_id}?workflowType=machine_learning"
            in printed)
    assert "{" not in printed  # not a JSON dump


def test_list_valued_overrides_make_their_own_table_rows():
    base = {"masksd.branches": "none"}
    variants = [("cris", base, 0.50), ("cris optim.milestones=[3]", {**base, "optim.milestones": [3]}, 0.52)]
    trials = pd.DataFrame([{"run_id": name, "variant": name, "variant_key": json.dumps(o, sort_keys=True),
                            "overrides": o, "seed": 0, "final/val/miou": miou, "optim.milestones": "[5]"}
                           for name, o, miou in variants])
    (section,) = [s for s in axis_sections(Sweep(trials, n_boot=10)) if s.axes == ("optim.milestones",)]
    rows = section.table[section.table["metric"] == "miou"]
    assert dict(zip(rows["row"], rows["variant"])) == {"[5]": "cris", "[3]": "cris optim.milestones=[3]"}
    assert rows.set_index("row").loc["[3]", "delta"] == pytest.approx(0.02)


def test_the_default_arm_is_cmmasksd_at_its_own_recipe_and_its_mask_ratios_are_reported():
    """The default sweep's CM-MaskSD arm carries its learning rate (`optim.*`); random masks or another
    mask ratio are not the default arm. Its masks' coverage over chance feeds metrics.json."""
    arms = [("cris", {"masksd.branches": "none"}),
            ("both random", {"masksd.branches": "both", "masksd.strategy": "random", "optim.lr": 0.004}),
            ("both", {"masksd.branches": "both", "optim.lr": 0.004, "optim.backbone_lr": 0.0004})]
    trials = pd.DataFrame([{"run_id": name, "variant": name, "variant_key": json.dumps(o, sort_keys=True),
                            "overrides": o, "seed": 0, "final/val/miou": 0.3,
                            f"{MASK}lmvsd_coverage": 0.3, f"{MASK}lmvsd_coverage_chance": 0.2,
                            f"{MASK}vmlsd_hit": 0.5, f"{MASK}vmlsd_chance": 0.4} for name, o in arms])
    sweep = Sweep(trials, n_boot=10)
    assert sweep.default_arm().name == "both"
    assert mask_ratios(sweep.default_arm()) == pytest.approx({"mask_coverage_ratio": 1.5, "word_hit_ratio": 1.25})


def test_learning_curves_name_every_arm_when_no_branch_table_does():
    """The default's arms differ in more than the branch (each at its own learning rate): no branch
    table, so every variant gets its own coloured, labelled curve, CRIS as the baseline."""
    arms = [("cris", {"masksd.branches": "none"}), ("maskris", {"masksd.recipe": "maskris"}),
            ("both lr", {"masksd.branches": "both", "optim.lr": 0.004})]
    trials = pd.DataFrame([{"run_id": name, "variant": name, "variant_key": json.dumps(o, sort_keys=True),
                            "overrides": o, "seed": 0, "final/val/miou": 0.3} for name, o in arms])
    sweep = Sweep(trials, n_boot=10)
    sections = axis_sections(sweep)
    assert not any(s.name == "branches" for s in sections)
    assert curve_labels(sections, sweep) == {"cris": "CRIS baseline", "maskris": "maskris", "both lr": "both lr"}


def test_a_heatmap_title_holding_several_overrides_fixed_wraps_to_the_figure():
    fixed = {"masksd.branches": "both", "optim.backbone_lr": 0.0004, "optim.lr": 0.004}
    title = heatmap_title("mask-ratio-v-lambda-v grid", fixed)
    assert max(len(line) for line in title.splitlines()) <= 60 and len(title.splitlines()) >= 2
    assert " ".join(title.split()) == ("mask-ratio-v-lambda-v grid: val mIoU (masksd.branches=both, "
                                       "optim.backbone_lr=0.0004, optim.lr=0.004) (★ best)")


def test_next_steps_link_a_tracking_server_without_its_credentials(tmp_path):
    sweep = {"tracking_uri": "https://user:s3cret@mlflow.example:5000/", "experiment_id": "12"}
    text = next_steps(tmp_path, {"baseline_val_miou": None}, sweep)
    assert text.splitlines()[-1] == "MLflow: https://mlflow.example:5000/#/experiments/12?workflowType=machine_learning"
    assert "s3cret" not in text and "CRIS baseline" not in text  # no headline without a baseline
