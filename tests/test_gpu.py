"""The CUDA path: bf16 training that resumes (CUDA RNG included) and evaluates. Skipped without a GPU;
`benchmarks/gpu.sh` runs these first on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from cmmasksd.config import build_config
from cmmasksd.identity import native_bf16
from cmmasksd.io.checkpoint import read_checkpoint
from cmmasksd.predict import load_checkpoint
from cmmasksd.train import CHECKPOINT_DIR, LAST, train
from helpers import Interrupt, stop_after

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

CUDA = {"device": "cuda", "optim.epochs": 2, "optim.milestones": [], "optim.amp": True}


def test_cuda_bf16_run_resumes_where_it_stopped_and_evaluates(tiny_config, tmp_path):
    assert native_bf16("cuda")
    straight = train(build_config(tiny_config(tmp_path / "straight", **CUDA)))
    assert straight.cost["bf16"] == 1.0 and 0.0 <= straight.final["val"]["miou"] <= 1.0
    assert straight.identity["runtime"] == {"device": "cuda", "precision": "bf16"}  # no CPU threads on the GPU

    with pytest.raises(Interrupt):
        train(build_config(tiny_config(tmp_path / "resumed", **CUDA)), on_epoch=stop_after(1))
    state = read_checkpoint(tmp_path / "resumed" / CHECKPOINT_DIR / LAST)
    assert state["rng_cuda"].device.type == "cpu"  # what torch.cuda.set_rng_state takes
    epochs = []
    resumed = train(build_config(tiny_config(tmp_path / "resumed", **CUDA)), on_epoch=lambda r: epochs.append(r.epoch))
    assert epochs == [2]
    # bf16 kernels on a GPU need not be bit-exact run to run: the resumed run lands where the straight one did
    assert resumed.history[-1]["train/loss"] == pytest.approx(straight.history[-1]["train/loss"], rel=0.05)

    loaded = load_checkpoint(resumed.checkpoint, device="cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"


def test_cuda_vit_with_token_dropping_trains(tiny_config, tmp_path):
    config = build_config(tiny_config(tmp_path / "vit", **CUDA, model="cris-tiny-vit", masksd__vit_masking="drop",
                                      masksd__mask_cell=None))
    result = train(config)
    assert result.history[-1]["train/lmvsd"] > 0
