"""Segmentation and self-distillation losses on per-pixel binary logits.

Computed in float32: under bf16 autocast the log-sigmoids of confident pixels would lose
the small differences the distillation terms are made of.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DistillKind = Literal["soft_bce", "mse", "kl"]


def seg_loss(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """BCE with logits against the ground truth resized (nearest, as CRIS) to the logits' size."""
    if gt.shape[-2:] != logits.shape[-2:]:
        gt = F.interpolate(gt.float(), size=logits.shape[-2:], mode="nearest")
    return F.binary_cross_entropy_with_logits(logits.float(), gt.float())


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: DistillKind) -> torch.Tensor:
    """D(student, stopgrad(teacher)), averaged over pixels; the teacher is detached here.

    soft_bce: BCE against sigmoid(teacher) (= KL plus the teacher's entropy, same gradient);
    mse: squared error of the probabilities; kl: pixel-wise binary KL(teacher || student).
    """
    student, teacher = student.float(), teacher.detach().float()
    if kind == "soft_bce":
        return F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    if kind == "mse":
        return F.mse_loss(torch.sigmoid(student), torch.sigmoid(teacher))
    if kind == "kl":
        p = torch.sigmoid(teacher)
        log_ratio_pos = F.logsigmoid(teacher) - F.logsigmoid(student)
        log_ratio_neg = F.logsigmoid(-teacher) - F.logsigmoid(-student)
        return (p * log_ratio_pos + (1 - p) * log_ratio_neg).mean()
    raise ValueError(f"unknown distill loss {kind!r}; expected soft_bce, mse or kl")
