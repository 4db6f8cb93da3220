"""Where the masks fall, per scorer: LMVSD coverage and VMLSD word hits against chance, epoch by epoch.

Trains the default sweep's base (`sweep-refshapes`: the pretrained tiny CLIP on RefShapes) once per
scorer setting and reads each run's per-epoch `mask/*` metrics (`cmmasksd.model.mask_stats`) and
val mIoU from its `results.json`, overall and per expression kind (and, for the live scorer, the
frozen scorer's masks drawn beside it: `mask/frozen/...`). Coverage is the share of the referred object's area the LMVSD
cells hide; its chance is the masked share of the whole image (about the ratio), so coverage /
chance > 1 means the masks prefer the object. Word hit / chance is the same for VMLSD's words.

    python benchmarks/bench_scorers.py --json benchmarks/scorers.json            # the default length
    python benchmarks/bench_scorers.py --epochs 1 --max-train-objects 256        # a quick look

Needs `data/prepared/refshapes` and the pretrained tiny CLIP (`dvc repro pretrain`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {  # name -> masksd overrides
    "live": {"masksd.scorer": "live"},
    "frozen": {"masksd.scorer": "frozen"},
    "frozen+centre": {"masksd.scorer": "frozen", "masksd.centre": True},
    "prediction (lmvsd)": {"masksd.scorer": "prediction", "masksd.branches": "lmvsd"},
}


def run_arm(name: str, overrides: dict, args, tmp: Path) -> dict:
    """One `cmmasksd train` of the default base with `overrides`; its per-epoch mask metrics."""
    out = tmp / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
    settings = {"data.prepared_dir": str(REPO / "data/prepared/refshapes"),
                "model.pretrained": str(REPO / "data/pretrained/tiny-rn-refshapes.pt"),
                "run.out_dir": str(out), "run.num_overlays": 0, "threads": 1, "optim.epochs": args.epochs,
                "optim.milestones": [max(1, args.epochs - 1)], **overrides}
    if args.max_train_objects:
        settings["data.max_train_objects"] = args.max_train_objects
    command = [sys.executable, "-m", "cmmasksd.cli", "train", "--config", "sweep-refshapes"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    history = json.loads((out / "results.json").read_text())["history"]
    return {"arm": name, "overrides": overrides,
            "epochs": [{"epoch": h["epoch"], "miou": h["val/miou"], "step_time_s": h["step_time_s"],
                        **{k.removeprefix("mask/"): v for k, v in h.items() if k.startswith("mask/")}}
                       for h in history]}


def ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def coverage(epoch: dict, prefix: str = "") -> float | None:
    """LMVSD coverage over its chance; `prefix`: "<kind>/", "frozen/", "frozen/<kind>/"."""
    return ratio(epoch.get(f"{prefix}lmvsd_coverage"), epoch.get(f"{prefix}lmvsd_coverage_chance"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="the default profile's length")
    parser.add_argument("--max-train-objects", type=int, help="default: every training object")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmmasksd-scorers-") as tmp, ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda name: run_arm(name, ARMS[name], args, Path(tmp)), args.arms))
    kinds = ("attribute", "positional", "relational")
    print(f"{'arm':<20} {'epoch':>5} {'coverage/chance':>16} {'(' + ' / '.join(kinds) + ')':>36} "
          f"{'frozen beside':>13} {'words/chance':>13} {'val mIoU':>9}")
    for result in results:
        for e in result["epochs"]:
            per_kind = " / ".join(str(coverage(e, f"{kind}/")) for kind in kinds)
            print(f"{result['arm']:<20} {e['epoch']:>5} {coverage(e)!s:>16} {per_kind:>36} "
                  f"{coverage(e, 'frozen/')!s:>13} {ratio(e.get('vmlsd_hit'), e.get('vmlsd_chance'))!s:>13} "
                  f"{100 * e['miou']:>9.2f}")
    summary = {"command": "benchmarks/bench_scorers.py " + " ".join(sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
