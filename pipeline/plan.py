"""`python -m pipeline.plan`: what the sweep in params.yaml costs on GPUs, and what more seeds would cost.

    python -m pipeline.plan --device H100                    # the sweep as params.yaml sets it
    python -m pipeline.plan --gpu-memory-gb 80 --target-delta 0.01 --json plan.json

Per variant of the sweep (and the CRIS baseline) the library's plan (`cmmasksd.plan`) at the input
size params.yaml prepares and the data-parallel workers `sweep.resources.workers` gives each trial:
memory per device, the micro-batch and accumulation that fit, GPU-hours per trial; then trials x
GPU-hours for the whole sweep. With a seed spread (`--seed-std`, else the last report's
`val_sd_delta` in reports/metrics.json) it says how many seeds a target delta needs at 80 % power
(`cmmasksd.stats.power_line`) and what they cost. The sweep's preflight (`preflight.check_fits`)
refuses, before Ray starts, a sweep whose trials cannot fit in `sweep.resources.gpu_memory_gb`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.common import REPO_ROOT, load_params, repo_path, run_main
from pipeline.params_schema import Params
from pipeline.sweep import base_config, expand_grid
from pipeline.trial import trial_config


def input_shape(params: Params) -> tuple[int, int]:
    """(size, word_len) params.yaml prepares the sweep's dataset at."""
    dataset = params.need("sweep").dataset
    settings = params.preprocess.get(dataset)
    if settings is None:
        raise KeyError(f"params.yaml: missing `preprocess.{dataset}`")
    return settings.size, settings.word_len


def variant_configs(params: Params) -> dict[str, Any]:
    """{variant name: its TrainConfig} for every variant of the sweep (seeds left out)."""
    from cmmasksd.config import build_config

    sweep = params.need("sweep")
    base = base_config(params.need("train"))
    prepared = repo_path(Path("data/prepared") / sweep.dataset)
    branches = build_config(trial_config(base, {}, prepared, Path("."), 1)).masksd.branches
    configs = {}
    for trial in expand_grid(sweep, branches):
        configs.setdefault(trial.name, build_config(trial_config(base, trial.settings, prepared, Path("."), 1)))
    return configs


def sweep_plan(params: Params, gpu_memory_gb: float | None, mfu: float, seed_std: float | None,
               target_delta: float) -> dict[str, Any]:
    """Per variant the library's plan; the sweep's trials x GPU-hours; the seeds `target_delta` needs."""
    from cmmasksd.plan import make_plan
    from cmmasksd.stats import power_line

    sweep = params.need("sweep")
    size, word_len = input_shape(params)
    memory = gpu_memory_gb or sweep.resources.gpu_memory_gb
    plans = {name: make_plan(config, name, sweep.resources.workers, memory, mfu, size, word_len, only_the_run=True)
             for name, config in variant_configs(params).items()}
    seeds = len(sweep.seeds)
    devices = next(iter(plans.values())).gpu_hours
    total = {device: round(sum(p.gpu_hours[device] for p in plans.values()) * seeds, 1) for device in devices}
    result = {"variants": {name: plan.to_json() for name, plan in plans.items()}, "seeds": seeds,
              "trials": seeds * len(plans), "gpu_hours": total}
    source = "--seed-std"
    if seed_std is None:
        metrics = REPO_ROOT / "reports" / "metrics.json"
        seed_std = json.loads(metrics.read_text()).get("val_sd_delta") if metrics.is_file() else None
        source = "reports/metrics.json val_sd_delta"
    if seed_std:
        needed = power_line(seed_std, seeds, target_delta)["seeds_needed"]
        per_seed = {device: sum(p.gpu_hours[device] for p in plans.values()) for device in devices}
        result["power"] = {"sd_delta": seed_std, "source": source, "target_delta": target_delta,
                           "seeds_needed": needed, "gpu_hours": {d: round(h * needed, 1) for d, h in per_seed.items()}}
    return result


def format_sweep_plan(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = []
    for name, plan in result["variants"].items():
        fit = plan["fit"] or {}
        mem = plan["memory"][plan["precision"]]["checkpointing" if plan["grad_checkpointing"] else "plain"]["total"]
        rows.append([name, f"{mem:.1f}", fit.get("micro_batch", "-"), plan["accumulate"],
                     *(plan["gpu_hours"][d] for d in ("A100-80GB", "H100"))])
    lines = [tabulate(rows, headers=["variant", "GiB/step", "fits: micro-batch", "accumulate", "A100 h/trial",
                                     "H100 h/trial"]),
             f"\n{result['trials']} trials ({result['seeds']} seeds): "
             + ", ".join(f"{d} {h:g} GPU-h" for d, h in result["gpu_hours"].items())]
    power = result.get("power")
    if power:
        lines.append(f"A {100 * power['target_delta']:g}-point delta at 80 % power needs {power['seeds_needed']} seeds "
                     f"(sd of the paired delta {100 * power['sd_delta']:.2f} points, {power['source']}): "
                     + ", ".join(f"{d} {h:g} GPU-h" for d, h in power["gpu_hours"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--gpu-memory-gb", type=float, help="default: sweep.resources.gpu_memory_gb")
    parser.add_argument("--device", help="a known GPU for its memory, e.g. H100")
    parser.add_argument("--mfu", type=float, default=0.3)
    parser.add_argument("--seed-std", type=float, help="sd of a paired per-seed val delta (fraction)")
    parser.add_argument("--target-delta", type=float, default=0.01, help="a val mIoU delta (fraction)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from cmmasksd.plan import DEVICES

    if args.device and args.device not in DEVICES:
        raise ValueError(f"--device {args.device}: not a known GPU; known: {', '.join(DEVICES)}")
    memory = args.gpu_memory_gb or (DEVICES[args.device].memory_gb if args.device else None)
    result = sweep_plan(load_params(args.params), memory, args.mfu, args.seed_std, args.target_delta)
    print(format_sweep_plan(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
