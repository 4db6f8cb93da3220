"""`cmmasksd plan`: will a run fit on a GPU, how to make it fit, and what it costs, answered on a CPU.

For one config (`make_plan`):

- **memory** of one training step per device at its micro-batch (global batch / devices / accumulate):
  weights, gradients, optimizer state and activations, for fp32 and bf16 autocast, with and without
  activation checkpointing (`cmmasksd.plan.memory.trace_step`: the real model's tensors, traced with
  fake tensors);
- **fit**, given the GPU's memory: the largest micro-batch that fits in `HEADROOM` of it (the rest is
  the CUDA context, cuDNN workspaces and the allocator's fragmentation), in the precision the run
  trains in on a GPU, and the `optim.accumulate` that keeps the recipe's global batch; memory is
  linear in the micro-batch (traced at two sizes); accumulation keeps every gradient alive across
  micro-batches, data parallelism adds DDP's gradient buckets (one more copy);
- **FLOPs** per step and per epoch (an epoch: one sample per training object, as the trainer draws
  them, plus one validation pass), and **GPU-hours** per trial at an assumed MFU on named devices.

The sweep-level plan (trials, seeds for a target delta) is `pipeline/plan.py`; the library never
reads params.yaml or MLflow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from cmmasksd.catalogue import split_sizes
from cmmasksd.config import TrainConfig
from cmmasksd.plan.memory import StepTrace, build_model, trace_step

GIB = 2**30
HEADROOM = 0.9  # the share of a GPU's memory a step may plan to use
DEFAULT_MFU = 0.3  # an assumption: measure yours with benchmarks/bench_step.py --device cuda (it prints MFU)
DEFAULT_SIZE, DEFAULT_WORD_LEN = 416, 17  # CRIS's input size and text length, where no prepared split says
MIN_MICRO_BATCH = 2  # the CRIS neck's BatchNorm1d over sentence features needs 2 samples to train


@dataclass(frozen=True)
class Device:
    memory_gb: float
    bf16_tflops: float  # dense peak
    fp32_tflops: float  # without TF32 (PyTorch's default for matmuls)


DEVICES = {  # vendors' data sheets, SXM parts
    "A100-40GB": Device(40, 312, 19.5), "A100-80GB": Device(80, 312, 19.5), "L40S": Device(48, 362, 91.6),
    "H100": Device(80, 989, 67), "H200": Device(141, 989, 67), "A10G": Device(24, 125, 31.2), "L4": Device(24, 121, 30.3),
}


@dataclass
class Plan:
    config: str
    input_size: int
    word_len: int
    devices: int
    global_batch: int
    precision: str  # what the run trains in on a GPU: bf16 when optim.amp
    grad_checkpointing: bool
    accumulate: int  # the config's, or the one `fit` chose
    micro_batch: int  # the config's (global batch / devices / its accumulate): `memory` is at this size
    memory: dict[str, dict[str, dict[str, float]]]  # precision -> "plain" | "checkpointing" -> part -> GiB
    flops: dict[str, float]
    gpu_hours: dict[str, float]  # device -> GPU-hours per trial (all devices together)
    fit: dict | None = None  # given the GPU's memory
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def epoch_sizes(config: TrainConfig) -> tuple[int, int, int, str]:
    """(training samples per epoch, validation expressions, final-evaluation expressions, where from):
    the prepared splits when they exist, else the dataset's published counts."""
    from cmmasksd.data.split import PreparedSplit

    root = Path(config.data.prepared_dir)
    eval_splits = config.data.eval_splits or []
    limit = config.data.max_eval_expressions

    def cap(n: int) -> int:
        return n if limit is None else min(n, limit)

    names = {config.data.train_split, config.data.val_split, *eval_splits}
    if all((root / name / "manifest.json").is_file() for name in names):
        counts = {name: PreparedSplit(root / name).manifest["counts"] for name in names}
        train, val = counts[config.data.train_split]["objects"], counts[config.data.val_split]["sentences"]
        final = sum(cap(counts[s]["sentences"]) for s in eval_splits)
        source = f"prepared splits in {root}"
    else:
        dataset = root.name
        published = split_sizes(dataset, "umd" if dataset == "refcocog" else "unc")
        if not published:
            raise ValueError(f"data.prepared_dir {root}: no prepared splits there and no published counts for "
                             f"{dataset!r}; prepare the data first (dvc repro preprocess@{dataset})")
        train, val = published[config.data.train_split]["refs"], published[config.data.val_split]["expressions"]
        final = sum(cap(published[s]["expressions"] or 0) for s in eval_splits)
        source = f"published {dataset} counts (cmmasksd.catalogue)"
    if config.data.max_train_objects:
        train = min(train, config.data.max_train_objects)
    if config.data.epoch_val_items:
        val = min(val, config.data.epoch_val_items)
    return train, val, final, source


