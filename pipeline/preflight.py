"""What the sweep checks on the driver before Ray starts: a fault every trial would hit is
reported once, naming the file, instead of failing each trial (and its retries) inside Ray."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.params_schema import PreprocessSettings, ResourcesParams


def keep_local_ray_on_loopback(address: str | None) -> None:
    """A local Ray binds every interface even with `_node_ip_address="127.0.0.1"` (measured: its
    GCS, raylet and workers listened on [::]); as a one-machine Ray it keeps to 127.0.0.1. Ray
    reads the switch when first imported, so this runs before any `import ray`. A cluster
    (`ray.address` set) is left alone, and so is a user's own setting of the variable."""
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def check_prepared(prepared_dir: Path, dataset: str, settings: PreprocessSettings) -> None:
    """Every prepared split is of this format and of the size and word_len params.yaml asks for."""
    from cmmasksd.data import PreparedSplit

    manifests = sorted(prepared_dir.glob("*/manifest.json"))
    if not manifests:
        raise FileNotFoundError(f"{prepared_dir}: no prepared split; run `dvc repro preprocess@{dataset}`")
    for manifest in manifests:
        split = PreparedSplit(manifest.parent)  # checks the format version
        if (split.size, split.word_len) != (settings.size, settings.word_len):
            raise ValueError(f"{split.split_dir}: prepared at size {split.size}, word_len {split.word_len}; "
                             f"params.yaml preprocess.{dataset} asks for size {settings.size}, word_len "
                             f"{settings.word_len}: run `dvc repro preprocess@{dataset}`")


def check_model(config: dict[str, Any]) -> None:
    """The trials' model builds, its `model.pretrained` weights read and fit (errors name the file)."""
    from cmmasksd.config import build_config
    from cmmasksd.model import create_model

    validated = build_config(config)
    create_model(validated.model, validated.masksd)


def check_fits(configs: dict[str, Any], resources: ResourcesParams, size: int, word_len: int) -> None:
    """Every variant's training step ({name: TrainConfig}) fits in `sweep.resources.gpu_memory_gb` (when
    set for GPU trials, `cmmasksd.plan`), else an error that names the setting to change."""
    if not resources.gpu or not resources.gpu_memory_gb:
        return
    from cmmasksd.plan import HEADROOM, make_plan

    usable = HEADROOM * resources.gpu_memory_gb
    for name, config in configs.items():
        plan = make_plan(config, name, resources.workers, resources.gpu_memory_gb, size=size, word_len=word_len,
                         only_the_run=True)
        need = plan.memory[plan.precision]["checkpointing" if config.run.grad_checkpointing else "plain"]["total"]
        if need <= usable:
            continue
        fit = plan.fit
        if fit["fits"]:
            advice = f"set optim.accumulate: {fit['accumulate']} in train.overrides (micro-batch {fit['micro_batch']}, " \
                     f"{fit['memory_gb']:.1f} GiB)"
            if fit["grad_checkpointing"] and not config.run.grad_checkpointing:
                advice += " and run.grad_checkpointing: true"
        else:
            advice = "use GPUs with more memory, more sweep.resources.workers, or a smaller input"
        raise ValueError(f"params.yaml: sweep.resources.gpu_memory_gb is {resources.gpu_memory_gb:g} ({usable:.0f} GiB "
                         f"usable), but a training step of variant `{name}` needs {need:.1f} GiB per GPU in "
                         f"{plan.precision} at micro-batch {plan.micro_batch}: {advice} (`python -m pipeline.plan` "
                         "shows the plan)")
