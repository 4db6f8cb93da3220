"""Named model configs and the one way to build a model: `create_model(name_or_config, masksd)`.

As in open_clip, architectures are JSON files found by name: `cmmasksd/model_configs/*.json`
hold `ModelConfig`s (resolved by `cmmasksd.config.get_model_config`, the config layer, which
never imports this module), and `cmmasksd/model_configs/clip/*.json` hold the tiny CLIP
architectures, which `register_clip_configs()` adds to open_clip (then
`open_clip.create_model("tiny-rn")` and `open_clip.get_tokenizer("tiny-rn")` work too).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import open_clip
import torch
from open_clip.model import CLIP

from cmmasksd.config import MODEL_CONFIG_DIR, MaskSDConfig, ModelConfig, get_model_config
from cmmasksd.io.checkpoint import read_checkpoint, weights_mismatch
from cmmasksd.model.backbone import ClipBackbone
from cmmasksd.model.cris import CRIS
from cmmasksd.model.masksd import CMMaskSD

CLIP_CONFIG_DIR = MODEL_CONFIG_DIR / "clip"

_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".safetensors"}
log = logging.getLogger(__name__)


def register_clip_configs() -> None:
    """Add the tiny CLIP architectures to open_clip's registry (idempotent: a second call re-reads them)."""
    open_clip.add_model_config(CLIP_CONFIG_DIR)


def load_clip_weights(clip: CLIP, path: str | Path) -> None:
    """Load a local state dict (raw, or under "state_dict", keys maybe prefixed "module.") strictly.

    The keys and shapes are checked before anything is copied: a mismatch never leaves the CLIP
    half loaded, and the error names the file and a few of the keys.
    """
    state = read_checkpoint(Path(path))
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: not a CLIP state dict (it holds a {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    mismatch = weights_mismatch(clip.state_dict(), state)
    if mismatch:
        raise ValueError(f"{path}: not a checkpoint of this CLIP architecture: {mismatch}")
    clip.load_state_dict(state)


def create_clip(name: str, pretrained: str | None = None) -> CLIP:
    """An open_clip model: random init (None), a local checkpoint file, or an open_clip tag ("openai")."""
    register_clip_configs()
    looks_like_path = (pretrained is not None and not pretrained.startswith("hf-hub:")
                       and (Path(pretrained).suffix in _WEIGHT_SUFFIXES or "/" in pretrained))
    if looks_like_path and not Path(pretrained).is_file():
        raise FileNotFoundError(f"model.pretrained: {pretrained}: no such file (for the default's tiny CLIP, "
                                "run `dvc repro pretrain`)")
    if pretrained is None or Path(pretrained).is_file():
        # open_clip warns "No pretrained weights loaded ... initialized randomly" for a model built
        # without a tag, even when we load a local file next: quiet it, and say what is loaded.
        with _quiet_root_warnings():
            clip = open_clip.create_model(name)
        if pretrained is not None:
            load_clip_weights(clip, pretrained)
        log.info("CLIP %s: %s", name, f"weights from {pretrained}" if pretrained else "random initialisation")
        return clip
    return open_clip.create_model(name, pretrained=pretrained)


@contextlib.contextmanager
def _quiet_root_warnings():
    """open_clip logs through the root logger: hold its WARNINGs back for the duration of a block."""
    level = logging.root.level
    logging.root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.root.setLevel(level)


def create_cris(model_cfg: ModelConfig, with_mask_tokens: bool = False) -> CRIS:
    backbone = ClipBackbone(create_clip(model_cfg.clip, model_cfg.pretrained), model_cfg.vit_layers, with_mask_tokens)
    if model_cfg.freeze_token_embedding:
        backbone.clip.token_embedding.requires_grad_(False)
    return CRIS(backbone, model_cfg)


def create_model(model_cfg: ModelConfig | str, masksd_cfg: MaskSDConfig | None = None,
                 compare_frozen: bool = False) -> CMMaskSD:
    """CRIS from a named or inline config, wrapped with the masked self-distillation branches.

    `masksd_cfg` defaults to the method's defaults (both branches); `branches: none` gives the
    CRIS baseline, with no mask tokens. `compare_frozen`: see `RunConfig.compare_frozen`.
    """
    if isinstance(model_cfg, str):
        model_cfg = get_model_config(model_cfg)
    masksd_cfg = masksd_cfg or MaskSDConfig()
    return CMMaskSD(create_cris(model_cfg, with_mask_tokens=masksd_cfg.branches != "none"), masksd_cfg,
                    compare_frozen)


def parameter_report(model_cfg: ModelConfig | str, masksd_cfg: MaskSDConfig | None = None) -> dict:
    """Parameters of the CRIS baseline vs CM-MaskSD (random init: nothing is downloaded).

    With shared weights the extra parameters are exactly the mask tokens.
    """
    if isinstance(model_cfg, str):
        model_cfg = get_model_config(model_cfg)
    model_cfg = model_cfg.model_copy(update={"pretrained": None})
    baseline = dict(create_model(model_cfg, MaskSDConfig(branches="none")).named_parameters())
    method = dict(create_model(model_cfg, masksd_cfg or MaskSDConfig()).named_parameters())
    return {
        "baseline": _count(baseline),
        "cmmasksd": _count(method),
        "extra": _count(method) - _count(baseline),
        "extra_names": sorted(set(method) - set(baseline)),
    }


def _count(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())
