"""What the masked passes show the encoders: BERT's word noise, the MaskRIS recipe (one joint masked
pass), a tower without a pooled embedding, and the letterbox border (never a mask candidate)."""

from __future__ import annotations

import pytest
import torch
from helpers import EOT, SOT, make_batch, masked_inputs, patch_masks, record_calls, word_masks, wrap

from cmmasksd.config import MaskSDConfig, apply_overrides, build_config, read_profile
from cmmasksd.model import (
    VisualFeatures,
    mask_stats,
    masksd,
)

# ---- g. BERT's word noise ----------------------------------------------------------------------------


def many_words(rows: int, width: int = 76) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` expressions of `width - 2` word ids (1..999) between SOT and EOT, every word chosen."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (rows, width), generator=g)
    tokens[:, 0], tokens[:, -1] = SOT, EOT
    words = torch.zeros_like(tokens, dtype=torch.bool)
    words[:, 1:-1] = True
    return tokens, words


def test_bert_noise_masks_80_replaces_10_and_keeps_10_percent(tiny_cris):
    model = wrap(tiny_cris, "rn", word_noise="bert")
    tokens, words = many_words(2000)
    words[::2, 1::3] = False  # a third of the words in every other row not chosen
    torch.manual_seed(0)
    noised, to_token = model._hidden_words(tokens, words)
    assert noised.shape == tokens.shape and to_token.dtype == torch.bool
    assert not (to_token & ~words).any() and torch.equal(noised[~words], tokens[~words])  # only chosen words
    chosen = words.sum().item()
    shares = {"mask token": (to_token & words).sum().item() / chosen,
              "random": (words & ~to_token & (noised != tokens)).sum().item() / chosen,
              "kept": (words & ~to_token & (noised == tokens)).sum().item() / chosen}
    # ~125000 chosen words: binomial standard errors 0.0011 (80 %) and 0.0008 (10 %); 0.006 is over 5 of them
    # (a random id equal to the word itself, 1 in 49405, moves "random" to "kept" by far less).
    assert shares == pytest.approx({"mask token": 0.8, "random": 0.1, "kept": 0.1}, abs=0.006)
    randoms = noised[words & ~to_token & (noised != tokens)]
    assert randoms.min().item() >= 1 and randoms.max().item() < int(tokens.max())  # below the batch's largest id


def test_bert_noise_never_draws_special_tokens(tiny_cris):
    """Random ids must be words: not padding (0), not EOT (it ends the sentence) and not SOT.

    Ids are drawn below the batch's largest, EOT (49407); SOT (49406) is among them once in
    49405 draws, so ~740000 random ids (7.4 M chosen words) miss it by chance with probability
    exp(-15)."""
    model = wrap(tiny_cris, "rn", word_noise="bert")
    tokens, words = many_words(100_000)
    torch.manual_seed(0)
    noised, to_token = model._hidden_words(tokens, words)
    randoms = noised[words & ~to_token & (noised != tokens)]
    assert randoms.numel() > 700_000
    drawn = {name: (randoms == i).sum().item() for name, i in (("padding", 0), ("SOT", SOT), ("EOT", EOT))}
    assert drawn == {"padding": 0, "SOT": 0, "EOT": 0}


def test_mask_noise_sends_every_chosen_word_to_the_mask_token(tiny_cris):
    model = wrap(tiny_cris, "rn", word_noise="mask")
    tokens, words = many_words(100)
    words[:, ::2] = False
    noised, to_token = model._hidden_words(tokens, words)
    assert torch.equal(noised, tokens) and torch.equal(to_token, words)


def test_bert_noise_reaches_the_text_encoder_of_the_masked_pass(tiny_cris):
    torch.manual_seed(0)
    model = wrap(tiny_cris, "rn", branches="vmlsd", word_noise="bert", mask_ratio_t=0.5)
    images, tokens, gt = make_batch(64, lengths=(8, 6))
    with torch.no_grad():
        chosen = model.word_mask(model.seg.encode_image(images), model.seg.encode_text(tokens), tokens)  # corr_top
    text_calls = record_calls(model.seg, "encode_text")
    model.training_loss(images, tokens, gt)
    ((noised, to_token),) = word_masks(text_calls)
    assert not (to_token & ~chosen).any() and torch.equal(noised[~chosen], tokens[~chosen])


# ---- h. the MaskRIS recipe ---------------------------------------------------------------------------


def test_maskris_recipe_sets_its_method_and_its_numbers_for_the_fields_left_out():
    cfg = MaskSDConfig(recipe="maskris")
    assert (cfg.branches, cfg.strategy, cfg.mask_ratio_v, cfg.mask_ratio_t, cfg.word_noise, cfg.fill) == (
        "joint", "random", 0.75, 0.15, "bert", "zero")
    assert (cfg.lambda_v, cfg.seg_weight) == (0.5, 0.5)  # MaskRIS's 0.5 / 0.5
    assert cfg.use_joint and cfg.masks_images and cfg.masks_words and not cfg.use_lmvsd and not cfg.use_vmlsd
    explicit = MaskSDConfig(recipe="maskris", mask_ratio_v=0.5, word_noise="mask", branches="both")
    assert (explicit.mask_ratio_v, explicit.mask_ratio_t) == (0.5, 0.15)  # a number given wins
    assert (explicit.branches, explicit.word_noise) == ("joint", "bert")  # the method is the recipe's
    assert MaskSDConfig().recipe == "cmmasksd" and MaskSDConfig().branches == "both"  # no recipe, no change


@pytest.mark.parametrize("profile", ["paper-refcoco-rn101", "sweep-refshapes"])
def test_maskris_recipe_set_on_a_shipped_profile_trains_maskris(profile):
    """The paper profiles document `--set masksd.recipe=maskris` as the MaskRIS arm (random cells
    at 0.75, 15 % of words with BERT noise, one pass), and `variant_name` names a sweep variant
    `{masksd.recipe: maskris}` "maskris". Both put the recipe on top of a profile's `masksd`
    section, which names `branches` (and on the paper profiles `word_noise`) for CM-MaskSD."""
    raw = apply_overrides(read_profile(profile), {"masksd.recipe": "maskris", "data.prepared_dir": "unused"})
    cfg = build_config(raw).masksd
    assert (cfg.branches, cfg.strategy, cfg.mask_ratio_v, cfg.mask_ratio_t, cfg.word_noise) == (
        "joint", "random", 0.75, 0.15, "bert")


def test_joint_branch_runs_one_masked_pass_hiding_cells_and_words(tiny_cris):
    torch.manual_seed(0)
    model = wrap(tiny_cris, "rn", recipe="maskris", mask_cell=8)
    decodes = record_calls(model.seg, "decode")
    image_calls, text_calls = masked_inputs(model)
    images, tokens, gt = make_batch(64, lengths=(3, 10))
    stats = mask_stats.MaskStats()
    loss, parts = model.training_loss(images, tokens, gt, stats)
    loss.backward()
    assert len(decodes) == 2  # clean + one masked pass
    assert len(image_calls) == 2 and len(text_calls) == 2  # the masked pass encodes both modalities afresh
    (cells,), ((_, _),) = patch_masks(image_calls), word_masks(text_calls)
    assert cells.shape == (2, 8, 8) and cells.sum((1, 2)).tolist() == [48, 48]  # 0.75 of 64 cells
    assert parts["lmvsd"] > 0 and parts["vmlsd"] == 0
    assert loss.item() == pytest.approx(parts["seg"].item() + parts["lmvsd"].item(), rel=1e-5)
    assert {"mask/lmvsd_hit", "mask/vmlsd_hit"} <= set(stats.metrics())  # both masks drawn and counted


def test_maskris_masks_at_least_one_word_of_a_three_word_expression(tiny_cris):
    model = wrap(tiny_cris, "rn", recipe="maskris")
    images, tokens, _ = make_batch(64, lengths=(3, 3))
    with torch.no_grad():
        vis, txt = model.seg.encode_image(images), model.seg.encode_text(tokens)
    for seed in range(5):
        torch.manual_seed(seed)
        chosen = model.word_mask(vis, txt, tokens)
        assert chosen.sum(1).tolist() == [1, 1]  # round(0.15 * 3) = 0, at least one
        assert not (chosen & ~masksd.real_word_mask(tokens)).any()


# ---- a tower's pooled image embedding ------------------------------------------------------------------


def test_word_mask_without_a_pooled_embedding_fails_clearly(tiny_cris):
    """`VisualFeatures.pooled` defaults to None and `VisualTower.encode` does not ask for it, but
    `word_mask` scores words against it: a tower that leaves it out must either still train VMLSD
    or be told what it lacks, not fail on `None.float()`."""
    model = wrap(tiny_cris, "rn", mask_ratio_t=0.5)
    images, tokens, _ = make_batch(64)
    with torch.no_grad():
        vis, txt = model.seg.encode_image(images), model.seg.encode_text(tokens)
    without = VisualFeatures(vis.levels, vis.joint, vis.grid, vis.values)
    try:
        chosen = model.word_mask(without, txt, tokens)
    except AttributeError as error:
        pytest.fail(f"a tower without `pooled` fails obscurely: {error!r}")
    except (ValueError, TypeError) as error:
        assert "pooled" in str(error)
    else:
        assert chosen.sum(1).tolist() == [2, 1]


# ---- the letterbox border ------------------------------------------------------------------------------


def test_cells_wholly_inside_the_letterbox_border_are_never_masked(tiny_cris):
    """A wide picture letterboxed into the top half of the input: the bottom half is border, and no
    cell there is a candidate; the ratio applies to the picture's cells."""
    content = torch.tensor([[0, 0, 32, 64], [0, 0, 64, 64]])  # top, left, bottom, right: sample 1 is all picture
    assert masksd.picture_cells(content, (8, 8), (64, 64))[0].sum() == 32
    assert masksd.picture_cells(torch.tensor([[0, 0, 33, 64]]), (8, 8), (64, 64))[0, 4].all()  # one row of it
    model = wrap(tiny_cris, "rn", branches="lmvsd", mask_cell=8, strategy="random", mask_ratio_v=0.5)
    images, tokens, gt = make_batch(64)
    drawn = []
    model.seg.encode_image = lambda images, cells=None, drop=False, fill="zero", _f=model.seg.encode_image: (
        drawn.append(cells) if cells is not None else None) or _f(images, cells, drop, fill)
    for _ in range(5):
        model.training_loss(images, tokens, gt, content=content)
    for cells in drawn:
        assert not cells[0, 4:].any() and int(cells[0].sum()) == 16  # half of the 32 picture cells
        assert int(cells[1].sum()) == 32  # half of all 64


def test_a_picture_without_border_draws_the_masks_it_drew_before(tiny_cris):
    """RefShapes has no border: with its full-picture box the masks (random ones included) and the
    loss are exactly those drawn without a box."""
    images, tokens, gt = make_batch(64)
    full = torch.tensor([[0, 0, 64, 64]] * len(tokens))
    losses = []
    for content in (None, full):
        model = wrap(tiny_cris, "rn", mask_cell=8, strategy="random")
        torch.manual_seed(3)
        losses.append(model.training_loss(images, tokens, gt, content=content)[0])
    assert torch.equal(losses[0], losses[1])
