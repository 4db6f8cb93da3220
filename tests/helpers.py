"""Helpers shared by the test modules (import them from here, never from another test module).

- `debug_config`: the one tiny training setting, the shipped `debug` profile
  (`cmmasksd/train_configs/debug.yaml`) placed on a prepared folder and an output folder, with
  dotted overrides. Tests take it through the `tiny_config` fixture (`conftest.py`).
- `Interrupt`, `stop_after`: a crash after an epoch, for resume tests; `CrashingTokenizer`: a crash
  (or Ctrl-C) after a number of prepared images, for preprocessing's.
- `make_repo`, `run_stage`, `child_runs`, `rest` and the trials-table columns: a copy of the project
  whose stages run for real on tiny settings (the sweep, the report, `dvc repro`).
- `wrap`, `make_tokens`, `make_batch`: a tiny CRIS (the `tiny_cris` fixture) as CM-MaskSD, and inputs
  for it, for the model tests; `record_calls`, `masked_inputs`, `patch_masks`, `word_masks`: what the
  masked passes handed the encoders.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import torch
import yaml

from cmmasksd.config import MaskSDConfig, apply_overrides, deep_merge, read_profile
from cmmasksd.metrics import METRIC_NAMES

PROJECT = Path(__file__).resolve().parent.parent
SOT, EOT = 49406, 49407  # CLIP's start- and end-of-text token ids
DEBUG_PROFILE = "debug"


# ---- tiny models and inputs -----------------------------------------------------------------------

def wrap(tiny_cris: dict, kind: str, **switches):
    """A deep copy of `tiny_cris[kind]` as CM-MaskSD in train mode; the live, uncentred scorer unless a
    test asks for another, so the masks come from the features under test."""
    from cmmasksd.model import CMMaskSD

    config = MaskSDConfig(**{"scorer": "live", "centre": False, **switches})
    return CMMaskSD(copy.deepcopy(tiny_cris[kind]), config).train()


def make_tokens(word_len: int = 17, lengths=(4, 2)) -> torch.Tensor:
    """SOT, n word ids, EOT, padding, one row per entry of `lengths`."""
    tokens = torch.zeros(len(lengths), word_len, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0] = SOT
        tokens[row, 1:n + 1] = torch.arange(100, 100 + n)
        tokens[row, n + 1] = EOT
    return tokens


def tokenize(*texts: str) -> torch.Tensor:
    """CLIP BPE tokens of `texts`, 17 per row (the prepared RefShapes text length)."""
    import open_clip

    return open_clip.SimpleTokenizer(context_length=17)(list(texts))


def make_batch(size: int = 64, word_len: int = 17, lengths=(4, 2)):
    """Random uint8 images, `make_tokens`, and random binary masks, seeded."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (len(lengths), 3, size, size), dtype=torch.uint8, generator=g)
    gt = (torch.rand(len(lengths), 1, size, size, generator=g) > 0.5).float()
    return images, make_tokens(word_len, lengths), gt


# ---- what a model's encoders were handed ---------------------------------------------------------

def record_calls(obj, name: str) -> list:
    """Wrap `obj.<name>` so every call appends its (args, kwargs) to the returned list."""
    calls, original = [], getattr(obj, name)

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(obj, name, recorded)
    return calls


def masked_inputs(model) -> tuple[list, list]:
    """Recorders of the masks the masked passes hand the encoders: (patch masks, (tokens, word masks))."""
    images, texts = record_calls(model.seg, "encode_image"), record_calls(model.seg, "encode_text")
    return images, texts


def _second(args, kwargs, name: str):
    return args[1] if len(args) > 1 else kwargs.get(name)


def patch_masks(calls) -> list[torch.Tensor]:
    """The patch masks of the recorded `encode_image(images, patch_mask, ...)` calls that had one."""
    masks = [_second(args, kwargs, "patch_mask") for args, kwargs in calls]
    return [mask for mask in masks if mask is not None]


