import open_clip
import pytest
import torch

from cmmasksd.config import MaskSDConfig, ModelConfig
from cmmasksd.config import MODEL_CONFIG_DIR
from cmmasksd.config import get_model_config as config_get_model_config
from cmmasksd.config import list_models as config_list_models
from cmmasksd.model import CMMaskSD, create_clip, create_model, get_model_config, list_models, load_clip_weights
from cmmasksd.model.factory import register_clip_configs

NAMES = ["cris-rn101", "cris-rn50", "cris-tiny-rn", "cris-tiny-vit", "cris-vit-b-16"]


def test_list_models():
    assert list_models() == NAMES
    # the registry is the config layer's (`cmmasksd.config`), re-exported by `cmmasksd.model`
    assert list_models is config_list_models and get_model_config is config_get_model_config
    assert sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_named_config_validates(name):
    cfg = get_model_config(name)
    assert cfg.clip in open_clip.list_models()


@pytest.mark.parametrize("name", ["cris-rn50", "cris-rn101", "cris-vit-b-16"])
def test_paper_configs_follow_cris(name):
    cfg = get_model_config(name)
    assert (cfg.neck_dim, cfg.decoder_layers, cfg.decoder_heads, cfg.decoder_ffn) == (512, 3, 8, 2048)
    assert (cfg.decoder_dropout, cfg.head_dim, cfg.head_kernel, cfg.pretrained) == (0.1, 256, 3, "openai")


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="cris-tiny-rn"):
        get_model_config("cris-rn152")


def test_tiny_clip_configs_are_registered_with_open_clip():
    register_clip_configs()  # explicit (create_clip calls it), not a side effect of importing the factory
    register_clip_configs()  # idempotent
    assert open_clip.get_tokenizer("tiny-rn").context_length == 22
    assert isinstance(open_clip.create_model("tiny-vit").visual, open_clip.transformer.VisionTransformer)


@pytest.mark.parametrize("masksd,tokens", [
    (None, ["text_mask_token"]),
    (MaskSDConfig(branches="none"), []),
])
def test_create_model_by_name_or_config(masksd, tokens):
    by_name = create_model("cris-tiny-rn", masksd)
    by_cfg = create_model(get_model_config("cris-tiny-rn"), masksd)
    for model in (by_name, by_cfg):
        assert isinstance(model, CMMaskSD)
        assert [n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if "mask_token" in n] == tokens


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_local_checkpoint_loads_in_every_wrapping(tmp_path):
    source = create_clip("tiny-rn")
    target_sd = source.state_dict()
    for i, state in enumerate([target_sd, {"state_dict": target_sd},
                               {"state_dict": {f"module.{k}": v for k, v in target_sd.items()}}]):
        path = _save(state, tmp_path / f"ckpt{i}.pt")
        clip = create_clip("tiny-rn", path)
        assert all(torch.equal(v, target_sd[k]) for k, v in clip.state_dict().items())


def test_checkpoint_with_missing_or_unexpected_keys_is_an_error(tmp_path):
    state = create_clip("tiny-rn").state_dict()
    missing = dict(state)
    missing.pop("text_projection")
    with pytest.raises(ValueError, match=r"missing\.pt: not a checkpoint of this CLIP architecture: 1 missing \(e\.g\. text_projection\)"):
        load_clip_weights(create_clip("tiny-rn"), _save(missing, tmp_path / "missing.pt"))
    extra = dict(state, **{"neck.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected \(e\.g\. neck\.extra\)"):
        load_clip_weights(create_clip("tiny-rn"), _save(extra, tmp_path / "extra.pt"))


def test_model_config_with_checkpoint_path_builds_on_those_weights(tmp_path):
    source = create_clip("tiny-vit")
    path = _save(source.state_dict(), tmp_path / "tiny.pt")
    cfg = get_model_config("cris-tiny-vit").model_copy(update={"pretrained": path})
    model = create_model(cfg)
    assert torch.equal(model.seg.backbone.clip.visual.proj, source.visual.proj)


@pytest.mark.slow
@pytest.mark.parametrize("clip_name", ["RN50", "ViT-B-16"])
def test_full_size_random_checkpoint_round_trip(tmp_path, clip_name):
    source = open_clip.create_model(clip_name)
    path = _save(source.state_dict(), tmp_path / f"{clip_name}.pt")
    cfg = ModelConfig(clip=clip_name, pretrained=path, vit_layers=(4, 8, 12))
    model = create_model(cfg)  # raises on any missing or unexpected key
    loaded = model.seg.backbone.clip.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    images = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    tokens = torch.tensor([[49406, 320, 49407] + [0] * 14])
    with torch.no_grad():
        assert model.eval()(images, tokens).shape == (1, 1, 16, 16)


def test_pretrained_file_that_is_unreadable_or_of_another_clip_is_named(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"noise\.pt: unreadable: torch\.load\(weights_only=True\) failed"):
        create_clip("tiny-rn", str(noise))
    vit = _save(create_clip("tiny-vit").state_dict(), tmp_path / "vit.pt")
    clip = create_clip("tiny-rn")
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    with pytest.raises(ValueError, match=r"vit\.pt: not a checkpoint of this CLIP architecture: \d+ missing \(e\.g\. "):
        load_clip_weights(clip, vit)
    assert all(torch.equal(v, before[k]) for k, v in clip.state_dict().items())  # nothing was half loaded
