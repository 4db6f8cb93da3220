"""The optimizer groups follow CRIS's `build_segmenter`: CLIP at backbone_lr except its positional embeddings."""

import pytest

from cmmasksd.config import DataConfig, MaskSDConfig, OptimConfig, TrainConfig
from cmmasksd.model import create_model, get_model_config
from cmmasksd.train import build_optimizer

LR, BACKBONE_LR = 1e-3, 1e-5


def expected_lr(name: str) -> float:
    """`seg.`/`student.` + `backbone.clip.` is CLIP; CRIS trains its positional embeddings like the new layers."""
    _, _, inner = name.partition(".")
    return BACKBONE_LR if inner.startswith("backbone.clip.") and "positional_embedding" not in name else LR


@pytest.mark.parametrize("weights", ["shared", "separate"])
@pytest.mark.parametrize("model_name, visual_pos", [("cris-tiny-rn", "visual.attnpool.positional_embedding"),
                                                    ("cris-tiny-vit", "visual.positional_embedding")])
def test_groups_follow_cris(model_name, visual_pos, weights):
    config = TrainConfig(data=DataConfig(prepared_dir="unused"), model=get_model_config(model_name),
                         masksd=MaskSDConfig(weights=weights), optim=OptimConfig(lr=LR, backbone_lr=BACKBONE_LR))
    model = create_model(config.model, config.masksd)
    optimizer = build_optimizer(model, config)

    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lr_of, "a parameter in two groups"
            lr_of[id(p)] = group["lr"]
    params = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in params.values()}
    assert sorted(g["lr"] for g in optimizer.param_groups) == [BACKBONE_LR, LR]

    for name, p in params.items():
        assert lr_of[id(p)] == expected_lr(name), name

    nets = ["seg", "student"] if weights == "separate" else ["seg"]
    assert (model.student is not None) == (weights == "separate")
    for net in nets:  # what CRIS moves to the new layers' rate exists (image and text), and what is new is there
        for name in (f"{net}.backbone.clip.positional_embedding", f"{net}.backbone.clip.{visual_pos}"):
            assert lr_of[id(params[name])] == LR
        for part in ("neck", "decoder", "head", "backbone.text_mask_token"):
            assert any(n.startswith(f"{net}.{part}") and lr_of[id(p)] == LR for n, p in params.items()), part
        assert lr_of[id(params[f"{net}.backbone.clip.token_embedding.weight"])] == BACKBONE_LR
