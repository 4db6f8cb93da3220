"""What a cell of an ablation table may claim: a two-level paired bootstrap over seeds and images.

Two sources of variation decide a comparison (the project's statistics spec): training seeds and test
images (expressions of one image are not independent). Each replicate therefore resamples both,
as MultiBERTs' multibootstrap does: n seeds with replacement (one draw for both arms when they ran
the same seed ids), then as many images as the split has, with replacement, one draw shared by
both arms and all seeds. A replicate's delta is the mean over drawn seeds of the variant's metric
on the drawn expressions minus the same for the baseline.

With few seeds the seed draw is degenerate (3 seeds: all three draws alike 1 time in 9), and the
percentile interval alone covers the true delta about 77 % of the time, with about 22 % false
positives on identical arms (measured in `tests/test_stats.py`'s simulation of the default sweep's
noise). So the reported interval is the union of the bootstrap's and a t-interval over seeds
(paired per-seed deltas, or Welch for unpaired arms): the t-interval brings the small-sample seed
variance, the bootstrap the test images it cannot see; together they cover about 95 %. A delta is
significant when that interval excludes 0 and both arms have >= 2 seeds; with one seed in an arm
the interval is the bootstrap's over images only and nothing is significant.

Vectorised: an image draw is a row of counts per image, so a metric on the drawn expressions is a
ratio of two matrix products of those counts with per-image sums (sum of IoU, number of
expressions, sum of I, sum of U), per seed. Metrics are fractions (1 point = 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

from cmmasksd.metrics import ious

METRICS = ("miou", "oiou")
TABLE_COLUMNS = ("seed", "sentence_idx", "image_id", "inter", "union")
_CHUNK_BYTES = 200e6  # peak memory of one chunk of replicates: ~32 bytes per (replicate, image)


@dataclass(frozen=True, eq=False)
class Arm:
    """One arm of a comparison: per seed (rows) and expression (columns) intersection and union."""

    inter: np.ndarray
    union: np.ndarray
    seeds: tuple

    def __post_init__(self):
        inter = np.asarray(self.inter, dtype=np.float64)
        union = np.asarray(self.union, dtype=np.float64)
        if inter.ndim != 2 or inter.shape != union.shape:
            raise ValueError(f"inter {inter.shape} and union {union.shape} must be the same "
                             "n_seeds x n_expressions shape")
        if inter.shape[0] != len(self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"need one distinct seed id per row: {inter.shape[0]} rows, seeds {self.seeds}")
        if inter.shape[1] == 0:
            raise ValueError("an arm needs at least one expression")
        if (inter < 0).any() or (inter > union).any():
            raise ValueError("need 0 <= inter <= union for every seed and expression")
        object.__setattr__(self, "inter", inter)
        object.__setattr__(self, "union", union)
        object.__setattr__(self, "seeds", tuple(self.seeds))

    @property
    def n_seeds(self) -> int:
        return self.inter.shape[0]

    def per_seed(self, metric: str) -> np.ndarray:
        """The metric of each seed on all expressions."""
        if metric == "miou":
            return ious(self.inter, self.union).mean(axis=1)
        return _ratio(self.inter.sum(axis=1), self.union.sum(axis=1))


@dataclass(frozen=True)
class Delta:
    """Variant minus baseline for one metric, and what the runs behind it can support."""

    metric: str
    delta: float  # mean over seeds of the variant - mean over seeds of the baseline, all expressions
    ci_low: float  # the reported interval: union of the bootstrap's and the seed t-interval
    ci_high: float
    p_value: float  # the larger of the bootstrap's and the t-test's one-sided p (the sign opposite delta)
    n_a: int
    n_b: int
    paired: bool  # both arms ran the same seed ids: one seed draw for both
    seed_variance_measured: bool  # each arm has >= 2 seeds
    significant: bool  # interval excludes 0 and the seed variance is measured
    boot_low: float  # percentiles of the two-level bootstrap (images only when seed_variance_measured is False)
    boot_high: float
    p_boot: float  # P(Delta* <= 0) for a delta >= 0, P(Delta* >= 0) for a negative one
    t_low: float  # t-interval over seeds (paired, else Welch); NaN unless both arms have >= 2 seeds
    t_high: float
    per_seed_deltas: tuple  # in the baseline's seed order; empty when not paired
    values_a: tuple  # the baseline's metric per seed, all expressions
    values_b: tuple
    n_boot: int
    level: float


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 1 where den is 0 (oIoU of only both-empty expressions, as `metrics.summarize`)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)


def _counts(draws: np.ndarray, n_categories: int) -> np.ndarray:
    """Rows of indices (B x k) -> how often each category was drawn per row (B x n_categories)."""
    rows = draws.shape[0]
    flat = (draws + n_categories * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n_categories).reshape(rows, n_categories).astype(np.float64)


def _image_codes(image_ids, n_expr: int) -> tuple[np.ndarray, int]:
    """Each expression's image as an index 0..n_images-1 (images in sorted id order)."""
    image_ids = np.asarray(image_ids)
    if image_ids.shape != (n_expr,):
        raise ValueError(f"need one image id per expression: {image_ids.shape} for {n_expr} expressions")
    images, codes = np.unique(image_ids, return_inverse=True)
    return codes.ravel(), len(images)


