"""Inference on one image and one expression from a saved checkpoint (the main branch only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmmasksd.config import TrainConfig
from cmmasksd.data import clip_tokenizer, letterbox_image, unletterbox
from cmmasksd.evaluate import upsampled_probabilities
from cmmasksd.model import CMMaskSD, create_model


@dataclass
class LoadedModel:
    model: CMMaskSD
    config: TrainConfig
    input_size: int
    word_len: int
    device: torch.device


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model from the config stored in a `best.pt`/`last.pt` and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    device = torch.device(device)
    state = torch.load(path, map_location=device, weights_only=True)
    if "config" not in state and "fingerprint" in state:
        raise ValueError(f"{path}: a resume checkpoint without the run config; use best.pt from the same folder")
    config = TrainConfig.model_validate(state["config"])
    # the checkpoint holds every weight: build without fetching pretrained CLIP weights first
    model = create_model(config.model.model_copy(update={"pretrained": None}), config.masksd)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    info = state["info"]
    return LoadedModel(model, config, int(info["input_size"]), int(info["word_len"]), device)


@torch.no_grad()
def predict_mask(loaded: LoadedModel, image: Image.Image, text: str) -> np.ndarray:
    """Probability map (H x W, original resolution) that each pixel belongs to the referred object."""
    canvas, meta = letterbox_image(image, loaded.input_size)
    pixels = torch.from_numpy(canvas).permute(2, 0, 1)[None].to(loaded.device)
    tokens = clip_tokenizer(loaded.word_len)([text]).to(loaded.device)
    probs = upsampled_probabilities(loaded.model(pixels, tokens), loaded.input_size)[0]
    return unletterbox(probs, meta).cpu().numpy()
