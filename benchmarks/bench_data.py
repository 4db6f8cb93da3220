"""Preprocessing and loader throughput at COCO image size, on COCO-like data.

    .venv/bin/python benchmarks/bench_data.py                       # defaults below
    .venv/bin/python benchmarks/bench_data.py --images 250 1000 --workers 1 2 --loader-workers 0 1 2

For each dataset size (`--images`, COCO-like 640x480 JPEGs, ~2.5 referred objects each) it
preprocesses the split at `--size` px with each `--workers` count, in a fresh process, and
reports images/s (total and per worker), images per CPU second of the whole process tree (the
per-core rate, which other load on the machine hardly changes), and memory: the preparing process's RSS once the
annotations are read (imports and `Refer`, which grow with `instances.json`) and its peak RSS,
and, sampled with psutil, the largest worker's RSS (every 50 ms) and the whole process tree's
PSS (every second; shared copy-on-write pages counted once). Peak minus annotations staying the same at both
sizes shows that preparing holds no per-image memory. It then reads the largest prepared split through `RefSegDataset` and
a shuffling torch `DataLoader` with each `--loader-workers` count, over one epoch after the
first batch, and reports samples/s (total, per loading process, and per CPU second). Prints tables and writes
everything to `--json`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from tabulate import tabulate

REPO = Path(__file__).resolve().parent.parent
KIB = 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[250, 1000], help="dataset sizes (images)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="preprocessing worker counts")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader num_workers")
    parser.add_argument("--size", type=int, default=416, help="input size (px)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loader-samples", type=int, default=2000, help="most samples read per loader setting")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cmmasksd-bench"), help="scratch folder")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "bench_data.json")
    parser.add_argument("--prepare-one", nargs=4, metavar=("ROOT", "OUT", "WORKERS", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_one:
        root, out, workers, size = args.prepare_one
        print(json.dumps(prepare_one(Path(root), Path(out), int(workers), int(size))))
        return

    from cmmasksd.data.cocolike import generate_cocolike

    results = {"machine": machine(), "settings": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items() if k != "prepare_one"}}
    preprocess = []
    for n_images in args.images:
        root = args.work / f"cocolike-{n_images}"
        counts = generate_cocolike(root, {"train": n_images})["train"]
        for workers in args.workers:
            out = args.work / f"prepared-{n_images}-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            run = measured([sys.executable, __file__, "--prepare-one", str(root), str(out), str(workers),
                            str(args.size)])
            preprocess.append({"images": n_images, "objects": counts["refs"], "workers": workers, **run,
                               "images_per_s_per_worker": round(run["images_per_s"] / workers, 1)})
            print(f"preprocess {n_images} images, {workers} worker(s): {run['images_per_s']} images/s", flush=True)
    results["preprocess"] = preprocess

    largest = args.work / f"prepared-{max(args.images)}-w{args.workers[0]}" / "train"
    results["loader"] = [loader_throughput(largest, nw, args.batch_size, args.loader_samples)
                         for nw in args.loader_workers]

    print(tabulate([[r["images"], r["objects"], r["workers"], r["seconds"], r["images_per_s"],
                     r["images_per_s_per_worker"], f"{r['cpu_s_parent']} + {r['cpu_s_workers']}",
                     r["images_per_cpu_s"], r["rss_after_annotations_mb"], r["peak_rss_mb"],
                     r["peak_worker_rss_mb"], r["peak_total_pss_mb"], r["prepared_mb"]] for r in preprocess],
                   headers=["images", "objects", "workers", "seconds", "images/s", "images/s per worker",
                            "CPU s parent + workers", "images per CPU s", "RSS after annotations MB",
                            "peak RSS MB", "peak worker RSS MB", "peak total PSS MB", "prepared MB"],
                   tablefmt="github"))
    print()
    print(tabulate([[r["num_workers"], r["samples"], r["seconds"], r["samples_per_s"], r["samples_per_s_per_process"],
                     r["samples_per_cpu_s"]] for r in results["loader"]],
                   headers=["num_workers", "samples", "seconds", "samples/s", "samples/s per process",
                            "samples per CPU s"], tablefmt="github"))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {args.json}")


def prepare_one(root: Path, out: Path, workers: int, size: int) -> dict:
    """Prepare `root`'s train split in this (fresh) process and time it."""
    from cmmasksd.data import Refer, prepare_split

    refer = Refer(root, "unc")
    annotations_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports + the parsed annotations
    cpu_before, started = cpu_seconds(), time.perf_counter()
    report = prepare_split(refer, "train", out, size, 17, progress=False, workers=workers)
    seconds = time.perf_counter() - started
    cpu = [after - before for after, before in zip(cpu_seconds(), cpu_before)]
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(report.n_images / seconds, 1),
        "cpu_s_parent": round(cpu[0], 2),
        "cpu_s_workers": round(cpu[1], 2),
        "images_per_cpu_s": round(report.n_images / sum(cpu), 1),
        "rss_after_annotations_mb": round(annotations_rss / KIB),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB),
        "prepared_mb": round(sum(p.stat().st_size for p in report.split_dir.iterdir()) / 2**20),
    }


def measured(command: list[str]) -> dict:
    """Run `command` (which prints a JSON dict last) while sampling its process tree's memory."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
    tree = psutil.Process(child.pid)
    worker_rss = total_pss = 0
    next_pss = time.perf_counter()
    while child.poll() is None:
        try:
            workers = tree.children(recursive=True)
            worker_rss = max([worker_rss, *(w.memory_info().rss for w in workers)])
            if time.perf_counter() >= next_pss:  # reading smaps costs ~10 ms a process: once a second
                total_pss = max(total_pss, sum(p.memory_full_info().pss for p in [tree, *workers]))
                next_pss += 1.0
        except psutil.Error:  # a process ended while being read
            pass
        time.sleep(0.05)
    stdout = child.stdout.read()
    if child.wait():
        raise RuntimeError(f"{command} failed with exit code {child.returncode}")
    return {**json.loads(stdout.splitlines()[-1]), "peak_worker_rss_mb": round(worker_rss / 2**20),
            "peak_total_pss_mb": round(total_pss / 2**20)}


def loader_throughput(split_dir: Path, num_workers: int, batch_size: int, samples: int) -> dict:
    """Training samples/s from a prepared split: `RefSegDataset` through a shuffling DataLoader."""
    import torch
    from torch.utils.data import DataLoader

    from cmmasksd.data import PreparedSplit, RefSegDataset

    torch.set_num_threads(1)  # the loader's own cost, not intra-op parallelism
    dataset = RefSegDataset(PreparedSplit(split_dir), train=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    cpu_before = cpu_seconds()
    batches = iter(loader)
    first = len(next(batches)["object_idx"])  # worker start-up and the first batch are not throughput
    started, seen = time.perf_counter(), 0
    for batch in itertools.islice(batches, max(1, samples // batch_size)):
        seen += len(batch["object_idx"])
    seconds = time.perf_counter() - started
    del batch, batches  # joins the workers, so that their CPU time is counted
    cpu = sum(cpu_seconds()) - sum(cpu_before)
    per_s = seen / seconds
    print(f"loader num_workers={num_workers}: {per_s:.0f} samples/s", flush=True)
    return {"num_workers": num_workers, "samples": seen, "seconds": round(seconds, 2), "samples_per_s": round(per_s),
            "samples_per_s_per_process": round(per_s / max(1, num_workers)),
            # start-up and first batch included: a lower bound
            "samples_per_cpu_s": round((first + seen) / cpu)}


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its ended children (pool or loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__}


if __name__ == "__main__":
    main()