def input_shape(config: TrainConfig) -> tuple[int, int]:
    """(input size, text length) of the prepared training split, else CRIS's."""
    from cmmasksd.data.split import PreparedSplit

    split = Path(config.data.prepared_dir) / config.data.train_split
    if (split / "manifest.json").is_file():
        prepared = PreparedSplit(split)
        return prepared.size, prepared.word_len
    return DEFAULT_SIZE, DEFAULT_WORD_LEN


def _gib(trace: StepTrace) -> dict[str, float]:
    return {part: round(value / GIB, 3) for part, value in trace.peak.items()}


def make_plan(config: TrainConfig, name: str = "", devices: int = 1, gpu_memory_gb: float | None = None,
              mfu: float = DEFAULT_MFU, size: int | None = None, word_len: int | None = None,
              only_the_run: bool = False) -> Plan:
    """The plan of one config on `devices` data-parallel GPUs (see the module docstring); `only_the_run`:
    memory in the run's own precision and checkpointing only (a third of the time)."""
    batch, accumulate = config.optim.batch_size, config.optim.accumulate
    if batch % (devices * accumulate):
        raise ValueError(f"optim.batch_size {batch} must divide into {devices} devices x optim.accumulate "
                         f"{accumulate} micro-batches")
    default_size, default_len = input_shape(config)
    size, word_len = size or default_size, word_len or default_len
    micro = batch // devices // accumulate
    precision = "bf16" if config.optim.amp else "fp32"
    checkpointing = config.run.grad_checkpointing
    model = build_model(config)
    combos = [(precision, checkpointing)] if only_the_run else [(p, c) for p in ("fp32", "bf16") for c in (False, True)]
    traces = {}
    for p, ckpt in combos:
        counted = (p, ckpt) == (precision, checkpointing)  # FLOPs of the step as the run takes it
        traces[p, ckpt] = trace_step(model, config, micro, size, word_len, p, ckpt, accumulate, count_flops=counted)
    memory = {p: {"checkpointing" if ckpt else "plain": _gib(t) for (q, ckpt), t in traces.items() if q == p}
              for p in dict.fromkeys(p for p, _ in combos)}
    run = traces[precision, checkpointing]
    train, val, final, source = epoch_sizes(config)
    per_sample = run.train_flops / (micro * accumulate)
    per_eval = run.eval_flops / micro
    epoch = per_sample * train + per_eval * val
    trial = config.optim.epochs * epoch + per_eval * final
    flops = {"per_step": per_sample * batch, "per_epoch": epoch, "per_trial": trial, "train_samples_per_epoch": train,
             "val_expressions": val, "final_eval_expressions": final}
    hours = {name: trial / (mfu * 1e12 * (d.bf16_tflops if precision == "bf16" else d.fp32_tflops)) / 3600
             for name, d in DEVICES.items()}
    plan = Plan(name, size, word_len, devices, batch, precision, checkpointing, accumulate, micro, memory, flops,
                hours,
                notes=[f"epoch sizes: {source}", f"GPU-hours at an assumed MFU of {mfu:.0%} (--mfu)"])
    if gpu_memory_gb:
        plan.fit = fit(model, config, traces, gpu_memory_gb, devices, size, word_len, precision, checkpointing)
        if plan.fit["fits"]:
            plan.accumulate, plan.grad_checkpointing = plan.fit["accumulate"], plan.fit["grad_checkpointing"]
    return plan


