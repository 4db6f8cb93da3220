"""Typed, validated configuration: a training run is a pure function of a `TrainConfig`.

Sections are nested (no flat namespace where `train.lr` and `test.lr` could collide) and
every field has the default from `shared/spec/method.md`. Unknown keys are errors, so a typo
in a YAML file or a sweep override fails loudly instead of silently training the default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the prepared (preprocessed) splits live and how samples are drawn from them."""

    prepared_dir: Path
    train_split: str = "train"
    val_split: str = "val"
    eval_splits: list[str] | None = None  # None: every split found in prepared_dir
    blank_text: bool = False  # ablation: every expression replaced by the empty string
    max_train_objects: int | None = Field(default=None, ge=1)
    max_eval_expressions: int | None = Field(default=None, ge=1)
    # The val pass after each epoch (model selection, the learning curve, ASHA) on the first N val
    # expressions only; the val-selected weights are then evaluated on every expression.
    epoch_val_expressions: int | None = Field(default=None, ge=1)

    @property
    def epoch_val_items(self) -> int | None:
        """How many val expressions the per-epoch pass reads (None: all)."""
        limits = [n for n in (self.epoch_val_expressions, self.max_eval_expressions) if n is not None]
        return min(limits) if limits else None


class ModelConfig(_Strict):
    """The segmentation model (CRIS): a CLIP backbone plus neck, decoder and head.

    Named configs live in `cmmasksd/model_configs/*.json` (`get_model_config`).
    """

    clip: str = "RN50"  # any open_clip model name, including the tiny ones registered here
    pretrained: str | None = None  # None, an open_clip tag ("openai"), or a checkpoint path
    vit_layers: tuple[int, int, int] = (4, 8, 12)  # ViT blocks that give the three levels
    neck_dim: int = Field(default=512, ge=8)
    decoder_layers: int = Field(default=3, ge=1)
    decoder_heads: int = Field(default=8, ge=1)
    decoder_ffn: int = Field(default=2048, ge=8)
    decoder_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    head_dim: int = Field(default=256, ge=8)  # channels of the stride-4 map
    head_kernel: int = Field(default=3, ge=1)  # size of the per-sample text-to-pixel kernel
    # Keep CLIP's token embedding (most of a small CLIP's weights: 6.3M of the tiny RN's 8.8M) at its
    # pretrained values: not trained, no gradient, no optimizer state. The text mask token still trains.
    freeze_token_embedding: bool = False

    @model_validator(mode="after")
    def _check_divisible(self) -> "ModelConfig":
        if self.neck_dim % self.decoder_heads:
            raise ValueError(
                f"neck_dim ({self.neck_dim}) must be divisible by decoder_heads ({self.decoder_heads})"
            )
        if self.head_kernel % 2 == 0:
            raise ValueError(f"head_kernel must be odd, got {self.head_kernel}")
        return self


# MaskRIS (naver-ai/maskris) on the CRIS model. `recipe: maskris` always sets its method (one joint masked
# pass, BERT word noise), whatever the profile says, and its numbers where the config gives none.
MASKRIS_METHOD = {"branches": "joint", "word_noise": "bert"}
MASKRIS = {"strategy": "random", "mask_ratio_v": 0.75, "mask_ratio_t": 0.15, "fill": "zero", "lambda_v": 0.5,
           "seg_weight": 0.5, "distill_loss": "soft_bce"}


