"""Metrics pinned on hand-made masks, including the empty cases."""

import numpy as np
import pytest

from cmmasksd.metrics import METRIC_NAMES, intersection_union, ious, summarize


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_intersection_union_of_overlapping_boxes():
    a = box(10, 10, 0, 4, 0, 4)  # 16 px
    b = box(10, 10, 2, 6, 2, 6)  # 16 px, overlap 2x2
    assert intersection_union(a, b) == (4, 28)


def test_empty_prediction_against_object_is_zero():
    gt = box(8, 8, 1, 3, 1, 3)
    inter, union = intersection_union(np.zeros_like(gt), gt)
    assert (inter, union) == (0, 4)
    assert ious([inter], [union])[0] == 0.0


def test_both_empty_counts_as_one():
    empty = np.zeros((5, 5), bool)
    inter, union = intersection_union(empty, empty)
    assert (inter, union) == (0, 0)
    assert ious([inter], [union])[0] == 1.0
    m = summarize([inter], [union])
    assert m["miou"] == m["oiou"] == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        intersection_union(np.zeros((2, 2), bool), np.zeros((3, 2), bool))


def test_summary_mean_overall_and_precision():
    # IoUs: 1.0, 0.5, 0.25, 0.6 -> mIoU 0.5875; oIoU = (4+2+1+6) / (4+4+4+10) = 13/22
    inter = np.array([4, 2, 1, 6])
    union = np.array([4, 4, 4, 10])
    m = summarize(inter, union)
    assert set(m) == set(METRIC_NAMES)
    assert m["miou"] == pytest.approx(0.5875)
    assert m["oiou"] == pytest.approx(13 / 22)
    assert m["prec_50"] == pytest.approx(0.75)  # 1.0, 0.5 (>= counts), 0.6
    assert m["prec_60"] == pytest.approx(0.5)
    assert m["prec_70"] == pytest.approx(0.25)
    assert m["prec_80"] == pytest.approx(0.25)
    assert m["prec_90"] == pytest.approx(0.25)


def test_summary_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        summarize(np.array([]), np.array([]))