def fit(model, config: TrainConfig, traces: dict, gpu_memory_gb: float, devices: int, size: int, word_len: int,
        precision: str, checkpointing: bool) -> dict:
    """The largest micro-batch that fits in HEADROOM x the GPU's memory, and the accumulation that keeps the
    global batch; with activation checkpointing too when the run does not fit without it."""
    usable = HEADROOM * gpu_memory_gb * GIB
    per_device = config.optim.batch_size // devices
    answers = []
    for ckpt in dict.fromkeys([checkpointing, True]):
        if (precision, ckpt) not in traces:
            traces[precision, ckpt] = trace_step(model, config, per_device // config.optim.accumulate, size, word_len,
                                                 precision, ckpt, config.optim.accumulate, count_flops=False)
        first = traces[precision, ckpt]
        other_micro = first.micro_batch // 2 if first.micro_batch >= 4 else first.micro_batch * 2
        second = trace_step(model, config, other_micro, size, word_len, precision, ckpt, first.accumulate,
                            count_flops=False)
        slope = (first.peak["total"] - second.peak["total"]) / (first.micro_batch - other_micro)
        fixed = first.peak["total"] - slope * first.micro_batch
        grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        extra = grads if devices > 1 else 0  # DDP's gradient buckets

        kept = max(grads - first.peak["gradients"], 0)  # with accumulation every gradient lives between micro-batches

        def memory(micro: int, steps: int) -> float:
            return fixed + slope * micro + extra + (kept if steps > 1 else 0)

        answer = {"grad_checkpointing": ckpt, "per_sample_gb": slope / GIB, "fixed_gb": (fixed + extra) / GIB,
                  "kept_gradients_gb": kept / GIB}
        for steps in range(1, per_device // MIN_MICRO_BATCH + 1):
            if per_device % steps == 0 and memory(per_device // steps, steps) <= usable:
                micro = per_device // steps
                answer |= {"fits": True, "micro_batch": micro, "accumulate": steps,
                           "memory_gb": memory(micro, steps) / GIB}
                break
        else:
            answer |= {"fits": False, "micro_batch": None, "accumulate": None,
                       "memory_gb": memory(MIN_MICRO_BATCH, 2) / GIB}
        answers.append(answer)
        if answer["fits"]:
            break
    chosen = answers[-1]
    return {"gpu_memory_gb": gpu_memory_gb, "usable_gb": round(usable / GIB, 1), "devices": devices, **chosen,
            "tried": answers}


def format_plan(plan: Plan) -> str:
    """The plan as a few readable tables."""
    from tabulate import tabulate

    rows = [[p, mode, *(f"{plan.memory[p][mode][k]:.2f}" for k in ("weights", "gradients", "optimizer",
                                                                      "activations", "total"))]
            for p in plan.memory for mode in plan.memory[p]]
    lines = [f"{plan.config}: {plan.input_size} px, {plan.word_len} tokens, global batch {plan.global_batch} on "
             f"{plan.devices} device(s), trains in {plan.precision}",
             "",
             f"Peak memory of one training step per device (GiB), at micro-batch "
             f"{plan.micro_batch} (the config's):",
             tabulate(rows, headers=["precision", "", "weights", "gradients", "optimizer", "activations", "total"],
                      tablefmt="simple")]
    if plan.fit:
        f = plan.fit
        if f["fits"]:
            lines += ["", f"Fits in {f['gpu_memory_gb']:g} GB ({f['usable_gb']:g} GiB usable) in {plan.precision}"
                      + (" with activation checkpointing" if f["grad_checkpointing"] else "")
                      + f": micro-batch {f['micro_batch']}, optim.accumulate {f['accumulate']} "
                      f"({f['memory_gb']:.1f} GiB)."]
        else:
            lines += ["", f"Does not fit in {f['gpu_memory_gb']:g} GB even at micro-batch {MIN_MICRO_BATCH} "
                      f"({f['memory_gb']:.1f} GiB with checkpointing): use more memory or a smaller input."]
    flops = plan.flops
    lines += ["", f"FLOPs: {flops['per_step'] / 1e12:.3g} TFLOP per optimizer step, {flops['per_epoch'] / 1e15:.3g} "
                  f"PFLOP per epoch ({flops['train_samples_per_epoch']:,} samples + {flops['val_expressions']:,} val "
                  f"expressions), {flops['per_trial'] / 1e15:.3g} PFLOP per trial.",
              "GPU-hours per trial: " + ", ".join(f"{k} {v:.3g}" for k, v in plan.gpu_hours.items()) + ".",
              *plan.notes]
    return "\n".join(lines)


__all__ = ["DEVICES", "Device", "Plan", "epoch_sizes", "fit", "format_plan", "make_plan"]
