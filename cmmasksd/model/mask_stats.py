"""Are the masks language-guided? Hit rates of the masks the branches draw, against chance.

- `mask/lmvsd_hit`: masked image area on the referred object / masked image area.
  `mask/lmvsd_chance`: object area / image area over the same samples (what a uniformly random
  mask hits on average). Both at input resolution, letterbox border included.
- `mask/lmvsd_coverage`: the share of the objects' area that was masked; `mask/lmvsd_coverage_chance`:
  the share of the whole image that was (what random cells cover of anything: about the ratio).
- `mask/vmlsd_hit`: masked content tokens / masked tokens.
  `mask/vmlsd_chance`: what random masks hit: each expression's share of content tokens among its
  real tokens (not SOT, EOT or padding), weighted by how many of its tokens are masked. (Unweighted,
  short expressions, masked at a higher rate by the one-word minimum, would count too little.)

hit / chance > 1 means the mask prefers the object (the content words). Counts are summed over
an epoch and divided once, so every masked pixel (token) weighs the same whatever the batch.
Per expression kind too (`mask/<kind>/...`, where the data has several: RefShapes' attribute,
positional and relational expressions), and, where the live scorer chooses the masks, for the
frozen scorer's masks beside them (`mask/frozen/...`, `RunConfig.compare_frozen`).
"""

from __future__ import annotations

from functools import cache

import open_clip
import torch
import torch.nn.functional as F

# Function words only: for RIS, position words ("left", "above", "behind") and even generic
# nouns ("object") say where or what the object is, so they count as content.
STOP_WORDS = (
    "a", "an", "the", "this", "that", "these", "those", "of", "to", "in", "on", "at", "by", "with",
    "from", "for", "as", "and", "or", "is", "are", "it", "its", "his", "her", "their", "who", "which",
    ",", ".", "'s",
)


@cache
def stop_token_ids(device: torch.device | str = "cpu") -> torch.Tensor:
    """CLIP BPE ids of `STOP_WORDS` (each a single token); every other real token is content.

    A stop list rather than a content list: it carries to real data with an open vocabulary, and
    a word split into several BPE pieces ("leftmost" = "left" + "most") counts once per piece,
    as VMLSD masks pieces. On RefShapes it leaves exactly the generator's colour, shape, size and
    position words (and the generic nouns) as content.
    """
    tokenizer = open_clip.SimpleTokenizer()
    return torch.tensor([i for word in STOP_WORDS for i in tokenizer.encode(word)], device=device)


def content_token_mask(tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """B x L, True at the real tokens that are not stop words."""
    return real & ~torch.isin(tokens, stop_token_ids(tokens.device))


class MaskStats:
    """Sums of the counts behind the hit rates, per expression kind; `CMMaskSD.training_loss(..., stats=)`
    adds to them.

    `kinds` names the kinds the batches' `kind` codes index (`cmmasksd.data.kinds`); with more than
    one, `metrics` gives each kind's rates too, as `mask/<kind>/<name>`. A `source` other than the
    masks in use (the frozen scorer's, drawn alongside the live scorer's for comparison) is logged
    as `mask/<source>/...`.
    """

    def __init__(self, kinds: tuple[str, ...] = ("all",)):
        self.kinds = kinds
        # "<source>/<branch>" -> kinds x [hit, masked, chance numerator, chance denominator], on the
        # device: no sync per step
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, key: str, kind: torch.Tensor | None, *counts: torch.Tensor) -> None:
        """counts: per-sample B-vectors, binned by the samples' kinds."""
        counts = torch.stack(counts, dim=1).double()  # B x 4
        kind = torch.zeros(len(counts), dtype=torch.long, device=counts.device) if kind is None else kind
        if key not in self.sums:
            self.sums[key] = counts.new_zeros(len(self.kinds), 4)
        self.sums[key].index_add_(0, kind.to(counts.device), counts)

    @torch.no_grad()
    def add_lmvsd(self, masked: torch.Tensor, gt_mask: torch.Tensor, kind: torch.Tensor | None = None,
                  source: str = "") -> None:
        """masked: B x gh x gw cells (True = masked); gt_mask: B x 1 x H x W, 1 on the object; kind: B codes.

        Counted on the area the cells of H // gh px cover from the top left: all of it, except
        for a ViT whose patch does not divide the input (its patch conv leaves the rest out too).
        """
        cell = gt_mask.shape[-2] // masked.shape[-2]
        on_object = F.avg_pool2d(gt_mask.float(), cell, divisor_override=1)[:, 0]  # object pixels per cell
        masked = masked.to(on_object.dtype)
        cells = masked[0].numel() * cell**2
        self._add(_key(source, "lmvsd"), kind, (masked * on_object).sum(dim=(1, 2)), masked.sum(dim=(1, 2)) * cell**2,
                  on_object.sum(dim=(1, 2)), on_object.new_full((len(masked),), cells))

    @torch.no_grad()
    def add_vmlsd(self, masked: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor,
                  kind: torch.Tensor | None = None, source: str = "") -> None:
        """masked, real: B x L bool (masked tokens, the expression's tokens); tokens: B x L ids."""
        content = content_token_mask(tokens, real)
        n_masked = masked.sum(dim=1).double()
        share = content.sum(dim=1).double() / real.sum(dim=1).clamp(min=1).double()
        self._add(_key(source, "vmlsd"), kind, (masked & content).sum(dim=1), n_masked, n_masked * share, n_masked)

    def metrics(self) -> dict[str, float]:
        """`mask/[<source>/]<branch>_hit` and `_chance` (and LMVSD's coverage) for each branch that drew
        masks, over every kind and, with several kinds, per kind (`mask/[<source>/]<kind>/...`)."""
        out = {}
        for key, sums in self.sums.items():
            source, _, branch = key.rpartition("/")
            prefix = f"{MASK_PREFIX}{source}/" if source else MASK_PREFIX
            out.update(_rates(branch, sums.sum(dim=0).tolist(), prefix))
            if len(self.kinds) > 1:
                for kind, row in zip(self.kinds, sums.tolist()):
                    out.update(_rates(branch, row, f"{prefix}{kind}/"))
        return out


MASK_PREFIX = "mask/"


def _key(source: str, branch: str) -> str:
    return f"{source}/{branch}" if source else branch


def _rates(branch: str, sums: list[float], prefix: str) -> dict[str, float]:
    hit, masked, share, whole = sums
    out = {f"{prefix}{branch}_hit": _ratio(hit, masked), f"{prefix}{branch}_chance": _ratio(share, whole)}
    if branch == "lmvsd":  # hit: masked object area; share: object area; whole: image area
        out[f"{prefix}lmvsd_coverage"] = _ratio(hit, share)
        out[f"{prefix}lmvsd_coverage_chance"] = _ratio(masked, whole)
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")  # nothing masked (e.g. blank text): undefined
