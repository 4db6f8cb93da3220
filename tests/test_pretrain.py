"""Contrastive pretraining of the tiny CLIP: captions, an open_clip-loadable result, resume after a kill."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml

import cmmasksd.pretrain
import pipeline.pretrain as stage
from cmmasksd.config import PretrainConfig
from cmmasksd.data import Refer
from cmmasksd.data.captions import CaptionPairs, load_scenes
from cmmasksd.model.factory import create_clip, register_clip_configs
from cmmasksd.pretrain import PROMPTS, pretrain
from pipeline.common import REPO_ROOT
from pipeline.params_schema import validate_params
from pipeline.pretrain import pretrain_config

TINY = {"epochs": 4, "batch_size": 8, "warmup_steps": 2, "threads": 1}


def test_scene_captions_name_every_object_left_to_right(refshapes_root):
    scenes = load_scenes(refshapes_root, "train", 96)
    instances = json.loads((refshapes_root / "instances.json").read_text())
    train_images = {o.image_id for o in Refer(refshapes_root, "unc").objects("train")}
    assert len(scenes) == len(train_images)
    per_image = {}
    for ann in instances["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["attributes"])
    assert sum(len(s.objects) for s in scenes) == sum(len(per_image[i]) for i in train_images)
    for scene in scenes[:5]:
        ordered = sorted(scene.objects, key=lambda o: o.x)
        assert scene.caption().replace(" and ", ", ").split(", ") == [f"a {o.phrase}" for o in ordered]
        assert all(f"a {o.phrase}" in PROMPTS for o in scene.objects)


def test_an_object_pair_keeps_its_object_and_paints_the_others(refshapes_root):
    scene = next(s for s in load_scenes(refshapes_root, "val", 96) if len(s.objects) >= 2)
    image = scene.isolate(0)
    keep, other = scene.objects[0].mask, scene.objects[1].mask & ~scene.objects[0].mask
    assert np.array_equal(image[keep], scene.image[keep])
    assert (image[other] == scene.background).all() and not (scene.image[other] == scene.background).all()
    register_clip_configs()  # else open_clip falls back to its default tokenizer (77 tokens), with a warning
    pairs = CaptionPairs([scene], open_clip.get_tokenizer("tiny-rn"))
    assert len(pairs) == 1 + len(scene.objects)
    decoded = open_clip.decode(pairs[1]["tokens"]).replace("<start_of_text>", "").split("<end_of_text>")[0].strip()
    assert decoded.startswith(f"a {scene.objects[0].phrase}")
    assert decoded.removeprefix(f"a {scene.objects[0].phrase}").strip() in ["", *scene.objects[0].positions()]


def test_a_refshapes_without_attributes_is_refused_by_name(refshapes_root, tmp_path):
    for name in ("refs(unc).p", "train2014"):
        (tmp_path / name).symlink_to(refshapes_root / name)
    instances = json.loads((refshapes_root / "instances.json").read_text())
    del instances["annotations"][0]["attributes"]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"instances.json: annotation 1 has no 'attributes'"):
        load_scenes(tmp_path, "train", 96)


def _config(root: Path, tmp: Path, **changes) -> PretrainConfig:
    return PretrainConfig(raw_dir=root, out=tmp / "clip.pt", work_dir=tmp / "work", **{**TINY, **changes})


@pytest.mark.slow
def test_pretrain_writes_open_clip_weights_and_measures_them(refshapes_root, tmp_path):
    metrics = pretrain(_config(refshapes_root, tmp_path))
    loaded = open_clip.create_model("tiny-rn", pretrained=str(tmp_path / "clip.pt"))
    assert set(loaded.state_dict()) == set(create_clip("tiny-rn").state_dict())
    losses = [h["loss"] for h in metrics["history"]]
    assert len(losses) == TINY["epochs"] and losses[-1] < losses[0]
    for run in ("pretrained", "random_init"):
        assert set(metrics[run]) == {"object_top1", "scene_top1", "mask_hit", "mask_hit_attention", "mask_chance"}
        assert all(0.0 <= v <= 1.0 for v in metrics[run].values())
    assert metrics["pretrained"]["mask_chance"] == metrics["random_init"]["mask_chance"] == metrics["chance"]["mask_hit"]
    assert metrics["chance"]["object_top1"] == 1 / 36


@pytest.mark.slow
def test_a_killed_pretraining_resumes_to_the_same_weights(refshapes_root, tmp_path):
    whole = tmp_path / "whole"
    pretrain(_config(refshapes_root, whole))
    broken = tmp_path / "broken"
    config = _config(refshapes_root, broken).model_dump_json()
    script = ("import sys; from cmmasksd.config import PretrainConfig; from cmmasksd.pretrain import pretrain; "
              "pretrain(PretrainConfig.model_validate_json(sys.argv[1]))")
    process = subprocess.Popen([sys.executable, "-c", script, config])
    deadline = time.monotonic() + 300
    while not list((broken / "work").glob("*/last.pt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    last = next((broken / "work").glob("*/last.pt"))
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch < TINY["epochs"] and not (broken / "clip.pt").exists()
    pretrain(_config(refshapes_root, broken))
    a = torch.load(whole / "clip.pt", weights_only=True)
    b = torch.load(broken / "clip.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_params_are_validated_by_key(tmp_path, monkeypatch):
    """Bad `pretrain` settings stop the stage with the key path, before it trains."""
    def trained(*args, **kwargs):
        raise AssertionError("the stage trained with bad params")

    monkeypatch.setattr(cmmasksd.pretrain, "pretrain", trained)
    path = tmp_path / "params.yaml"
    for settings, message in (({"dataset": "refshapes", "epochs": 0}, r"`pretrain.epochs`: Input should be greater "
                                                                       r"than or equal to 1"),
                              ({"epoch": 3}, r"`pretrain.epoch`: Extra inputs are not permitted")):
        path.write_text(yaml.safe_dump({"pretrain": settings}))
        with pytest.raises(ValueError, match=rf"^{path}: {message}"):
            stage.main(["--params", str(path), "--metrics", str(tmp_path / "pretrain.json")])
    assert not (tmp_path / "pretrain.json").exists()


def test_stage_config_is_the_validated_settings_with_paths_in_the_repo():
    config = pretrain_config(validate_params({"pretrain": {"dataset": "refshapes", "epochs": 2}}))
    defaults = validate_params({}).pretrain
    assert config.epochs == 2 and (config.batch_size, config.lr) == (defaults.batch_size, defaults.lr)
    assert config.raw_dir == REPO_ROOT / "data" / "raw" / "refshapes"
    assert config.out.is_absolute() and config.out.is_relative_to(REPO_ROOT)
    assert config.work_dir == REPO_ROOT / "runs" / "pretrain"


def test_a_missing_weights_file_is_named():
    with pytest.raises(FileNotFoundError, match=r"model.pretrained: data/pretrained/nothing.pt: no such file"):
        create_clip("tiny-rn", "data/pretrained/nothing.pt")
