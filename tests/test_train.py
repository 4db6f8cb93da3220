"""Training end to end on the tiny config: results, checkpoint resume, evaluate and predict."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import Interrupt, stop_after
from PIL import Image
from scipy import ndimage

from cmmasksd.config import build_config, deep_merge, load_config, read_profile
from cmmasksd.data import PreparedSplit
from cmmasksd.identity import run_identity
from cmmasksd.metrics import METRIC_NAMES, ious, summarize
from cmmasksd.model import parameter_report
from cmmasksd.predict import load_checkpoint, predict_mask
from cmmasksd.train import BEST, CHECKPOINT_DIR, LAST, train
from cmmasksd.visualize import GT_COLOUR, PRED_COLOUR, load_rgb

SPLITS = ("testA", "testB", "val")


# ---- reading the figures back: what they show, not just that they are PNGs ----------------------

MPL_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]  # matplotlib's C0..C3


def read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def near(pixels: np.ndarray, colour, tol: int = 2) -> np.ndarray:
    return (np.abs(pixels - np.asarray(colour)) <= tol).all(-1)


def tinted(image: np.ndarray) -> np.ndarray:
    """`image` with the prediction colour blended in (`overlay_mask`, alpha 0.5)."""
    return (0.5 * image + 0.5 * np.asarray(PRED_COLOUR)).astype(int)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, flags.astype(int), 0]))
    return [(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 20]


def pictures_in(figure: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each picture shown (axes off: blocks of non-white pixels), row by row."""
    ink = (figure != 255).any(-1)
    return [(top, bottom, left, right) for top, bottom in _runs(ink.mean(1) > 0.5)
            for left, right in _runs(ink[top:bottom].mean(0) > 0.9)]


def pixels_of(figure: np.ndarray, box, shape) -> np.ndarray:
    """The picture in `box` read back at `shape`: the centre of each displayed pixel."""
    top, bottom, left, right = box
    ys = (top + (np.arange(shape[0]) + 0.5) * (bottom - top) / shape[0]).astype(int)
    xs = (left + (np.arange(shape[1]) + 0.5) * (right - left) / shape[1]).astype(int)
    return figure[np.ix_(ys, xs)]


def assert_learning_curves(path: Path, history: list[dict]) -> None:
    """Left: one line per train/ loss (matplotlib's colour cycle); right: val mIoU and oIoU only."""
    figure = read_rgb(path)
    half = figure.shape[1] // 2
    assert len([key for key in history[0] if key.startswith("train/")]) == 4  # loss, seg, lmvsd, vmlsd: C0..C3
    for i, colour in enumerate(MPL_COLOURS):
        assert near(figure[:, :half], colour, 10).sum() > 20, f"loss line C{i}"
        assert (near(figure[:, half:], colour, 10).sum() > 20) == (i < 2), f"validation line C{i}"


def assert_overlays_show_the_picks(path: Path, split: PreparedSplit, table: pd.DataFrame, count: int) -> None:
    """Rows from the best to the worst IoU; per row the input of an expression with that IoU, its ground
    truth outlined in green, and beside it the prediction tinted red whose IoU is the table's."""
    figure = read_rgb(path)
    boxes = pictures_in(figure)
    assert len(boxes) == 2 * count
    ranked = table.iou.sort_values(ascending=False).to_numpy()
    for row, iou in enumerate(ranked[np.unique(np.linspace(0, len(ranked) - 1, num=count).round().astype(int))]):
        pair = boxes[2 * row: 2 * row + 2]
        shown, overlay = (pixels_of(figure, box, (split.size, split.size)) for box in pair)
        top, bottom, left, right = pair[0]
        ys, xs = np.nonzero(near(figure[top:bottom, left:right], GT_COLOUR, 25))
        outline = ys * split.size // (bottom - top), xs * split.size // (right - left)
        fits = []
        for sent_idx in table.sentence_idx[np.isclose(table.iou, iou)]:  # ties: any of them may be shown
            obj = int(split.sentence_object[sent_idx])
            image, gt = split.image(int(split.object_image[obj])).astype(int), split.mask(obj).astype(bool)
            red = near(overlay, tinted(image))
            edge = ndimage.binary_dilation(gt ^ ndimage.binary_erosion(gt), iterations=2)
            fits.append(near(shown, image).mean() > 0.95 and (near(overlay, image) | red).mean() > 0.95
                        and len(ys) > 20 and edge[outline].mean() > 0.95
                        and abs((red & gt).sum() / max((red | gt).sum(), 1) - iou) < 0.05)
        assert any(fits), f"overlay row {row} (IoU {iou:.2f}) shows none of the expressions with that IoU"


