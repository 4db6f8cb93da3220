"""Evaluation at the original image resolution, over every expression of a split.

Logits at stride 4 -> sigmoid -> upsampled to the letterboxed input -> letterbox undone ->
threshold -> IoU against the ground-truth mask decoded from the original annotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from cmmasksd.data import PreparedSplit, RefSegDataset, unletterbox
from cmmasksd.metrics import intersection_union, ious, summarize


@dataclass
class SplitEvaluation:
    split: str
    metrics: dict[str, float]
    per_expression: pd.DataFrame  # sentence_idx, sent_id, ref_id, object_idx, image_id, inter, union, iou


def upsampled_probabilities(logits: torch.Tensor, size: int) -> torch.Tensor:
    """B x 1 x s x s logits -> B x size x size probabilities on the letterboxed canvas."""
    logits = F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits[:, 0])


@torch.no_grad()
def evaluate_split(
    model: torch.nn.Module,
    split: PreparedSplit,
    *,
    device: torch.device,
    batch_size: int = 32,
    threshold: float = 0.35,
    max_items: int | None = None,
    blank_text: bool = False,
    progress: bool = False,
) -> SplitEvaluation:
    """Per-expression IoUs and the split's summary metrics (see `cmmasksd.metrics`)."""
    dataset = RefSegDataset(split, train=False, blank_text=blank_text, max_items=max_items)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    objects = split.objects
    sentences = split.sentences
    image_ids = split.images["image_id"].to_numpy()  # expressions cluster by image: the statistics resample images
    model.eval()
    rows = []
    for batch in tqdm(loader, desc=f"eval {split.name}", disable=not progress, leave=False):
        logits = model(batch["image"].to(device), batch["tokens"].to(device))
        probs = upsampled_probabilities(logits, split.size)
        for prob, sent_idx, obj_idx in zip(probs, batch["sentence_idx"].tolist(), batch["object_idx"].tolist()):
            image_idx = int(objects.at[obj_idx, "image_idx"])
            pred = unletterbox(prob, split.meta(image_idx)) > threshold
            inter, union = intersection_union(pred.cpu().numpy(), split.gt_mask(obj_idx))
            rows.append(
                {
                    "sentence_idx": sent_idx,
                    "sent_id": int(sentences.at[sent_idx, "sent_id"]),
                    "ref_id": int(objects.at[obj_idx, "ref_id"]),
                    "object_idx": obj_idx,
                    "image_id": int(image_ids[image_idx]),
                    "inter": inter,
                    "union": union,
                }
            )
    table = pd.DataFrame(rows)
    table["iou"] = ious(table["inter"].to_numpy(), table["union"].to_numpy())
    metrics = summarize(table["inter"].to_numpy(), table["union"].to_numpy())
    return SplitEvaluation(split=split.name, metrics=metrics, per_expression=table)