class MaskSDConfig(_Strict):
    """The masked self-distillation branches; `branches: none` is the CRIS baseline.

    `joint` is MaskRIS's single masked pass that hides image cells and words together (its loss
    weight `lambda_v`); `recipe: maskris` sets MaskRIS's method (`MASKRIS_METHOD`) and its numbers
    (`MASKRIS`) for every field left out.
    """

    recipe: Literal["cmmasksd", "maskris"] = "cmmasksd"
    branches: Literal["none", "lmvsd", "vmlsd", "both", "joint"] = "both"
    strategy: Literal["corr_top", "corr_bottom", "corr_sample", "random"] = "corr_top"
    mask_ratio_v: float = Field(default=0.5, gt=0.0, lt=1.0)
    mask_ratio_t: float = Field(default=0.3, gt=0.0, lt=1.0)
    lambda_v: float = Field(default=1.0, ge=0.0)
    lambda_t: float = Field(default=1.0, ge=0.0)
    # Epochs over which the distillation weights rise linearly from 0 to lambda_v / lambda_t (step by
    # step), so the masked branches distil from a teacher that already segments; 0: full from step 0.
    distill_warmup: float = Field(default=0.0, ge=0.0)
    distill_loss: Literal["soft_bce", "mse", "kl"] = "soft_bce"
    gt_on_masked: bool = False
    weights: Literal["shared", "separate"] = "shared"
    sample_temperature: float = Field(default=0.1, gt=0.0)  # for strategy corr_sample
    # The patch features the masks are scored on. values: each patch's value path into CLIP's joint
    # space (MaskCLIP); attention: CRIS's per-position attention-pool output, which in CLIP localises
    # the wrong way round (CLIP Surgery; measured on the pretrained tiny CLIP: design notes of masksd).
    correlation: Literal["values", "attention"] = "values"
    # LMVSD masking cell in pixels; None: the backbone's own (32 for ResNet, the patch size for ViT).
    # A ViT masks whole tokens, so it accepts only its patch size (checked when the model is built).
    mask_cell: int | None = Field(default=None, gt=0)
    # How a ViT's masked LMVSD pass hides patches. token: the learned mask token replaces them at the
    # input (every token is encoded); drop: MAE-style, only the visible patches are encoded and the
    # mask token fills the dropped positions after the encoder (cheaper by the masked fraction).
    vit_masking: Literal["token", "drop"] = "token"
    # Where the masks come from (design notes of masksd). live: the model being fine-tuned scores its own
    # masks; frozen: a no-grad copy of the pretrained CLIP towers does (the alignment CM-MaskSD inherits);
    # prediction: the teacher's own probability map (LMVSD only: an upper bound for guided masking).
    # Default frozen + centre: the only CLIP scorer whose masks stay on the object through a default-length
    # run (benchmarks/bench_scorers.py: coverage 1.25-1.27x chance every epoch; live 0.35-0.39x, frozen ~1.0x).
    scorer: Literal["live", "frozen", "prediction"] = "frozen"
    centre: bool = True  # subtract each image's mean patch feature before the patch-sentence cosine
    # What a ResNet's masked cells show. zero: 0 in the normalised input, i.e. the mean colour (the
    # literature's; the paper profiles keep it); black: black pixels; noise: N(0, 1) in the normalised
    # input; median: each image's median colour. Default median: with the referent visible and 32 of 64
    # other cells masked, the student still agrees with its teacher (IoU 0.64), where the mean colour's
    # cells read as extra shapes on RefShapes (0.21; black 0.04, noise 0.08: benchmarks/bench_fill.py).
    # (A ViT uses its mask token.)
    fill: Literal["zero", "black", "noise", "median"] = "median"
    # How VMLSD's masked words are hidden. mask: all by the mask token; bert: 80 % mask token, 10 % a
    # random token, 10 % left as they are (MaskRIS, after BERT).
    word_noise: Literal["mask", "bert"] = "mask"
    seg_weight: float = Field(default=1.0, gt=0.0)  # weight of the clean pass's loss against the ground truth

    @model_validator(mode="before")
    @classmethod
    def _recipe_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("recipe") == "maskris":
            return {**MASKRIS, **data, **MASKRIS_METHOD}
        return data

    @model_validator(mode="after")
    def _scorer_fits(self) -> "MaskSDConfig":
        if self.scorer == "prediction" and self.branches in ("vmlsd", "both", "joint"):
            raise ValueError("scorer: prediction scores image cells by the teacher's mask; it has nothing to say "
                             "about words, so it works with branches: lmvsd only")
        return self

    @property
    def use_lmvsd(self) -> bool:
        return self.branches in ("lmvsd", "both")

    @property
    def use_vmlsd(self) -> bool:
        return self.branches in ("vmlsd", "both")

    @property
    def use_joint(self) -> bool:
        return self.branches == "joint"

    @property
    def masks_images(self) -> bool:
        return self.branches in ("lmvsd", "both", "joint")

    @property
    def masks_words(self) -> bool:
        return self.branches in ("vmlsd", "both", "joint")


