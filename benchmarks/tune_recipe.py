"""The default's recipe, chosen on val from one small grid run for CRIS and CM-MaskSD alike.

Every arm gets the same grid (the learning rate, the backbone's a tenth of it) on tuning seeds that
the table does not use, inside the default profile's budget (`sweep-refshapes`: its training set,
epochs, schedule and batch). Each run is a `cmmasksd train`; the script prints every cell's final
val mIoU (mean over the tuning seeds), its rise over the last quarter of the epochs, and each arm's
best learning rate, and writes them with the per-epoch curves to `--json`.

    python benchmarks/tune_recipe.py --json benchmarks/recipe_grid.json     # ~9 min on 2 cores

Needs `data/prepared/refshapes` and the pretrained tiny CLIP (`dvc repro pretrain`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARMS = {"cris": {"masksd.branches": "none"}, "cmmasksd": {"masksd.branches": "both"}}


def train_cell(arm: str, lr: float, seed: int, tmp: Path) -> dict:
    """One `cmmasksd train` of the default profile with this arm, learning rate and seed."""
    out = tmp / f"{arm}-{lr:g}-{seed}"
    settings = {"data.prepared_dir": str(REPO / "data/prepared/refshapes"),
                "model.pretrained": str(REPO / "data/pretrained/tiny-rn-refshapes.pt"),
                "run.out_dir": str(out), "run.num_overlays": 0, "threads": 1, "seed": seed,
                "optim.lr": lr, "optim.backbone_lr": lr / 10, **ARMS[arm]}
    command = [sys.executable, "-m", "cmmasksd.cli", "train", "--config", "sweep-refshapes"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads((out / "results.json").read_text())
    curve = [h["val/miou"] for h in result["history"]]
    return {"arm": arm, "lr": lr, "seed": seed, "val_miou": result["final"]["val"]["miou"], "curve": curve,
            "last_quarter_rise": curve[-1] - curve[-1 - max(1, len(curve) // 4)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100], help="not the table's seeds")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    cells = list(itertools.product(args.arms, args.lrs, args.seeds))
    with tempfile.TemporaryDirectory(prefix="cmmasksd-recipe-") as tmp, ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda cell: train_cell(*cell, Path(tmp)), cells))
    best = {}
    print(f"{'arm':<10} {'lr':>8} {'val mIoU':>9} {'last-quarter rise':>18}")
    for arm, lr in itertools.product(args.arms, args.lrs):
        mine = [r for r in runs if r["arm"] == arm and r["lr"] == lr]
        miou = sum(r["val_miou"] for r in mine) / len(mine)
        rise = sum(r["last_quarter_rise"] for r in mine) / len(mine)
        print(f"{arm:<10} {lr:>8g} {100 * miou:>9.2f} {100 * rise:>+18.2f}")
        if miou > best.get(arm, (None, -1.0))[1]:
            best[arm] = (lr, miou)
    for arm, (lr, miou) in best.items():
        print(f"best for {arm}: lr {lr:g} (backbone {lr / 10:g}), val mIoU {100 * miou:.2f}")
    if args.json:
        summary = {"command": "benchmarks/tune_recipe.py " + " ".join(sys.argv[1:]),
                   "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                   "best": {arm: {"lr": lr, "val_miou": miou} for arm, (lr, miou) in best.items()}, "runs": runs}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
