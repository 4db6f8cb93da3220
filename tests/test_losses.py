import math

import pytest
import torch
import torch.nn.functional as F

from cmmasksd.losses import distill_loss, seg_loss


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(p * torch.log(p) + (1 - p) * torch.log(1 - p)).mean()


def test_seg_loss_matches_bce_on_hand_values():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    gt = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    expected = -(math.log(0.5) + math.log(1 - 1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1)))
                 + math.log(1 / (1 + math.exp(-3)))) / 4
    assert seg_loss(logits, gt).item() == pytest.approx(expected, rel=1e-6)


def test_seg_loss_resizes_gt_nearest_to_logit_size():
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., 0, :] = 1.0  # top row only: nearest keeps rows 0 and 4 (bilinear or area would give 0 or 0.25)
    logits = torch.tensor([[[[5.0, 5.0], [-5.0, -5.0]]]])
    small_gt = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert seg_loss(logits, gt).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, small_gt).item())


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_distill_of_identical_logits_is_zero(kind):
    logits = torch.randn(2, 1, 5, 5) * 3
    assert distill_loss(logits, logits.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_bce_is_kl_plus_teacher_entropy_and_minimal_at_teacher():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 1, 6, 6), torch.randn(2, 1, 6, 6)
    soft = distill_loss(student, teacher, "soft_bce")
    kl = distill_loss(student, teacher, "kl")
    assert soft.item() == pytest.approx((kl + _entropy(teacher)).item(), rel=1e-5)
    assert distill_loss(teacher, teacher, "soft_bce").item() == pytest.approx(_entropy(teacher).item(), rel=1e-5)
    assert soft.item() > distill_loss(teacher, teacher, "soft_bce").item()


def test_kl_on_hand_values_and_stable_for_confident_logits():
    student, teacher = torch.tensor([0.0]), torch.tensor([math.log(3.0)])  # p_s = 1/2, p_t = 3/4
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert distill_loss(student, teacher, "kl").item() == pytest.approx(expected, rel=1e-6)
    extreme = distill_loss(torch.tensor([-80.0, 80.0]), torch.tensor([80.0, -80.0]), "kl")
    assert torch.isfinite(extreme) and extreme.item() == pytest.approx(80.0, rel=1e-3)


def test_mse_on_probabilities():
    student, teacher = torch.tensor([0.0]), torch.tensor([math.log(3.0)])
    assert distill_loss(student, teacher, "mse").item() == pytest.approx(0.25**2)


@pytest.mark.parametrize("kind", ["soft_bce", "mse", "kl"])
def test_teacher_is_detached(kind):
    student = torch.randn(1, 1, 4, 4, requires_grad=True)
    teacher = torch.randn(1, 1, 4, 4, requires_grad=True)
    distill_loss(student, teacher, kind).backward()
    assert teacher.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="soft_bce"):
        distill_loss(torch.zeros(1), torch.zeros(1), "l1")
