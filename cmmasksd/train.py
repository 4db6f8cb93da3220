"""`train(config) -> TrainResult`: data, model, optimizer, loop, eval, checkpoint, top to bottom.

The run is a pure function of the config: the data order of epoch e depends only on
(seed, e), and the checkpoint written after every epoch holds everything else (weights,
optimizer, schedule, RNG), so a run interrupted and restarted with the same `out_dir` ends
with the same weights as one that never stopped. Tracking systems stay outside: callers
pass `on_epoch` (Ray Tune and MLflow do, in `pipeline/`).

Started inside a `torch.distributed` process group (torchrun, Ray Train) it trains data-parallel
(`cmmasksd.distributed`): each rank takes its slice of every global batch of
`optim.batch_size`, gradients are averaged by DDP, evaluation is sharded, and rank 0 alone
writes checkpoints (with every rank's RNG state), tables and figures.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmmasksd.config import TrainConfig
from cmmasksd.data import EpochBatchSampler, PreparedSplit, RefSegDataset
from cmmasksd.distributed import Dist, barrier, broadcast_weights, gather_objects, local_device, sum_tensors, training_step
from cmmasksd.evaluate import SplitEvaluation, evaluate_split
from cmmasksd.identity import differences, resolve_device, run_identity
from cmmasksd.io.checkpoint import read_checkpoint, read_resume_state, save_checkpoint
from cmmasksd.model import CMMaskSD, create_model, parameter_report
from cmmasksd.model.mask_stats import MaskStats
from cmmasksd.model.masksd import warmup_scale
from cmmasksd.step import BATCH_KEYS, StepTimer, optimizer_step
from cmmasksd.visualize import save_learning_curves, save_prediction_overlays

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
_RESUME_KEYS = ("model", "optimizer", "scheduler", "rng_cpu", "epoch", "history", "best_val", "best_epoch",
                "identity")


@dataclass
class EpochReport:
    epoch: int  # number of finished epochs (1-based)
    metrics: dict[str, float]  # train/*, val/*, mask/* (branches that ran), lr, epoch_time_s, step_time_s
    checkpoint_dir: Path  # holds last.pt: everything needed to resume (written by rank 0 only)


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_val_miou: float
    history: list[dict[str, float]]
    final: dict[str, dict[str, float]]  # split -> metric name -> value
    per_expression: dict[str, Path]  # split -> CSV of per-expression IoUs
    cost: dict[str, float]  # step_time_s, peak_mem_mb, params_*, bf16
    checkpoint: Path  # best weights (selected on val)
    identity: dict  # what the weights depend on (`cmmasksd.identity.run_identity`), runtime included
    figures: list[Path] = field(default_factory=list)

    def flat_metrics(self) -> dict[str, float]:
        """`final/<split>/<metric>` for every evaluated split, plus `cost/*` and `best_epoch`."""
        flat = {f"final/{split}/{k}": v for split, ms in self.final.items() for k, v in ms.items()}
        flat.update({f"cost/{k}": v for k, v in self.cost.items()})
        flat["best_epoch"] = float(self.best_epoch)
        return flat


def open_splits(config: TrainConfig) -> dict[str, PreparedSplit]:
    """Every prepared split under `data.prepared_dir` (a split is complete when its manifest exists)."""
    root = Path(config.data.prepared_dir)
    names = sorted(p.parent.name for p in root.glob("*/manifest.json"))
    if not names:
        raise FileNotFoundError(f"{root}: no prepared split (expected <split>/manifest.json); run `cmmasksd prepare`")
    needed = {config.data.train_split, config.data.val_split, *(config.data.eval_splits or [])}
    missing = sorted(needed - set(names))
    if missing:
        raise FileNotFoundError(f"{root}: missing prepared split(s) {missing}; found {names}")
    splits = {name: PreparedSplit(root / name) for name in names}
    train = splits[config.data.train_split]
    for split in splits.values():  # one model sees them all: one input size, one text length
        if (split.size, split.word_len) != (train.size, train.word_len):
            raise ValueError(f"{split.split_dir}: prepared at size {split.size}, word_len {split.word_len}, but "
                             f"{train.split_dir} at size {train.size}, word_len {train.word_len}; prepare them alike")
    return splits


def build_optimizer(model: CMMaskSD, config: TrainConfig) -> torch.optim.Optimizer:
    """Two groups as CRIS: CLIP at `backbone_lr`; its positional embeddings and everything new
    (neck, decoder, head, mask tokens) at `lr`."""
    opt = config.optim
    backbone, rest = model.param_groups()
    groups = [{"params": backbone, "lr": opt.backbone_lr}, {"params": rest, "lr": opt.lr}]
    groups = [g for g in groups if g["params"]]
    cls = torch.optim.AdamW if opt.optimizer == "adamw" else torch.optim.Adam
    fused = resolve_device(config.device).type == "cuda"  # one kernel for all parameters
    return cls(groups, weight_decay=opt.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning rate per epoch (stepped once after each): `optim.schedule`."""
    opt = config.optim
    if opt.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, opt.milestones, opt.gamma)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(config: TrainConfig, on_epoch: Callable[[EpochReport], None] | None = None) -> TrainResult:
    """Train, select on val, evaluate every split; resumes from `out_dir/checkpoints/last.pt`."""
    ctx = Dist.current()
    out_dir = Path(config.run.out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = local_device(resolve_device(config.device), ctx)
    identity = run_identity(config, device.type)
    torch.manual_seed(config.seed)

    # data
    splits = open_splits(config)
    train_split, val_split = splits[config.data.train_split], splits[config.data.val_split]
    train_set = RefSegDataset(
        train_split, train=True, seed=config.seed, blank_text=config.data.blank_text,
        max_items=config.data.max_train_objects,
    )
    info = {"input_size": train_split.size, "word_len": train_split.word_len}
    sampler = EpochBatchSampler(len(train_set), config.optim.batch_size, config.seed,
                                drop_last=len(train_set) > config.optim.batch_size, rank=ctx.rank, world=ctx.world)
    workers = config.run.num_workers
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0,  # started once: the epoch comes with each key
                        generator=torch.Generator().manual_seed(config.seed))  # workers' seeds: not the global RNG

    # model, optimizer, schedule
    model = create_model(config.model, config.masksd, compare_frozen=config.run.compare_frozen).to(device)
    model.set_grad_checkpointing(config.run.grad_checkpointing)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    amp = identity["runtime"]["precision"] == "bf16"
    if amp:
        model = model.to(memory_format=torch.channels_last)  # the layout oneDNN / cuDNN run bf16 convs in

    # resume
    start_epoch, history, best_val, best_epoch = 0, [], -1.0, 0
    last_path = ckpt_dir / LAST
    state = _read_resume(last_path, ctx)
    if state is not None:
        changed = differences(state["identity"], identity)
        if changed:
            raise ValueError(f"{last_path}: holds another run (it differs in {'; '.join(changed[:4])}); "
                             "resume it with the same config, precision and threads, or use another run.out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        best_val, best_epoch = state["best_val"], state["best_epoch"]
        log.info("resumed %s at epoch %d", out_dir, start_epoch)
    _set_rng(state, config.seed, device, ctx)
    step = training_step(model, device, ctx)
    if config.compile:
        step = torch.compile(step)

    step_times: list[float] = []
    timer = StepTimer(device)
    epochs = tqdm(range(start_epoch, config.optim.epochs), desc="train", initial=start_epoch,
                  total=config.optim.epochs, disable=None if ctx.main else True)
    for epoch in epochs:
        model.train()
        sampler.set_epoch(epoch)
        sums: dict[str, torch.Tensor] = {}
        mask_stats = MaskStats(train_split.kinds[0])
        epoch_start = time.perf_counter()
        scales = []
        for i, batch in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}", leave=False,
                                       disable=None if ctx.main else True)):
            model.distill_scale = warmup_scale(config.masksd.distill_warmup, epoch, i, len(loader))
            scales.append(model.distill_scale)
            timer.start()
            batch = {key: batch[key].to(device, non_blocking=True) for key in BATCH_KEYS}
            loss, parts = optimizer_step(step, optimizer, batch, accumulate=config.optim.accumulate,
                                         grad_clip=config.optim.grad_clip, amp=amp, device_type=device.type,
                                         stats=mask_stats)
            timer.stop()
            for key, value in {"loss": loss, **parts}.items():  # summed on the device: no sync
                sums[key] = sums.get(key, 0.0) + value
        n_steps = max(len(loader), 1)
        step_times.extend(timer.epoch_times())
        lr = optimizer.param_groups[-1]["lr"]
        scheduler.step()

        val = evaluate_split(
            model, val_split, device=device, batch_size=config.optim.batch_size,
            threshold=config.eval_threshold, max_items=config.data.epoch_val_items,
            blank_text=config.data.blank_text,
        )
        mask_stats.sums = sum_tensors(mask_stats.sums, ctx)  # counts over every rank's samples
        sums = sum_tensors(sums, ctx)
        metrics = {f"train/{k}": float(v) / (n_steps * ctx.world) for k, v in sums.items()}
        metrics.update({f"val/{k}": v for k, v in val.metrics.items()})
        metrics.update(mask_stats.metrics())
        if config.masksd.distill_warmup > 0:
            metrics["distill_scale"] = sum(scales) / max(len(scales), 1)  # the epoch's mean share of lambda
        metrics.update(lr=lr, epoch_time_s=time.perf_counter() - epoch_start,
                       step_time_s=sum(step_times[-n_steps:]) / n_steps)
        history.append({"epoch": epoch + 1, **metrics})
        if val.metrics["miou"] > best_val:
            best_val, best_epoch = val.metrics["miou"], epoch + 1
            if ctx.main:
                save_checkpoint({"model": model.state_dict(), "info": info,
                                 "config": config.model_dump(mode="json"), "epoch": epoch + 1}, ckpt_dir / BEST)
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "epoch": epoch + 1, "history": history, "best_val": best_val, "best_epoch": best_epoch,
            "identity": identity, "info": info,
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        ranks_rng = gather_objects((state["rng_cpu"], state.get("rng_cuda")), ctx)
        if ctx.world > 1:
            state["rng_ranks"] = ranks_rng
        if ctx.main:
            save_checkpoint(state, last_path)
        barrier(ctx)  # rank 0's files are complete before any rank reports the epoch
        epochs.set_postfix(loss=f"{metrics['train/loss']:.3f}", val_miou=f"{val.metrics['miou']:.3f}")
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in metrics.items()})
        if on_epoch is not None:
            on_epoch(EpochReport(epoch + 1, metrics, ckpt_dir))

    return _finish(config, model, splits, history, best_epoch, best_val, step_times, device, ctx, identity)