def word_masks(calls) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, word mask) of the recorded `encode_text(tokens, word_mask)` calls that had one."""
    masks = [(args[0] if args else kwargs["tokens"], _second(args, kwargs, "word_mask")) for args, kwargs in calls]
    return [(tokens, mask) for tokens, mask in masks if mask is not None]


# ---- the tiny training setting -------------------------------------------------------------------

def dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """Keyword-style keys (`optim__epochs`) as the dotted keys `apply_overrides` takes (`optim.epochs`)."""
    return {key.replace("__", "."): value for key, value in overrides.items()}


def debug_config(prepared_dir: str | Path, out_dir: str | Path, **overrides: Any) -> dict[str, Any]:
    """The raw `debug` profile with `data.prepared_dir`, `run.out_dir` and dotted `overrides` set.

    Overrides are dotted keys, written either way: `optim__epochs=1` or `**{"optim.epochs": 1}`;
    a whole section or the model name is replaced as a value (`model="cris-tiny-vit"`).
    """
    placed = {"data.prepared_dir": str(prepared_dir), "run.out_dir": str(out_dir)}
    return apply_overrides(read_profile(DEBUG_PROFILE), {**placed, **dotted(overrides)})


class Interrupt(Exception):
    """A crash in the middle of a run (raised from an `on_epoch` callback)."""


def stop_after(epoch: int):
    """An `on_epoch` callback that crashes the run once `epoch` has finished (its checkpoint written)."""
    def callback(report) -> None:
        if report.epoch == epoch:
            raise Interrupt
    return callback


class CrashingTokenizer:
    """CLIP's tokenizer (17 tokens) that, at call `kill_at`, kills its process (SIGKILL: no cleanup at
    all) or, at call `interrupt_at`, raises KeyboardInterrupt (Ctrl-C).

    The prepare loop tokenizes once per usable image, in the parent, so this stops a run after a
    known number of images. A test that uses it for every run gives them all one fingerprint.
    """

    def __init__(self, kill_at: int | None = None, interrupt_at: int | None = None, word_len: int = 17):
        from cmmasksd.data.prepared import clip_tokenizer

        self.kill_at, self.interrupt_at = kill_at, interrupt_at
        self.calls = 0
        self._tokenize = clip_tokenizer(word_len)

    def __call__(self, texts):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self._tokenize(texts)


# ---- a copy of the project whose stages run for real ------------------------------------------------

# The sweep's trials on top of the debug profile: 2 epochs on 16 objects, 8 expressions per split.
SWEEP_TRAIN = {"optim": {"epochs": 2, "milestones": []},
               "data": {"max_train_objects": 16, "max_eval_expressions": 8}, "run": {"num_overlays": 1},
               "masksd": {"mask_cell": 8}}  # 64 px images here: an 8 x 8 mask grid, as 12 px at 96 px

COST = ["cost/bf16", "cost/params_baseline", "cost/params_extra", "cost/params_total", "cost/peak_mem_mb",
        "cost/step_time_s"]
FINALS = sorted(f"final/{split}/{metric}" for split in ("testA", "testB", "val") for metric in METRIC_NAMES)
TRIALS_COLUMNS = ["variant", "variant_key", "seed", "status", "mlflow_run_id", "checkpoint", *COST, *FINALS,
                  "overrides", "error"]


def make_repo(tmp_path: Path, prepared_root: Path | None, train: dict | None = None, **changes) -> Path:
    """A copy of the project's stages, library and params whose trials train the debug profile.

    With `prepared_root` the prepared data is copied in and the trials start from random weights
    (no pretrain stage runs); without it (`dvc repro`) they start from the pretrain stage's weights.
    `train` is merged into the tiny `train.overrides`; `changes` are other dotted params.
    """
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    for package in ("pipeline", "cmmasksd"):
        shutil.copytree(PROJECT / package, repo / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(PROJECT / name, repo / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    weights = {"model": {"pretrained": None if prepared_root is not None else params["pretrain"]["out"]}}
    tiny = {
        "fetch.refshapes.generate": {"seed": 0, "image_size": 64,
                                     "images": {"train": 16, "val": 8, "testA": 4, "testB": 4}},
        "preprocess.refshapes.size": 64,
        "pretrain.epochs": 1, "pretrain.batch_size": 8, "pretrain.warmup_steps": 1, "pretrain.threads": 1,
        "train.profile": DEBUG_PROFILE,
        "train.overrides": deep_merge(deep_merge(weights, SWEEP_TRAIN), train or {}),
        "sweep.variants": [{"masksd.branches": "both"}],
        "sweep.seeds": [0],
        "sweep.max_concurrent": 2,
        **changes,
    }
    for key, value in tiny.items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if prepared_root is not None:
        shutil.copytree(prepared_root, repo / "data" / "prepared" / "refshapes")
    return repo


def run_stage(repo: Path, *args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """`python -m <args>` in `repo`, which must succeed."""
    result = subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def child_runs(sweep_file: Path):
    """(client, the sweep's trial runs) from the sweep's `sweep.json`."""
    from mlflow.tracking import MlflowClient

    info = json.loads(sweep_file.read_text())
    client = MlflowClient(info["tracking_uri"])
    runs = client.search_runs([info["experiment_id"]],
                              filter_string=f"tags.`mlflow.parentRunId` = '{info['parent_run_id']}'")
    return client, runs


def rest(uri: str, endpoint: str, body: dict | None = None) -> dict:
    """One call of MLflow's REST API, as the UI makes it (GET with a query, or POST with JSON)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}"
    if body is None:
        request = urllib.request.Request(url)
    else:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
