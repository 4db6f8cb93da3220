"""Pictures people would rather look at than numbers: mask overlays and learning curves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cmmasksd.data import PreparedSplit, RefSegDataset  # noqa: E402
from cmmasksd.evaluate import upsampled_probabilities  # noqa: E402

PRED_COLOUR = (255, 40, 40)
GT_COLOUR = (40, 220, 40)


def overlay_mask(image: np.ndarray, mask: np.ndarray, colour=PRED_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """Blend `colour` into the pixels of `mask` (H x W bool) over an H x W x 3 uint8 image."""
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out.clip(0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, mask: np.ndarray, text: str, path: Path) -> Path:
    """One prediction: the image, the predicted mask in red, the expression as the title."""
    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(overlay_mask(image, mask))
    ax.set_title("\n".join(textwrap.wrap(text, 50)) or "(empty expression)", fontsize=10)
    ax.axis("off")
    return _save(fig, path, dpi=120)


@torch.no_grad()
def save_prediction_overlays(
    model: torch.nn.Module,
    split: PreparedSplit,
    per_expression: pd.DataFrame,
    path: Path,
    *,
    device: torch.device,
    count: int = 4,
    threshold: float = 0.35,
    blank_text: bool = False,
) -> Path:
    """A grid of `count` expressions spread from the best to the worst IoU: the ground truth outlined
    in green beside the prediction filled in red, on the letterboxed input, with expression and IoU."""
    ranked = per_expression.sort_values("iou", ascending=False).reset_index(drop=True)
    picks = ranked.iloc[np.unique(np.linspace(0, len(ranked) - 1, num=min(count, len(ranked))).round().astype(int))]
    dataset = RefSegDataset(split, train=False, blank_text=blank_text)
    model.eval()
    fig, axes = plt.subplots(len(picks), 2, figsize=(6, 3.2 * len(picks)), squeeze=False)
    for row, (_, pick) in zip(axes, picks.iterrows()):
        item = dataset[int(pick["sentence_idx"])]
        logits = model(item["image"][None].to(device), item["tokens"][None].to(device))
        pred = (upsampled_probabilities(logits, split.size)[0] > threshold).cpu().numpy()
        image = item["image"].permute(1, 2, 0).numpy()
        gt = item["mask"][0].numpy() > 0.5
        text = split.sentences.at[int(pick["sentence_idx"]), "text"]
        row[0].imshow(image)
        row[0].contour(gt, levels=[0.5], colors=[np.asarray(GT_COLOUR) / 255], linewidths=2)
        row[0].set_title("\n".join(textwrap.wrap(f"{text}  (ground truth)", 40)), fontsize=8)
        row[1].imshow(overlay_mask(image, pred, PRED_COLOUR))
        row[1].contour(gt, levels=[0.5], colors=[np.asarray(GT_COLOUR) / 255], linewidths=1)
        row[1].set_title(f"prediction (IoU {pick['iou']:.2f})", fontsize=8)
        for ax in row:
            ax.axis("off")
    return _save(fig, path)


def save_learning_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Train losses and val mIoU/oIoU per epoch, side by side."""
    frame = pd.DataFrame(history)
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    for col in [c for c in frame.columns if c.startswith("train/")]:
        ax_loss.plot(frame["epoch"], frame[col], marker="o", label=col.removeprefix("train/"))
    ax_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax_loss.legend(fontsize=8)
    for col in ("val/miou", "val/oiou"):
        if col in frame:
            ax_val.plot(frame["epoch"], frame[col], marker="o", label=col)
    ax_val.set(xlabel="epoch", ylabel="IoU", title="validation", ylim=(0, 1))
    ax_val.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path, dpi: int = 110) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def load_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB, naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
