"""Where the masks come from and what they hide: BatchNorm statistics left to the clean pass, the
unbiased chance of the word hit rate, the frozen and the prediction scorers, centred correlation,
what a ResNet's masked cells show, BERT's word noise, and the MaskRIS recipe.

The library modules are imported as modules (`masksd.correlation_scores`, ...) so that the tests
that guard a fixed defect collect, and fail, against the code before the fix too.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import make_batch, masked_inputs, patch_masks, record_calls, tokenize, word_masks, wrap
from pydantic import ValidationError
from torch import nn

from cmmasksd.config import MaskSDConfig
from cmmasksd.model import (
    TextFeatures,
    VisualFeatures,
    mask_stats,
    masksd,
    parameter_report,
)
from cmmasksd.model.batchnorm import clean_batch_stats
from cmmasksd.model.towers import resnet

# ---- a. BatchNorm's running statistics describe clean images --------------------------------------


def batchnorm_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{buf}": getattr(m, buf).clone() for name, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for buf in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("kind,switches", [("rn", {}), ("rn", {"mask_cell": 8, "strategy": "random"}), ("vit", {})],
                         ids=["rn-both", "rn-both-8px-random", "vit-both"])
def test_masked_passes_leave_batchnorm_running_stats_to_the_clean_pass(tiny_cris, kind, switches):
    """Defect fixed: the masked passes also updated the running statistics that evaluation uses.
    After a training step they hold what the clean pass alone gives (the RN tower and the CRIS
    neck have BatchNorm; the ViT only the neck)."""
    torch.manual_seed(0)
    model = wrap(tiny_cris, kind, branches="both", **switches)
    clean_only = copy.deepcopy(model.seg).train()  # the same initial buffers
    images, tokens, gt = make_batch(64)
    decodes = record_calls(model.seg, "decode")
    torch.manual_seed(1)  # the decoder's dropout: the same draws in both clean passes
    model.training_loss(images, tokens, gt)
    assert len(decodes) == 3  # the clean pass and both masked passes ran
    torch.manual_seed(1)
    with torch.no_grad():
        clean_only(images, tokens)
    got, want = batchnorm_state(model.seg), batchnorm_state(clean_only)
    assert got.keys() == want.keys() and len(got) >= 3
    assert not [k for k in got if not torch.equal(got[k], want[k])]
    assert all(v.item() == 1 for k, v in got.items() if k.endswith("num_batches_tracked"))  # one pass, not three


def test_clean_batch_stats_normalises_by_the_batch_and_restores_tracking():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3).train()
    x = 5 + 3 * torch.randn(8, 3, 4, 4)
    before = batchnorm_state(norm)
    with clean_batch_stats(norm):
        y = norm(x)
        assert norm.momentum == 0.0
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # the batch's statistics, not the running (0, 1)
    assert y.var(dim=(0, 2, 3), unbiased=False).sub(1).abs().max() < 1e-3
    assert all(torch.equal(v, batchnorm_state(norm)[k]) for k, v in before.items())
    assert norm.momentum == 0.1
    with pytest.raises(RuntimeError, match="inside"), clean_batch_stats(norm):
        raise RuntimeError("inside")
    assert norm.momentum == 0.1  # restored on an error too
    norm(x)
    assert norm.num_batches_tracked.item() == 1


# ---- b. the word hit rate's chance is what random masks hit ---------------------------------------


def test_vmlsd_chance_is_the_expected_hit_of_random_masks_over_expressions_of_different_lengths():
    """Defect fixed: chance was content tokens / real tokens over the batch. The one-word minimum
    masks a 1-word expression wholly and a 10-word one at 0.3, so the short one weighs more in what
    random masks hit than in the token count.

    "red": 1 real token, 1 content, 1 masked. "it is the one to the left of the red": 10 real
    tokens, 3 content (one, left, red), 3 masked. Random masks hit (1 + 3 * 3/10) / 4 = 0.475 content
    tokens per masked token in expectation; the old chance was (1 + 3) / (1 + 10) = 0.364.
    """
    pair = tokenize("red", "it is the one to the left of the red")
    real = masksd.real_word_mask(pair)
    content = mask_stats.content_token_mask(pair, real)
    assert real.sum(1).tolist() == [1, 10] and content.sum(1).tolist() == [1, 3]
    k = masksd.mask_count(0.3, real.sum(1))
    assert k.tolist() == [1, 3]
    expected = (1 * 1 / 1 + 3 * 3 / 10) / (1 + 3)
    old = (1 + 3) / (1 + 10)
    assert abs(expected - old) > 0.1

    copies = 4000
    tokens = pair.repeat(copies, 1)
    real = masksd.real_word_mask(tokens)
    torch.manual_seed(0)
    masked = masksd.select_masked(torch.zeros(tokens.shape), masksd.mask_count(0.3, real.sum(1)), "random", 0.1,
                                  valid=real)
    stats = mask_stats.MaskStats()
    stats.add_vmlsd(masked, tokens, real)
    metrics = stats.metrics()
    assert metrics["mask/vmlsd_chance"] == pytest.approx(expected, rel=1e-12)
    # The hit over 4000 pairs: 16000 masked tokens, the long expression's hits hypergeometric
    # (variance 3 * 0.3 * 0.7 * 7/9 = 0.49 per pair): standard error 0.7 / (4 * sqrt(4000)) = 0.0028;
    # 0.015 is over 5 of them, and the old chance is 0.11 away.
    assert metrics["mask/vmlsd_hit"] == pytest.approx(expected, abs=0.015)
    assert metrics["mask/vmlsd_hit"] == pytest.approx(metrics["mask/vmlsd_chance"], abs=0.015)


# ---- c. the frozen scorer ---------------------------------------------------------------------------


def test_frozen_scorer_is_outside_the_state_the_optimizer_and_the_parameter_counts(tiny_cris):
    live, scored = wrap(tiny_cris, "rn"), wrap(tiny_cris, "rn", scorer="frozen")
    assert live.frozen is None and scored.frozen is not None
    assert set(scored.state_dict()) == set(live.state_dict())  # a checkpoint of either loads into the other
    live.load_state_dict(scored.state_dict())
    scorer_ids = {id(p) for p in scored.frozen.backbone.parameters()}
    assert scorer_ids and not scorer_ids & {id(p) for p in scored.parameters()}
    assert not scorer_ids & {id(p) for group in scored.param_groups() for p in group}
    assert not any(p.requires_grad for p in scored.frozen.backbone.parameters())
    assert parameter_report("cris-tiny-rn", MaskSDConfig(scorer="frozen")) == parameter_report("cris-tiny-rn")


def test_frozen_scorer_keeps_the_initial_weights_eval_mode_and_masks_while_the_model_trains(tiny_cris):
    torch.manual_seed(0)
    model = wrap(tiny_cris, "rn", scorer="frozen")
    initial_backbone = copy.deepcopy(model.seg.backbone.state_dict())
    initial_scorer = copy.deepcopy(model.frozen.backbone.state_dict())
    assert initial_scorer.keys() == initial_backbone.keys()
    assert all(torch.equal(initial_scorer[k], initial_backbone[k]) for k in initial_backbone)

    backbone_params, rest = model.param_groups()
    optimizer = torch.optim.AdamW([{"params": backbone_params}, {"params": rest}], lr=1e-2)
    images, tokens, gt = make_batch(64)
    for _ in range(2):
        optimizer.zero_grad()
        model.training_loss(images, tokens, gt)[0].backward()
        optimizer.step()
    model.train()

    trained = model.seg.backbone.state_dict()
    assert any(not torch.equal(trained[k], initial_backbone[k]) for k in initial_backbone)  # the live one moved
    now = model.frozen.backbone.state_dict()
    assert not [k for k in initial_scorer if not torch.equal(now[k], initial_scorer[k])]  # BN buffers included
    assert not any(m.training for m in model.frozen.backbone.modules())

    # The masks of the next step are those a fresh model's frozen scorer draws: they do not drift.
    fresh = wrap(tiny_cris, "rn", scorer="frozen")
    with torch.no_grad():
        vis, txt = fresh.frozen.encode(images, tokens)
        want_cells, want_words = fresh.patch_mask(vis, txt), fresh.word_mask(vis, txt, tokens)
    image_calls, text_calls = masked_inputs(model)
    model.training_loss(images, tokens, gt)
    (cells,), ((_, words),) = patch_masks(image_calls), word_masks(text_calls)
    assert torch.equal(cells, want_cells) and torch.equal(words, want_words)
    assert want_cells.any() and want_words.any()
    # ... while the live model's own features have left the pretrained ones
    with torch.no_grad():
        live_sentence = model.seg.encode_text(tokens).sentence
    assert not torch.allclose(live_sentence, txt.sentence, atol=1e-4)


# ---- d. the prediction scorer ------------------------------------------------------------------------


def test_prediction_scorer_masks_the_cells_of_highest_mean_probability(tiny_cris):
    # 64 px, 8 px cells: an 8 x 8 grid; the logits (stride 4) give each cell 2 x 2 values. k = 2.
    model = wrap(tiny_cris, "rn", branches="lmvsd", scorer="prediction", mask_cell=8, mask_ratio_v=2 / 64)
    logits = torch.full((1, 1, 16, 16), -4.0)
    logits[0, 0, 2:4, 12:14] = 2.0  # cell (1, 6): probability 0.881
    logits[0, 0, 14:16, 0:2] = 1.5  # cell (7, 0): 0.818
    logits[0, 0, 10:12, 4:6] = torch.tensor([[20.0, 20.0], [20.0, -20.0]])  # cell (5, 2): mean 0.75, mean logit 10
    embed = model.seg.backbone.embed_dim
    noise = torch.randn(1, embed, 2, 2)  # the image features play no part
    vis = VisualFeatures([], noise, (2, 2), noise, pooled=noise.mean((2, 3)))
    txt = TextFeatures(torch.zeros(1, 3, 8), torch.randn(1, embed), torch.zeros(1, 3, dtype=torch.bool))
    cells = model.patch_mask(vis, txt, logits)
    assert cells.shape == (1, 8, 8) and cells[0].nonzero().tolist() == [[1, 6], [7, 0]]


def test_prediction_scorer_draws_from_the_clean_passs_logits_in_training(tiny_cris):
    torch.manual_seed(0)
    model = wrap(tiny_cris, "rn", branches="lmvsd", scorer="prediction", mask_cell=8)
    image_calls, outputs, decode = record_calls(model.seg, "encode_image"), [], model.seg.decode

    def recorded_decode(*args, **kwargs):
        outputs.append(decode(*args, **kwargs))
        return outputs[-1]

    model.seg.decode = recorded_decode
    images, tokens, gt = make_batch(64)
    model.training_loss(images, tokens, gt)
    (cells,) = patch_masks(image_calls)
    clean_logits = outputs[0]
    vis = VisualFeatures([], torch.zeros(2, 1, 2, 2), (2, 2), torch.zeros(2, 1, 2, 2))
    expected = model.patch_mask(vis, None, clean_logits)
    assert torch.equal(cells, expected) and cells.sum().item() == 2 * 32


@pytest.mark.parametrize("branches", ["both", "vmlsd", "joint"])
def test_prediction_scorer_is_refused_with_any_branch_that_masks_words(branches):
    with pytest.raises(ValidationError, match="scorer: prediction"):
        MaskSDConfig(scorer="prediction", branches=branches)


def test_prediction_scorer_is_refused_with_the_maskris_recipe_and_accepted_for_lmvsd():
    with pytest.raises(ValidationError, match="scorer: prediction"):
        MaskSDConfig(recipe="maskris", scorer="prediction")  # joint, from the recipe
    assert MaskSDConfig(scorer="prediction", branches="lmvsd").scorer == "prediction"


# ---- e. centred correlation --------------------------------------------------------------------------


def offset_case(embed: int):
    """Three patches on a 1 x 3 grid and a sentence along e0: patch 0 points along the sentence
    but is short, patch 1 is long and at 45 degrees. An offset common to every patch (along e2)
    swamps the short one: un-centred, patch 1 overtakes patch 0; centred, nothing changes."""
    sentence = torch.zeros(1, embed)
    sentence[0, 0] = 1.0
    dense = torch.zeros(1, embed, 1, 3)
    dense[0, :2, 0, 0] = torch.tensor([0.1, 0.0])
    dense[0, :2, 0, 1] = torch.tensor([1.0, 1.0])
    dense[0, :2, 0, 2] = torch.tensor([-1.0, 0.0])
    offset = torch.zeros(1, embed, 1, 1)
    offset[0, 2] = 10.0
    return dense, dense + offset, sentence


def test_centred_scores_are_the_cosine_after_removing_each_images_mean_patch():
    torch.manual_seed(0)
    dense, sentence = torch.randn(2, 8, 3, 4), torch.randn(2, 8)
    patches = dense.flatten(2).transpose(1, 2)  # B x N x E
    centred = patches - patches.mean(dim=1, keepdim=True)
    by_hand = (centred @ sentence[:, :, None])[..., 0] / (centred.norm(dim=-1) * sentence.norm(dim=-1, keepdim=True))
    assert torch.allclose(masksd.correlation_scores(dense, sentence, centre=True), by_hand.view(2, 3, 4), atol=1e-6)
    plain = (patches @ sentence[:, :, None])[..., 0] / (patches.norm(dim=-1) * sentence.norm(dim=-1, keepdim=True))
    assert torch.allclose(masksd.correlation_scores(dense, sentence), plain.view(2, 3, 4), atol=1e-6)


def test_a_common_offset_changes_uncentred_ranks_but_not_centred_ones(tiny_cris):
    embed = 8
    dense, shifted, sentence = offset_case(embed)
    plain = [masksd.correlation_scores(d, sentence).flatten() for d in (dense, shifted)]
    assert plain[0].argmax().item() == 0 and plain[1].argmax().item() == 1  # the offset reorders them
    centred = [masksd.correlation_scores(d, sentence, centre=True) for d in (dense, shifted)]
    assert torch.allclose(centred[0], centred[1], atol=1e-6)
    pick = {centre: [masksd.correlation_cells(d, sentence, (1, 3), 1 / 3, "corr_top", 0.1, centre)[0, 0].tolist()
                     for d in (dense, shifted)] for centre in (False, True)}
    assert pick[False] == [[True, False, False], [False, True, False]]
    assert pick[True] == [[False, True, False]] * 2  # centred: patch 1 with or without the offset

    # the model's patch_mask follows `centre`
    for centre, same in ((False, False), (True, True)):
        model = wrap(tiny_cris, "rn", mask_ratio_v=1 / 3, centre=centre)
        embed = model.seg.backbone.embed_dim
        dense, shifted, sentence = offset_case(embed)
        txt = TextFeatures(torch.zeros(1, 3, 8), sentence, torch.zeros(1, 3, dtype=torch.bool))
        masks = [model.patch_mask(VisualFeatures([], d, (1, 3), d), txt) for d in (dense, shifted)]
        assert torch.equal(masks[0], masks[1]) == same


# ---- f. what a ResNet's masked cells show ------------------------------------------------------------


def fill_case(tiny_cris):
    backbone = tiny_cris["rn"].backbone
    images, _, _ = make_batch(64)
    x = backbone.normalize(images)
    masked = torch.zeros(2, 64, 64, dtype=torch.bool)
    masked[0, :32] = True  # the top half of image 0 and the right half of image 1
    masked[1, :, 32:] = True
    return backbone, images, x, masked


@pytest.mark.parametrize("fill", ["zero", "black", "noise", "median"])
def test_fill_leaves_unmasked_pixels_untouched(tiny_cris, fill):
    backbone, _, x, masked = fill_case(tiny_cris)
    out = resnet.fill_cells(x, masked, fill, backbone)
    keep = ~masked[:, None].expand_as(x)
    assert out.shape == x.shape and torch.equal(out[keep], x[keep])
    assert not torch.equal(out[~keep], x[~keep])


def test_zero_fill_is_zero_in_the_normalised_input(tiny_cris):
    backbone, _, x, masked = fill_case(tiny_cris)
    out = resnet.fill_cells(x, masked, "zero", backbone)
    assert torch.all(out[masked[:, None].expand_as(x)] == 0)


def test_median_fill_is_each_images_median_colour(tiny_cris):
    """On a plain background the median colour is the background: masked cells vanish into it."""
    backbone, _, x, masked = fill_case(tiny_cris)
    x = x.clone()
    x[1] = x[1, :, :1, :1]  # image 1: one colour everywhere, as a plain background
    out = resnet.fill_cells(x, masked, "median", backbone)
    for i in range(2):
        median = x[i].flatten(1).median(dim=1).values
        assert torch.equal(out[i][:, masked[i]], median[:, None].expand(-1, int(masked[i].sum())))
    assert torch.equal(out[1], x[1])  # filling a plain image with its median changes nothing


def test_black_fill_is_the_normalised_value_of_pixel_0(tiny_cris):
    backbone, images, x, masked = fill_case(tiny_cris)
    out = resnet.fill_cells(x, masked, "black", backbone)
    black = backbone.normalize(torch.zeros_like(images))
    where = masked[:, None].expand_as(x)
    assert torch.equal(out[where], black[where])
    assert torch.allclose((out * backbone.std + backbone.mean)[where], torch.zeros(()), atol=1e-6)  # un-normalised


def test_noise_fill_is_standard_normal_in_the_normalised_input(tiny_cris):
    backbone, _, x, masked = fill_case(tiny_cris)
    torch.manual_seed(0)
    out = resnet.fill_cells(x, masked, "noise", backbone)
    values = out[masked[:, None].expand_as(x)]
    n = values.numel()  # 2 images x 3 channels x 2048 px = 12288
    # standard errors: mean 1 / sqrt(n) = 0.009, std 1 / sqrt(2n) = 0.0064; bounds at over 5 of them
    assert abs(values.mean().item()) < 5.5 / math.sqrt(n)
    assert abs(values.std().item() - 1) < 5.5 / math.sqrt(2 * n)
    assert not torch.equal(out, resnet.fill_cells(x, masked, "noise", backbone))  # drawn afresh


def test_masked_pass_shows_the_configured_fill(tiny_cris):
    model = wrap(tiny_cris, "rn", branches="lmvsd", fill="black", mask_cell=8)
    backbone = model.seg.backbone
    seen = []
    handle = backbone.clip.visual.conv1.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    image_calls = record_calls(model.seg, "encode_image")
    images, tokens, gt = make_batch(64)
    try:
        model.training_loss(images, tokens, gt)
    finally:
        handle.remove()
    (cells,) = patch_masks(image_calls)
    pixels = resnet.cells_to_pixels(cells, (64, 64))[:, None].expand(-1, 3, -1, -1)
    clean, masked_input = seen
    black = backbone.normalize(torch.zeros_like(images))
    assert pixels.any() and torch.equal(masked_input[pixels], black[pixels])
    assert torch.equal(masked_input[~pixels], clean[~pixels])