# One step per epoch: 8 training objects at the debug profile's batch of 8.
ONE_STEP = {"data.max_train_objects": 8, "data.max_eval_expressions": 8}


def test_one_step_trains_evaluates_and_writes_its_files(tiny_config):
    """The fast path through `train` (as lightning's fast_dev_run): one step, every split scored,
    checkpoints, tables, figures and results.json written, and the run's identity recorded."""
    config = build_config(tiny_config(**ONE_STEP, optim__epochs=1, run__num_overlays=1))
    result = train(config)
    out = Path(config.run.out_dir)
    assert [h["epoch"] for h in result.history] == [1] and result.best_epoch == 1
    assert set(result.final) == set(SPLITS) and all(set(m) == set(METRIC_NAMES) for m in result.final.values())
    assert all(len(result.per_expression[s].read_text().splitlines()) == 1 + 8 for s in SPLITS)
    assert [figure.name for figure in result.figures] == ["learning_curves.png", "overlays_val.png"]
    assert result.identity == run_identity(config, "cpu")  # the config without `run`, as this machine runs it
    assert result.cost["bf16"] == float(result.identity["runtime"]["precision"] == "bf16")
    last = torch.load(out / CHECKPOINT_DIR / LAST, weights_only=True)
    assert last["identity"] == result.identity and "fingerprint" not in last
    best = load_checkpoint(out / CHECKPOINT_DIR / BEST)
    assert best.config == config
    saved = json.loads((out / "results.json").read_text())
    assert saved["best_epoch"] == 1 and saved["identity"] == result.identity


def test_epoch_val_reads_a_subset_and_the_selected_weights_every_expression(tiny_config, monkeypatch):
    """`data.epoch_val_expressions` shortens the per-epoch val pass only; the final tables stay whole."""
    import cmmasksd.train as train_module

    calls = []
    real = train_module.evaluate_split

    def recording(model, split, **kwargs):
        result = real(model, split, **kwargs)
        calls.append((split.name, len(result.per_expression)))
        return result

    monkeypatch.setattr(train_module, "evaluate_split", recording)
    config = build_config(tiny_config(**ONE_STEP, optim__epochs=2, data__epoch_val_expressions=3))
    result = train(config)
    assert calls[:2] == [("val", 3), ("val", 3)]  # one pass per epoch, on the first 3 expressions
    assert sorted(calls[2:]) == sorted((s, 8) for s in SPLITS)  # then every split, max_eval_expressions each
    assert len(result.per_expression["val"].read_text().splitlines()) == 1 + 8


@pytest.mark.parametrize("schedule, factors", [("step", [1.0, 1.0, 0.1]),  # debug: milestone 2, gamma 0.1
                                                  ("cosine", [1.0, 0.75, 0.25])])  # (1 + cos(pi e / 3)) / 2
def test_learning_rate_per_epoch_follows_the_schedule(tiny_config, schedule, factors):
    config = build_config(tiny_config(**ONE_STEP, optim__schedule=schedule))
    history = train(config).history
    assert [h["lr"] for h in history] == pytest.approx([config.optim.lr * f for f in factors])


