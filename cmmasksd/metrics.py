"""Referring-segmentation metrics as the RIS literature reports them.

Conventions (stated once, used everywhere):
- IoU of one expression = |pred & gt| / |pred | gt| at the ORIGINAL image resolution.
  When both masks are empty the union is 0 and the IoU counts as 1 (a correct "nothing");
  a non-empty union with no intersection is 0.
- mIoU = mean over expressions of IoU; oIoU = sum of intersections / sum of unions.
- Prec@X = fraction of expressions with IoU >= X, for X in 0.5..0.9.
Metric names below are stable: the tracking and report stages depend on them.
"""

from __future__ import annotations

import numpy as np

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_NAMES = ("miou", "oiou", *(f"prec_{round(t * 100)}" for t in PREC_THRESHOLDS))


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts of intersection and union of two boolean masks of the same shape."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred, gt = pred.astype(bool, copy=False), gt.astype(bool, copy=False)
    return int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())


def ious(intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
    """Per-expression IoU; both-empty (union 0) counts as 1."""
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def summarize(intersections: np.ndarray, unions: np.ndarray) -> dict[str, float]:
    """mIoU, oIoU and Prec@0.5..0.9 over all expressions of a split."""
    inter = np.asarray(intersections, dtype=np.float64)
    union = np.asarray(unions, dtype=np.float64)
    if inter.size == 0:
        raise ValueError("cannot summarize an empty set of expressions")
    per_expr = ious(inter, union)
    total_union = union.sum()
    metrics = {
        "miou": float(per_expr.mean()),
        "oiou": float(inter.sum() / total_union) if total_union > 0 else 1.0,
    }
    for t in PREC_THRESHOLDS:
        metrics[f"prec_{round(t * 100)}"] = float((per_expr >= t - 1e-12).mean())
    return metrics
