"""The report stage end to end on a synthetic sweep logged through MlflowClient per the tracking contract.

Per-expression IoUs are planted so that the answers are known: "both" (+5 points) and "+VMLSD"
(+3 points) beat the baseline well beyond a +-0.1 / +-0.02 per-expression spread, "+LMVSD" differs
from it by a zero-mean +-0.1 pattern only (no effect), and each grid has one clearly best cell.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from cmmasksd.config import MaskSDConfig
from cmmasksd.metrics import summarize
from pipeline.report import branch_table, copy_overlays, grid_table, load_trials, main, published_table

N_EXPR = 200
UNION = 1000
SEED_OFFSET = {0: 0.0, 1: 0.01}
RNG = np.random.default_rng(0)
BASE_IOU = RNG.uniform(0.2, 0.8, N_EXPR)
ZERO_MEAN = 0.1 * RNG.permutation(np.repeat([1.0, -1.0], N_EXPR // 2))

# (variant name, masksd overrides, per-expression effect, seeds)
VARIANTS = [
    ("cris", {"branches": "none"}, 0.0, [0, 1]),
    ("lmvsd", {"branches": "lmvsd"}, ZERO_MEAN, [0, 1]),
    ("vmlsd", {"branches": "vmlsd"}, 0.03 + 0.1 * ZERO_MEAN, [0, 1]),
    ("both", {}, 0.05 + 0.2 * ZERO_MEAN, [0, 1]),  # every knob at its default
    ("both r_v=0.25 r_t=0.15", {"mask_ratio_v": 0.25, "mask_ratio_t": 0.15}, 0.03, [0]),
    ("both r_v=0.25 r_t=0.3", {"mask_ratio_v": 0.25}, 0.08, [0]),  # best ratio cell
    ("both r_v=0.5 r_t=0.15", {"mask_ratio_t": 0.15}, 0.04, [0]),
    ("both l_v=0.5 l_t=0.5", {"lambda_v": 0.5, "lambda_t": 0.5}, 0.01, [0]),
    ("both l_v=0.5", {"lambda_v": 0.5}, 0.02, [0]),
    ("both l_t=0.5", {"lambda_t": 0.5}, 0.06, [0]),  # best lambda cell
    ("both random", {"strategy": "random"}, 0.0, [0]),
]
FAILED = ("both r_v=0.75", {"mask_ratio_v": 0.75}, 0.0, [0])


def planted_ious(effect, seed: int) -> np.ndarray:
    """IoUs on a 1/1000 grid, so the logged intersections and unions reproduce them exactly."""
    return np.round((BASE_IOU + effect + SEED_OFFSET[seed]) * UNION) / UNION


def planted_val_miou(name: str) -> pd.Series:
    """Planted val mIoU per seed of one variant."""
    _, _, effect, seeds = next(v for v in VARIANTS if v[0] == name)
    return pd.Series({s: planted_ious(effect, s).mean() for s in seeds})


def log_trial(client, experiment_id, parent_id, tmp_path, variant, status="FINISHED", seed=0):
    name, overrides, effect, _ = variant
    run = client.create_run(experiment_id, run_name=name, tags={
        "mlflow.parentRunId": parent_id, "cmmasksd.role": "trial", "cmmasksd.variant": name})
    run_id = run.info.run_id
    masksd = {**MaskSDConfig().model_dump(), "branches": "both", **overrides}
    params = {**{f"masksd.{k}": v for k, v in masksd.items()}, "seed": seed, "model.clip": "tiny", "optim.lr": 1e-3}
    ious = planted_ious(effect, seed)
    inter = np.round(ious * UNION).astype(int)
    final = {f"final/val/{k}": v for k, v in summarize(inter, np.full(N_EXPR, UNION)).items()}
    final |= {f"final/testA/{k}": v for k, v in summarize(inter - 10, np.full(N_EXPR, UNION)).items()}
    extra = {"none": 0, "lmvsd": 256, "vmlsd": 256, "both": 256}[masksd["branches"]]
    final |= {"cost/step_time_s": 0.5 + extra / 512, "cost/peak_mem_mb": 900.0 + extra,
              "cost/params_total": 1e6 + extra, "cost/params_baseline": 1e6, "cost/params_extra": extra,
              "best_epoch": 3}
    now = int(time.time() * 1000)
    curve = [Metric("val/miou", ious.mean() * f, now, epoch) for epoch, f in enumerate((0.6, 0.85, 1.0), 1)]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=curve + [Metric(k, float(v), now, 0) for k, v in final.items()])
    csv = tmp_path / f"per_expression_val_{run_id}" / "per_expression_val.csv"
    csv.parent.mkdir()
    pd.DataFrame({"sentence_idx": np.arange(N_EXPR), "sent_id": np.arange(N_EXPR) + 1000,
                  "ref_id": np.arange(N_EXPR) // 2, "object_idx": np.arange(N_EXPR) // 2,
                  "inter": inter, "union": UNION, "iou": ious}).to_csv(csv, index=False)
    client.log_artifact(run_id, str(csv), artifact_path="per_expression")
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
        "cmmasksd.role": "sweep", "git_commit": "abc123", "dataset": "refshapes", "backbone": "tiny"})
    parent_id = parent.info.run_id
    for variant in VARIANTS:
        for seed in variant[3]:
            log_trial(client, experiment_id, parent_id, tmp_path, variant, seed=seed)
    failed_id = log_trial(client, experiment_id, parent_id, tmp_path, FAILED, status="FAILED")
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"experiment": "cmmasksd", "parent_run_id": parent_id, "tracking_uri": uri}))
    out = tmp_path / "reports"
    (tmp_path / "params.yaml").write_text("report:\n  bootstrap_samples: 500\n")
    assert main(["--sweep-file", str(sweep_file), "--out", str(out), "--params", str(tmp_path / "params.yaml")]) == 0
    return SimpleNamespace(out=out, failed_id=failed_id, uri=uri, parent_id=parent_id)


@pytest.fixture(scope="module")
def long(report):
    return pd.read_csv(report.out / "ablation.csv")


def cell(long, table, row, col=None, metric="miou", split="val"):
    rows = long[(long.table == table) & (long.split == split) & (long.row.astype(str) == row) & (long.metric == metric)]
    if col is not None:
        rows = rows[rows.col.astype(str) == col]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_branch_table_reports_the_planted_means_and_stds(long):
    for row, name in [("CRIS baseline", "cris"), ("+LMVSD", "lmvsd"), ("+VMLSD", "vmlsd"), ("+LMVSD +VMLSD", "both")]:
        got, planted = cell(long, "branches", row), planted_val_miou(name)
        assert got.variant == name
        assert got.n == 2
        assert got["mean"] == pytest.approx(planted.mean(), abs=1e-9)
        assert got["std"] == pytest.approx(planted.std(), abs=1e-9)
        assert got.delta == pytest.approx(planted.mean() - planted_val_miou("cris").mean(), abs=1e-9)


def test_significance_marks_follow_the_planted_effects(long):
    assert cell(long, "branches", "+LMVSD").significant == False  # noqa: E712 (read back as bool)
    for row in ("+VMLSD", "+LMVSD +VMLSD"):
        got = cell(long, "branches", row)
        assert got.significant == True  # noqa: E712
        assert got.ci_low <= got.delta <= got.ci_high
    lmvsd = cell(long, "branches", "+LMVSD")
    assert lmvsd.ci_low < 0 < lmvsd.ci_high


def test_cost_and_other_splits_are_reported(long):
    assert cell(long, "branches", "+LMVSD +VMLSD", metric="params_extra")["mean"] == 256
    assert cell(long, "branches", "+LMVSD +VMLSD", metric="step_time_s").delta == pytest.approx(0.5)
    test_a = cell(long, "branches", "+LMVSD +VMLSD", split="testA")
    assert test_a["mean"] == pytest.approx(planted_val_miou("both").mean() - 0.01)
    assert np.isnan(test_a.ci_low)  # the synthetic sweep logs per-expression IoUs for val only


def test_grids_mark_their_best_cell(report, long):
    ratio = long[(long.table == "mask_ratio") & (long.metric == "miou")]
    assert len(ratio) == 4
    assert ratio.loc[ratio.best, ["row", "col"]].astype(float).values.tolist() == [[0.25, 0.3]]
    lam = long[(long.table == "lambda") & (long.metric == "miou")]
    assert lam.loc[lam.best, ["row", "col"]].astype(float).values.tolist() == [[1.0, 0.5]]
    md = (report.out / "ablation.md").read_text()
    best = planted_val_miou("both r_v=0.25 r_t=0.3").mean()
    assert f"**{100 * best:.2f} (n=1)" in md


def test_markdown_states_the_legend_untested_tables_and_missing_runs(report):
    md = (report.out / "ablation.md").read_text()
    assert "B=500" in md and "mIoU" in md and "oIoU" in md
    assert "`weights` is not varied in this sweep." in md
    missing = md.split("## Missing trials")[1]
    assert report.failed_id in missing and "FAILED" in missing


def test_latex_is_one_booktabs_tabular_per_table(report):
    tex = (report.out / "ablation.tex").read_text()
    # branches val + testA, two grids, strategy
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 5
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 5
    assert r"corr\_top" in tex and r"$\pm$" in tex and r"\label{tab:mask_ratio}" in tex


def test_reports_are_attached_to_the_sweep_run(report):
    names = {f.path for f in MlflowClient(report.uri).list_artifacts(report.parent_id, "reports")}
    assert {"reports/ablation.md", "reports/metrics.json", "reports/heatmap_lambda.png"} <= names


def test_a_sweep_without_grid_or_lmvsd_gives_empty_tables_not_errors(report):
    trials = load_trials(report.uri, report.parent_id)
    small = trials[trials["variant"].isin(["cris", "vmlsd"])]
    assert grid_table(small).empty
    rows = branch_table(small, n_boot=100)
    assert set(rows["row"]) == {"CRIS baseline", "+VMLSD"}


def test_metrics_json_for_dvc(report):
    metrics = json.loads((report.out / "metrics.json").read_text())
    baseline, best = planted_val_miou("cris"), planted_val_miou("both r_v=0.25 r_t=0.3")
    assert metrics["n_trials"] == 15 and metrics["n_failed"] == 1
    assert metrics["baseline_val_miou"] == pytest.approx(baseline.mean())
    assert metrics["best_val_miou"] == pytest.approx(best.mean())
    assert metrics["best_delta_miou"] == pytest.approx(best[0] - baseline[0])  # on the shared seed
    assert metrics["best_delta_ci_low"] > 0


def test_a_sweep_with_no_finished_trial_still_reports(report, tmp_path):
    client = MlflowClient(report.uri)
    experiment_id = client.get_experiment_by_name("cmmasksd").experiment_id
    parent_id = client.create_run(experiment_id, run_name="empty sweep").info.run_id
    failed_id = log_trial(client, experiment_id, parent_id, tmp_path, FAILED, status="FAILED")
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({"parent_run_id": parent_id, "tracking_uri": report.uri}))
    assert main(["--sweep-file", str(sweep_file), "--out", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n_trials"] == 0 and metrics["n_failed"] == 1 and metrics["best_val_miou"] is None
    assert failed_id in (tmp_path / "out" / "ablation.md").read_text()
    assert (tmp_path / "out" / "heatmap_lambda.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["heatmap_mask_ratio.png", "heatmap_lambda.png", "learning_curves.png"])
def test_figures_are_pngs(report, name):
    data = (report.out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_published_numbers_sit_beside_ours_on_real_datasets_only(report):
    ours = pd.DataFrame([{"row": "CRIS baseline", "val": 0.5012, "testA": 0.6, "testB": None}])
    table = published_table("refcoco", ours)
    assert list(table.columns) == ["row", "val", "testA", "testB"]
    assert table.set_index("row").loc["CM-MaskSD", "val"] == "74.89"
    assert table.set_index("row").loc["ours: CRIS baseline"].tolist() == ["50.12", "60.00", "-"]
    assert list(published_table("refcocog", ours).columns) == ["row", "val", "test"]
    assert published_table("refshapes", ours) is None
    assert "Published numbers" not in (report.out / "ablation.md").read_text()  # the fixture is RefShapes


def test_overlays_of_a_variant_are_copied_from_its_first_seed(report, tmp_path):
    client = MlflowClient(report.uri)
    trials = load_trials(report.uri, report.parent_id)
    cris = trials[trials["variant"] == "cris"].sort_values("seed")
    figure = tmp_path / "overlays_val.png"
    figure.write_bytes((report.out / "learning_curves.png").read_bytes())  # any real PNG
    client.log_artifact(cris["run_id"].iloc[0], str(figure), artifact_path="figures")

    copy_overlays(client, trials, "cris", tmp_path / "baseline.png")
    assert (tmp_path / "baseline.png").read_bytes() == figure.read_bytes()
    copy_overlays(client, trials, "lmvsd", tmp_path / "lmvsd.png")  # logged no figure: a note says so
    note = (tmp_path / "lmvsd.png").read_bytes()
    assert note[:8] == b"\x89PNG\r\n\x1a\n" and note != figure.read_bytes()
