"""What masked cells should show: student-teacher agreement with the referent left visible, per fill.

A masked pass should lose information, not gain a shape. With every LMVSD cell that touches the
referred object left visible, masking `--cells` of the others should barely change the prediction;
a fill that reads as an object (RefShapes' mean-colour squares on a plain background) changes it.
For a CRIS trained on RefShapes (`--checkpoint`, a `best.pt`; or trained here for `--epochs` from the
default base), this measures on val, per `masksd.fill`, the IoU between the clean (teacher) and the
masked (student) binary predictions and the soft-BCE distillation loss between them.

    python benchmarks/bench_fill.py --json benchmarks/fill.json
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

import torch

REPO = Path(__file__).resolve().parent.parent
FILLS = ("zero", "black", "noise", "median")


def trained_checkpoint(epochs: int, tmp: Path) -> Path:
    """A CRIS fine-tuned from the pretrained tiny CLIP with the default base's recipe."""
    out = tmp / "cris"
    settings = {"data.prepared_dir": str(REPO / "data/prepared/refshapes"), "masksd.branches": "none",
                "model.pretrained": str(REPO / "data/pretrained/tiny-rn-refshapes.pt"), "run.out_dir": str(out),
                "run.num_overlays": 0, "threads": 1, "optim.epochs": epochs, "optim.milestones": [max(1, epochs - 1)]}
    command = [sys.executable, "-m", "cmmasksd.cli", "train", "--config", "sweep-refshapes"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out / "checkpoints" / "best.pt"


@torch.no_grad()
def agreement(checkpoint: Path, cells: int, cell: int, limit: int) -> dict:
    from cmmasksd.data import PreparedSplit, RefSegDataset
    from cmmasksd.losses import distill_loss
    from cmmasksd.predict import load_checkpoint

    model = load_checkpoint(checkpoint).model.eval()
    split = PreparedSplit(REPO / "data/prepared/refshapes/val")
    loader = torch.utils.data.DataLoader(RefSegDataset(split, train=False, max_items=limit), batch_size=32)
    generator = torch.Generator().manual_seed(0)
    sums = {fill: {"iou": 0.0, "distill": 0.0} for fill in FILLS}
    n = 0
    for batch in loader:
        images, tokens, gt = batch["image"], batch["tokens"], batch["mask"]
        size = images.shape[-1]
        grid = size // cell
        on_object = torch.nn.functional.max_pool2d(gt, cell)[:, 0] > 0  # B x g x g: cells touching the referent
        keys = torch.rand(on_object.shape, generator=generator).masked_fill(on_object, -1.0).flatten(1)
        picked = keys.argsort(dim=1, descending=True)[:, :cells]
        masked = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, picked, True).view(-1, grid, grid) & ~on_object
        seg = model.seg
        txt = seg.encode_text(tokens)
        teacher = seg.decode(seg.encode_image(images), txt)
        for fill in FILLS:
            student = seg.decode(seg.encode_image(images, masked, fill=fill), txt)
            a, b = teacher.sigmoid() > 0.35, student.sigmoid() > 0.35
            inter, union = (a & b).flatten(1).sum(1).float(), (a | b).flatten(1).sum(1).float()
            sums[fill]["iou"] += float(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).sum())
            sums[fill]["distill"] += float(distill_loss(student, teacher, "soft_bce")) * len(tokens)
        n += len(tokens)
    return {fill: {k: round(v / n, 4) for k, v in values.items()} for fill, values in sums.items()} | {"n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a RefShapes best.pt; default: train one here")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cells", type=int, default=32, help="cells masked off the referent (of 64 at 12 px)")
    parser.add_argument("--cell", type=int, default=12)
    parser.add_argument("--limit", type=int, default=512, help="val expressions")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="cmmasksd-fill-") as tmp:
        checkpoint = args.checkpoint or trained_checkpoint(args.epochs, Path(tmp))
        result = agreement(checkpoint, args.cells, args.cell, args.limit)
    for fill in FILLS:
        print(f"{fill:>6}: student-teacher IoU {result[fill]['iou']:.3f}, distillation loss {result[fill]['distill']:.4f}")
    if args.json:
        summary = {"command": "benchmarks/bench_fill.py " + " ".join(sys.argv[1:]), "result": result,
                   "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
