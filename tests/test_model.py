import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, make_tokens, wrap

from cmmasksd.config import MaskSDConfig
from cmmasksd.model import TextFeatures, VisualFeatures, create_cris, get_model_config, parameter_report
from cmmasksd.model.masksd import mask_count, real_word_mask, select_masked
from cmmasksd.model.towers.resnet import spatial_attention_pool, value_path


def count_calls(obj, name: str) -> list:
    """Wrap `obj.<name>` so every call appends to the returned list."""
    calls, original = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


# ---- shapes and agreement with open_clip -----------------------------------------------------


@pytest.mark.parametrize("kind", ["rn", "vit"])
@pytest.mark.parametrize("size,word_len", [(64, 17), (96, 22), (64, 22), (96, 17)])
def test_forward_shapes(tiny_cris, kind, size, word_len):
    cris = tiny_cris[kind].eval()
    images, tokens, _ = make_batch(size, word_len)
    with torch.no_grad():
        vis, txt = cris.encode_image(images), cris.encode_text(tokens)
        logits = cris.decode(vis, txt)
    assert logits.shape == (2, 1, size // 4, size // 4)
    for level, stride, dim in zip(vis.levels, (8, 16, 32), cris.backbone.level_dims):
        assert level.shape == (2, dim, size // stride, size // stride)
    patch = cris.backbone.patch_stride
    assert vis.grid == (size // patch, size // patch)
    assert vis.joint.shape == vis.values.shape == (2, cris.backbone.embed_dim, *vis.grid)
    assert txt.words.shape == (2, word_len, cris.backbone.word_dim)
    assert txt.sentence.shape == (2, cris.backbone.embed_dim)
    assert torch.equal(txt.pad_mask, tokens == 0)


def test_value_path_is_in_the_pooled_embeddings_space(tiny_cris):
    # Identical positions (no positional embedding): any attention mixes identical values, so the
    # pooled output equals every position's value path.
    pool = copy.deepcopy(tiny_cris["rn"].backbone.clip.visual.attnpool)
    with torch.no_grad():
        pool.positional_embedding.zero_()
        x = torch.randn(2, pool.k_proj.in_features, 1, 1).expand(-1, -1, 3, 3)
        values = value_path(pool, x)
        pooled = pool(x)
    assert torch.allclose(values, pooled[:, :, None, None].expand_as(values), atol=1e-5)


def test_resnet_attention_pool_row0_is_open_clip_pooled_output(tiny_cris):
    pool = tiny_cris["rn"].backbone.clip.visual.attnpool
    x = torch.randn(2, pool.k_proj.in_features, 3, 3)  # the config's 96 px grid: no resize
    with torch.no_grad():
        assert torch.allclose(spatial_attention_pool(pool, x)[0], pool(x), atol=1e-5)


def test_vit_joint_features_match_open_clip_tokens(tiny_cris):
    backbone = tiny_cris["vit"].backbone.eval()
    images, _, _ = make_batch(96)
    visual = backbone.clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(backbone.normalize(images))
            joint = backbone.encode_image(images).joint
    finally:
        visual.output_tokens = False
    expected = (tokens @ visual.proj).transpose(1, 2).reshape(joint.shape)
    assert torch.allclose(joint, expected, atol=1e-5)


@pytest.mark.parametrize("word_len", [17, 22])
def test_sentence_feature_matches_open_clip_encode_text(tiny_cris, word_len):
    backbone = tiny_cris["rn"].backbone.eval()
    tokens = make_tokens(word_len)
    full = F.pad(tokens, (0, backbone.clip.context_length - word_len))
    with torch.no_grad():
        ours = backbone.encode_text(tokens).sentence
        theirs = backbone.clip.encode_text(full)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_input_checks(tiny_cris):
    cris = tiny_cris["rn"]
    images, tokens, _ = make_batch(64)
    with pytest.raises(TypeError, match="uint8"):
        cris.encode_image(images.float())
    with pytest.raises(ValueError, match="multiple of 32"):
        cris.encode_image(images[..., :48, :48])
    with pytest.raises(ValueError, match="context length"):
        cris.encode_text(make_tokens(23))
    with pytest.raises(ValueError, match="patch_mask"):
        cris.encode_image(images, torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_mask"):  # a ViT masks its own tokens only
        tiny_cris["vit"].encode_image(images, torch.zeros(2, 8, 8, dtype=torch.bool))


def test_baseline_backbone_has_no_mask_tokens():
    cris = create_cris(get_model_config("cris-tiny-vit"), with_mask_tokens=False)
    assert cris.backbone.text_mask_token is None and cris.backbone.visual_mask_token is None
    with pytest.raises(ValueError, match="without mask tokens"):
        cris.encode_text(make_tokens(17), torch.ones(2, 17, dtype=torch.bool))


# ---- masking ---------------------------------------------------------------------------------


def conv1_input(backbone, images, mask):
    """What the ResNet stem sees when `mask` is applied: the masked, normalised input."""
    seen = {}
    handle = backbone.clip.visual.conv1.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    try:
        with torch.no_grad():
            backbone.encode_image(images, mask)
    finally:
        handle.remove()
    return seen["x"]


def test_resnet_patch_mask_zeroes_exactly_the_masked_cells(tiny_cris):
    backbone = tiny_cris["rn"].backbone.eval()
    images, _, _ = make_batch(64)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = True
    x, clean = conv1_input(backbone, images, mask), backbone.normalize(images)
    assert torch.all(x[0, :, :32, 32:] == 0)
    assert torch.equal(x[0, :, :32, :32], clean[0, :, :32, :32]) and torch.equal(x[1], clean[1])


def test_vit_patch_mask_changes_only_the_masked_sample(tiny_cris):
    backbone = tiny_cris["vit"].backbone.eval()
    images, _, _ = make_batch(64)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1, 2, 3] = True
    with torch.no_grad():
        clean, masked = backbone.encode_image(images).joint, backbone.encode_image(images, mask).joint
    assert torch.allclose(clean[0], masked[0], atol=1e-6)
    assert not torch.allclose(clean[1], masked[1])


def test_resnet_cell_mask_zeroes_exactly_the_chosen_12px_cells(tiny_cris):
    model = wrap(tiny_cris, "rn", mask_cell=12, mask_ratio_v=0.3)
    backbone = model.seg.backbone
    images, tokens, _ = make_batch(96)
    with torch.no_grad():
        mask = model.patch_mask(backbone.encode_image(images), backbone.encode_text(tokens))
    assert mask.shape == (2, 8, 8) and mask.sum((1, 2)).tolist() == [round(0.3 * 64)] * 2
    pixels = mask[:, :, None, :, None].expand(2, 8, 12, 8, 12).reshape(2, 1, 96, 96).expand(-1, 3, -1, -1)
    x, clean = conv1_input(backbone, images, mask), backbone.normalize(images)
    assert torch.all(x[pixels] == 0) and torch.equal(x[~pixels], clean[~pixels])


def one_hot_scores(embed: int, grid: tuple[int, int], hot: tuple[int, int]):
    """Value-path features whose patch-sentence cosine is 1 at patch `hot` and -1 elsewhere (the
    attention-pool map is noise: the masks are scored on the values by default)."""
    sentence = torch.zeros(1, embed)
    sentence[0, 0] = 1.0
    joint = -sentence.view(1, embed, 1, 1).repeat(1, 1, *grid)
    joint[0, 0, hot[0], hot[1]] = 1.0
    txt = TextFeatures(torch.zeros(1, 3, 8), sentence, torch.zeros(1, 3, dtype=torch.bool))
    return VisualFeatures([], torch.randn_like(joint), grid, joint), txt


@pytest.mark.parametrize("hot,cells", [((0, 0), [0, 1]), ((1, 1), [3, 4])])
def test_cell_mask_picks_the_peak_of_the_resampled_similarity_map(tiny_cris, hot, cells):
    # 3 x 3 stride-32 scores, bilinear to the 8 x 8 grid of 12 px cells: the 4 highest cells are the
    # 2 x 2 block nearest the hot patch's centre (pixels 0-24 for patch (0, 0), 36-60 for (1, 1)).
    model = wrap(tiny_cris, "rn", mask_cell=12, mask_ratio_v=4 / 64)
    vis, txt = one_hot_scores(model.seg.backbone.embed_dim, (3, 3), hot)
    picked = model.patch_mask(vis, txt)[0].nonzero().tolist()
    assert picked == [[r, c] for r in cells for c in cells]


def test_mask_cell_none_or_the_stride_is_the_backbone_grid(tiny_cris):
    images, tokens, gt = make_batch(96)
    losses = []
    for cell in (None, 32):
        model = wrap(tiny_cris, "rn", mask_cell=cell)
        assert model.mask_grid((3, 3)) == (3, 3)
        torch.manual_seed(0)
        losses.append(model.training_loss(images, tokens, gt)[0].item())
    assert losses[0] == losses[1]
    model = wrap(tiny_cris, "rn", mask_cell=20)
    with pytest.raises(ValueError, match="mask_cell 20 must divide the input size 96 x 96"):
        model.training_loss(images, tokens, gt)


def test_vit_accepts_only_its_patch_size_as_mask_cell(tiny_cris):
    assert wrap(tiny_cris, "vit", mask_cell=16).mask_grid((6, 6)) == (6, 6)
    with pytest.raises(ValueError, match="patch size 16 or None"):
        wrap(tiny_cris, "vit", mask_cell=12)
    with pytest.raises(ValueError, match="mask_cell"):
        MaskSDConfig(mask_cell=0)


def test_corr_top_and_bottom_pick_the_most_and_least_correlated_patches(tiny_cris):
    model = wrap(tiny_cris, "rn", mask_ratio_v=0.25)
    embed = model.seg.backbone.embed_dim
    sentence = torch.zeros(1, embed)
    sentence[0, 0] = 1.0
    cosines = torch.tensor([0.9, -0.5, 0.1, 0.7, -0.9, 0.3, 0.0, 0.5])  # 2 x 4 grid, k = 2
    joint = torch.zeros(1, embed, 8)
    joint[0, 0], joint[0, 1] = cosines, torch.sqrt(1 - cosines**2)
    dense, noise = joint.view(1, embed, 2, 4), torch.randn(1, embed, 2, 4)
    vis = VisualFeatures([], noise, (2, 4), dense)
    txt = TextFeatures(torch.zeros(1, 3, 8), sentence, torch.zeros(1, 3, dtype=torch.bool))
    top = model.patch_mask(vis, txt).flatten()
    assert top.nonzero().flatten().tolist() == [0, 3]
    model.cfg = MaskSDConfig(mask_ratio_v=0.25, strategy="corr_bottom", scorer="live", centre=False)
    assert model.patch_mask(vis, txt).flatten().nonzero().flatten().tolist() == [1, 4]
    # correlation: attention scores CRIS's attention-pool map instead
    model.cfg = MaskSDConfig(mask_ratio_v=0.25, correlation="attention", scorer="live", centre=False)
    assert model.patch_mask(VisualFeatures([], dense, (2, 4), noise), txt).flatten().nonzero().flatten().tolist() == [0, 3]


def test_word_mask_scores_only_real_words_against_clips_pooled_image_embedding(tiny_cris):
    """Defect fixed: words were scored against the mean of the value-path features, which is not
    what CLIP's contrastive loss aligned the text with. Here the two point opposite ways."""
    model = wrap(tiny_cris, "rn", mask_ratio_t=0.5)
    backbone = model.seg.backbone
    tokens = make_tokens(8, lengths=(4, 0))  # sample 1: no real word
    embed = backbone.embed_dim
    # Words whose projections are known: solve words @ P = targets (P has full row rank here).
    image_dir = torch.randn(embed)
    targets = torch.randn(2, 8, embed)
    targets[0, 1:5] = torch.stack([-image_dir, image_dir, 0.2 * image_dir + torch.randn(embed), 3 * image_dir])
    proj = backbone.clip.text_projection.detach()
    words = targets @ torch.linalg.pinv(proj)
    scores = F.cosine_similarity(words @ proj, image_dir.expand(2, 1, embed), dim=-1)
    value_map = -image_dir.view(1, embed, 1, 1).expand(2, -1, 2, 2).clone()  # the old, wrong reference
    vis = VisualFeatures([], torch.randn_like(value_map), (2, 2), value_map, pooled=image_dir.expand(2, embed))
    txt = TextFeatures(words, torch.zeros(2, embed), tokens == 0)
    chosen = model.word_mask(vis, txt, tokens)
    real = real_word_mask(tokens)
    expected_top = scores[0].masked_fill(~real[0], -2).topk(2).indices.sort().values.tolist()
    assert chosen[0].nonzero().flatten().tolist() == expected_top == [2, 4]
    assert not chosen[1].any()  # nothing to mask: mask nothing
    model.cfg = MaskSDConfig(mask_ratio_t=0.5, strategy="corr_bottom", scorer="live")
    assert model.word_mask(vis, txt, tokens)[0].nonzero().flatten().tolist() == [1, 3]


def test_real_words_exclude_sot_eot_and_padding():
    tokens = make_tokens(7, lengths=(3, 0, 5))
    assert real_word_mask(tokens).tolist() == [
        [False, True, True, True, False, False, False],
        [False] * 7,
        [False, True, True, True, True, True, False],
    ]


def test_mask_count_rounds_with_at_least_one():
    assert mask_count(0.3, torch.tensor([0, 1, 2, 5, 10, 36])).tolist() == [0, 1, 1, 2, 3, 11]


def test_select_masked_strategies():
    torch.manual_seed(0)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.8, 0.6]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    k = torch.tensor([2, 1])
    assert select_masked(scores, k, "corr_top", 0.1, valid).tolist() == [
        [False, True, False, True], [False, False, True, False]]
    assert select_masked(scores, k, "corr_bottom", 0.1, valid).tolist() == [
        [True, False, False, True], [False, True, False, False]]
    cold_sample = select_masked(scores, k, "corr_sample", 1e-4, valid)
    assert torch.equal(cold_sample, select_masked(scores, k, "corr_top", 0.1, valid))
    for strategy in ("random", "corr_sample"):
        picked = select_masked(scores, k, strategy, 0.1, valid)
        assert picked.sum(1).tolist() == [2, 1] and not (picked & ~valid).any()


def test_corr_sample_follows_softmax_probabilities():
    torch.manual_seed(0)
    temperature = 0.5
    scores = torch.tensor([[0.0, temperature * torch.log(torch.tensor(3.0)).item()]]).expand(4000, 2)
    picked = select_masked(scores, torch.ones(4000, dtype=torch.long), "corr_sample", temperature)
    assert picked[:, 1].float().mean().item() == pytest.approx(0.75, abs=0.03)  # softmax: 3 / (1 + 3)


# ---- every switch: forward + backward --------------------------------------------------------

SWITCHES = [  # every value of every switch appears at least once
    ("rn", dict(branches="both", strategy="corr_top", distill_loss="soft_bce")),
    ("vit", dict(branches="both", strategy="corr_bottom", distill_loss="mse", gt_on_masked=True, weights="separate")),
    ("vit", dict(branches="lmvsd", strategy="corr_sample", distill_loss="kl")),
    ("rn", dict(branches="vmlsd", strategy="random", distill_loss="soft_bce", gt_on_masked=True)),
    ("rn", dict(branches="both", strategy="random", distill_loss="kl", weights="separate")),
    ("rn", dict(branches="lmvsd", strategy="corr_top", distill_loss="mse", gt_on_masked=True, weights="separate")),
    ("vit", dict(branches="vmlsd", strategy="corr_sample", distill_loss="mse", weights="separate")),
    ("vit", dict(branches="none")),
    ("rn", dict(branches="none", weights="separate")),
    ("rn", dict(branches="both", strategy="corr_sample", distill_loss="mse", mask_cell=8)),  # 8 x 8 cells at 64 px
]


@pytest.mark.parametrize("kind,switches", SWITCHES, ids=[f"{k}-{'-'.join(map(str, s.values()))}" for k, s in SWITCHES])
def test_training_loss_forward_backward(tiny_cris, kind, switches):
    torch.manual_seed(0)
    model = wrap(tiny_cris, kind, **switches)
    cfg = model.cfg
    images, tokens, gt = make_batch(64)
    loss, parts = model.training_loss(images, tokens, gt)
    loss.backward()

    assert torch.isfinite(loss) and set(parts) == {"seg", "lmvsd", "vmlsd"}
    assert loss.item() == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-5)
    assert (parts["lmvsd"] > 0) == cfg.use_lmvsd and (parts["vmlsd"] > 0) == cfg.use_vmlsd
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)

    assert (model.student is not None) == (cfg.weights == "separate" and cfg.branches != "none")
    tokens_of = model.masked_net.backbone
    text_grad = tokens_of.text_mask_token.grad
    assert (text_grad is not None and text_grad.abs().sum() > 0) == cfg.use_vmlsd
    if kind == "vit":
        visual_grad = tokens_of.visual_mask_token.grad
        assert (visual_grad is not None and visual_grad.abs().sum() > 0) == cfg.use_lmvsd
    if model.student is not None:  # the masked branches train the copy, not the main network's tokens
        assert model.seg.backbone.text_mask_token.grad is None


