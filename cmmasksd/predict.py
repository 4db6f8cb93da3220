"""Inference on one image and one expression from a saved checkpoint (the main branch only)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from cmmasksd.config import TrainConfig
from cmmasksd.errors import format_validation_error
from cmmasksd.data import clip_tokenizer, letterbox_image, unletterbox
from cmmasksd.evaluate import upsampled_probabilities
from cmmasksd.io.checkpoint import CheckpointError, first_sentence, read_checkpoint, weights_mismatch
from cmmasksd.model import CMMaskSD, create_model


NOT_A_CHECKPOINT = "not a cmmasksd checkpoint (expected a best.pt written by `cmmasksd train`)"


@dataclass
class LoadedModel:
    model: CMMaskSD
    config: TrainConfig
    input_size: int
    word_len: int
    device: torch.device


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model from the config stored in a `best.pt` and load its weights.

    Anything else (a file torch refuses with weights_only=True, another program's file, a
    resume `last.pt`, weights of another architecture) is a one-line ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = _load_state(path)
    if "config" not in state and "identity" in state:  # what train's last.pt holds instead
        raise ValueError(f"{path}: a resume checkpoint without the run config; use best.pt from the same folder")
    missing = sorted({"config", "model", "info"} - set(state))
    if missing or not isinstance(state["model"], dict):
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}; it has no {', '.join(missing) or 'state_dict under model'}")
    try:
        config = TrainConfig.model_validate(state["config"])
    except ValidationError as err:
        raise ValueError(f"{path}: its config is not valid: {format_validation_error(err, TrainConfig)}") from err
    try:
        # The checkpoint holds every weight: no pretrained CLIP weights are fetched. Quiet, as
        # open_clip logs each build step and warns that no pretrained weights were loaded.
        with _quiet_logging():
            # the frozen scorer only draws training masks: prediction builds none
            masksd = config.masksd.model_copy(update={"scorer": "live"})
            model = create_model(config.model.model_copy(update={"pretrained": None}), masksd)
    except (RuntimeError, TypeError, ValueError) as err:  # e.g. a CLIP name this open_clip does not know
        raise ValueError(f"{path}: cannot build the model its config describes: {first_sentence(err)}") from err
    _check_weights(path, model, state["model"])
    model.load_state_dict(state["model"])
    device = torch.device(device)
    model.to(device).eval()
    info = state["info"]
    return LoadedModel(model, config, int(info["input_size"]), int(info["word_len"]), device)


def _load_state(path: Path) -> dict:
    try:
        state = read_checkpoint(path)
    except CheckpointError as err:
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}; {err.reason.removeprefix('unreadable: ')}") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}; it holds a {type(state).__name__}, not a dict")
    return state


def _check_weights(path: Path, model: CMMaskSD, weights: dict) -> None:
    """A mismatch as counts and a few keys: load_state_dict would list every key of another architecture."""
    mismatch = weights_mismatch(model.state_dict(), weights)
    if mismatch:
        raise ValueError(f"{path}: its weights do not fit the model its config describes: {mismatch}")


@contextmanager
def _quiet_logging():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


@torch.no_grad()
def predict_mask(loaded: LoadedModel, image: Image.Image, text: str) -> np.ndarray:
    """Probability map (H x W, original resolution) that each pixel belongs to the referred object."""
    canvas, meta = letterbox_image(image, loaded.input_size)
    pixels = torch.from_numpy(np.array(canvas)).permute(2, 0, 1)[None].to(loaded.device)
    tokens = clip_tokenizer(loaded.word_len)([text]).to(loaded.device)
    probs = upsampled_probabilities(loaded.model(pixels, tokens), loaded.input_size)[0]
    return unletterbox(probs, meta).cpu().numpy()