@pytest.mark.slow
def test_train_writes_results_tables_and_figures(tiny_config, prepared_root, tmp_path):
    config = build_config(tiny_config(tmp_path / "run"))
    seen = []
    result = train(config, on_epoch=lambda report: seen.append(report.epoch))

    assert seen == [1, 2, 3]
    assert set(result.final) == set(SPLITS)  # every split but train, selected on val
    for split in SPLITS:
        assert set(result.final[split]) == set(METRIC_NAMES)
        table = result.per_expression[split].read_text().splitlines()
        assert table[0] == "sentence_idx,sent_id,ref_id,object_idx,image_id,kind,inter,union,iou"
        assert len(table) == 1 + 16
        frame = pd.read_csv(result.per_expression[split])
        prepared = PreparedSplit(prepared_root / split)  # the statistics resample images: each row's own
        image_ids = prepared.images.image_id.to_numpy()[prepared.object_image[frame.object_idx]]
        assert frame.image_id.tolist() == image_ids.tolist()
        np.testing.assert_allclose(frame.iou, ious(frame.inter, frame.union))
        assert result.final[split] == pytest.approx(summarize(frame.inter, frame.union))  # the table is what was scored
    assert 1 <= result.best_epoch <= 3
    assert result.best_val_miou == max(h["val/miou"] for h in result.history)
    assert result.history[result.best_epoch - 1]["val/miou"] == result.best_val_miou
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert {"train/seg", "train/lmvsd", "train/vmlsd", "val/miou", "lr"} <= set(result.history[0])
    assert result.history[0]["train/lmvsd"] > 0 and result.history[0]["train/vmlsd"] > 0
    assert result.history[-1]["lr"] == pytest.approx(2e-4)  # x0.1 after the milestone at epoch 2
    assert result.cost["step_time_s"] > 0
    counts = parameter_report(config.model, config.masksd)  # the extra parameters are the mask tokens
    assert (result.cost["params_total"], result.cost["params_extra"]) == (counts["cmmasksd"], counts["extra"])
    assert counts["extra"] > 0
    assert [figure.name for figure in result.figures] == ["learning_curves.png", "overlays_val.png"]
    assert all(Image.open(figure).format == "PNG" for figure in result.figures)
    assert_learning_curves(result.figures[0], result.history)
    assert_overlays_show_the_picks(result.figures[1], PreparedSplit(prepared_root / "val"),
                                   pd.read_csv(result.per_expression["val"]), count=2)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"]["val"]["miou"] == pytest.approx(result.final["val"]["miou"])


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_resumed_run_ends_with_the_same_weights(tiny_config, tmp_path, accumulate):
    """Interrupt after epoch 1, restart with the same out_dir: same weights as an uninterrupted run,
    with and without gradient accumulation."""
    settings = {"masksd.strategy": "corr_sample", "optim.accumulate": accumulate}
    straight = build_config(tiny_config(tmp_path / "straight", **settings))
    train(straight)

    resumed_cfg = build_config(tiny_config(tmp_path / "resumed", **settings))
    with pytest.raises(Interrupt):
        train(resumed_cfg, on_epoch=stop_after(1))
    epochs_after_restart = []
    train(resumed_cfg, on_epoch=lambda report: epochs_after_restart.append(report.epoch))
    assert epochs_after_restart == [2, 3]

    def weights(run: str) -> dict:
        path = tmp_path / run / CHECKPOINT_DIR / "last.pt"
        return torch.load(path, weights_only=True)["model"]

    a, b = weights("straight"), weights("resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_refuses_a_different_config_and_names_what_differs(tiny_config, tmp_path):
    one_epoch = {**ONE_STEP, "optim.epochs": 1, "optim.milestones": [], "run.num_overlays": 0}
    train(build_config(tiny_config(tmp_path / "run", **one_epoch)))
    changed = build_config(tiny_config(tmp_path / "run", **one_epoch, masksd__mask_ratio_v=0.25))
    with pytest.raises(ValueError, match=r"last\.pt: holds another run \(it differs in masksd\.mask_ratio_v: "
                                         r"0\.5 -> 0\.25\)"):
        train(changed)
    fewer_threads = build_config(tiny_config(tmp_path / "run", **one_epoch, threads=1))  # 1 and 2 threads differ
    with pytest.raises(ValueError, match=r"differs in runtime\.threads: 2 -> 1\)"):
        train(fewer_threads)


def test_resume_continues_a_run_that_differs_only_in_where_it_executes(tiny_config, tmp_path):
    """`run` (output folder, loader workers, overlays) is not part of the identity: a checkpoint
    resumes a run that changed it, even when the folder moved."""
    two_epochs = {**ONE_STEP, "optim.epochs": 2, "optim.milestones": [], "run.num_overlays": 0}
    with pytest.raises(Interrupt):
        train(build_config(tiny_config(tmp_path / "run", **two_epochs)), on_epoch=stop_after(1))
    (tmp_path / "run").rename(tmp_path / "moved")
    epochs = []
    result = train(build_config(tiny_config(tmp_path / "moved", **two_epochs, run__num_overlays=1)),
                   on_epoch=lambda report: epochs.append(report.epoch))
    assert epochs == [2] and [f.name for f in result.figures] == ["learning_curves.png", "overlays_val.png"]


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {prepared_dir: x}\nmasksd: {mask_ratio_v: 1.5}\n")
    with pytest.raises(ValueError, match="mask_ratio_v"):
        load_config(path)
    path.write_text("data: {prepared_dir: x}\noptim: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(path)
    ok = _write(tmp_path / "ok.yaml", "data: {prepared_dir: x}\nmodel: cris-tiny-rn\n")
    cfg = load_config(ok, {"masksd.lambda_v": 0.5, "model.head_kernel": 3})
    assert cfg.masksd.lambda_v == 0.5 and cfg.model.head_kernel == 3 and cfg.model.clip == "tiny-rn"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
def test_cli_train_evaluate_predict(tiny_config, prepared_root, refshapes_root, tmp_path):
    """The documented commands: train, then evaluate and predict from the saved checkpoint."""
    config = _write(tmp_path / "cfg.yaml", json.dumps(tiny_config(tmp_path / "run", optim__epochs=1,
                                                                  optim__milestones=[])))
    cli = [sys.executable, "-m", "cmmasksd.cli"]
    subprocess.run([*cli, "train", "--config", str(config)], check=True, capture_output=True, text=True)
    checkpoint = tmp_path / "run" / CHECKPOINT_DIR / "best.pt"
    assert checkpoint.exists()

    out = subprocess.run([*cli, "evaluate", "--checkpoint", str(checkpoint), "--splits", "val", "testA",
                          "--out", str(tmp_path / "eval")], check=True, capture_output=True, text=True)
    metrics = json.loads(out.stdout)
    assert set(metrics) == {"val", "testA"} and set(metrics["val"]) == set(METRIC_NAMES)
    table = pd.read_csv(tmp_path / "eval" / "per_expression_testA.csv")
    assert sorted(table.sentence_idx) == list(range(PreparedSplit(prepared_root / "testA").n_sentences))
    assert metrics["testA"] == pytest.approx(summarize(table.inter, table.union))

    image = next((refshapes_root / "train2014").glob("*.jpg"))
    # After one epoch the model may select nothing at 0.35: a copy of the checkpoint whose threshold
    # selects the most probable 30% of the pixels gives the overlay something to show.
    probs = predict_mask(load_checkpoint(checkpoint), load_rgb(image), "the red circle")
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["eval_threshold"] = float(np.quantile(probs, 0.7))
    torch.save(state, tmp_path / "lower.pt")
    selected = probs > state["config"]["eval_threshold"]
    overlay = tmp_path / "overlay.png"
    out = subprocess.run([*cli, "predict", "--checkpoint", str(tmp_path / "lower.pt"), "--image", str(image),
                          "--text", "the red circle", "--out", str(overlay)], check=True, capture_output=True, text=True)
    said = re.fullmatch(rf"{re.escape(str(overlay))}: (\d+) of {probs.size} pixels selected", out.stdout.strip())
    assert said, out.stdout
    n_selected = int(said[1])
    assert 0.25 < selected.mean() < 0.35 and abs(n_selected - selected.sum()) <= 0.01 * probs.size
    figure = read_rgb(overlay)
    (box,) = pictures_in(figure)  # the input image, at its own resolution, tinted where selected
    shown, pixels = pixels_of(figure, box, probs.shape), np.asarray(load_rgb(image)).astype(int)
    red = near(shown, tinted(pixels))
    assert (red | near(shown, pixels)).mean() > 0.99 and (red == selected).mean() > 0.99
    assert abs(int(red.sum()) - n_selected) <= 0.01 * probs.size

    bad = subprocess.run([*cli, "predict", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "missing.jpg"),
                          "--text", "x", "--out", str(overlay)], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.jpg" in bad.stderr


@pytest.mark.parametrize("dataset, splits", [("refcoco", ["val", "testA", "testB"]),
                                             ("refcoco+", ["val", "testA", "testB"]),
                                             ("refcocog", ["val", "test"])])
@pytest.mark.parametrize("backbone, clip", [("rn101", "RN101-quickgelu"), ("vit-b-16", "ViT-B-16-quickgelu")])
def test_paper_profiles_hold_the_cris_recipe(dataset, splits, backbone, clip):
    cfg = load_config(f"paper-{dataset}-{backbone}")
    assert cfg.model.clip == clip and cfg.model.pretrained == "openai"
    assert cfg.data.eval_splits == splits and cfg.data.val_split == "val"
    assert cfg.data.prepared_dir == Path("data/prepared") / dataset
    opt = cfg.optim
    assert (opt.optimizer, opt.lr, opt.backbone_lr, opt.epochs, opt.milestones, opt.batch_size) == \
        ("adam", 1e-4, 1e-5, 50, [35], 64)


def test_profile_overrides_merge_section_by_section():
    base = read_profile("sweep-refshapes")
    merged = deep_merge(base, {"optim": {"epochs": 2}, "model": {"head_kernel": 5}, "data": {"prepared_dir": "x"}})
    cfg = build_config(merged)
    assert cfg.optim.epochs == 2 and cfg.optim.lr == base["optim"]["lr"]  # the rest of the section stays
    assert cfg.model.clip == "tiny-rn" and cfg.model.head_kernel == 5
    assert base["optim"]["epochs"] != 2  # the profile itself is untouched
    with pytest.raises(FileNotFoundError, match="paper-refcoco-rn101"):
        read_profile("no-such-profile")


@pytest.mark.slow
def test_bf16_autocast_only_where_the_cpu_has_it_and_runs_stay_deterministic(tiny_config, tmp_path, monkeypatch):
    short = {"optim.epochs": 1, "optim.milestones": [], "run.num_overlays": 0, "masksd.branches": "none"}
    plain = train(build_config(tiny_config(tmp_path / "fp32", **short)))
    assert plain.cost["bf16"] == float(torch.cpu._is_avx512_bf16_supported())
    # as on a CPU with avx512_bf16 (the decision lives in `cmmasksd.identity.native_bf16`)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    runs = [train(build_config(tiny_config(tmp_path / f"bf16-{i}", **short))) for i in range(2)]
    assert [r.cost["bf16"] for r in runs] == [1.0, 1.0]
    assert [r.identity["runtime"]["precision"] for r in runs] == ["bf16", "bf16"]
    assert runs[0].history[0]["train/loss"] == runs[1].history[0]["train/loss"]
    assert runs[0].final == runs[1].final
    off = train(build_config(tiny_config(tmp_path / "off", **short, optim__amp=False)))
    assert off.cost["bf16"] == 0.0 and off.identity["runtime"]["precision"] == "fp32"


@pytest.mark.slow
def test_bf16_run_interrupted_and_resumed_ends_with_the_same_weights(tiny_config, tmp_path, monkeypatch):
    """The AMP path on the CPU (bf16 autocast + channels_last, as on a CPU with avx512_bf16) resumes exactly."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    two = {"optim.epochs": 2, "optim.milestones": [], "run.num_overlays": 0}
    straight = train(build_config(tiny_config(tmp_path / "straight", **two)))
    config = build_config(tiny_config(tmp_path / "resumed", **two))
    with pytest.raises(Interrupt):
        train(config, on_epoch=stop_after(1))
    resumed = train(config)
    assert straight.cost["bf16"] == resumed.cost["bf16"] == 1.0
    a = torch.load(tmp_path / "straight" / CHECKPOINT_DIR / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / CHECKPOINT_DIR / "last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_compile_wraps_the_training_step_and_is_part_of_the_run(tiny_config, tmp_path, monkeypatch):
    """`compile: true` hands the step to torch.compile (stubbed here: compiling takes minutes on the
    CPU); a compiled run draws other dropout numbers, so it does not resume an eager one."""
    from cmmasksd.distributed import TrainingStep

    compiled = []

    def record(module, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", record)
    one_epoch = {**ONE_STEP, "optim.epochs": 1, "optim.milestones": [], "run.num_overlays": 0}
    train(build_config(tiny_config(tmp_path / "run", **one_epoch, compile=True)))
    assert len(compiled) == 1 and isinstance(compiled[0], TrainingStep)
    with pytest.raises(ValueError, match=r"differs in compile: True -> False\)"):
        train(build_config(tiny_config(tmp_path / "run", **one_epoch)))