@pytest.mark.parametrize("branches,decodes", [("none", 1), ("lmvsd", 2), ("vmlsd", 2), ("both", 3)])
def test_branches_reuse_clean_features(tiny_cris, branches, decodes):
    model = wrap(tiny_cris, "rn", branches=branches)
    calls = {name: count_calls(model.seg, name) for name in ("decode", "encode_image", "encode_text")}
    model.training_loss(*make_batch(64))
    assert len(calls["decode"]) == decodes
    assert len(calls["encode_image"]) == 1 + (branches in ("lmvsd", "both"))  # VMLSD reuses the clean image
    assert len(calls["encode_text"]) == 1 + (branches in ("vmlsd", "both"))  # LMVSD reuses the clean text


def test_zero_weight_branch_is_skipped_unless_it_gets_gt(tiny_cris):
    model = wrap(tiny_cris, "rn", lambda_v=0.0)
    calls = count_calls(model.seg, "decode")
    _, parts = model.training_loss(*make_batch(64))
    assert len(calls) == 2 and parts["lmvsd"] == 0.0
    model = wrap(tiny_cris, "rn", lambda_v=0.0, gt_on_masked=True)
    calls = count_calls(model.seg, "decode")
    _, parts = model.training_loss(*make_batch(64))
    assert len(calls) == 3 and parts["lmvsd"] > 0