def _per_image_sums(arm: Arm, codes: np.ndarray, n_images: int) -> np.ndarray:
    """n_images x (3 n_seeds): per image and seed, sum of IoU | sum of I | sum of U."""
    per_expr = np.concatenate([ious(arm.inter, arm.union), arm.inter, arm.union])
    return np.stack([np.bincount(codes, weights=row, minlength=n_images) for row in per_expr], axis=1)


def _drawn_seed_means(drawn_sums: np.ndarray, n_expr_drawn: np.ndarray, seed_draws: np.ndarray) -> dict:
    """Per replicate, the mean over drawn seeds of each metric on the drawn expressions.

    drawn_sums: B x 3 x n_seeds sums of IoU, I and U over the drawn expressions.
    """
    iou_sum, inter_sum, union_sum = drawn_sums[:, 0], drawn_sums[:, 1], drawn_sums[:, 2]
    per_seed = {"miou": iou_sum / n_expr_drawn[:, None], "oiou": _ratio(inter_sum, union_sum)}
    seed_weights = _counts(seed_draws, drawn_sums.shape[2]) / seed_draws.shape[1]
    return {metric: (seed_weights * values).sum(axis=1) for metric, values in per_seed.items()}


def _replicate_deltas(a: Arm, b: Arm, image_ids, seed_draws_a: np.ndarray, seed_draws_b: np.ndarray,
                      image_draws: np.ndarray) -> dict[str, np.ndarray]:
    """Delta* per replicate for explicit draws, so it can be checked against a plain loop.

    seed_draws_a / _b: B x n_a / B x n_b row indices into each arm's seeds (the same array when
    paired); image_draws: B x n_images indices into the images in sorted id order.
    """
    codes, n_images = _image_codes(image_ids, a.inter.shape[1])
    per_image = np.column_stack([np.bincount(codes, minlength=n_images),
                                 _per_image_sums(a, codes, n_images), _per_image_sums(b, codes, n_images)])
    drawn = _counts(np.asarray(image_draws), n_images) @ per_image  # one product for everything
    n_boot, split = drawn.shape[0], 1 + 3 * a.n_seeds
    means_a = _drawn_seed_means(drawn[:, 1:split].reshape(n_boot, 3, a.n_seeds), drawn[:, 0],
                                np.asarray(seed_draws_a))
    means_b = _drawn_seed_means(drawn[:, split:].reshape(n_boot, 3, b.n_seeds), drawn[:, 0],
                                np.asarray(seed_draws_b))
    return {metric: means_b[metric] - means_a[metric] for metric in METRICS}


