"""The schema of `params.yaml`: one pydantic model per section, checked before a stage does anything.

`load_params` validates the file with `validate_params`, so a typo (`sweep.seed` for `sweep.seeds`),
a value out of range or a sweep variant that `TrainConfig` refuses stops every stage with the key
path and what is allowed, before it downloads, trains or starts Ray. The stages read the validated
`Params` object itself (typed attributes, not string keys). Where a library model already
describes a section it is the schema (`TrainConfig` for the profile, `train.overrides` and each
variant; `PretrainConfig`; `RefShapesConfig`; the source catalogue's `with_settings`), so no default
or range is written twice. A section whose keys all have defaults may be left out.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from cmmasksd.config import (
    PretrainConfig,
    TrainConfig,
    apply_overrides,
    build_config,
    deep_merge,
    read_profile,
)
from cmmasksd.errors import format_validation_error
from cmmasksd.catalogue import DATASETS as REAL_DATASETS
from cmmasksd.catalogue import SOURCES, get_source
from cmmasksd.data.refshapes import RefShapesConfig
from cmmasksd.io import with_settings
from pipeline.contract import DEFAULT_GRIDS

DATASETS = ("refshapes", *REAL_DATASETS)  # what the fetch stage can make: RefShapes and the catalogue's
# The sweep sets the data folder of a trial, so a profile and a variant are checked without it.
_PLACEMENT = {"data.prepared_dir": "."}


def _known_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return name


Dataset = Annotated[str, AfterValidator(_known_dataset)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RefShapesFetch(_Section):
    """`fetch.refshapes`: generated offline; `generate` holds `RefShapesConfig`'s fields."""

    generate: RefShapesConfig = Field(default_factory=RefShapesConfig)


class _FetchBase(_Section):
    def settings(self, name: str) -> dict[str, Any]:
        """The settings of catalogue source `name` (`refcoco+` included) as written."""
        return dict(getattr(self, _field_name(name)))

    @field_validator("*")
    @classmethod
    def _catalogue_accepts(cls, settings: Any, info: ValidationInfo) -> Any:
        """The catalogue owns the rules for mirrors and checks; `source` is a path or null."""
        if not isinstance(settings, dict):  # `refshapes`: its own model
            return settings
        local = settings.get("source")
        if local is not None and not isinstance(local, str):
            raise ValueError(f"source must be a local folder or zip, or null; got {local!r}")
        name = cls.model_fields[info.field_name].alias or info.field_name
        try:
            with_settings(get_source(name), {key: value for key, value in settings.items() if key != "source"})
        except ValueError as err:
            raise ValueError(str(err).removeprefix(f"{name}: ")) from None  # the key path names it
        return settings


def _field_name(source: str) -> str:
    return source.replace("+", "_plus")  # `refcoco+` is not a Python name; params.yaml keeps it as written


# One key per catalogue source: a dataset added to `cmmasksd.catalogue` is a key here, with nothing to write.
FetchParams = create_model(
    "FetchParams",
    __base__=_FetchBase,
    __doc__="`fetch`: RefShapes' generator, and per catalogue source a local copy (`source`) or its mirrors "
            "and checks. A source's settings stay as written: a key left out keeps the catalogue's value.",
    refshapes=(RefShapesFetch, Field(default_factory=RefShapesFetch)),
    **{_field_name(name): (dict[str, Any], Field(default_factory=dict, alias=name if _field_name(name) != name else None))
       for name in SOURCES},
)


class PreprocessSettings(_Section):
    """`preprocess.<dataset>`: the refer split files to read and the sizes of the training format."""

    split_by: str = Field(min_length=1)
    size: int = Field(gt=0)  # letterboxed image side, pixels
    word_len: int = Field(gt=0)  # tokens per expression
    workers: int = Field(default=1, ge=1)  # processes decoding images


# `PretrainConfig`'s fields with their defaults and ranges, but the refer folder comes from `dataset`.
PretrainParams = create_model(
    "PretrainParams",
    __base__=_Section,
    __doc__="`pretrain`: a `PretrainConfig` whose `raw_dir` is `data/raw/<dataset>`.",
    dataset=(Dataset, "refshapes"),
    **{name: (field.annotation, field) for name, field in PretrainConfig.model_fields.items() if name != "raw_dir"},
)


class TrainParams(_Section):
    """`train`: a profile (a shipped name or a path) with `overrides` merged in section by section."""

    profile: str = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)


class AshaParams(_Section):
    """`sweep.asha`: stop the worse trials early; the horizon is the base config's `optim.epochs`."""

    enabled: bool = False
    grace_period: int = Field(default=1, ge=1)  # epochs every trial runs before it may be stopped
    reduction_factor: float = Field(default=2, gt=1)


