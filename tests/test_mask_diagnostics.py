"""Mask hit rates: the counting on hand-made masks, the content words, per expression kind, the frozen
scorer's alongside the live one's, and the per-epoch metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tokenize

from cmmasksd.config import MaskSDConfig, build_config
from cmmasksd.data.refshapes import COLOURS, SHAPES, SIZES
from cmmasksd.model import create_model
from cmmasksd.model.mask_stats import STOP_WORDS, MaskStats, content_token_mask, stop_token_ids
from cmmasksd.model.masksd import real_word_mask, select_masked
from cmmasksd.train import train

LMVSD_KEYS = {"mask/lmvsd_hit", "mask/lmvsd_chance", "mask/lmvsd_coverage", "mask/lmvsd_coverage_chance"}
VMLSD_KEYS = {"mask/vmlsd_hit", "mask/vmlsd_chance"}
KEYS = LMVSD_KEYS | VMLSD_KEYS


def object_and_masks():
    """An 8 x 8 image whose object is the top-left 4 x 4 quarter, and masks on and off it."""
    gt = torch.zeros(1, 1, 8, 8)
    gt[..., :4, :4] = 1.0
    on, off = torch.zeros(1, 8, 8, dtype=torch.bool), torch.zeros(1, 8, 8, dtype=torch.bool)
    on[:, :2, :2] = True
    off[:, 4:, 4:] = True
    return gt, on, off


def test_lmvsd_hit_is_the_masked_share_on_the_object_against_its_area():
    gt, on, off = object_and_masks()
    # on: 4 px, all on the 16 px object; off: 16 px, none on it. Coverage: masked object px / object
    # px; its chance: masked px / image px.
    for mask, hit, coverage, masked in ((on, 1.0, 4 / 16, 4), (off, 0.0, 0.0, 16)):
        stats = MaskStats()
        stats.add_lmvsd(mask, gt)
        assert stats.metrics() == {"mask/lmvsd_hit": hit, "mask/lmvsd_chance": 16 / 64,
                                   "mask/lmvsd_coverage": coverage, "mask/lmvsd_coverage_chance": masked / 64}


def test_lmvsd_counts_cells_of_several_pixels():
    gt, _, _ = object_and_masks()
    cells = torch.tensor([[[True, True], [False, False]]])  # 4 px cells: the object's and the one right of it
    stats = MaskStats()
    stats.add_lmvsd(cells, gt)
    # 32 px masked (the top half), 16 of them the whole object
    assert stats.metrics() == {"mask/lmvsd_hit": 0.5, "mask/lmvsd_chance": 16 / 64,
                               "mask/lmvsd_coverage": 16 / 16, "mask/lmvsd_coverage_chance": 32 / 64}


def test_hit_rates_weigh_every_masked_pixel_not_every_batch():
    gt, on, off = object_and_masks()
    stats = MaskStats()
    stats.add_lmvsd(on, gt)  # 4 px masked, all on the object
    stats.add_lmvsd(on | off, torch.zeros_like(gt))  # 20 px masked, no object: 4 of 24 on an object
    # coverage: 4 of the 16 object px (the second image has none); its chance: 24 of 128 px masked
    assert stats.metrics() == {"mask/lmvsd_hit": 4 / 24, "mask/lmvsd_chance": 16 / 128,
                               "mask/lmvsd_coverage": 4 / 16, "mask/lmvsd_coverage_chance": 24 / 128}


def test_random_masks_hit_the_object_at_chance():
    torch.manual_seed(0)
    gt = torch.zeros(4000, 1, 8, 8)
    gt[..., :3, 2:7] = 1.0  # 15 of 64 cells
    masked = select_masked(torch.zeros(4000, 64), torch.full((4000,), 16), "random", 0.1).view(4000, 8, 8)
    stats = MaskStats()
    stats.add_lmvsd(masked, gt)
    metrics = stats.metrics()
    assert metrics["mask/lmvsd_chance"] == 15 / 64
    assert metrics["mask/lmvsd_hit"] == pytest.approx(15 / 64, abs=0.01)
    # random cells cover the object as they cover anything: the masked share of the image, 16 / 64
    assert metrics["mask/lmvsd_coverage_chance"] == 16 / 64
    assert metrics["mask/lmvsd_coverage"] == pytest.approx(16 / 64, abs=0.01)


def test_vmlsd_hit_counts_masked_content_words_against_their_share():
    tokens = tokenize("the red circle to the left of the blue square")  # content: red circle left blue square
    real = real_word_mask(tokens)
    masked = torch.zeros_like(real)
    masked[0, [1, 2, 5]] = True  # "the", "red", the second "the"
    stats = MaskStats()
    stats.add_vmlsd(masked, tokens, real)
    assert stats.metrics() == {"mask/vmlsd_hit": 1 / 3, "mask/vmlsd_chance": 5 / 10}


def test_refshapes_position_colour_shape_and_size_words_are_content():
    content = [*COLOURS, *SHAPES, *SIZES, "big", "largest", "smallest", "leftmost", "rightmost", "top", "bottom",
               "left", "right", "above", "below", "object", "shape"]
    function = ["the", "to", "of", "on", "at"]
    tokens = tokenize(" ".join(content), " ".join(function))
    real = real_word_mask(tokens)
    content_mask = content_token_mask(tokens, real)
    assert torch.equal(content_mask[0], real[0]) and not content_mask[1].any()
    assert len(stop_token_ids()) == len(STOP_WORDS)  # every stop word is one BPE token


def test_no_masks_no_metrics_and_nothing_masked_is_nan():
    assert MaskStats().metrics() == {}
    tokens = tokenize("")
    stats = MaskStats()
    stats.add_vmlsd(torch.zeros_like(tokens, dtype=torch.bool), tokens, real_word_mask(tokens))
    assert all(math.isnan(v) for v in stats.metrics().values()) and len(stats.metrics()) == 2


def one_epoch(tiny_config, **masksd) -> dict[str, float]:
    """The metrics of one epoch of two steps (16 objects at batch 8); dotted keys as they are, others
    under `masksd`."""
    config = tiny_config(**{k if "." in k else f"masksd.{k}": v for k, v in masksd.items()}, data__max_train_objects=16,
                         data__max_eval_expressions=8, optim__epochs=1, optim__milestones=[], run__num_overlays=0)
    epochs = []
    train(build_config(config), on_epoch=lambda report: epochs.append(report.metrics))
    return epochs[0]


def test_epoch_metrics_hold_the_hit_rates_only_when_the_branches_run(tiny_config):
    metrics = one_epoch(tiny_config, mask_cell=8)  # 64 px: an 8 x 8 grid of 8 px cells
    assert KEYS <= set(metrics) and all(0.0 <= metrics[k] <= 1.0 for k in KEYS)
    baseline = one_epoch(tiny_config, branches="none")
    assert not any(k.startswith("mask/") for k in baseline)


def training_stats(cfg: MaskSDConfig) -> MaskStats:
    """The counts of one tiny RN training step at 96 px."""
    torch.manual_seed(0)
    model = create_model("cris-tiny-rn", cfg).train()
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    gt = (torch.rand(2, 1, 96, 96) > 0.5).float()
    stats = MaskStats()
    loss, _ = model.training_loss(images, tokenize("the red circle", "the small blue square on the left"), gt, stats)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    return stats


@pytest.mark.parametrize("switches,reported", [({"branches": "lmvsd"}, LMVSD_KEYS), ({"lambda_v": 0.0}, VMLSD_KEYS)],
                         ids=["vmlsd-off", "lmvsd-weight-0"])
def test_a_branch_that_does_not_run_reports_nothing(switches, reported):
    keys = training_stats(MaskSDConfig(**switches)).metrics()
    assert set(keys) == reported


def test_cell_mask_at_96px_trains_and_counts_for_corr_top_and_random():
    runs = {strategy: training_stats(MaskSDConfig(mask_cell=12, strategy=strategy))
            for strategy in ("corr_top", "random")}
    for stats in runs.values():
        assert stats.sums["lmvsd"][:, 1].sum() == 2 * 32 * 12 * 12  # masked px: round(0.5 * 64) cells of 12 x 12 px each
        metrics = stats.metrics()
        assert set(metrics) == KEYS and all(0.0 <= v <= 1.0 for v in metrics.values())
    for key in ("mask/lmvsd_chance", "mask/vmlsd_chance"):  # the same samples, whatever the strategy
        assert runs["corr_top"].metrics()[key] == runs["random"].metrics()[key]
    for stats in runs.values():  # 32 of the 64 cells of each image, whatever the strategy
        assert stats.metrics()["mask/lmvsd_coverage_chance"] == 0.5


def test_rates_per_kind_and_over_all_kinds():
    gt, on, off = object_and_masks()
    stats = MaskStats(("attribute", "positional", "relational"))
    stats.add_lmvsd(torch.cat([on, off]), torch.cat([gt, gt]), kind=torch.tensor([0, 2]))
    metrics = stats.metrics()
    assert metrics["mask/attribute/lmvsd_coverage"] == 4 / 16  # `on`: 4 of the object's 16 px
    assert metrics["mask/relational/lmvsd_coverage"] == 0.0  # `off`: none of them
    assert math.isnan(metrics["mask/positional/lmvsd_hit"])  # no positional sample: undefined
    assert metrics["mask/lmvsd_coverage"] == 4 / 32 and metrics["mask/lmvsd_hit"] == 4 / 20  # pooled
    # one kind (real data): no per-kind keys
    single = MaskStats()
    single.add_lmvsd(on, gt)
    assert set(single.metrics()) == LMVSD_KEYS


def test_frozen_source_is_logged_beside_the_masks_in_use():
    gt, on, off = object_and_masks()
    stats = MaskStats()
    stats.add_lmvsd(off, gt)
    stats.add_lmvsd(on, gt, source="frozen")
    metrics = stats.metrics()
    assert metrics["mask/lmvsd_hit"] == 0.0 and metrics["mask/frozen/lmvsd_hit"] == 1.0


def test_the_frozen_comparison_counts_the_frozen_scorers_masks_and_changes_no_draw(tiny_cris):
    """With a sampled strategy the comparison draws random numbers: under a forked state, so the live
    masks and everything after them are those of a model without it."""
    from cmmasksd.model import CMMaskSD

    images, tokens = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), tokenize("the red circle", "the cube")
    gt = (torch.rand(2, 1, 64, 64) > 0.5).float()
    config = MaskSDConfig(scorer="live", strategy="corr_sample", mask_cell=8)
    runs = {}
    for compare in (False, True):
        model = CMMaskSD(copy.deepcopy(tiny_cris["rn"]), config, compare_frozen=compare).train()
        torch.manual_seed(3)
        stats = MaskStats()
        loss, _ = model.training_loss(images, tokens, gt, stats)
        runs[compare] = (loss.detach(), torch.rand(1), stats)
    assert torch.equal(runs[False][0], runs[True][0]) and torch.equal(runs[False][1], runs[True][1])
    assert runs[False][2].sums.keys() == {"lmvsd", "vmlsd"}
    assert runs[True][2].sums.keys() == {"lmvsd", "vmlsd", "frozen/lmvsd", "frozen/vmlsd"}
    assert torch.equal(runs[True][2].sums["lmvsd"], runs[False][2].sums["lmvsd"])
    # what the frozen scorer's masks would count: those of a model that scores with it
    scored = CMMaskSD(copy.deepcopy(tiny_cris["rn"]), config.model_copy(update={"scorer": "frozen",
                                                                                "strategy": "corr_top"}))
    comparing = CMMaskSD(copy.deepcopy(tiny_cris["rn"]), config.model_copy(update={"strategy": "corr_top"}),
                         compare_frozen=True)
    counted = []
    for model in (scored.train(), comparing.train()):
        stats = MaskStats()
        model.training_loss(images, tokens, gt, stats)
        counted.append(stats.sums)
    assert torch.equal(counted[0]["lmvsd"], counted[1]["frozen/lmvsd"])
    assert torch.equal(counted[0]["vmlsd"], counted[1]["frozen/vmlsd"])


@pytest.mark.parametrize("config", [MaskSDConfig(scorer="frozen"), MaskSDConfig(scorer="live", strategy="random"),
                                    MaskSDConfig(branches="none")], ids=["frozen", "random", "cris"])
def test_no_comparison_where_it_would_say_nothing(tiny_cris, config):
    from cmmasksd.model import CMMaskSD

    model = CMMaskSD(copy.deepcopy(tiny_cris["rn"]), config, compare_frozen=True)
    assert not model.compares_frozen
    assert (model.frozen is not None) == (config.scorer == "frozen" and config.branches != "none")


@pytest.mark.slow
def test_an_epoch_logs_the_frozen_scorers_rates_and_each_kinds(tiny_config):
    metrics = one_epoch(tiny_config, mask_cell=8, scorer="live", **{"run.compare_frozen": True})
    kinds = ("attribute", "positional", "relational")  # the debug data is RefShapes
    for prefix in ("mask/", "mask/frozen/"):
        assert {prefix + k.removeprefix("mask/") for k in KEYS} <= set(metrics)
        for kind in kinds:
            assert f"{prefix}{kind}/lmvsd_coverage" in metrics and f"{prefix}{kind}/vmlsd_hit" in metrics
