"""The memory and FLOPs of one training step, counted from the real model's tensors without running it.

`trace_step` builds the model of a config (random weights: the same tensors as pretrained ones), turns
its weights into fake tensors (`FakeTensorMode`: shapes, dtypes and strides, no data, no arithmetic) and
runs an optimizer step the way `cmmasksd.step` runs it, its optimizer state already created (as from
the second step on; the optimizer fused, as on a GPU), under `LiveTensors`, which adds up every tensor storage while it lives and keeps the peak with its parts:
weights (the trained ones, buffers and the frozen scorer's copy), gradients, optimizer state, and
activations (with inputs and temporaries). FLOPs come from `torch.utils.flop_counter` in the same pass.
Fake tensors live on the CPU, so bf16 follows CPU autocast's op lists, which cast the same matmuls and
convolutions as CUDA's.

`measured_peak` runs the same steps for real on the CPU under `torch.profiler` (`profile_memory`) and
reads the peak of its memory timeline: what `benchmarks/bench_plan.py` checks the estimate against.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from cmmasksd.config import TrainConfig
from cmmasksd.distributed import TrainingStep
from cmmasksd.model import CMMaskSD, create_model
from cmmasksd.step import optimizer_step

SOT, EOT = 49406, 49407


class LiveTensors(TorchDispatchMode):
    """The bytes of every tensor storage alive, and their peak. Storages seen before (views, in-place
    results) count once; a storage stops counting when its last tensor dies. Each storage gets a serial
    number (Python reuses the ids of dead objects), `serial` names the live ones."""

    def __init__(self, preexisting=()):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # id(storage) -> (serial, bytes)
        self.count = self.current = self.peak = 0
        self.at_peak: dict[int, int] = {}  # serial -> bytes
        for tensor in preexisting:
            self.add(tensor)

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        self.count += 1
        self.live[key] = (self.count, storage.nbytes())
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak, self.at_peak = self.current, dict(self.live.values())

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, (0, 0))[1]

    def serials(self, tensors) -> set[int]:
        """The serial numbers of the (live) storages of `tensors`."""
        keys = {id(t.untyped_storage()) for t in tensors if t is not None}
        return {self.live[k][0] for k in keys if k in self.live}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out


@dataclass(frozen=True)
class StepTrace:
    micro_batch: int
    accumulate: int
    precision: str  # fp32 | bf16
    grad_checkpointing: bool
    peak: dict[str, int]  # bytes at the step's peak: weights, gradients, optimizer, activations, total
    train_flops: float  # one optimizer step: every micro-batch, forward and backward
    eval_flops: float  # one forward pass of the main branch over the micro-batch


def example_batch(n: int, size: int, word_len: int) -> dict[str, torch.Tensor]:
    """A training batch of `n` samples: random images, a short expression, empty masks."""
    tokens = torch.zeros(n, word_len, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:5], tokens[:, 5] = SOT, 400, EOT
    return {"image": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), "tokens": tokens,
            "mask": torch.zeros(n, 1, size, size), "content": torch.tensor([[0, 0, size, size]]).expand(n, 4),
            "kind": torch.zeros(n, dtype=torch.long)}


def fake_batch(mode: FakeTensorMode, n: int, size: int, word_len: int) -> dict[str, torch.Tensor]:
    """`example_batch`'s shapes and dtypes, as fake tensors."""
    return {k: mode.from_tensor(v) for k, v in example_batch(n, size, word_len).items()}


def build_model(config: TrainConfig) -> CMMaskSD:
    """The config's model with random weights (the pretrained ones have the same shapes)."""
    model_cfg = config.model.model_copy(update={"pretrained": None})
    return create_model(model_cfg, config.masksd, compare_frozen=config.run.compare_frozen).train()