class ResourcesParams(_Section):
    """`sweep.resources`: what one trial reserves; fractional GPUs share one. With `workers` > 1
    each trial is a Ray Train run of that many data-parallel workers, each holding `cpu` and `gpu`."""

    cpu: float = Field(default=1, gt=0)
    gpu: float = Field(default=0, ge=0)
    workers: int = Field(default=1, ge=1)
    # each GPU's memory: with `gpu` > 0 the sweep checks, before Ray starts, that every trial's training
    # step fits (`pipeline.plan.check_fits`; `python -m pipeline.plan` shows the plan)
    gpu_memory_gb: float | None = Field(default=None, gt=0)


class SweepParams(_Section):
    """`sweep`: the grid (variants x seeds, plus the CRIS baseline) and how Ray Tune runs it."""

    name: str = Field(pattern=r"^[\w.-]+$")  # names the Ray experiment's folder
    dataset: Dataset
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    variants: list[dict[str, Any]] = Field(default_factory=list)  # dotted `TrainConfig` keys -> values
    resources: ResourcesParams = Field(default_factory=ResourcesParams)
    max_concurrent: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=-1)  # retries from the last checkpoint; -1: no limit
    asha: AshaParams = Field(default_factory=AshaParams)


class RayParams(_Section):
    address: str | None = None  # None: a local Ray started by the stage; "auto" or "ray://host:10001"
    storage: str = Field(min_length=1)  # trial folders and checkpoints, outside DVC's outputs


class MlflowParams(_Section):
    tracking_uri: str | None = None  # None: sqlite:///<repo>/mlflow.db
    experiment: str = Field(min_length=1)


class ReportParams(_Section):
    bootstrap_samples: int = Field(default=10_000, ge=1)
    bootstrap_seed: int = 0
    grids: list[tuple[str, str]] = Field(default_factory=lambda: list(DEFAULT_GRIDS))  # two-key tables + heatmaps


class Params(_Section):
    """The whole file. A left-out section with required keys is None (the stage that reads it says so)."""

    datasets: list[Dataset] | None = Field(default=None, min_length=1)
    fetch: FetchParams = Field(default_factory=FetchParams)
    preprocess: dict[Dataset, PreprocessSettings] = Field(default_factory=dict)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    train: TrainParams | None = None
    sweep: SweepParams | None = None
    ray: RayParams | None = None
    mlflow: MlflowParams | None = None
    report: ReportParams = Field(default_factory=ReportParams)

    def need(self, name: str) -> Any:
        """Section `name`, or an error naming it when params.yaml leaves it out."""
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"params.yaml: missing `{name}`")
        return value

    @model_validator(mode="after")
    def _datasets_are_built(self) -> Params:
        """DVC preprocesses each of `datasets`, and the sweep's data comes from one of them."""
        if self.datasets is None:
            return self
        unset = [name for name in self.datasets if name not in self.preprocess]
        if unset:
            raise ValueError(f"`datasets`: {unset} need settings in `preprocess` (has {sorted(self.preprocess)})")
        if self.sweep is not None and self.sweep.dataset not in self.datasets:
            raise ValueError(f"`sweep.dataset`: {self.sweep.dataset!r} is not in `datasets` {self.datasets}, "
                             "so no stage would fetch and preprocess it")
        return self

    @model_validator(mode="after")
    def _trials_are_valid(self) -> Params:
        """Every trial's config builds: the profile, it with `train.overrides`, and each variant on that."""
        if self.train is None:
            return self
        try:
            profile = read_profile(self.train.profile)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"`train.profile`: {err}") from None
        try:
            _check_trial(profile, "")
        except ValueError as err:
            raise ValueError(f"`train.profile` {self.train.profile}: {err}") from None
        base = deep_merge(profile, self.train.overrides)
        _check_trial(base, "train.overrides")
        for i, variant in enumerate(self.sweep.variants if self.sweep else []):
            _check_trial(apply_overrides(base, variant), f"sweep.variants[{i}]")
        return self


def _check_trial(raw: dict[str, Any], where: str) -> None:
    """`raw`, placed anywhere, must be a `TrainConfig`; the error names the keys under `where`."""
    try:
        build_config(apply_overrides(raw, _PLACEMENT))
    except ValidationError as err:
        raise ValueError(format_validation_error(err, TrainConfig, where)) from None
    except ValueError as err:  # e.g. a model config name that is not registered
        raise ValueError(f"`{where}`: {err}" if where else str(err)) from None


def validate_params(raw: dict[str, Any]) -> Params:
    """`raw` (params.yaml as read) validated, defaults filled in; a left-out section with required keys is None."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, Params)) from None
