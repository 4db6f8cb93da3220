"""Training-step cost of CRIS and the CM-MaskSD branches, measured in one run, as ratios to CRIS.

    .venv/bin/python benchmarks/bench_step.py                                  # tiny RN, CPU, 1 thread
    .venv/bin/python benchmarks/bench_step.py --model cris-tiny-vit --threads 1
    .venv/bin/python benchmarks/bench_step.py --model cris-vit-b-16 --size 416 --batch 32 --device cuda --amp

For each variant (`cris`, `lmvsd`, `vmlsd`, `both`: the default, masks scored by the no-grad
pretrained copy (`masksd.scorer: frozen`; `scorer_mb`: its weights), `both-live`: scored by the model
itself (no copy), `both-ckpt`: the default with activation checkpointing (`run.grad_checkpointing`),
`maskris`: one joint masked pass, and `naive`: both branches as three full passes, no clean features
reused, for reference only; on a ViT also `lmvsd-drop` and `both-drop`, `masksd.vit_masking: drop`) it
reports the FLOPs of one step (forward + backward, counted by
`torch.utils.flop_counter.FlopCounterMode`), the median step time over `--steps` after `--warmup`
(CUDA: timed with CUDA events, no synchronize inside the step), samples/s, peak memory (CUDA:
`max_memory_allocated`; CPU: the profiler's peak of tensor memory, `cmmasksd.plan.measured_peak`)
and, on CUDA, model FLOP/s and the fraction of the device's bf16 peak (MFU; `--peak-tflops` or a
table of known devices). Then evaluation throughput: expressions/s through `evaluate_split` on
a generated RefShapes split at `--size`, the original-resolution metric included. Random weights:
the cost does not depend on them. Prints a table; `--json` writes everything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from cmmasksd.config import MaskSDConfig
from cmmasksd.data import Refer, RefShapesConfig, generate_refshapes, prepare_split
from cmmasksd.data.split import PreparedSplit
from cmmasksd.evaluate import evaluate_split
from cmmasksd.losses import seg_loss
from cmmasksd.model import create_model, get_model_config
from cmmasksd.model.masksd import CMMaskSD
from cmmasksd.plan import DEVICES

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"cris": {"branches": "none"}, "lmvsd": {"branches": "lmvsd"}, "vmlsd": {"branches": "vmlsd"},
            "both": {"branches": "both"},  # the default: masks scored by the no-grad pretrained copy
            "both-live": {"branches": "both", "scorer": "live"},  # scored by the model itself: no copy
            "both-ckpt": {"branches": "both"},  # the default with activation checkpointing
            "naive": {"branches": "both", "scorer": "live"},
            "maskris": {"recipe": "maskris"}}  # one joint masked pass
DROP_VARIANTS = {"lmvsd-drop": {"branches": "lmvsd", "vit_masking": "drop"},
                 "both-drop": {"branches": "both", "vit_masking": "drop"}}


def naive_loss(model: CMMaskSD, images, tokens, gt):
    """Both branches without reuse: each masked pass encodes both modalities again (three full passes)."""
    seg, cfg = model.seg, model.cfg
    vis, txt = seg.encode_image(images), seg.encode_text(tokens)
    logits = seg.decode(vis, txt)
    loss = seg_loss(logits, gt)
    patch_mask, word_mask = model.patch_mask(vis, txt), model.word_mask(vis, txt, tokens)
    masked_image = seg.decode(seg.encode_image(images, patch_mask), seg.encode_text(tokens))
    masked_text = seg.decode(seg.encode_image(images), seg.encode_text(tokens, word_mask))
    return (loss + model._branch_loss(masked_image, logits, gt, cfg.lambda_v)
            + model._branch_loss(masked_text, logits, gt, cfg.lambda_t))


def batch(size: int, n: int, word_len: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    tokens = torch.zeros(n, word_len, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(300, 40000, (n, 5), generator=generator), 49407
    gt = torch.zeros(n, 1, size, size)
    gt[..., size // 4: size // 2, size // 3: 2 * size // 3] = 1
    return images.to(device), tokens.to(device), gt.to(device)


def measure(name: str, model: CMMaskSD, data, args, device: torch.device) -> dict:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def step():
        with autocast:
            loss = naive_loss(model, *data) if name == "naive" else model.training_loss(*data)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(args.warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1000 for start, end in events]
    else:
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    row = {"variant": name, "gflop_per_step": counter.get_total_flops() / 1e9, "step_s": seconds,
           "samples_per_s": args.batch / seconds,
           "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    if device.type == "cuda":
        row["tflops"] = row["gflop_per_step"] / seconds / 1e3
        name = torch.cuda.get_device_name()  # the plan's table of known GPUs (cmmasksd.plan.DEVICES)
        peak = args.peak_tflops or next((d.bf16_tflops for k, d in DEVICES.items() if k.split("-")[0] in name), None)
        row["mfu"] = row["tflops"] / peak if peak else None
    return row


def eval_throughput(model: CMMaskSD, args, device: torch.device, work: Path) -> dict:
    """Expressions/s of `evaluate_split` (batched forward, original-resolution IoUs) on generated data."""
    images = max(8, args.eval_images)
    generate_refshapes(work / "raw", RefShapesConfig(image_size=args.size, images={"val": images}, seed=0))
    prepare_split(Refer(work / "raw", "unc"), "val", work / "prepared", args.size, args.word_len, progress=False)
    split = PreparedSplit(work / "prepared" / "val")
    model.eval()
    evaluate_split(model, split, device=device, batch_size=args.batch, max_items=args.batch)  # warm up
    start = time.perf_counter()
    result = evaluate_split(model, split, device=device, batch_size=args.batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n = len(result.per_expression)
    return {"expressions": n, "seconds": seconds, "expressions_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cris-tiny-rn", help="a model config name (cmmasksd/model_configs)")
    parser.add_argument("--size", type=int, default=96, help="input size (px)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--word-len", type=int, default=17)
    parser.add_argument("--mask-cell", type=int, default=None, help="masksd.mask_cell (ResNet; default: its stride)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, for MFU")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the variants")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_cfg = get_model_config(args.model).model_copy(update={"pretrained": None})  # random: same cost, no network
    data = batch(args.size, args.batch, args.word_len, device)
    rows = []
    for name in args.variants or list(VARIANTS) + list(DROP_VARIANTS):
        settings = {**VARIANTS, **DROP_VARIANTS}[name]
        torch.manual_seed(0)
        try:
            model = create_model(model_cfg, MaskSDConfig(**settings, mask_cell=args.mask_cell)).to(device)
        except ValueError as err:  # e.g. dropping on a ResNet
            print(f"{name}: skipped ({err})")
            continue
        if device.type == "cuda" and not model_cfg.clip.startswith(("ViT", "tiny-vit")):
            model = model.to(memory_format=torch.channels_last)
        model.set_grad_checkpointing(name.endswith("-ckpt"))
        rows.append(measure(name, model, data, args, device))
        scorer = model.frozen.backbone.state_dict().values() if model.frozen is not None else []
        rows[-1]["scorer_mb"] = sum(t.numel() * t.element_size() for t in scorer) / 2**20  # the frozen copy's weights
    cris = next(r for r in rows if r["variant"] == "cris")
    for row in rows:
        row["flop_ratio"] = row["gflop_per_step"] / cris["gflop_per_step"]
        row["time_ratio"] = row["step_s"] / cris["step_s"]
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        evaluation = eval_throughput(create_model(model_cfg, MaskSDConfig(branches="none")).to(device), args, device,
                                     Path(work))
    print(tabulate(rows, headers="keys", floatfmt=".3f"))
    print(f"eval: {evaluation['expressions_per_s']:.1f} expressions/s ({evaluation['expressions']} expressions)")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
        args.json.write_text(json.dumps({"settings": settings, "machine": machine, "steps": rows,
                                         "eval": evaluation}, indent=2) + "\n")


if __name__ == "__main__":
    main()