def _fakeify(module: nn.Module, mode: FakeTensorMode) -> None:
    """Every parameter and buffer replaced by a fake tensor of its shape (in place)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = nn.Parameter(mode.from_tensor(param.detach()), requires_grad=param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                sub._buffers[name] = mode.from_tensor(buffer)


def trace_step(model: CMMaskSD, config: TrainConfig, micro_batch: int, size: int, word_len: int,
               precision: str = "fp32", grad_checkpointing: bool = False, accumulate: int = 1,
               count_flops: bool = True) -> StepTrace:
    """Peak memory by part (and FLOPs) of an optimizer step of `accumulate` micro-batches of `micro_batch`,
    the optimizer state already there (as from the second step on). `model`: `build_model`'s, not changed."""
    model = copy.deepcopy(model)
    model.set_grad_checkpointing(grad_checkpointing)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fakeify(model, mode)
    if model.frozen is not None:
        _fakeify(model.frozen.backbone, mode)
    frozen = [*model.frozen.backbone.parameters(), *model.frozen.backbone.buffers()] if model.frozen else []
    weights = [*model.parameters(), *model.buffers(), *frozen]
    step, amp = TrainingStep(model), precision == "bf16"
    flops = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    with mode:
        optimizer = _optimizer(model, config)
        _create_state(optimizer)
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        batch = fake_batch(mode, micro_batch * accumulate, size, word_len)
        tracker = LiveTensors([*weights, *state])
        with tracker, flops:
            optimizer_step(step, optimizer, batch, accumulate=accumulate, grad_clip=config.optim.grad_clip,
                           amp=amp, device_type="cpu")
        train_flops = flops.get_total_flops() if count_flops else math.nan
        eval_flops = math.nan
        if count_flops:
            model.eval()
            with torch.no_grad(), FlopCounterMode(display=False) as counter, \
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model(batch["image"][:micro_batch], batch["tokens"][:micro_batch])
            eval_flops = counter.get_total_flops()
    parts = {"weights": tracker.serials(weights), "gradients": tracker.serials(p.grad for p in model.parameters()),
             "optimizer": tracker.serials(state)}
    peak = {part: sum(n for key, n in tracker.at_peak.items() if key in keys) for part, keys in parts.items()}
    peak["activations"] = tracker.peak - sum(peak.values())
    peak["total"] = tracker.peak
    return StepTrace(micro_batch, accumulate, precision, grad_checkpointing, peak, float(train_flops),
                     float(eval_flops))


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer state a step creates (Adam's moments), from a step on zero gradients."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _optimizer(model: CMMaskSD, config: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """The training's optimizer (its groups, Adam or AdamW); fused, as it runs on a GPU."""
    from cmmasksd.train import build_optimizer

    optimizer = build_optimizer(model, config)
    if not fused:
        return optimizer
    return type(optimizer)(optimizer.param_groups, fused=True)


def measured_peak(config: TrainConfig, micro_batch: int, size: int, word_len: int, precision: str = "fp32",
                  grad_checkpointing: bool = False, threads: int | None = None) -> dict[str, float]:
    """The peak bytes of tensor memory of the same two optimizer steps run for real on the CPU, from
    `torch.profiler`'s memory timeline (`profile_memory=True`), and the parts it saw at the peak."""
    from torch.profiler import ProfilerActivity, profile

    if threads:
        torch.set_num_threads(threads)
    model = build_model(config)
    model.set_grad_checkpointing(grad_checkpointing)
    step, optimizer = TrainingStep(model), _optimizer(model, config, fused=False)  # as it trains on the CPU
    batch = example_batch(micro_batch, size, word_len)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        for _ in range(2):
            optimizer_step(step, optimizer, batch, accumulate=1, grad_clip=config.optim.grad_clip,
                           amp=precision == "bf16", device_type="cpu")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated for CUDA snapshots; the CPU has no other
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    at = max(range(len(totals)), key=totals.__getitem__)
    row = sizes[at]  # columns: unused, parameter, optimizer state, input, temporary, activation, gradient, ...
    return {"total": float(totals[at]), "weights": float(row[1]), "optimizer": float(row[2]),
            "gradients": float(row[6]), "activations": float(totals[at] - row[1] - row[2] - row[6])}
