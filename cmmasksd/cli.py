"""`cmmasksd` command line: generate data, prepare it, train, evaluate, predict, plan a run, count parameters."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from cmmasksd.config import TrainConfig
from cmmasksd.errors import one_line


def _parse_overrides(pairs: list[str]) -> dict:
    """`key.sub=value` pairs; values are parsed as (safe) YAML so numbers and booleans keep their type."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            reason = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--set {key}: {value!r} is not a plain YAML value ({reason})") from err
    return overrides


def cmd_refshapes(args) -> None:
    from cmmasksd.data import RefShapesConfig, generate_refshapes

    cfg = RefShapesConfig(seed=args.seed, image_size=args.image_size)
    print(json.dumps(generate_refshapes(Path(args.out), cfg), indent=2, default=str))


def cmd_prepare(args) -> None:
    from cmmasksd.data import Refer, format_reports, prepare_dataset

    refer = Refer(Path(args.root), args.split_by, image_dir=Path(args.image_dir) if args.image_dir else None)
    reports = prepare_dataset(refer, Path(args.out), size=args.size, word_len=args.word_len, splits=args.splits,
                              workers=args.workers)
    print(format_reports(reports))


def cmd_train(args) -> None:
    """One run; under `torchrun --nproc-per-node N` each process joins the group and trains its share."""
    import torch.distributed as dist

    from cmmasksd.config import load_config
    from cmmasksd.distributed import Dist, init_from_env
    from cmmasksd.train import train

    config = load_config(args.config, _parse_overrides(args.set))
    joined = init_from_env()
    try:
        result = train(config)
    finally:
        if joined:
            dist.destroy_process_group()
    if Dist(int(os.environ.get("RANK", 0))).main:
        print(json.dumps({"out_dir": str(result.out_dir), "best_epoch": result.best_epoch, "final": result.final,
                          "cost": result.cost}, indent=2))


def cmd_evaluate(args) -> None:
    from cmmasksd.data import PreparedSplit
    from cmmasksd.evaluate import evaluate_split
    from cmmasksd.predict import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, args.device)
    root = Path(args.prepared or loaded.config.data.prepared_dir)
    results = {}
    for split in args.splits:
        evaluation = evaluate_split(loaded.model, PreparedSplit(root / split), device=loaded.device,
                                    threshold=loaded.config.eval_threshold, progress=True)
        results[split] = evaluation.metrics
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            evaluation.per_expression.to_csv(Path(args.out) / f"per_expression_{split}.csv", index=False)
    print(json.dumps(results, indent=2))


def cmd_predict(args) -> None:
    import numpy as np

    from cmmasksd.predict import load_checkpoint, predict_mask
    from cmmasksd.visualize import load_rgb, save_overlay

    loaded = load_checkpoint(args.checkpoint, args.device)
    image = load_rgb(Path(args.image))
    probs = predict_mask(loaded, image, args.text)
    mask = probs > loaded.config.eval_threshold
    save_overlay(np.asarray(image), mask, args.text, Path(args.out))
    print(f"{args.out}: {int(mask.sum())} of {mask.size} pixels selected")


def cmd_params(args) -> None:
    from cmmasksd.model import get_model_config, parameter_report

    print(json.dumps(parameter_report(get_model_config(args.model)), indent=2))


def cmd_plan(args) -> None:
    from cmmasksd.config import load_config
    from cmmasksd.plan import DEVICES, format_plan, make_plan

    config = load_config(args.config, _parse_overrides(args.set))
    if args.device and args.device not in DEVICES:
        raise ValueError(f"--device {args.device}: not a known GPU; known: {', '.join(DEVICES)} (or give --gpu-memory-gb)")
    memory = args.gpu_memory_gb or (DEVICES[args.device].memory_gb if args.device else None)
    plan = make_plan(config, name=Path(args.config).stem if args.config.endswith((".yaml", ".yml")) else args.config,
                     devices=args.devices, gpu_memory_gb=memory, mfu=args.mfu, size=args.size, word_len=args.word_len)
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmmasksd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refshapes", help="generate the synthetic RefShapes dataset in the refer layout")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.set_defaults(func=cmd_refshapes)

    p = sub.add_parser("prepare", help="preprocess refer-format data into the compact training format")
    p.add_argument("--root", required=True, help="folder with instances.json and refs(<split-by>).p")
    p.add_argument("--split-by", default="unc")
    p.add_argument("--image-dir", help="COCO train2014 folder (default: <root>/train2014)")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=416)
    p.add_argument("--word-len", type=int, default=17)
    p.add_argument("--splits", nargs="*", help="default: every split in the refs file")
    p.add_argument("--workers", type=int, default=1, help="processes decoding images (a rerun resumes)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train and evaluate one run (data-parallel under torchrun)")
    p.add_argument("--config", required=True, help="YAML file or shipped config name (demo-cris, demo-cmmasksd, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. masksd.lambda_v=0.5")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on prepared splits")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prepared", help="prepared data folder (default: the one the run trained on)")
    p.add_argument("--splits", nargs="+", default=["val"])
    p.add_argument("--out", help="folder for per-expression IoU tables")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="segment the object an expression refers to; writes an overlay PNG")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("plan", help="will a run fit on a GPU, and what it costs (memory, FLOPs, GPU-hours)")
    p.add_argument("--config", required=True, help="YAML file or shipped config name (paper-refcoco-rn101, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.batch_size=32")
    p.add_argument("--devices", type=int, default=1, help="data-parallel GPUs")
    p.add_argument("--gpu-memory-gb", type=float, help="each GPU's memory: find the micro-batch and accumulation")
    p.add_argument("--device", help="a known GPU, e.g. H100 (its memory, if --gpu-memory-gb is not given)")
    p.add_argument("--mfu", type=float, default=0.3, help="assumed model FLOPs utilisation for GPU-hours")
    p.add_argument("--size", type=int, help="input size (default: the prepared split's, else 416)")
    p.add_argument("--word-len", type=int, help="text length (default: the prepared split's, else 17)")
    p.add_argument("--json", help="write the plan here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("params", help="parameter counts of the CRIS baseline and CM-MaskSD")
    p.add_argument("--model", required=True, help="registered model config, e.g. cris-rn101")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as err:
        prefix = "invalid config: " if isinstance(err, ValidationError) else ""
        print(f"error: {prefix}{one_line(err, TrainConfig)}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