class OptimConfig(_Strict):
    """The CRIS recipe by default: Adam 1e-4 (backbone 1e-5), 50 epochs, x0.1 at 35."""

    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(default=1e-4, gt=0.0)
    backbone_lr: float = Field(default=1e-5, ge=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    epochs: int = Field(default=50, ge=1)
    # step: x gamma after each milestone epoch (CRIS); cosine: from lr to 0 over the epochs, set per
    # epoch (milestones and gamma unused), for short budgets whose last epochs should settle.
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [35])
    gamma: float = Field(default=0.1, gt=0.0)
    batch_size: int = Field(default=64, ge=1)  # the global batch: all processes, all micro-batches
    # micro-batches per optimizer step (`cmmasksd.step`): the same recipe in less memory per device
    accumulate: int = Field(default=1, ge=1)
    grad_clip: float | None = Field(default=None, gt=0.0)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (avx512_bf16); else fp32

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if v != sorted(v):
            raise ValueError(f"milestones must be increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> "OptimConfig":
        if self.accumulate > self.batch_size:
            raise ValueError(f"accumulate ({self.accumulate}) cuts batch_size ({self.batch_size}) into micro-batches: "
                             "it must not exceed it")
        return self


class RunConfig(_Strict):
    """Where and how a run executes: nothing here changes its weights (measured, `cmmasksd.identity`).

    A checkpoint resumes a run that differs only here, and no fingerprint reads this section.
    """

    out_dir: Path = Path("runs/default")
    num_workers: int = Field(default=0, ge=0)  # data loader processes
    num_overlays: int = Field(default=4, ge=0)  # prediction overlays saved after training
    # Where another scorer (live, prediction) chooses the masks, also count where the frozen scorer's
    # would fall (`mask/frozen/...` in MLflow), side by side. Costs one no-grad pass of a copy of the
    # pretrained towers per step (RN101 at 416 px: +5.9 % FLOPs, 461 MB; `benchmarks/bench_step.py`);
    # its draws use a forked random state, so the weights are those of a run without it (tested).
    compare_frozen: bool = True
    # Activation checkpointing in the CLIP towers: their blocks are recomputed in the backward pass
    # (less memory, more time: `benchmarks/bench_step.py --grad-checkpointing`). Here, not in `model`,
    # because it computes the same weights (tested bit for bit on the CPU).
    grad_checkpointing: bool = False


class TrainConfig(_Strict):
    """What a run computes (every section but `run`) and where it executes (`run`)."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    masksd: MaskSDConfig = Field(default_factory=MaskSDConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    # torch CPU threads; None: torch's default on the machine. Part of the result: 1 and 2 threads
    # give different weights on the same CPU (reductions split differently).
    threads: int | None = Field(default=None, ge=1)
    eval_threshold: float = Field(default=0.35, gt=0.0, lt=1.0)  # CRIS's threshold
    # torch.compile the training step. Opt-in: on the CPU it recompiles as the masks change (tiny config,
    # 2 epochs: 691 s against 5.7 s eager), and compiled dropout draws other numbers (part of the run's identity).
    compile: bool = False
    run: RunConfig = Field(default_factory=RunConfig)


class PretrainConfig(_Strict):
    """Contrastive pretraining of a CLIP on a dataset's captions (`cmmasksd.pretrain`).

    The embedded default's stand-in for `openai` weights: the tiny CLIP learns RefShapes'
    colour, shape, size and position words on its regions before CRIS is fine-tuned from it.
    """

    raw_dir: Path  # the refer layout with annotation attributes (RefShapes)
    split_by: str = "unc"
    train_split: str = "train"
    val_split: str = "val"
    clip: str = "tiny-rn"
    epochs: int = Field(default=12, ge=1)
    batch_size: int = Field(default=128, ge=2)
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    warmup_steps: int = Field(default=50, ge=0)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    out: Path = Path("data/pretrained/tiny-rn-refshapes.pt")  # the open_clip-loadable state dict
    work_dir: Path = Path("runs/pretrain")  # last.pt for resuming; outside DVC's outputs
    mask_cell: int = Field(default=12, gt=0)  # the LMVSD cell the zero-shot mask hit rate uses
    mask_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (a path or a shipped profile name); `model:` may name a registered model
    config or give fields inline.

    `overrides` are dotted keys (``{"masksd.lambda_v": 0.5}``) applied after the file, which is
    how sweeps and the CLI's ``--set`` change one value without copying a file.
    """
    return build_config(apply_overrides(read_profile(path), overrides or {}))


PROFILE_DIR = Path(__file__).parent / "train_configs"


def resolve_profile(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a profile shipped in `cmmasksd/train_configs/` (e.g. `demo-cris`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = PROFILE_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"{name_or_path}: no such file and no shipped profile of that name (shipped: {names})")


def read_profile(name_or_path: str | Path) -> dict[str, Any]:
    """The raw (unvalidated) mapping of a profile, to merge overrides into before `build_config`."""
    path = resolve_profile(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, section by section (a new dict; neither input changes)."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), str) and key == "model":
            merged[key] = {"name": merged[key], **value}  # a named model config, then some fields
        else:
            merged[key] = value
    return merged


MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


def list_models() -> list[str]:
    """Names of the shipped model configs (e.g. `cris-rn101`, `cris-tiny-rn`)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> ModelConfig:
    """A named model config (`cmmasksd/model_configs/<name>.json`): the one place names resolve."""
    path = MODEL_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown model config {name!r}; available: {', '.join(list_models())}")
    return ModelConfig.model_validate(json.loads(path.read_text()))


def build_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a plain dict; a string `model` (or `model.name`) is a named model config."""
    raw = dict(raw)
    model = raw.get("model")
    if isinstance(model, dict) and "name" in model:
        named = get_model_config(model["name"]).model_dump()
        named.update({k: v for k, v in model.items() if k != "name"})
        raw["model"] = named
    elif isinstance(model, str):
        raw["model"] = get_model_config(model).model_dump()
    return TrainConfig.model_validate(raw)


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`tree` with dotted overrides (``{"optim.lr": 1e-3}``) merged in (a new dict; `tree` is unchanged)."""
    for dotted_key, value in overrides.items():
        *parents, leaf = dotted_key.split(".")
        nested: dict[str, Any] = {leaf: value}
        for part in reversed(parents):
            nested = {part: nested}
        tree = deep_merge(tree, nested)
    return tree
