"""The sweep's checks on the driver: bad weights or stale prepared data are named before Ray starts."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

import pipeline.sweep as sweep_stage
from cmmasksd.data import Refer, prepare_split
from cmmasksd.model import create_clip

PARAMS = yaml.safe_load((sweep_stage.REPO_ROOT / "params.yaml").read_text())


@pytest.fixture
def repo(tmp_path, prepared_root, monkeypatch):
    """The repo's params over a repo root in tmp_path holding the tiny prepared RefShapes (64 px,
    word_len 17); reaching Ray or MLflow fails the test."""
    shutil.copytree(prepared_root, tmp_path / "data" / "prepared" / "refshapes")
    monkeypatch.setattr(sweep_stage, "repo_path", lambda path: tmp_path / path)

    def reached(*args, **kwargs):
        raise AssertionError("the sweep went past its preflight checks")

    monkeypatch.setattr(sweep_stage, "init_ray", reached)
    monkeypatch.setattr(sweep_stage, "ensure_experiment", reached)
    return tmp_path


def sweep_with(repo, pretrained, size=64):
    params = yaml.safe_load(yaml.safe_dump(PARAMS))
    params["preprocess"]["refshapes"]["size"] = size
    params["train"]["overrides"] = {"model": {"pretrained": pretrained}}
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    sweep_stage.main(["--params", str(path), "--out", str(repo / "sweep")])


def test_missing_pretrained_file_is_named(repo):
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained: .*nowhere\.pt: no such file"):
        sweep_with(repo, str(repo / "nowhere.pt"))


def test_pretrained_file_that_is_not_a_checkpoint_is_named(repo):
    (repo / "notes.pt").write_text("these are not weights")
    with pytest.raises(ValueError, match=r"notes\.pt: unreadable: torch\.load\(weights_only=True\) failed"):
        sweep_with(repo, str(repo / "notes.pt"))


def test_pretrained_weights_of_another_architecture_name_a_few_keys(repo):
    torch.save(create_clip("tiny-vit").state_dict(), repo / "vit.pt")  # the default model is tiny-rn
    with pytest.raises(ValueError, match=r"vit\.pt: not a checkpoint of this CLIP architecture: \d+ missing "
                                         r"\(e\.g\. [\w.]+, [\w.]+\); \d+ unexpected \(e\.g\. "):
        sweep_with(repo, str(repo / "vit.pt"))


def test_prepared_split_of_another_size_or_word_len_is_named(repo, refshapes_root):
    with pytest.raises(ValueError, match=r"prepared/refshapes/\w+: prepared at size 64, word_len 17; params\.yaml "
                                         r"preprocess\.refshapes asks for size 96, word_len 17"):
        sweep_with(repo, None, size=96)
    val = repo / "data" / "prepared" / "refshapes"
    shutil.rmtree(val / "val")
    prepare_split(Refer(refshapes_root, "unc"), "val", val, 64, 22, progress=False)
    with pytest.raises(ValueError, match=r"refshapes/val: prepared at size 64, word_len 22; .* asks for size 64, "
                                         r"word_len 17"):
        sweep_with(repo, None)
