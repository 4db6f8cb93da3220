"""A run's identity: everything its weights depend on, and nothing else; what the machine decides
(device, precision, threads) is part of it, and a sweep's identity follows its trials'."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from helpers import Interrupt, debug_config, stop_after

import cmmasksd.identity as identity_module
from cmmasksd.config import build_config, read_profile
from cmmasksd.identity import differences, digest, prepared_digest, run_identity
from pipeline.identity import sweep_identity
from pipeline.params_schema import ResourcesParams, SweepParams
from pipeline.storage import RayStorage
from pipeline.sweep import expand_grid, trial_identities, warn_other_precision


def config(prepared: Path, out_dir: Path = Path("runs/debug"), **overrides):
    return build_config(debug_config(prepared, out_dir, **overrides))


@pytest.fixture
def native(monkeypatch):
    """Decide whether this machine 'has' native bf16, whatever the CPU under the test is."""
    def force(value: bool) -> None:
        monkeypatch.setattr(identity_module, "native_bf16", lambda device_type: value)
    return force


def test_where_a_run_executes_is_not_its_identity(prepared_root, tmp_path):
    base = run_identity(config(prepared_root), "cpu")
    moved = run_identity(config(prepared_root, tmp_path, run__num_workers=2, run__num_overlays=0), "cpu")
    assert moved == base


def test_threads_seed_and_settings_are_its_identity(prepared_root):
    base = run_identity(config(prepared_root), "cpu")
    assert differences(base, run_identity(config(prepared_root, threads=1), "cpu")) == ["runtime.threads: 2 -> 1"]
    assert run_identity(config(prepared_root, seed=1), "cpu") != base
    assert run_identity(config(prepared_root, **{"masksd.mask_ratio_v": 0.25}), "cpu") != base


def test_data_and_weights_count_by_content_not_by_path(prepared_root, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(prepared_root, copy)
    assert prepared_digest(copy) == prepared_digest(prepared_root)
    weights_a, weights_b = tmp_path / "a.pt", tmp_path / "b.pt"
    weights_a.write_bytes(b"weights")
    weights_b.write_bytes(b"weights")
    a = run_identity(config(prepared_root, **{"model.pretrained": str(weights_a)}), "cpu")
    b = run_identity(config(copy, **{"model.pretrained": str(weights_b)}), "cpu")
    assert a == b and a["model"]["pretrained"].startswith("sha256:")
    manifest = copy / "val" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["counts"]["sentences"] += 1
    manifest.write_text(json.dumps(data))
    assert prepared_digest(copy) != prepared_digest(prepared_root)


def test_the_precision_that_runs_is_recorded(prepared_root, native):
    native(True)
    assert run_identity(config(prepared_root), "cpu")["runtime"]["precision"] == "bf16"
    assert run_identity(config(prepared_root, **{"optim.amp": False}), "cpu")["runtime"]["precision"] == "fp32"
    native(False)
    assert run_identity(config(prepared_root), "cpu")["runtime"]["precision"] == "fp32"
    assert "threads" not in run_identity(config(prepared_root), "cuda")["runtime"]  # the GPU computes


def _sweep_name(prepared_root: Path, sweep: SweepParams) -> str:
    base = read_profile("debug")
    trials = expand_grid(sweep)
    identities = trial_identities(base, trials, prepared_root, 1, sweep.resources)
    return f"{sweep.name}-{digest(sweep_identity(identities, {'workers': 1}, 'code'))}"


def test_forcing_bf16_on_and_off_names_another_sweep(prepared_root, native):
    sweep = SweepParams(name="s", dataset="refshapes", seeds=[0, 1], variants=[{"masksd.strategy": "random"}])
    native(True)
    bf16 = _sweep_name(prepared_root, sweep)
    assert _sweep_name(prepared_root, sweep) == bf16  # stable
    native(False)
    fp32 = _sweep_name(prepared_root, sweep)
    assert fp32 != bf16
    gpu = sweep.model_copy(update={"resources": ResourcesParams(gpu=1)})
    assert _sweep_name(prepared_root, gpu) not in (bf16, fp32)  # CUDA trials: another device, bf16


def test_a_sweep_that_ran_in_the_other_precision_is_named(prepared_root, native, tmp_path, caplog):
    sweep = SweepParams(name="s", dataset="refshapes", seeds=[0])
    storage = RayStorage.from_param(str(tmp_path), tmp_path)
    native(False)
    fp32_name = _sweep_name(prepared_root, sweep)
    (tmp_path / fp32_name).mkdir()
    (tmp_path / fp32_name / "cmmasksd_sweep.json").write_text("{}")
    native(True)
    identities = trial_identities(read_profile("debug"), expand_grid(sweep), prepared_root, 1, sweep.resources)
    with caplog.at_level(logging.WARNING):
        warn_other_precision(sweep, identities, {"workers": 1}, "code", storage)
    assert "ran in fp32 before" in caplog.text and fp32_name in caplog.text and "optim.amp: false" in caplog.text
    caplog.clear()
    native(False)
    same = trial_identities(read_profile("debug"), expand_grid(sweep), prepared_root, 1, sweep.resources)
    warn_other_precision(sweep, same, {"workers": 1}, "code", storage)
    assert caplog.text == ""  # nothing to say: there is no bf16 sweep


@pytest.mark.slow
def test_a_checkpoint_from_another_precision_is_not_resumed(tiny_config, native):
    from cmmasksd.train import train

    run = build_config(tiny_config(optim__epochs=2, run__num_overlays=0))
    native(False)
    with pytest.raises(Interrupt):
        train(run, on_epoch=stop_after(1))
    native(True)
    with pytest.raises(ValueError, match=r"differs in runtime.precision: 'fp32' -> 'bf16'\)"):
        train(run)
