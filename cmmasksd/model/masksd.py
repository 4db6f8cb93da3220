"""CM-MaskSD: CRIS plus two masked self-distillation branches that run only in training.

Main: P = f(I, T), L_seg = BCE(P, GT).
LMVSD: mask the image patches chosen (by `strategy`) from their CLIP similarity to the
sentence; L_v = D(f(I_masked, T), stopgrad(P)).
VMLSD: mask the words chosen from their CLIP similarity to the image's global feature (CLIP's
pooled image embedding: the ResNet attention pool's output, a ViT's projected class token, what
CLIP's contrastive loss aligned the text with); L_t = D(f(I, T_masked), stopgrad(P)).
L = seg_weight * L_seg + lambda_v * L_v + lambda_t * L_t (+ BCE against GT on a masked branch with
`gt_on_masked`, unweighted). With shared weights a masked branch reuses the clean features of the
modality it leaves intact. The masked passes normalise with their own batch statistics but leave
BatchNorm's running statistics to the clean pass (`clean_batch_stats`): evaluation sees clean
images (measured before this: masked passes raised the stem's running variance 1.14x; recomputing
the statistics on clean images gave `both` +0.52 val mIoU).
`branches: joint` is MaskRIS's variant (`recipe: maskris`): one masked pass hides random cells
(`fill: zero`, 0.75) and words (0.15, at least one per expression, BERT's 80/10/10 noise) together,
L = seg_weight * L_seg + lambda_v * D(f(I_masked, T_masked), stopgrad(P)), 0.5 / 0.5 in MaskRIS.

Where the masks come from (`scorer`). The paper says only that CM-MaskSD inherits CLIP's
alignment. `live` scores with the model being fine-tuned, whose sentence feature leaves CLIP's
joint space within ~50 steps (measured: cosine to the pretrained feature 0.54 at step 50; corr_top
hits fall from 0.95x chance at step 0 to 0.32-0.38x from step 300 on, below random, because the
background sits closer to any sentence than objects do). `frozen` scores with a no-grad copy of
the pretrained towers taken when the model is built (`FrozenScorer`: outside the optimizer, the
checkpoints, the parameter counts and prediction), so the masks keep the alignment CLIP had.
`centre` subtracts each image's mean patch feature before the cosine (what every patch shares,
background included, says nothing about which one the sentence names). `prediction` ranks cells
by the teacher's own probability: an upper bound for guided masking, not CLIP correlation; it has
nothing to say about words, so it is refused for VMLSD.
Measured (`benchmarks/bench_scorers.py`, the default sweep's base, seed 0, 4 epochs, bf16 on an Intel
Xeon; LMVSD coverage = share of the object masked over share of the image masked, 1 = random, at
most 2 at ratio 0.5): live 0.35, 0.35, 0.37, 0.39 by epoch; frozen 0.99-1.01; frozen + centre
1.25-1.27; prediction 1.83-2.00. VMLSD content-word hits over the unbiased chance: live 1.09-1.12,
frozen 1.23-1.24. Val mIoU after 4 epochs (one seed, so within seed noise): live 43.9, frozen
38.2, frozen + centre 40.7, prediction (LMVSD alone) 42.4. Re-measured with a tiny CLIP pretrained on
an AMD EPYC (`benchmarks/scorers_kinds.json`): frozen + centre 1.37-1.38 (attribute expressions 1.6,
positional ~1.0, relational ~0.9), live 0.30-0.39. The default is frozen + centre: the only CLIP scorer
whose masks stay guided through the run; whether guidance pays in mIoU is what the default sweep's
seeds have to show.

Masking cell (`mask_cell`, pixels). None keeps the backbone's own: a ResNet zeroes its
stride-32 cells of the input, a ViT replaces whole patch tokens by the learned mask token (so a
ViT accepts only its patch size). On the 96 px RefShapes default a stride-32 grid is 3 x 3, and
masking 50 % zeroes about half the image, usually the referred object itself; MaskRIS zeroes
32 px cells at 448 px, a 14 x 14 grid. A ResNet with cell c masks an (H/c) x (W/c) grid: the
patch-sentence similarity map is resampled to it bilinearly and the cells are chosen on it as
before. The RefShapes profiles use 12 px (8 x 8); the paper profiles keep the stride (13 x 13 at
416 px); MaskRIS's 32 px at 448 px is about 8 px at 96 px (a 12 x 12 grid), what its RefShapes arm
uses. `training_loss(..., stats=)` measures how often the masks hit the object and the content
words (`mask_stats`). `fill` is what a ResNet's masked cells show: `zero` (0 in the normalised
input: the mean colour; the literature's, and the paper profiles'), `black`, `noise`, or `median`
(each image's median colour, the default: on RefShapes the mean colour's cells read as extra shapes,
measured in `benchmarks/bench_fill.py`).

Which patch features the masks are scored on (`correlation`). CRIS's joint map is the attention
pool with every position as a query; in CLIP that map localises the wrong way round (CLIP
Surgery, "opposite visualization"). Measured on the pretrained tiny CLIP (`pretrain` stage,
RefShapes val, 50 % of 12 px cells): corr_top on it masked 0.018 of its area on the named object
against a chance of 0.025, below random. `values` (the default) scores each position's own value
path into the joint space instead (MaskCLIP): 0.047, near the 0.05 that masking the whole object
allows at this ratio. `attention` keeps the plain reading for comparison.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cmmasksd.config import MaskSDConfig
from cmmasksd.losses import distill_loss, seg_loss
from cmmasksd.model.backbone import TextFeatures, VisualFeatures
from cmmasksd.model.batchnorm import clean_batch_stats
from cmmasksd.model.cris import CRIS
from cmmasksd.model.mask_stats import MaskStats


def warmup_scale(warmup_epochs: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The share of the distillation weights in use at `step` of `epoch` (0-based): a linear rise from
    0 over `warmup_epochs` (`masksd.distill_warmup`), then 1. A function of the position only, so a
    resumed run continues the same ramp."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch + step / max(steps_per_epoch, 1)) / warmup_epochs)


def select_masked(scores: torch.Tensor, k: torch.Tensor, strategy: str, temperature: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pick k[i] of the valid entries of row i of a B x N score matrix; True = picked.

    corr_top: highest scores; corr_bottom: lowest; corr_sample: sampled without replacement
    with probabilities softmax(score / temperature) (Gumbel top-k); random: uniformly.
    """
    if strategy == "corr_top":
        keys = scores
    elif strategy == "corr_bottom":
        keys = -scores
    elif strategy == "corr_sample":
        keys = scores / temperature - torch.empty_like(scores).exponential_().log()
    elif strategy == "random":
        keys = torch.rand_like(scores)
    else:
        raise ValueError(f"unknown masking strategy {strategy!r}")
    if valid is not None:
        keys = keys.masked_fill(~valid, float("-inf"))
    order = keys.argsort(dim=1, descending=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    picked = ranks < k[:, None]
    return picked if valid is None else picked & valid


def real_word_mask(tokens: torch.Tensor) -> torch.Tensor:
    """B x L, True at the expression's words: not SOT (first), not EOT (the argmax token), not padding."""
    real = tokens != 0
    real[:, 0] = False
    real[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)] = False
    return real


