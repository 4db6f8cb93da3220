"""Training end to end on the tiny config: results, checkpoint resume, evaluate and predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmmasksd.config import build_config, deep_merge, load_config, read_profile
from cmmasksd.metrics import METRIC_NAMES
from cmmasksd.train import CHECKPOINT_DIR, train

SPLITS = ("testA", "testB", "val")


def tiny_config(prepared_root: Path, out_dir: Path, **masksd) -> dict:
    return {
        "data": {"prepared_dir": str(prepared_root), "max_train_objects": 32, "max_eval_expressions": 16},
        "model": "cris-tiny-rn",
        "masksd": {"branches": "both", **masksd},
        "optim": {"optimizer": "adamw", "lr": 2e-3, "backbone_lr": 2e-3, "epochs": 3, "milestones": [2],
                  "batch_size": 8},
        "threads": 2,
        "out_dir": str(out_dir),
        "num_overlays": 2,
    }


class Interrupt(Exception):
    pass


def test_train_writes_results_tables_and_figures(prepared_root, tmp_path):
    config = build_config(tiny_config(prepared_root, tmp_path / "run"))
    seen = []
    result = train(config, on_epoch=lambda report: seen.append(report.epoch))

    assert seen == [1, 2, 3]
    assert set(result.final) == set(SPLITS)  # every split but train, selected on val
    for split in SPLITS:
        assert set(result.final[split]) == set(METRIC_NAMES)
        table = result.per_expression[split].read_text().splitlines()
        assert table[0] == "sentence_idx,sent_id,ref_id,object_idx,inter,union,iou"
        assert len(table) == 1 + 16
    assert 1 <= result.best_epoch <= 3
    assert result.best_val_miou == max(h["val/miou"] for h in result.history)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert {"train/seg", "train/lmvsd", "train/vmlsd", "val/miou", "lr"} <= set(result.history[0])
    assert result.history[0]["train/lmvsd"] > 0 and result.history[0]["train/vmlsd"] > 0
    assert result.history[-1]["lr"] == pytest.approx(2e-4)  # x0.1 after the milestone at epoch 2
    assert result.cost["params_extra"] > 0 and result.cost["step_time_s"] > 0
    for figure in result.figures:
        assert figure.stat().st_size > 1000 and Image.open(figure).format == "PNG"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["final"]["val"]["miou"] == pytest.approx(result.final["val"]["miou"])


def test_resumed_run_ends_with_the_same_weights(prepared_root, tmp_path):
    """Interrupt after epoch 1, restart with the same out_dir: same weights as an uninterrupted run."""
    straight = build_config(tiny_config(prepared_root, tmp_path / "straight", strategy="corr_sample"))
    train(straight)

    resumed_cfg = build_config(tiny_config(prepared_root, tmp_path / "resumed", strategy="corr_sample"))

    def stop_after_first(report):
        if report.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(resumed_cfg, on_epoch=stop_after_first)
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


def test_resume_refuses_a_different_config(prepared_root, tmp_path):
    train(build_config(tiny_config(prepared_root, tmp_path / "run") | {"optim": {"epochs": 1, "milestones": [],
                                                                                 "batch_size": 8}}))
    changed = build_config(tiny_config(prepared_root, tmp_path / "run", mask_ratio_v=0.25))
    with pytest.raises(ValueError, match="different config"):
        train(changed)


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


def test_cli_train_evaluate_predict(prepared_root, refshapes_root, tmp_path):
    """The documented commands: train, then evaluate and predict from the saved checkpoint."""
    config = _write(tmp_path / "cfg.yaml", json.dumps(tiny_config(prepared_root, tmp_path / "run") |
                                                      {"optim": {"epochs": 1, "milestones": [], "batch_size": 8}}))
    cli = [sys.executable, "-m", "cmmasksd.cli"]
    subprocess.run([*cli, "train", "--config", str(config)], check=True, capture_output=True, text=True)
    checkpoint = tmp_path / "run" / CHECKPOINT_DIR / "best.pt"
    assert checkpoint.exists()

    out = subprocess.run([*cli, "evaluate", "--checkpoint", str(checkpoint), "--splits", "val", "testA",
                          "--out", str(tmp_path / "eval")], check=True, capture_output=True, text=True)
    metrics = json.loads(out.stdout)
    assert set(metrics) == {"val", "testA"} and set(metrics["val"]) == set(METRIC_NAMES)
    assert (tmp_path / "eval" / "per_expression_testA.csv").exists()

    image = next((refshapes_root / "train2014").glob("*.jpg"))
    overlay = tmp_path / "overlay.png"
    out = subprocess.run([*cli, "predict", "--checkpoint", str(checkpoint), "--image", str(image),
                          "--text", "the red circle", "--out", str(overlay)], check=True, capture_output=True, text=True)
    assert "pixels selected" in out.stdout
    picture = np.asarray(Image.open(overlay))
    assert picture.ndim == 3 and picture.shape[0] > 100  # a real figure, not an empty file

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
