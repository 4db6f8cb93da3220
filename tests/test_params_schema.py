"""params.yaml's schema: every bad value is refused by key path, with what is allowed, before Ray starts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from pydantic import ValidationError

import pipeline.sweep as sweep_stage
from cmmasksd.config import build_config
from cmmasksd.catalogue import SOURCES
from pipeline.common import run_main
from pipeline.contract import DEFAULT_GRIDS
from pipeline.params_schema import FetchParams, Params, validate_params
from pipeline.storage import RayStorage
from pipeline.sweep import base_config, build_tuner, expand_grid
from pipeline.trial import SweepSpec, trial_config

PROJECT = Path(__file__).resolve().parent.parent
REAL = yaml.safe_load((PROJECT / "params.yaml").read_text())


def changed(**changes) -> dict:
    """The repo's params with dotted keys (`sweep__seeds` for `sweep.seeds`) set; None removes the key."""
    params = copy.deepcopy(REAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = params
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return params


BAD = {
    "unknown_key": (changed(sweep__seed=[0]),
                    "`sweep.seed`: Extra inputs are not permitted (allowed: name, dataset, seeds, variants, "),
    "variant_key_train_config_lacks": (
        changed(sweep__variants=[{"masksd.branches": "both"}, {"masksd.mask_ratio": 0.3}]),
        "`sweep.variants[1].masksd.mask_ratio`: Extra inputs are not permitted (allowed: recipe, branches, strategy, "),
    "mask_ratio_1.5": (changed(sweep__variants=[{"masksd.mask_ratio_v": 1.5}]),
                       "`sweep.variants[0].masksd.mask_ratio_v`: Input should be less than 1, got 1.5 "
                       "(allowed: > 0.0 and < 1.0)"),
    "negative_lambda": (changed(sweep__variants=[{"masksd.lambda_t": -0.5}]),
                        "`sweep.variants[0].masksd.lambda_t`: Input should be greater than or equal to 0, got -0.5"),
    "empty_datasets": (changed(datasets=[]), "`datasets`: List should have at least 1 item"),
    "sweep_dataset_not_built": (changed(sweep__dataset="refcoco"),
                                "`sweep.dataset`: 'refcoco' is not in `datasets` ['refshapes']"),
    "bad_train_override": (changed(train__overrides={"optim": {"epochs": 0}}),
                           "`train.overrides.optim.epochs`: Input should be greater than or equal to 1, got 0"),
    "missing_profile": (changed(train__profile="no-such-profile"),
                        "`train.profile`: no-such-profile: no such file and no shipped profile of that name"),
    "unknown_preprocess_key": (changed(preprocess__refshapes__worker=2),
                               "`preprocess.refshapes.worker`: Extra inputs are not permitted "
                               "(allowed: split_by, size, word_len, workers)"),
    "unknown_generator_key": (changed(fetch__refshapes__generate={"sede": 1}),
                              "`fetch.refshapes.generate.sede`: Extra inputs are not permitted (allowed: image_size, "),
    "bad_checksum": (changed(fetch__refcoco__sha256="abc"), "`fetch.refcoco`: sha256 must be 64 hex digits or null"),
    "missing_required_key": (changed(mlflow__experiment=None), "`mlflow.experiment`: Field required"),
    "asha_reduction_factor": (changed(sweep__asha={"enabled": True, "reduction_factor": 1}),
                              "`sweep.asha.reduction_factor`: Input should be greater than 1, got 1"),
}


@pytest.fixture
def no_ray(monkeypatch):
    """The sweep stage may not reach Ray or MLflow: the test fails if it does."""
    def reached(*args, **kwargs):
        raise AssertionError("the sweep went past validation")

    monkeypatch.setattr(sweep_stage, "init_ray", reached)
    monkeypatch.setattr(sweep_stage, "resolve_tracking_uri", reached)


@pytest.mark.parametrize("case", list(BAD))
def test_sweep_stage_refuses_bad_params_by_key_path_before_ray(case, tmp_path, no_ray):
    params, expected = BAD[case]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ValueError) as caught:
        sweep_stage.main(["--params", str(path), "--out", str(tmp_path / "sweep")])
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and expected in message
    assert "\n" not in message
    assert not (tmp_path / "sweep").exists()


def test_the_repo_params_validate_with_defaults_filled_in():
    params = validate_params(REAL)
    assert isinstance(params, Params)  # typed: the stages read attributes, not string keys
    assert params.preprocess["refshapes"].workers == 1  # the schema's default
    assert params.sweep.asha.enabled is False and params.report.bootstrap_samples == 10_000
    assert params.pretrain.work_dir == Path("runs/pretrain")  # PretrainConfig's default
    assert params.fetch.settings("refcoco") == REAL["fetch"]["refcoco"]  # as written: left-out keys keep the catalogue's
    assert params.fetch.settings("refcoco+") == REAL["fetch"]["refcoco+"]  # by the name params.yaml uses
    assert validate_params(params.model_dump(mode="json", by_alias=True)) == params
    with pytest.raises(ValidationError, match="frozen"):  # one validated object, shared, never changed by a stage
        params.sweep.seeds = [7]


def test_fetch_schema_names_every_catalogue_source():
    allowed = {field.alias or name for name, field in FetchParams.model_fields.items()}
    assert allowed == {"refshapes", *SOURCES}


def test_left_out_sections_stay_out_unless_all_their_keys_have_defaults():
    params = validate_params({"preprocess": {"refshapes": {"split_by": "unc", "size": 64, "word_len": 17}}})
    assert params.sweep is None and params.report.grids == DEFAULT_GRIDS  # the report's default grids, filled in
    with pytest.raises(KeyError, match=r"missing `sweep`"):
        params.need("sweep")


def test_asha_horizon_is_the_validated_default_when_the_profile_leaves_epochs_out(tmp_path):
    profile = tmp_path / "no-epochs.yaml"
    profile.write_text("model: cris-tiny-rn\nmasksd: {branches: none}\n")  # optim.epochs left at its default
    params = validate_params({"train": {"profile": str(profile)},
                              "sweep": {"name": "asha", "dataset": "refshapes", "asha": {"enabled": True}}})
    base = base_config(params.train)
    resolved = build_config(trial_config(base, {}, tmp_path, tmp_path, 1))  # as the sweep resolves it
    trials = expand_grid(params.sweep, resolved.masksd.branches)
    spec = SweepSpec(base=base, prepared_dir=str(tmp_path), threads=1, tracking_uri="", experiment_id="",
                     parent_run_id="", tags={}, dataset={})
    tuner = build_tuner(spec, trials, params.sweep, resolved.optim.epochs, "asha", RayStorage(str(tmp_path)))
    assert tuner._local_tuner._tune_config.scheduler._max_t == 50  # TrainConfig's default; Ray has no accessor
    assert not ray.is_initialized()  # building the Tuner starts nothing


def test_run_main_prints_one_error_line_and_exits_2(capsys):
    def main():
        validate_params({}).need("sweep")

    with pytest.raises(SystemExit) as caught:
        run_main(main)
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: missing `sweep`\n"  # a KeyError without its quotes


@pytest.mark.slow
def test_stage_run_by_python_reports_one_error_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(changed(sweep__variants=[{"masksd.mask_ratio_v": 1.5}]), sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "pipeline.sweep", "--params", str(path)], cwd=PROJECT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: `sweep.variants[0].masksd.mask_ratio_v`: Input should be less than 1")
    assert "Traceback" not in result.stderr