def mask_count(ratio: float, n: torch.Tensor) -> torch.Tensor:
    """max(1, round(ratio * n)) per sample (half to even), and 0 where there is nothing to mask."""
    k = torch.round(ratio * n.float()).long().clamp(min=1)
    return torch.where(n > 0, k, torch.zeros_like(k))


def cell_grid(grid: tuple[int, int], stride: int, cell: int | None) -> tuple[int, int]:
    """The LMVSD mask grid for a backbone grid: itself, or (H/c) x (W/c) with `mask_cell` c."""
    if cell is None or cell == stride:
        return tuple(grid)
    h, w = grid[0] * stride, grid[1] * stride  # the input is exactly the grid x the stride
    if h % cell or w % cell:
        raise ValueError(f"mask_cell {cell} must divide the input size {h} x {w}")
    return h // cell, w // cell


@torch.no_grad()
def correlation_scores(dense: torch.Tensor, sentence: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """B x h x w cosine similarities of the B x E x h x w patch features `dense` and the sentence in
    CLIP's joint space; `centre`: each image's mean patch feature subtracted first (what is common to
    every patch, background included, says nothing about which patch the sentence names)."""
    patches = dense.flatten(2).transpose(1, 2).float()  # B x N x E
    if centre:
        patches = patches - patches.mean(dim=1, keepdim=True)
    scores = F.cosine_similarity(patches, sentence.float()[:, None], dim=-1)
    return scores.view(-1, *dense.shape[-2:])


def picture_cells(content: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """B x gh x gw: the cells that show some of the picture, given each sample's B x 4 content box
    (top, left, bottom, right, input pixels); a cell wholly inside the letterbox border shows none."""
    cell_h, cell_w = size[0] / grid[0], size[1] / grid[1]
    rows = torch.arange(grid[0], device=content.device)
    cols = torch.arange(grid[1], device=content.device)
    top, left, bottom, right = (content[:, i, None] for i in range(4))
    in_rows = ((rows + 1) * cell_h > top) & (rows * cell_h < bottom)  # B x gh
    in_cols = ((cols + 1) * cell_w > left) & (cols * cell_w < right)  # B x gw
    return in_rows[:, :, None] & in_cols[:, None, :]


@torch.no_grad()
def cells_from_scores(scores: torch.Tensor, grid: tuple[int, int], ratio: float, strategy: str,
                      temperature: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """B x gh x gw cells to mask from a B x h x w score map, resampled to the cell grid (bilinear);
    `valid` (B x gh x gw), if given, the candidates: the ratio applies to them."""
    if tuple(grid) != tuple(scores.shape[-2:]):
        scores = F.interpolate(scores[:, None], size=grid, mode="bilinear", align_corners=False)[:, 0]
    scores = scores.flatten(1)
    b, n = scores.shape
    if valid is None:
        k = mask_count(ratio, torch.full((b,), n, device=scores.device))
        return select_masked(scores, k, strategy, temperature).view(b, *grid)
    valid = valid.flatten(1)
    return select_masked(scores, mask_count(ratio, valid.sum(dim=1)), strategy, temperature, valid).view(b, *grid)


def correlation_cells(dense: torch.Tensor, sentence: torch.Tensor, grid: tuple[int, int], ratio: float,
                      strategy: str, temperature: float, centre: bool = False,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """B x gh x gw cells to mask, scored by `correlation_scores`."""
    return cells_from_scores(correlation_scores(dense, sentence, centre), grid, ratio, strategy, temperature, valid)


class FrozenScorer:
    """A no-grad copy of the pretrained CLIP towers that scores the masks (`scorer: frozen`).

    Not a submodule on purpose: it stays outside the optimizer, the checkpoints, the parameter
    counts and DDP, stays in eval mode, and moves to the images' device when first used.
    """

    def __init__(self, backbone: nn.Module):
        self.backbone = copy.deepcopy(backbone).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[VisualFeatures, TextFeatures]:
        if self.backbone.mean.device != images.device:
            self.backbone.to(images.device)
        return self.backbone.encode_image(images), self.backbone.encode_text(tokens)


class CMMaskSD(nn.Module):
    """`forward` is the main branch alone (inference costs what CRIS costs); `training_loss` adds the branches."""

    def __init__(self, seg: CRIS, cfg: MaskSDConfig, compare_frozen: bool = False):
        super().__init__()
        tower = seg.backbone.tower
        tower.check_mask_cell(cfg.mask_cell)
        if cfg.vit_masking == "drop" and not tower.supports_drop:
            raise ValueError(f"masksd.vit_masking: drop needs a ViT backbone (a {tower.name} {tower.masking})")
        self.cfg = cfg
        self.seg = seg
        self.distill_scale = 1.0  # the training loop's `warmup_scale`: the share of lambda_v / lambda_t in use
        # Ablation of weight sharing: the masked branches get their own copy, same initialisation.
        self.student = copy.deepcopy(seg) if cfg.weights == "separate" and cfg.branches != "none" else None
        # `compare_frozen`: the frozen scorer's masks are also drawn, for the diagnostics only
        # (`mask/frozen/...`), where another scorer chooses the masks and the choice is not random.
        self.compares_frozen = (compare_frozen and cfg.branches != "none" and cfg.scorer != "frozen"
                                and cfg.strategy != "random")
        # Taken now, while the backbone holds the pretrained weights (a resumed run loads over them later).
        wants_copy = (cfg.branches != "none" and cfg.scorer == "frozen") or self.compares_frozen
        self.frozen = FrozenScorer(seg.backbone) if wants_copy else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the towers of every network that trains (`ClipBackbone`); the
        frozen scorer runs without gradients and keeps nothing anyway."""
        for net in {id(self.seg): self.seg, id(self.masked_net): self.masked_net}.values():
            net.backbone.set_grad_checkpointing(enable)

    @property
    def masked_net(self) -> CRIS:
        return self.seg if self.student is None else self.student

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.seg(images, tokens)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """`CRIS.param_groups` over the main network and, if separate, the student."""
        nets = [self.seg] if self.student is None else [self.seg, self.student]
        groups = [net.param_groups() for net in nets]
        return [p for g in groups for p in g[0]], [p for g in groups for p in g[1]]

    def _runs(self, enabled: bool, weight: float) -> bool:
        return self.training and enabled and (weight > 0 or self.cfg.gt_on_masked)

    def training_loss(self, images: torch.Tensor, tokens: torch.Tensor, gt_mask: torch.Tensor,
                      stats: MaskStats | None = None, content: torch.Tensor | None = None,
                      kind: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts {seg, lmvsd, vmlsd} (each as added to the total; 0 when off; the
        joint branch reports as lmvsd), the parts as detached 0-dim tensors: reading one is a device
        sync, left to the caller.

        In eval mode only the main branch runs, so this is the validation loss of the main branch.
        `stats`, if given, counts where the drawn masks fall (for the hit rates), per expression `kind`
        (B codes), and where the frozen scorer's would have (`compares_frozen`). `content` (B x 4,
        the letterboxed picture's box) keeps cells wholly inside the border out of the LMVSD candidates.
        The masked passes leave BatchNorm's running statistics to the clean pass (`clean_batch_stats`).
        """
        cfg = self.cfg
        vis = self.seg.encode_image(images)
        txt = self.seg.encode_text(tokens)
        logits = self.seg.decode(vis, txt)
        parts = {"seg": cfg.seg_weight * seg_loss(logits, gt_mask)}
        wants_cells = self._runs(cfg.use_lmvsd or cfg.use_joint, cfg.lambda_v)
        wants_words = self._runs(cfg.use_vmlsd or cfg.use_joint, cfg.lambda_t if cfg.use_vmlsd else cfg.lambda_v)
        scored = self._scoring_features(images, tokens, vis, txt) if wants_cells or wants_words else None
        cells = self.patch_mask(*scored, logits, content, tuple(images.shape[-2:])) if wants_cells else None
        words = self.word_mask(*scored, tokens) if wants_words else None
        if stats is not None:
            if cells is not None:
                stats.add_lmvsd(cells, gt_mask, kind)
            if words is not None:
                stats.add_vmlsd(words, tokens, real_word_mask(tokens), kind)
            if self.compares_frozen and (cells is not None or words is not None):
                self._count_frozen_masks(images, tokens, gt_mask, content, kind, stats, cells is not None,
                                         words is not None)
        with clean_batch_stats(self.masked_net):
            if cfg.use_joint and cells is not None:
                parts["lmvsd"] = self._branch_loss(self._masked_logits(images, tokens, vis, txt, cells, words),
                                                   logits, gt_mask, cfg.lambda_v * self.distill_scale)
            else:
                if cells is not None:
                    parts["lmvsd"] = self._branch_loss(self._masked_logits(images, tokens, vis, txt, cells, None),
                                                       logits, gt_mask, cfg.lambda_v * self.distill_scale)
                if words is not None:
                    parts["vmlsd"] = self._branch_loss(self._masked_logits(images, tokens, vis, txt, None, words),
                                                       logits, gt_mask, cfg.lambda_t * self.distill_scale)
        total = sum(parts.values())
        zero = total.new_zeros(()).detach()
        report = {"seg": zero, "lmvsd": zero, "vmlsd": zero} | {k: v.detach() for k, v in parts.items()}
        return total, report

    @torch.no_grad()
    def _count_frozen_masks(self, images, tokens, gt_mask, content, kind, stats: MaskStats, cells: bool,
                            words: bool) -> None:
        """Where the frozen scorer's masks would fall, as `source="frozen"`; its draws (`corr_sample`)
        use a forked random state, so the run trains exactly as without the comparison."""
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            vis, txt = self.frozen.encode(images, tokens)
            if cells:
                picked = self.patch_mask(vis, txt, None, content, tuple(images.shape[-2:]), scorer="frozen")
                stats.add_lmvsd(picked, gt_mask, kind, source="frozen")
            if words:
                picked = self.word_mask(vis, txt, tokens, scorer="frozen")
                stats.add_vmlsd(picked, tokens, real_word_mask(tokens), kind, source="frozen")

    def _branch_loss(self, branch_logits, main_logits, gt_mask, weight: float) -> torch.Tensor:
        loss = weight * distill_loss(branch_logits, main_logits, self.cfg.distill_loss)
        return loss + seg_loss(branch_logits, gt_mask) if self.cfg.gt_on_masked else loss

    def mask_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return cell_grid(grid, self.seg.backbone.patch_stride, self.cfg.mask_cell)

    def dense(self, vis: VisualFeatures) -> torch.Tensor:
        """The patch features the masks are scored on (`correlation`)."""
        return vis.values if self.cfg.correlation == "values" else vis.joint

    def _scoring_features(self, images, tokens, vis: VisualFeatures, txt: TextFeatures):
        """The features the masks are scored on: the clean pass's (live), or the frozen copy's."""
        return self.frozen.encode(images, tokens) if self.cfg.scorer == "frozen" else (vis, txt)

    def patch_mask(self, vis: VisualFeatures, txt: TextFeatures, logits: torch.Tensor | None = None,
                   content: torch.Tensor | None = None, size: tuple[int, int] | None = None,
                   scorer: str | None = None) -> torch.Tensor:
        """B x gh x gw cells to mask for LMVSD: scored by patch-sentence correlation, or (`scorer:
        prediction`) by the teacher's probability averaged over each cell of the input; with `content`
        (and the input `size`), only cells that show some of the picture are candidates. `scorer`:
        the config's unless given."""
        cfg = self.cfg
        grid = self.mask_grid(vis.grid)
        # (Not for a ViT that drops its masked patches: it needs the same number masked in every image.)
        valid = picture_cells(content, grid, size) if content is not None and cfg.vit_masking != "drop" else None
        if (scorer or cfg.scorer) == "prediction":
            with torch.no_grad():
                scores = F.adaptive_avg_pool2d(torch.sigmoid(logits.detach().float()), grid)[:, 0]
            return cells_from_scores(scores, grid, cfg.mask_ratio_v, cfg.strategy, cfg.sample_temperature, valid)
        return correlation_cells(self.dense(vis), txt.sentence, grid, cfg.mask_ratio_v, cfg.strategy,
                                 cfg.sample_temperature, cfg.centre, valid)

    def word_mask(self, vis: VisualFeatures, txt: TextFeatures, tokens: torch.Tensor,
                  scorer: str | None = None) -> torch.Tensor:
        """B x L words to mask for VMLSD, scored by their similarity to CLIP's pooled image embedding
        (what CLIP's contrastive loss aligned the text with)."""
        cfg = self.cfg
        if vis.pooled is None:
            raise ValueError(f"the {self.seg.backbone.tower.name} image tower gives no pooled image embedding "
                             "(VisualFeatures.pooled), which VMLSD scores the words against")
        with torch.no_grad():
            backbone = self.frozen.backbone if (scorer or cfg.scorer) == "frozen" else self.seg.backbone
            words = backbone.project_words(txt.words).float()  # B x L x E
            scores = F.cosine_similarity(words, vis.pooled.float()[:, None], dim=-1)
            real = real_word_mask(tokens)
            k = mask_count(cfg.mask_ratio_t, real.sum(dim=1))
            return select_masked(scores, k, cfg.strategy, cfg.sample_temperature, valid=real)

    def _masked_logits(self, images, tokens, vis: VisualFeatures, txt: TextFeatures,
                       cells: torch.Tensor | None, words: torch.Tensor | None) -> torch.Tensor:
        """The masked pass: image cells and/or words hidden; with shared weights the clean features
        of a modality left intact are reused."""
        net, cfg = self.masked_net, self.cfg
        shared = net is self.seg
        if cells is not None:
            masked_vis = net.encode_image(images, cells, drop=cfg.vit_masking == "drop", fill=cfg.fill)
        else:
            masked_vis = vis if shared else net.encode_image(images)
        if words is not None:
            masked_txt = net.encode_text(*self._hidden_words(tokens, words))
        else:
            masked_txt = txt if shared else net.encode_text(tokens)
        return net.decode(masked_vis, masked_txt)

    def _hidden_words(self, tokens: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, word mask) for the text encoder: every chosen word to the mask token, or BERT's
        80 / 10 / 10 (mask token / a random token / left as it is)."""
        if self.cfg.word_noise == "mask":
            return tokens, words
        draw = torch.rand(words.shape, device=words.device)
        to_token, to_random = words & (draw < 0.8), words & (draw >= 0.8) & (draw < 0.9)
        # Any id but padding and CLIP's last two, start- and end-of-text (the end marks where the sentence ends).
        vocab = self.masked_net.backbone.clip.token_embedding.num_embeddings
        random_ids = torch.randint_like(tokens, 1, vocab - 2)
        return torch.where(to_random, random_ids, tokens), to_token