def _read_resume(last_path: Path, ctx: Dist) -> dict | None:
    """The resume state, read by every rank from its own `out_dir` once rank 0 has read (and, if
    unusable, set aside) the shared one; all ranks must resume at the same epoch."""
    state = read_resume_state(last_path, _RESUME_KEYS) if ctx.main else None
    barrier(ctx)
    if not ctx.main:
        state = read_resume_state(last_path, _RESUME_KEYS)
    epochs = gather_objects(None if state is None else state["epoch"], ctx)
    if len(set(epochs)) > 1:
        raise RuntimeError(f"{last_path}: the ranks would resume at different epochs {epochs}; "
                           "give every rank the same checkpoint")
    return state


def _set_rng(state: dict | None, seed: int, device: torch.device, ctx: Dist) -> None:
    """Continue each rank's random stream from the checkpoint; in a group, ranks draw apart."""
    if state is None:
        if ctx.world > 1:
            torch.manual_seed(seed * 10_007 + 1 + ctx.rank)  # each rank its own masks
        return
    ranks = state.get("rng_ranks")
    if ctx.world == 1:
        cpu, cuda = state["rng_cpu"], state.get("rng_cuda")
    elif ranks is not None and len(ranks) == ctx.world:
        cpu, cuda = ranks[ctx.rank]
    else:
        log.warning("resuming with %d processes a run saved with %d: new random streams", ctx.world,
                    len(ranks) if ranks else 1)
        torch.manual_seed(seed * 10_007 + 1 + ctx.rank + state["epoch"] * 1_000_003)
        return
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _finish(config, model, splits, history, best_epoch, best_val, step_times, device, ctx, identity) -> TrainResult:
    """Reload the val-selected weights, evaluate every split; rank 0 writes tables, figures, results.json."""
    out_dir = Path(config.run.out_dir)
    best_path = out_dir / CHECKPOINT_DIR / BEST
    if ctx.main:  # only rank 0 has it on its disk (Ray Train workers may sit on other nodes)
        model.load_state_dict(read_checkpoint(best_path)["model"])
    broadcast_weights(model, ctx)
    eval_names = config.data.eval_splits or [n for n in splits if n != config.data.train_split]
    final: dict[str, dict[str, float]] = {}
    tables: dict[str, Path] = {}
    evaluations: dict[str, SplitEvaluation] = {}
    for name in eval_names:
        evaluation = evaluate_split(
            model, splits[name], device=device, batch_size=config.optim.batch_size,
            threshold=config.eval_threshold, max_items=config.data.max_eval_expressions,
            blank_text=config.data.blank_text, progress=True,
        )
        evaluations[name] = evaluation
        final[name] = evaluation.metrics
        if ctx.main:
            tables[name] = out_dir / f"per_expression_{name}.csv"
            evaluation.per_expression.to_csv(tables[name], index=False)

    params = parameter_report(config.model, config.masksd)  # counted on unweighted copies of the model
    cost = {
        "step_time_s": (sum(step_times) / len(step_times)) if step_times else float("nan"),
        "peak_mem_mb": _peak_memory_mb(device),
        "params_total": float(params["cmmasksd"]),
        "params_baseline": float(params["baseline"]),
        "params_extra": float(params["extra"]),  # 0 for the CRIS baseline: no mask tokens built
        "bf16": float(identity["runtime"]["precision"] == "bf16"),  # 1: trained under bf16 autocast
    }
    result = TrainResult(out_dir, best_epoch, best_val, history, final, tables, cost, best_path, identity)
    if not ctx.main:
        return result
    result.figures = [save_learning_curves(history, out_dir / "learning_curves.png")]
    val_name = config.data.val_split
    if config.run.num_overlays and val_name in evaluations:
        result.figures.append(save_prediction_overlays(
            model, splits[val_name], evaluations[val_name].per_expression, out_dir / "overlays_val.png",
            device=device, count=config.run.num_overlays, threshold=config.eval_threshold,
            blank_text=config.data.blank_text,
        ))
    (out_dir / "results.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    return result
