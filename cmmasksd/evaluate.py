"""Evaluation at the original image resolution, over every expression of a split.

Logits at stride 4 -> sigmoid -> upsampled to the letterboxed input -> letterbox undone ->
threshold -> IoU against the ground-truth mask decoded from the original annotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cmmasksd.data import PreparedSplit, RefSegDataset, unletterbox
from cmmasksd.distributed import Dist, gather_objects
from cmmasksd.metrics import ious, summarize


@dataclass
class SplitEvaluation:
    split: str
    metrics: dict[str, float]
    per_expression: pd.DataFrame  # sentence_idx, sent_id, ref_id, object_idx, image_id, kind, inter, union, iou


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
    """Per-expression IoUs and the split's summary metrics (see `cmmasksd.metrics`).

    The arithmetic stays on the device, a batch at a time: the expressions of one image (they
    are consecutive) are unletterboxed in one call and compared with their objects' masks, each
    decoded once; only the counts come back. In a process group each rank scores every
    world-th expression and every rank gets the whole table.
    """
    ctx = Dist.current()
    dataset = RefSegDataset(split, train=False, blank_text=blank_text, max_items=max_items)
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world)) if ctx.world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    model.eval()
    counts = []
    for batch in tqdm(loader, desc=f"eval {split.name}", disable=not (progress and ctx.main), leave=False):
        logits = model(batch["image"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))
        probs = upsampled_probabilities(logits, split.size)
        counts.append(_count_batch(probs, batch["object_idx"].numpy(), split, threshold))
    sentence_idx = np.asarray(shard.indices if ctx.world > 1 else range(len(dataset)), dtype=np.int64)
    inter_union = torch.cat(counts).cpu().numpy() if counts else np.zeros((0, 2), dtype=np.int64)
    parts = gather_objects((sentence_idx, inter_union), ctx)
    sentence_idx = np.concatenate([p[0] for p in parts])
    inter_union = np.concatenate([p[1] for p in parts])
    order = np.argsort(sentence_idx, kind="stable")
    return _evaluation(split, sentence_idx[order], inter_union[order])


def _count_batch(probs: torch.Tensor, object_idx: np.ndarray, split: PreparedSplit, threshold: float) -> torch.Tensor:
    """B x 2 (intersection, union) at the original resolution, on the device, in batch order."""
    image_idx = split.object_image[object_idx]
    counts = torch.empty((len(object_idx), 2), dtype=torch.int64, device=probs.device)
    for image in dict.fromkeys(image_idx.tolist()):  # each image once, in order of first appearance
        rows = np.flatnonzero(image_idx == image)
        at = torch.from_numpy(rows).to(probs.device)
        pred = unletterbox(probs[at], split.meta(image)) > threshold
        objects, which = np.unique(object_idx[rows], return_inverse=True)
        gt = torch.from_numpy(np.stack([split.gt_mask(int(o)) for o in objects])).to(probs.device)[which]
        counts[at] = torch.stack(
            [(pred & gt).sum(dim=(1, 2)), (pred | gt).sum(dim=(1, 2))], dim=1)
    return counts


def _evaluation(split: PreparedSplit, sentence_idx: np.ndarray, inter_union: np.ndarray) -> SplitEvaluation:
    objects = split.objects
    object_idx = split.sentence_object[sentence_idx].astype(np.int64)
    image_ids = split.images["image_id"].to_numpy()  # expressions cluster by image: the statistics resample images
    table = pd.DataFrame({
        "sentence_idx": sentence_idx,
        "sent_id": split.sentences["sent_id"].to_numpy()[sentence_idx].astype(np.int64),
        "ref_id": objects["ref_id"].to_numpy()[object_idx].astype(np.int64),
        "object_idx": object_idx,
        "image_id": image_ids[split.object_image[object_idx]].astype(np.int64),
        "kind": np.asarray(split.kinds[0])[split.kinds[1][sentence_idx]],
        "inter": inter_union[:, 0].astype(np.int64),
        "union": inter_union[:, 1].astype(np.int64),
    })
    table["iou"] = ious(table["inter"].to_numpy(), table["union"].to_numpy())
    metrics = summarize(table["inter"].to_numpy(), table["union"].to_numpy())
    return SplitEvaluation(split=split.name, metrics=metrics, per_expression=table)
