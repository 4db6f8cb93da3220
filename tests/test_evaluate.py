"""The batched, on-device evaluation scores exactly what one expression at a time does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmmasksd.config import MaskSDConfig
from cmmasksd.data import PreparedSplit, RefSegDataset, unletterbox
from cmmasksd.evaluate import evaluate_split, upsampled_probabilities
from cmmasksd.metrics import intersection_union
from cmmasksd.model.factory import create_model


def one_at_a_time(model, split: PreparedSplit, threshold: float) -> list[tuple[int, int]]:
    """The reference: each expression's map unletterboxed alone, moved to numpy, compared there."""
    counts = []
    dataset = RefSegDataset(split, train=False)
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            logits = model(item["image"][None], item["tokens"][None])
            prob = upsampled_probabilities(logits, split.size)[0]
            image_idx = int(split.object_image[item["object_idx"]])
            pred = unletterbox(prob, split.meta(image_idx)) > threshold
            counts.append(intersection_union(pred.numpy(), split.gt_mask(item["object_idx"])))
    return counts


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batched_evaluation_equals_the_one_at_a_time_reference(prepared_root, batch_size):
    torch.manual_seed(0)
    model = create_model("cris-tiny-rn", MaskSDConfig(branches="none")).eval()
    split = PreparedSplit(prepared_root / "val")
    threshold = 0.5  # random weights: predictions near 0.5, so masks partly on, partly off
    evaluation = evaluate_split(model, split, device=torch.device("cpu"), batch_size=batch_size, threshold=threshold)
    table = evaluation.per_expression
    reference = np.array(one_at_a_time(model, split, threshold))
    assert table["sentence_idx"].tolist() == list(range(split.n_sentences))
    assert 0 < (table["inter"] > 0).sum() < len(table)  # a test that can tell: some hits, some misses
    np.testing.assert_array_equal(table[["inter", "union"]].to_numpy(), reference)
    assert table["object_idx"].tolist() == split.sentence_object.tolist()
    assert table["kind"].tolist() == [split.kinds[0][k] for k in split.kinds[1]]  # per-kind mIoU in the report