@pytest.mark.parametrize("weights", ["shared", "separate"])
def test_eval_runs_the_main_branch_only(tiny_cris, weights):
    model = wrap(tiny_cris, "vit", weights=weights).eval()
    calls = count_calls(model.seg, "decode")
    student_calls = count_calls(model.student, "decode") if model.student is not None else []
    images, tokens, gt = make_batch(64)
    with torch.no_grad():
        logits = model(images, tokens)
        _, parts = model.training_loss(images, tokens, gt)
    assert len(calls) == 2 and not student_calls  # one pass for forward, one for the eval loss
    assert parts["lmvsd"] == parts["vmlsd"] == 0.0
    assert logits.shape == (2, 1, 16, 16)


def test_param_groups_split_clip_from_the_rest(tiny_cris):
    for weights in ("shared", "separate"):
        model = wrap(tiny_cris, "rn", weights=weights)
        backbone, rest = model.param_groups()
        ids_b, ids_r = {id(p) for p in backbone}, {id(p) for p in rest}
        assert not ids_b & ids_r and ids_b | ids_r == {id(p) for p in model.parameters()}
        assert id(model.masked_net.backbone.text_mask_token) in ids_r
        assert id(model.seg.backbone.pool_residual[0].weight) in ids_r
        nets = [model.seg] if model.student is None else [model.seg, model.student]
        assert ids_b == {id(p) for net in nets for n, p in net.backbone.clip.named_parameters()
                         if "positional_embedding" not in n}  # as CRIS: see test_optimizer.py


@pytest.mark.parametrize("name,extra_names", [
    ("cris-tiny-rn", ["seg.backbone.text_mask_token"]),
    ("cris-tiny-vit", ["seg.backbone.text_mask_token", "seg.backbone.visual_mask_token"]),
])
def test_parameter_report_extra_is_exactly_the_mask_tokens(name, extra_names):
    report = parameter_report(name)
    cfg = get_model_config(name)
    cris = create_cris(cfg, with_mask_tokens=True)
    token_params = sum(p.numel() for n, p in cris.named_parameters() if n.endswith("mask_token"))
    assert report["extra_names"] == extra_names
    assert report["extra"] == token_params == report["cmmasksd"] - report["baseline"] > 0
