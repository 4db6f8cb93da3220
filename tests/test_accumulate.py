"""Gradient accumulation (`optim.accumulate`): the plain step unchanged, micro-batches that add up to
the whole batch (BN in eval mode, no dropout), and under DDP one all-reduce per optimizer step."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cmmasksd.config import MaskSDConfig, OptimConfig
from cmmasksd.distributed import TrainingStep
from cmmasksd.model import create_model, get_model_config
from cmmasksd.step import micro_batches, optimizer_step

BATCH = 16


def tiny_model(branches: str) -> nn.Module:
    """A tiny CRIS (or CM-MaskSD with the live scorer, whose masks are chosen per sample) in training
    mode, with every BatchNorm in eval mode and no dropout: nothing depends on the batch as a whole."""
    torch.manual_seed(0)
    config = get_model_config("cris-tiny-rn").model_copy(update={"decoder_dropout": 0.0})
    model = create_model(config, MaskSDConfig(branches=branches, scorer="live", centre=False, mask_cell=8)).train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def make_batches(n_steps: int, size: int = BATCH) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.zeros(size, 17, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 49406, torch.randint(300, 900, (size, 3), generator=g), 49407
    return [{"image": torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, generator=g),
             "tokens": tokens, "mask": (torch.rand(size, 1, 64, 64, generator=g) > 0.6).float(),
             "content": torch.tensor([[0, 0, 64, 64]]).expand(size, 4), "kind": torch.zeros(size, dtype=torch.long)}
            for _ in range(n_steps)]


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05)


def train_steps(model: nn.Module, batches, accumulate: int, grad_clip: float | None = None,
                optimizer=adamw) -> dict[str, torch.Tensor]:
    step = TrainingStep(model)
    optimizer = optimizer(model)
    for batch in batches:
        optimizer_step(step, optimizer, batch, accumulate=accumulate, grad_clip=grad_clip, amp=False,
                       device_type="cpu")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_accumulate_1_is_the_plain_step_bit_for_bit():
    batches = make_batches(3)
    model = tiny_model("both")
    reference = copy.deepcopy(model)
    got = train_steps(model, batches, accumulate=1, grad_clip=1.0)
    step, optimizer = TrainingStep(reference), adamw(reference)
    for batch in batches:  # the training loop as it was before accumulation
        loss, _ = step(batch["image"], batch["tokens"], batch["mask"], None, batch["content"], batch["kind"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
    want = reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("branches", ["none", "both"])
@pytest.mark.parametrize("accumulate", [2, 3])
def test_micro_batches_add_up_to_the_whole_batch(branches, accumulate):
    """3 optimizer steps at batch 16 (3 micro-batches: 6, 5 and 5 samples, weighted by size), with SGD,
    whose update follows the gradient. (Adam divides by each gradient's own scale: the rounding noise,
    ~1e-10, of gradients that are truly 0, the attention key biases that softmax ignores, becomes steps
    of 1e-3 of either sign however the batch is cut; measured 3.9e-5 apart after 3 steps at lr 1e-4.)"""
    batches = make_batches(3)
    whole = train_steps(tiny_model(branches), batches, 1, optimizer=sgd)
    accumulated = train_steps(tiny_model(branches), batches, accumulate, optimizer=sgd)
    initial = tiny_model(branches).state_dict()
    assert any(not torch.equal(whole[k], initial[k]) for k in whole)  # it trained
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=0, atol=1e-6, msg=key)


def test_micro_batches_cut_every_input_alike_and_refuse_too_many():
    batch = make_batches(1, size=5)[0]
    parts = micro_batches(batch, 2)
    assert [len(p["image"]) for p in parts] == [3, 2]
    assert all(torch.equal(torch.cat([p[k] for p in parts]), batch[k]) for k in batch)
    with pytest.raises(ValueError, match="optim.accumulate: 3 micro-batches of this process's 5 samples leave fewer "
                                         "than 2 in a micro-batch"):
        micro_batches(batch, 3)
    with pytest.raises(ValueError, match="accumulate \\(8\\) cuts batch_size \\(4\\)"):
        OptimConfig(batch_size=4, accumulate=8)


def _ddp_steps(batches, rank: int, accumulate: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """This rank's half of each global batch, `accumulate` micro-batches per step; the weights after,
    and the all-reduces (bucket hook calls) of each step."""
    model = tiny_model("none")
    ddp = nn.parallel.DistributedDataParallel(TrainingStep(model), find_unused_parameters=True)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    optimizer = sgd(model)  # fp32: see test_micro_batches_add_up_to_the_whole_batch
    per_step = []
    for batch in batches:
        shard = {k: v[rank * BATCH // 2:(rank + 1) * BATCH // 2] for k, v in batch.items()}
        before = len(calls)
        optimizer_step(ddp, optimizer, shard, accumulate=accumulate, grad_clip=None, amp=False, device_type="cpu")
        per_step.append(len(calls) - before)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, per_step


def _ddp_worker(rank: int, port: int, batches, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    results = {n: _ddp_steps(batches, rank, n) for n in (1, 2)}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_accumulates_without_syncing_the_micro_batches_that_do_not_step(tmp_path):
    """2 gloo ranks x 2 micro-batches of 4 = one process at batch 16; the first micro-batch's backward
    all-reduces nothing (`no_sync`), so a step all-reduces as often as a step without accumulation."""
    batches = make_batches(3)
    whole = train_steps(tiny_model("none"), batches, accumulate=1, optimizer=sgd)
    out = tmp_path / "rank0.pt"
    mp.start_processes(_ddp_worker, args=(free_port(), batches, str(out)), nprocs=2, start_method="spawn")
    results = torch.load(out, weights_only=True)
    (plain, plain_calls), (accumulated, accumulated_calls) = results[1], results[2]
    assert min(plain_calls) >= 1 and accumulated_calls == plain_calls
    for key in whole:
        torch.testing.assert_close(plain[key], whole[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(accumulated[key], whole[key], rtol=0, atol=1e-6, msg=key)


def test_accumulation_is_part_of_the_run_identity(tiny_config):
    from cmmasksd.config import build_config
    from cmmasksd.identity import differences, run_identity

    plain, accumulated = (run_identity(build_config(tiny_config(optim__accumulate=n))) for n in (1, 2))
    assert differences(plain, accumulated) == ["optim.accumulate: 1 -> 2"]