def _bootstrap(a: Arm, b: Arm, image_ids, paired: bool, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """n_boot replicate deltas; the image draws come in chunks that keep memory under ~200 MB.

    Seeds and images have their own random streams, so the replicates do not depend on the chunking.
    """
    seed_rng, image_rng = np.random.default_rng(seed).spawn(2)
    seeds_a = seed_rng.integers(0, a.n_seeds, size=(n_boot, a.n_seeds))
    seeds_b = seeds_a if paired else seed_rng.integers(0, b.n_seeds, size=(n_boot, b.n_seeds))
    n_images = len(np.unique(np.asarray(image_ids)))
    chunk = max(1, int(_CHUNK_BYTES // (32 * n_images)))
    parts = []
    for start in range(0, n_boot, chunk):
        rows = slice(start, min(start + chunk, n_boot))
        images = image_rng.integers(0, n_images, size=(rows.stop - rows.start, n_images))
        parts.append(_replicate_deltas(a, b, image_ids, seeds_a[rows], seeds_b[rows], images))
    return {metric: np.concatenate([part[metric] for part in parts]) for metric in METRICS}


def compare_arms(a: Arm, b: Arm, image_ids, metrics=METRICS, n_boot: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> dict[str, Delta]:
    """Variant `b` against baseline `a` per metric, from one bootstrap draw shared by all metrics.

    Seeds are paired (one draw for both arms, per-seed deltas, a t-interval) when both arms ran the
    same seed ids; `b`'s rows are then aligned to `a`'s seed order.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRICS}")
    if a.inter.shape[1] != b.inter.shape[1]:
        raise ValueError(f"the arms have {a.inter.shape[1]} and {b.inter.shape[1]} expressions; "
                         "both must be evaluated on the same expressions")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    paired = set(a.seeds) == set(b.seeds)
    if paired:
        order = [b.seeds.index(s) for s in a.seeds]
        b = Arm(b.inter[order], b.union[order], a.seeds)
    replicates = _bootstrap(a, b, image_ids, paired, n_boot, seed)
    return {metric: _delta(metric, a, b, replicates[metric], paired, level) for metric in metrics}


def _delta(metric: str, a: Arm, b: Arm, replicates: np.ndarray, paired: bool, level: float) -> Delta:
    values_a, values_b = a.per_seed(metric), b.per_seed(metric)
    delta = float(values_b.mean() - values_a.mean())
    tail = (1 - level) / 2
    boot_low, boot_high = (float(q) for q in np.quantile(replicates, [tail, 1 - tail]))
    p_boot = float(np.mean(replicates <= 0) if delta >= 0 else np.mean(replicates >= 0))
    seed_variance_measured = a.n_seeds >= 2 and b.n_seeds >= 2
    per_seed_deltas = values_b - values_a if paired else np.array([])
    ci_low, ci_high, p_value, t_low, t_high = boot_low, boot_high, p_boot, math.nan, math.nan
    if seed_variance_measured:
        t_low, t_high, p_t = (_paired_t(per_seed_deltas, level) if paired else _welch_t(values_a, values_b, level))
        ci_low, ci_high, p_value = min(boot_low, t_low), max(boot_high, t_high), max(p_boot, p_t)
    return Delta(
        metric=metric, delta=delta, ci_low=ci_low, ci_high=ci_high, p_value=p_value,
        n_a=a.n_seeds, n_b=b.n_seeds, paired=paired, seed_variance_measured=seed_variance_measured,
        significant=bool(seed_variance_measured and (ci_low > 0 or ci_high < 0)),
        boot_low=boot_low, boot_high=boot_high, p_boot=p_boot,
        t_low=t_low, t_high=t_high, per_seed_deltas=tuple(per_seed_deltas.tolist()),
        values_a=tuple(values_a.tolist()), values_b=tuple(values_b.tolist()),
        n_boot=len(replicates), level=level,
    )


def _t_result(mean: float, se: float, df: float, level: float) -> tuple[float, float, float]:
    """(low, high, one-sided p of the sign opposite `mean`) of a t statistic."""
    if se == 0:
        return mean, mean, 0.0 if mean != 0 else 1.0
    half = scipy.stats.t.ppf(1 - (1 - level) / 2, df) * se
    return mean - half, mean + half, float(scipy.stats.t.sf(abs(mean) / se, df))


def _paired_t(deltas: np.ndarray, level: float) -> tuple[float, float, float]:
    return _t_result(float(deltas.mean()), float(deltas.std(ddof=1)) / math.sqrt(deltas.size), deltas.size - 1,
                     level)


def _welch_t(values_a: np.ndarray, values_b: np.ndarray, level: float) -> tuple[float, float, float]:
    """Welch's t over two unpaired sets of per-seed values (Welch-Satterthwaite degrees of freedom)."""
    va, vb = values_a.var(ddof=1) / values_a.size, values_b.var(ddof=1) / values_b.size
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (values_a.size - 1) + vb**2 / (values_b.size - 1)) if se > 0 else 1.0
    return _t_result(float(values_b.mean() - values_a.mean()), se, df, level)


def seed_summary(values) -> tuple[float, float]:
    """Mean and std (ddof 1) over seeds; the std is NaN with one seed (its variance is not measured)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no seeds to summarise")
    return float(values.mean()), float(values.std(ddof=1)) if values.size >= 2 else math.nan


def power_line(sd: float, n_seeds: int, target_delta: float = 0.01, alpha: float = 0.05,
               power: float = 0.8) -> dict:
    """Smallest delta n seeds detect, and seeds needed for `target_delta` (normal approximation).

    `sd` is a per-seed std: of paired per-seed deltas (the spec's formula), or the baseline's seed
    std when no pairs exist. NaN / None when `sd` is not finite (fewer than 2 seeds). At least 2
    seeds are always needed: one seed cannot measure its own variance.
    """
    z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
    if not math.isfinite(sd):
        return {"min_detectable_delta": math.nan, "seeds_needed": None}
    return {"min_detectable_delta": z * sd / math.sqrt(n_seeds),
            "seeds_needed": max(2, math.ceil((z * sd / target_delta) ** 2))}


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"per-expression table lacks columns {missing}; needs {list(TABLE_COLUMNS)}")
    if table.duplicated(["seed", "sentence_idx"]).any():
        raise ValueError("per-expression table has more than one row for some (seed, sentence_idx)")


def _complete_expressions(table: pd.DataFrame) -> np.ndarray:
    """sentence_idx present for every seed of the table, sorted."""
    n_seeds = table["seed"].nunique()
    per_expr = table.groupby("sentence_idx")["seed"].nunique()
    return np.sort(per_expr.index[per_expr == n_seeds].to_numpy())


def arm_from_table(table: pd.DataFrame, expressions=None) -> Arm:
    """An arm from a long table (one row per seed and expression), columns in the given order.

    `expressions` (sentence_idx values) default to those present for every seed.
    """
    _check_table(table)
    if expressions is None:
        expressions = _complete_expressions(table)
    wide = table.pivot(index="seed", columns="sentence_idx", values=["inter", "union"])
    inter = wide["inter"].reindex(columns=expressions)
    union = wide["union"].reindex(columns=expressions)
    if inter.isna().any().any() or union.isna().any().any():
        raise ValueError("some requested expressions are missing for some seed of the table")
    return Arm(inter.to_numpy(), union.to_numpy(), tuple(inter.index.tolist()))


def _image_ids(tables: list[pd.DataFrame], expressions: np.ndarray) -> np.ndarray:
    """The image of each expression, checked to be the same in every row of every table."""
    pairs = pd.concat([t[["sentence_idx", "image_id"]] for t in tables]).drop_duplicates()
    if pairs["sentence_idx"].duplicated().any():
        raise ValueError("some sentence_idx has different image ids across rows")
    return pairs.set_index("sentence_idx")["image_id"].reindex(expressions).to_numpy()


def compare_tables(base: pd.DataFrame, variant: pd.DataFrame, **kwargs) -> dict[str, Delta]:
    """`compare_arms` on long per-expression tables, aligned by sentence_idx.

    Uses only expressions present for every seed of both arms; keyword arguments go to `compare_arms`.
    """
    for table in (base, variant):
        _check_table(table)
    shared = np.intersect1d(_complete_expressions(base), _complete_expressions(variant))
    if shared.size == 0:
        raise ValueError("the two tables share no expression evaluated for every seed of both arms")
    image_ids = _image_ids([base, variant], shared)
    return compare_arms(arm_from_table(base, shared), arm_from_table(variant, shared), image_ids, **kwargs)
