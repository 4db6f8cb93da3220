"""`cmmasksd plan`'s memory estimate against the CPU profiler's peak, and how long the plan takes.

For each case (a profile, an input size, a micro-batch, a precision, checkpointing on or off) the
estimate (`cmmasksd.plan.memory.trace_step`: fake tensors) and the measurement (`measured_peak`: the
same two optimizer steps run for real under `torch.profiler` with `profile_memory=True`) of the peak
tensor memory of one training step, and their ratio (target: within +-20 %).

    python benchmarks/bench_plan.py --json benchmarks/plan.json                      # tiny and RN101
    python benchmarks/bench_plan.py --cases debug:64:8:fp32 --threads 2

On a GPU, `torch.cuda.max_memory_allocated` is the measurement (`benchmarks/gpu.sh`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cmmasksd.config import apply_overrides, build_config, read_profile
from cmmasksd.plan.memory import build_model, measured_peak, trace_step

CASES = ["debug:96:16:fp32", "debug:96:16:fp32:ckpt", "debug:96:16:bf16", "paper-refcoco-rn101:416:2:fp32",
         "paper-refcoco-rn101:416:2:fp32:ckpt", "paper-refcoco-rn101:416:2:bf16"]


def run_case(case: str, threads: int) -> dict:
    profile, size, micro, precision, *rest = case.split(":")
    checkpointing = rest == ["ckpt"]
    raw = apply_overrides(read_profile(profile), {"data.prepared_dir": "data/prepared/none", "optim.batch_size": int(micro)})
    config = build_config(raw)
    start = time.perf_counter()
    estimate = trace_step(build_model(config), config, int(micro), int(size), 17, precision, checkpointing,
                          count_flops=False)
    estimate_s = time.perf_counter() - start
    start = time.perf_counter()
    measured = measured_peak(config, int(micro), int(size), 17, precision, checkpointing, threads=threads)
    return {"case": case, "estimate_mb": estimate.peak["total"] / 2**20, "measured_mb": measured["total"] / 2**20,
            "ratio": estimate.peak["total"] / measured["total"], "estimate_s": estimate_s,
            "measured_s": time.perf_counter() - start,
            "estimate_parts_mb": {k: v / 2**20 for k, v in estimate.peak.items()},
            "measured_parts_mb": {k: v / 2**20 for k, v in measured.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, help="profile:size:micro-batch:fp32|bf16[:ckpt]")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        rows.append(run_case(case, args.threads))
        r = rows[-1]
        print(f"{case:<40} estimate {r['estimate_mb']:9.1f} MB  measured {r['measured_mb']:9.1f} MB  "
              f"ratio {r['ratio']:.3f}  ({r['estimate_s']:.1f} s / {r['measured_s']:.1f} s)", flush=True)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
        args.json.write_text(json.dumps({"machine": machine, "cases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
