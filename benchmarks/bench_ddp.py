"""Data-parallel scaling: the same tiny run with 1 and with N processes under torchrun.

    .venv/bin/python benchmarks/bench_ddp.py --procs 1 2 --json benchmarks/bench_ddp.json

Each run trains `cris-tiny-rn` with both branches on a generated RefShapes (96 px) for
`--epochs` epochs at global batch `--batch`, one thread per process (gloo on the CPU, nccl on
GPUs with `--device cuda`). From each run's `results.json`: the mean step time (rank 0's), the
global samples/s (global batch / step time) and samples/s per process, and the ratio to one
process. On a 2-core CPU little speed-up is expected; the point there is that it runs and scales
no worse than the cores allow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=120, help="training images generated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()

    from cmmasksd.data import Refer, RefShapesConfig, generate_refshapes, prepare_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="cmmasksd-ddp-") as tmp:
        tmp = Path(tmp)
        generate_refshapes(tmp / "raw", RefShapesConfig(image_size=96, seed=0, images={
            "train": args.images, "val": 20, "testA": 10, "testB": 10}))
        prepare_dataset(Refer(tmp / "raw", "unc"), tmp / "prepared", 96, 17, progress=False)
        for procs in args.procs:
            config = {"data": {"prepared_dir": str(tmp / "prepared")}, "model": "cris-tiny-rn",
                      "masksd": {"branches": "both", "mask_cell": 12},
                      "optim": {"optimizer": "adamw", "lr": 2e-3, "backbone_lr": 2e-4, "epochs": args.epochs,
                                "milestones": [], "batch_size": args.batch},
                      "threads": 1, "device": args.device, "run": {"out_dir": str(tmp / f"run{procs}"), "num_overlays": 0}}
            (tmp / f"run{procs}.yaml").write_text(yaml.safe_dump(config))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                            "-m", "cmmasksd.cli", "train", "--config", str(tmp / f"run{procs}.yaml")], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
            result = json.loads((tmp / f"run{procs}" / "results.json").read_text())
            step = result["cost"]["step_time_s"]
            rows.append({"procs": procs, "step_time_s": round(step, 4), "samples_per_s": round(args.batch / step, 1),
                         "samples_per_s_per_proc": round(args.batch / step / procs, 1),
                         "val_miou": round(result["final"]["val"]["miou"], 4)})
            print(rows[-1], flush=True)
    for row in rows:
        row["speedup"] = round(row["samples_per_s"] / rows[0]["samples_per_s"], 3)
    summary = {"command": "benchmarks/bench_ddp.py " + " ".join(sys.argv[1:]),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
               "device": args.device, "epochs": args.epochs, "global_batch": args.batch, "rows": rows}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
