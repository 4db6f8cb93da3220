"""The benchmarks run and their numbers hang together (their figures are measured in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each runs a benchmark script in a process of its own
PROJECT = Path(__file__).resolve().parent.parent


def test_bench_step_measures_every_variant_against_cris(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/bench_step.py", "--model", "cris-tiny-vit", "--size", "64",
                    "--batch", "4", "--steps", "1", "--warmup", "0", "--eval-images", "8",
                    "--variants", "cris", "lmvsd", "lmvsd-drop", "both", "naive", "--json", str(out)],
                   cwd=PROJECT, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    steps = {row["variant"]: row for row in result["steps"]}
    assert list(steps) == ["cris", "lmvsd", "lmvsd-drop", "both", "naive"]
    assert steps["cris"]["flop_ratio"] == 1.0 and steps["cris"]["time_ratio"] == 1.0
    gflop = {name: row["gflop_per_step"] for name, row in steps.items()}
    assert gflop["cris"] < gflop["lmvsd-drop"] < gflop["lmvsd"] < gflop["both"] < gflop["naive"]
    for row in steps.values():
        assert row["step_s"] > 0 and row["samples_per_s"] == 4 / row["step_s"]
    assert result["eval"]["expressions"] > 0 and result["eval"]["expressions_per_s"] > 0


def test_mask_hits_reports_hit_rates_against_chance_per_kind_of_expression(prepared_root, tmp_path):
    """On the tiny RN at random init (`--weights none`): the script builds open_clip's `tiny-rn`
    itself, so it must register the project's tiny CLIP configs first."""
    out = tmp_path / "hits.json"
    done = subprocess.run([sys.executable, "benchmarks/mask_hits.py", "--weights", "none", "--prepared",
                           str(prepared_root / "val"), "--clip", "tiny-rn", "--cell", "8", "--json", str(out)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1][:300]
    result = json.loads(out.read_text())
    assert result["weights"] is None and result["expressions"]["all"] > 0
    assert {"values/all", "attention/all"} <= set(result["hits"])
    assert all(0.0 <= hit["hit"] <= 1.0 and 0.0 < hit["chance"] < 1.0 for hit in result["hits"].values())


def test_bench_plan_compares_the_estimate_with_the_cpu_profiler(tmp_path):
    out = tmp_path / "plan.json"
    subprocess.run([sys.executable, "benchmarks/bench_plan.py", "--cases", "debug:64:4:fp32", "--json", str(out)],
                   cwd=PROJECT, check=True, capture_output=True, timeout=300)
    (case,) = json.loads(out.read_text())["cases"]
    assert case["case"] == "debug:64:4:fp32" and case["measured_mb"] > 0
    assert 0.8 <= case["ratio"] <= 1.2  # the plan's target
