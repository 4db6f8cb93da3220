"""The CUDA path: bf16 training that resumes (CUDA RNG included) and evaluates. Skipped without a GPU;
`benchmarks/gpu.sh` runs these first on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from cmmasksd.config import build_config, deep_merge
from cmmasksd.io.checkpoint import read_checkpoint
from cmmasksd.predict import load_checkpoint
from cmmasksd.train import CHECKPOINT_DIR, LAST, native_bf16, train
from test_train import Interrupt, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

CUDA = {"device": "cuda", "optim": {"epochs": 2, "milestones": [], "batch_size": 8, "amp": True}}


def cuda_config(prepared_root, out_dir, **masksd):
    return build_config(deep_merge(tiny_config(prepared_root, out_dir, **masksd), CUDA))


def test_cuda_bf16_run_resumes_where_it_stopped_and_evaluates(prepared_root, tmp_path):
    assert native_bf16(torch.device("cuda"))
    straight = train(cuda_config(prepared_root, tmp_path / "straight"))
    assert straight.cost["bf16"] == 1.0 and 0.0 <= straight.final["val"]["miou"] <= 1.0

    def stop_after_first(report):
        if report.epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cuda_config(prepared_root, tmp_path / "resumed"), on_epoch=stop_after_first)
    state = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_DIR / LAST)
    assert state["rng_cuda"].device.type == "cpu"  # what torch.cuda.set_rng_state takes
    epochs = []
    resumed = train(cuda_config(prepared_root, tmp_path / "resumed"), on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs == [2]
    # bf16 kernels on a GPU need not be bit-exact run to run: the resumed run lands where the straight one did
    assert resumed.history[-1]["train/loss"] == pytest.approx(straight.history[-1]["train/loss"], rel=0.05)

    loaded = load_checkpoint(resumed.checkpoint, device="cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"


def test_cuda_vit_with_token_dropping_trains(prepared_root, tmp_path):
    config = build_config(deep_merge(tiny_config(prepared_root, tmp_path / "vit", vit_masking="drop"),
                                     {**CUDA, "model": "cris-tiny-vit", "masksd": {"mask_cell": None}}))
    result = train(config)
    assert result.history[-1]["train/lmvsd"] > 0
