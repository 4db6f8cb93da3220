"""The step benchmark runs and its numbers hang together (its figures are measured in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
