"""CM-MaskSD: CRIS plus two masked self-distillation branches that run only in training.

Main: P = f(I, T), L_seg = BCE(P, GT).
LMVSD: mask the image patches chosen (by `strategy`) from their CLIP similarity to the
sentence; L_v = D(f(I_masked, T), stopgrad(P)).
VMLSD: mask the words chosen from their CLIP similarity to the image's global feature;
L_t = D(f(I, T_masked), stopgrad(P)).
L = L_seg + lambda_v * L_v + lambda_t * L_t (+ BCE against GT on a masked branch with
`gt_on_masked`, unweighted). The masks are scored on the clean pass's features, and with
shared weights a masked branch reuses the clean features of the modality it leaves intact.

Masking cell (`mask_cell`, pixels). None keeps the backbone's own: a ResNet zeroes its
stride-32 cells of the input, a ViT replaces whole patch tokens by the learned mask token (so a
ViT accepts only its patch size). On the 96 px RefShapes default a stride-32 grid is 3 x 3, and
masking 50 % zeroes about half the image, usually the referred object itself; MaskRIS zeroes
32 px cells at 448 px, a 14 x 14 grid. A ResNet with cell c masks an (H/c) x (W/c) grid: the
patch-sentence similarity map is resampled to it bilinearly and the cells are chosen on it as
before. The RefShapes profiles use 12 px (8 x 8); the paper profiles keep the stride (13 x 13 at
416 px). `training_loss(..., stats=)` measures how often the masks hit the object and the
content words (`mask_stats`).

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
from cmmasksd.model.cris import CRIS
from cmmasksd.model.mask_stats import MaskStats


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
def correlation_cells(dense: torch.Tensor, sentence: torch.Tensor, grid: tuple[int, int], ratio: float,
                      strategy: str, temperature: float) -> torch.Tensor:
    """B x gh x gw cells to mask, scored by the cosine similarity of the B x E x h x w patch features
    `dense` and the sentence in CLIP's joint space.

    On a cell grid other than the backbone's, the score map is resampled to it (bilinear).
    """
    patches = dense.flatten(2).transpose(1, 2).float()  # B x N x E
    scores = F.cosine_similarity(patches, sentence.float()[:, None], dim=-1)
    if tuple(grid) != tuple(dense.shape[-2:]):
        scores = F.interpolate(scores.view(-1, 1, *dense.shape[-2:]), size=grid, mode="bilinear",
                               align_corners=False).flatten(1)
    b, n = scores.shape
    k = mask_count(ratio, torch.full((b,), n, device=scores.device))
    return select_masked(scores, k, strategy, temperature).view(b, *grid)


class CMMaskSD(nn.Module):
    """`forward` is the main branch alone (inference costs what CRIS costs); `training_loss` adds the branches."""

    def __init__(self, seg: CRIS, cfg: MaskSDConfig):
        super().__init__()
        tower = seg.backbone.tower
        tower.check_mask_cell(cfg.mask_cell)
        if cfg.vit_masking == "drop" and not tower.supports_drop:
            raise ValueError(f"masksd.vit_masking: drop needs a ViT backbone (a {tower.name} {tower.masking})")
        self.cfg = cfg
        self.seg = seg
        # Ablation of weight sharing: the masked branches get their own copy, same initialisation.
        self.student = copy.deepcopy(seg) if cfg.weights == "separate" and cfg.branches != "none" else None

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
                      stats: MaskStats | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts {seg, lmvsd, vmlsd} (each as added to the total; 0 when off), the
        parts as detached 0-dim tensors: reading one is a device sync, left to the caller.

        In eval mode only the main branch runs, so this is the validation loss of the main branch.
        `stats`, if given, counts where the drawn masks fall (for the hit rates).
        """
        cfg = self.cfg
        vis = self.seg.encode_image(images)
        txt = self.seg.encode_text(tokens)
        logits = self.seg.decode(vis, txt)
        parts = {"seg": seg_loss(logits, gt_mask)}
        if self._runs(cfg.use_lmvsd, cfg.lambda_v):
            mask = self.patch_mask(vis, txt)
            if stats is not None:
                stats.add_lmvsd(mask, gt_mask)
            parts["lmvsd"] = self._branch_loss(self._lmvsd_logits(images, tokens, mask, txt), logits, gt_mask,
                                               cfg.lambda_v)
        if self._runs(cfg.use_vmlsd, cfg.lambda_t):
            mask = self.word_mask(vis, txt, tokens)
            if stats is not None:
                stats.add_vmlsd(mask, tokens, real_word_mask(tokens))
            parts["vmlsd"] = self._branch_loss(self._vmlsd_logits(images, tokens, vis, mask), logits, gt_mask,
                                               cfg.lambda_t)
        total = sum(parts.values())
        zero = total.new_zeros(()).detach()
        report = {"seg": zero, "lmvsd": zero, "vmlsd": zero} | {k: v.detach() for k, v in parts.items()}
        return total, report

    def _branch_loss(self, branch_logits, main_logits, gt_mask, weight: float) -> torch.Tensor:
        loss = weight * distill_loss(branch_logits, main_logits, self.cfg.distill_loss)
        return loss + seg_loss(branch_logits, gt_mask) if self.cfg.gt_on_masked else loss

    def mask_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return cell_grid(grid, self.seg.backbone.patch_stride, self.cfg.mask_cell)

    def dense(self, vis: VisualFeatures) -> torch.Tensor:
        """The patch features the masks are scored on (`correlation`)."""
        return vis.values if self.cfg.correlation == "values" else vis.joint

    def patch_mask(self, vis: VisualFeatures, txt: TextFeatures) -> torch.Tensor:
        """B x gh x gw cells to mask for LMVSD (`correlation_cells` on the clean pass's features)."""
        return correlation_cells(self.dense(vis), txt.sentence, self.mask_grid(vis.grid), self.cfg.mask_ratio_v,
                                 self.cfg.strategy, self.cfg.sample_temperature)

    def word_mask(self, vis: VisualFeatures, txt: TextFeatures, tokens: torch.Tensor) -> torch.Tensor:
        """B x L words to mask for VMLSD, scored by word-image similarity (image = the mean patch feature)."""
        with torch.no_grad():
            words = self.seg.backbone.project_words(txt.words).float()  # B x L x E
            image = self.dense(vis).float().mean(dim=(2, 3))
            scores = F.cosine_similarity(words, image[:, None], dim=-1)
            real = real_word_mask(tokens)
            k = mask_count(self.cfg.mask_ratio_t, real.sum(dim=1))
            return select_masked(scores, k, self.cfg.strategy, self.cfg.sample_temperature, valid=real)

    def _lmvsd_logits(self, images, tokens, patch_mask: torch.Tensor, txt: TextFeatures) -> torch.Tensor:
        net = self.masked_net
        masked_vis = net.encode_image(images, patch_mask, drop=self.cfg.vit_masking == "drop")
        return net.decode(masked_vis, txt if net is self.seg else net.encode_text(tokens))

    def _vmlsd_logits(self, images, tokens, vis: VisualFeatures, word_mask: torch.Tensor) -> torch.Tensor:
        net = self.masked_net
        masked_txt = net.encode_text(tokens, word_mask)
        return net.decode(vis if net is self.seg else net.encode_image(images), masked_txt)
