"""`cmmasksd plan` and the sweep's plan: memory counted from fake tensors (against the CPU profiler's
peak), the micro-batch and accumulation that fit, FLOPs and GPU-hours, and the sweep's preflight."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from cmmasksd.config import build_config
from cmmasksd.plan import DEVICES, HEADROOM, make_plan
from cmmasksd.plan.memory import LiveTensors, build_model, measured_peak, trace_step

GIB = 2**30


def test_live_tensors_count_each_storage_once_while_it_lives():
    tracker = LiveTensors()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:]  # the same storage: not counted again
        a.add_(1)  # in place: the same storage
        b = torch.empty(500)  # 2000
        serial_b = tracker.serials([b])
        del a, view
        c = torch.empty(250)  # 1000: after a died
    assert tracker.peak == 6000 and tracker.current == 3000
    assert set(tracker.at_peak.values()) == {4000, 2000} and serial_b <= set(tracker.at_peak)
    assert tracker.serials([c]).isdisjoint(tracker.at_peak)


@pytest.mark.slow
@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("fp32", True)])
def test_the_estimate_is_within_20_percent_of_the_cpu_profilers_peak(tiny_config, precision, checkpointing):
    config = build_config(tiny_config())
    estimate = trace_step(build_model(config), config, 8, 64, 17, precision, checkpointing, count_flops=False)
    measured = measured_peak(config, 8, 64, 17, precision, checkpointing, threads=2)
    assert estimate.peak["total"] == pytest.approx(measured["total"], rel=0.2)
    assert estimate.peak["weights"] + estimate.peak["optimizer"] == pytest.approx(
        measured["weights"] + measured["optimizer"], rel=0.2)


def test_plan_splits_memory_and_checkpointing_saves_activations(tiny_config):
    config = build_config(tiny_config(**{"optim.batch_size": 16}))
    plan = make_plan(config, "debug")
    for precision in ("fp32", "bf16"):
        plain, ckpt = plan.memory[precision]["plain"], plan.memory[precision]["checkpointing"]
        assert plain["total"] == pytest.approx(sum(plain[k] for k in ("weights", "gradients", "optimizer",
                                                                     "activations")), abs=0.002)
        assert ckpt["activations"] < plain["activations"] and ckpt["weights"] == plain["weights"]
    assert plan.memory["bf16"]["plain"]["activations"] < plan.memory["fp32"]["plain"]["activations"]
    assert plan.flops["per_step"] > 0 and plan.flops["train_samples_per_epoch"] == 32  # debug: 32 objects
    trial = plan.flops["per_trial"]
    assert plan.precision == "bf16"  # optim.amp: bf16 autocast on a GPU
    assert plan.gpu_hours["H100"] == pytest.approx(trial / (0.3 * 989e12) / 3600)


def test_fit_takes_the_largest_micro_batch_and_the_accumulation_that_keeps_the_batch(tiny_config):
    config = build_config(tiny_config(**{"optim.batch_size": 16, "optim.amp": False}))
    probe = make_plan(config, "debug", gpu_memory_gb=1000.0, only_the_run=True).fit
    assert probe["fits"] and probe["accumulate"] == 1 and probe["micro_batch"] == 16
    def need(micro: int) -> float:  # with accumulation: the gradients are kept between micro-batches
        return probe["fixed_gb"] + micro * probe["per_sample_gb"] + probe["kept_gradients_gb"]

    gpu = (need(4) + need(8)) / 2 / HEADROOM  # 4 samples fit, 8 do not
    fit = make_plan(config, "debug", gpu_memory_gb=gpu, only_the_run=True).fit
    assert fit["fits"] and fit["micro_batch"] * fit["accumulate"] == 16
    assert fit["micro_batch"] == 4 and fit["accumulate"] == 4  # 8 does not fit; 16 = 4 x 4
    assert fit["memory_gb"] <= HEADROOM * gpu
    assert not make_plan(config, "debug", gpu_memory_gb=probe["fixed_gb"] / 2, only_the_run=True).fit["fits"]


@pytest.mark.slow
def test_cli_plan_writes_json_and_a_table(tiny_config, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "-m", "cmmasksd.cli", "plan", "--config", str(config), "--device", "H100",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    plan = json.loads(out.read_text())
    assert {"memory", "accumulate", "gpu_hours", "fit", "flops"} <= set(plan)
    assert plan["fit"]["gpu_memory_gb"] == DEVICES["H100"].memory_gb and plan["fit"]["fits"]
    assert "Peak memory of one training step per device" in done.stdout and "GPU-hours per trial" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "cmmasksd.cli", "plan", "--config", str(config), "--device", "X1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --device X1: not a known GPU")


def test_the_sweep_refuses_trials_that_do_not_fit_before_ray_starts(tiny_config):
    from pipeline.params_schema import ResourcesParams
    from pipeline.preflight import check_fits

    configs = {"both": build_config(tiny_config(**{"optim.batch_size": 16}))}
    check_fits(configs, ResourcesParams(gpu=0, gpu_memory_gb=0.01), 64, 17)  # CPU trials: nothing to check
    check_fits(configs, ResourcesParams(gpu=1, gpu_memory_gb=80), 64, 17)
    with pytest.raises(ValueError, match=r"sweep.resources.gpu_memory_gb is 0.2 .* variant `both` needs .* GiB per "
                                         r"GPU in bf16 at micro-batch 16: set optim.accumulate: \d+ in train.overrides"):
        check_fits(configs, ResourcesParams(gpu=1, gpu_memory_gb=0.2), 64, 17)


@pytest.mark.slow
def test_sweep_plan_costs_every_variant_and_the_seeds_a_delta_needs(prepared_root, monkeypatch):
    import pipeline.plan as plan_module
    from pipeline.common import load_params
    from pipeline.plan import sweep_plan

    monkeypatch.setattr(plan_module, "repo_path", lambda path: prepared_root)  # the default's data, prepared
    params = load_params()
    result = sweep_plan(params, gpu_memory_gb=80, mfu=0.3, seed_std=0.02, target_delta=0.01)
    sweep = params.need("sweep")
    from pipeline.sweep import expand_grid

    names = {trial.name for trial in expand_grid(sweep)}  # every arm of params.yaml, CRIS included
    assert set(result["variants"]) == names and "cris" in names and result["seeds"] == len(sweep.seeds)
    assert result["trials"] == len(result["variants"]) * len(sweep.seeds)
    per_trial = sum(v["gpu_hours"]["H100"] for v in result["variants"].values())
    assert result["gpu_hours"]["H100"] == pytest.approx(per_trial * len(sweep.seeds), abs=0.05)
    power = result["power"]
    assert power["seeds_needed"] == 32  # ((1.96 + 0.84) x 2 / 1)^2 = 31.4
    assert power["gpu_hours"]["H100"] == pytest.approx(per_trial * 32, abs=0.05)
