"""The ablation statistics: the vectorised bootstrap against a plain loop, its calibration, the rules."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from cmmasksd import stats
from cmmasksd.stats import (Arm, compare_arms, compare_tables, power_line,
                            seed_summary)

# ----------------------------------------------------------------------------- small exact case

# 10 expressions on 6 images (ids deliberately unsorted and sparse); unions of 0 are both-empty.
IMAGE_IDS = np.array([30, 30, 10, 50, 50, 50, 20, 40, 40, 60])
INTER_A = np.array([[4, 0, 3, 0, 5, 1, 2, 0, 7, 6],
                    [2, 1, 3, 0, 4, 0, 2, 0, 6, 5]])
UNION_A = np.array([[8, 5, 6, 0, 9, 4, 2, 3, 9, 6],
                    [8, 5, 6, 4, 9, 4, 4, 0, 9, 8]])
INTER_B = np.array([[5, 2, 3, 0, 5, 2, 0, 0, 8, 6],
                    [3, 2, 2, 0, 6, 1, 1, 0, 7, 6]])
UNION_B = np.array([[7, 5, 5, 0, 8, 4, 0, 0, 9, 7],
                    [8, 4, 6, 0, 9, 4, 3, 0, 9, 6]])


def slow_metrics(inter, union, expressions):
    """mIoU and oIoU of one seed on a list of expressions, written literally."""
    per_expr = [1.0 if union[i] == 0 else inter[i] / union[i] for i in expressions]
    total_union = sum(union[i] for i in expressions)
    oiou = 1.0 if total_union == 0 else sum(inter[i] for i in expressions) / total_union
    return {"miou": sum(per_expr) / len(per_expr), "oiou": oiou}


def slow_replicate_deltas(seed_draws_a, seed_draws_b, image_draws):
    images = sorted(set(IMAGE_IDS.tolist()))
    deltas = {"miou": [], "oiou": []}
    for seeds_a, seeds_b, drawn in zip(seed_draws_a, seed_draws_b, image_draws):
        expressions = []
        for k in drawn:
            expressions += [i for i in range(len(IMAGE_IDS)) if IMAGE_IDS[i] == images[k]]
        for metric in deltas:
            metric_a = [slow_metrics(INTER_A[s], UNION_A[s], expressions)[metric] for s in seeds_a]
            metric_b = [slow_metrics(INTER_B[s], UNION_B[s], expressions)[metric] for s in seeds_b]
            deltas[metric].append(sum(metric_b) / len(metric_b) - sum(metric_a) / len(metric_a))
    return deltas


def small_arms(seeds_b=(0, 1)):
    return Arm(INTER_A, UNION_A, (0, 1)), Arm(INTER_B, UNION_B, seeds_b)


@pytest.mark.parametrize("paired", [True, False])
def test_vectorised_replicates_equal_a_plain_loop(paired):
    rng = np.random.default_rng(0)
    seed_draws_a = rng.integers(0, 2, size=(60, 2))
    seed_draws_b = seed_draws_a if paired else rng.integers(0, 2, size=(60, 2))
    image_draws = rng.integers(0, 6, size=(60, 6))
    image_draws[0] = 1  # only image 20: union 0 for arm B's seed 0, so its oIoU is 0 / 0 -> 1
    image_draws[1] = 3  # only image 40: a both-empty expression in several seeds
    fast = stats._replicate_deltas(*small_arms(), IMAGE_IDS, seed_draws_a, seed_draws_b, image_draws)
    slow = slow_replicate_deltas(seed_draws_a, seed_draws_b, image_draws)
    for metric in ("miou", "oiou"):
        np.testing.assert_allclose(fast[metric], slow[metric], rtol=0, atol=1e-12)


def test_union_zero_everywhere_counts_as_one():
    arm = Arm(np.zeros((2, 3)), np.zeros((2, 3)), (0, 1))
    for metric in ("miou", "oiou"):
        np.testing.assert_array_equal(arm.per_seed(metric), [1.0, 1.0])


def test_point_estimate_by_hand():
    everything = list(range(len(IMAGE_IDS)))
    result = compare_arms(*small_arms(), IMAGE_IDS, n_boot=200)
    for metric in ("miou", "oiou"):
        per_seed_a = [slow_metrics(INTER_A[s], UNION_A[s], everything)[metric] for s in (0, 1)]
        per_seed_b = [slow_metrics(INTER_B[s], UNION_B[s], everything)[metric] for s in (0, 1)]
        assert result[metric].delta == pytest.approx(np.mean(per_seed_b) - np.mean(per_seed_a))
        assert result[metric].per_seed_deltas == pytest.approx(np.subtract(per_seed_b, per_seed_a))
    assert result["oiou"].values_a[0] == pytest.approx(28 / 52)


def test_paired_seeds_are_aligned_by_id():
    a, b = small_arms()
    swapped = Arm(INTER_B[::-1], UNION_B[::-1], (1, 0))
    assert compare_arms(a, swapped, IMAGE_IDS, n_boot=300) == compare_arms(a, b, IMAGE_IDS, n_boot=300)


def test_deterministic_for_a_seed_and_chunking_keeps_every_replicate(monkeypatch):
    a, b = small_arms()
    first = compare_arms(a, b, IMAGE_IDS, n_boot=500, seed=3)
    assert compare_arms(a, b, IMAGE_IDS, n_boot=500, seed=3) == first
    assert compare_arms(a, b, IMAGE_IDS, n_boot=500, seed=4) != first
    monkeypatch.setattr(stats, "_CHUNK_BYTES", 32 * 6 * 7)  # 7 replicates per chunk
    chunked = compare_arms(a, b, IMAGE_IDS, n_boot=500, seed=3)
    assert chunked == first  # the same replicates, intervals and p-values, in 72 chunks


# ----------------------------------------------------------------------------- calibration
#
# Simulated arms with the noise the spec measured on the default RefShapes sweep, in fractions:
# - 3 seeds, as the sweep runs (seeds 0/1/2);
# - seed std 0.026 per arm: the CRIS baseline's val mIoU over seeds was 29.0 / 30.4 / 25.4;
#   seed effects are independent between arms (its per-seed deltas varied even more);
# - test-set noise of a one-seed delta with SE ~0.006: the single-seed expression bootstrap gave
#   [+2.5, +4.9], half-width 1.2 points. Split into an arm x image effect (sd 0.049 over 300
#   images) and a seed x expression effect (sd 0.1 over 1000 expressions): sqrt(2 (0.049^2/300 +
#   0.1^2/1000)) = 0.006. An image effect shared by both arms (difficulty) clusters expressions.
# Every term is uniform with bounded support, so IoUs stay in [0, 1] without clipping and the
# population difference (expectation over seeds and images) is exactly the simulated delta, for
# mIoU (linear) and oIoU (unions drawn independently of IoUs: E[IoU U] / E[U] = E[IoU]).
N_SIMULATIONS = 200
N_SEEDS, N_IMAGES, N_EXPRESSIONS = 3, 300, 1000
SEED_SD, ARM_IMAGE_SD, SEED_EXPRESSION_SD, SHARED_IMAGE_HALF_WIDTH = 0.026, 0.049, 0.1, 0.15
TRUE_DELTA = 0.02


def uniform(rng, sd, size):
    return rng.uniform(-sd * math.sqrt(3), sd * math.sqrt(3), size)


def simulated_arms(rng, true_delta, paired=True):
    image_ids = np.concatenate([np.arange(N_IMAGES), rng.integers(0, N_IMAGES, N_EXPRESSIONS - N_IMAGES)])
    shared_image = rng.uniform(-SHARED_IMAGE_HALF_WIDTH, SHARED_IMAGE_HALF_WIDTH, N_IMAGES)[image_ids]
    union = rng.integers(100, 10_000, N_EXPRESSIONS).astype(float)
    arms = []
    for arm, delta in enumerate((0.0, true_delta)):
        iou = (0.5 + delta + shared_image + uniform(rng, SEED_SD, (N_SEEDS, 1))
               + uniform(rng, ARM_IMAGE_SD, N_IMAGES)[image_ids]
               + uniform(rng, SEED_EXPRESSION_SD, (N_SEEDS, N_EXPRESSIONS)))
        seeds = tuple(range(N_SEEDS)) if paired or arm == 0 else tuple(range(10, 10 + N_SEEDS))
        arms.append(Arm(iou * union, np.broadcast_to(union, iou.shape), seeds))
    return *arms, image_ids


@pytest.fixture(scope="module", params=["paired", "unpaired"])
def simulations(request):
    """Per setting (true delta, then the null), the mIoU Delta of every simulated comparison."""
    rng = np.random.default_rng(0)
    paired = request.param == "paired"
    return {delta: [compare_arms(*simulated_arms(rng, delta, paired), metrics=("miou",), n_boot=1000,
                                 seed=int(rng.integers(2**31)))["miou"] for _ in range(N_SIMULATIONS)]
            for delta in (TRUE_DELTA, 0.0)}


def test_interval_covers_the_true_delta(simulations):
    coverage = np.mean([d.ci_low <= TRUE_DELTA <= d.ci_high for d in simulations[TRUE_DELTA]])
    assert 0.88 <= coverage <= 0.99, f"coverage {coverage:.3f}"


def test_identical_arms_are_rarely_significant(simulations):
    false_positives = np.mean([d.significant for d in simulations[0.0]])
    assert false_positives <= 0.10, f"false positive rate {false_positives:.3f}"


def test_the_percentile_bootstrap_alone_would_undercover_with_three_seeds(simulations):
    """Why the interval is a union: the bootstrap's own percentiles miss the truth far too often."""
    coverage = np.mean([d.boot_low <= TRUE_DELTA <= d.boot_high for d in simulations[TRUE_DELTA]])
    assert coverage < 0.88, f"bootstrap-only coverage {coverage:.3f}"
    assert all(d.ci_low <= d.boot_low and d.boot_high <= d.ci_high for d in simulations[TRUE_DELTA])


def test_seed_t_interval_covers_the_true_delta(simulations):
    coverage = np.mean([d.t_low <= TRUE_DELTA <= d.t_high for d in simulations[TRUE_DELTA]])
    assert 0.88 <= coverage <= 0.99, f"coverage {coverage:.3f}"


# ----------------------------------------------------------------------------- the rules

def shifted_arms(seeds_a, seeds_b, shift=0.2, n_expr=40):
    """A baseline and a variant clearly better by `shift` in IoU, every seed alike."""
    rng = np.random.default_rng(1)
    union = np.full(n_expr, 100.0)
    base_iou = rng.uniform(0.2, 0.6, n_expr)
    image_ids = np.arange(n_expr) // 2

    def arm(iou, seeds):
        return Arm(np.tile(iou * union, (len(seeds), 1)), np.tile(union, (len(seeds), 1)), seeds)

    return arm(base_iou, seeds_a), arm(base_iou + shift, seeds_b), image_ids


@pytest.mark.parametrize("seeds_a, seeds_b", [((0,), (0,)), ((0,), (0, 1, 2)), ((0, 1), (7,))])
def test_one_seed_is_never_significant(seeds_a, seeds_b):
    result = compare_arms(*shifted_arms(seeds_a, seeds_b), n_boot=500)["miou"]
    assert result.ci_low > 0
    assert not result.significant and not result.seed_variance_measured
    assert math.isnan(result.t_low) and math.isnan(result.t_high)


def test_interval_excluding_zero_with_seeds_is_significant():
    result = compare_arms(*shifted_arms((0, 1, 2), (0, 1, 2)), n_boot=500)["miou"]
    assert result.ci_low > 0 and result.significant and result.seed_variance_measured
    assert result.delta == pytest.approx(0.2) and result.p_value == 0.0


def test_seed_t_interval_is_paired_for_paired_seeds_and_welch_otherwise():
    a, b = small_arms()
    paired = compare_arms(a, b, IMAGE_IDS, n_boot=200)["miou"]
    d = np.array(paired.per_seed_deltas)
    half = scipy.stats.t.ppf(0.975, 1) * d.std(ddof=1) / math.sqrt(2)
    assert paired.paired
    assert (paired.t_low, paired.t_high) == pytest.approx((d.mean() - half, d.mean() + half))
    unpaired = compare_arms(*small_arms(seeds_b=(5, 6)), IMAGE_IDS, n_boot=200)["miou"]
    assert not unpaired.paired and unpaired.per_seed_deltas == ()
    va, vb = np.array(unpaired.values_a), np.array(unpaired.values_b)
    welch = scipy.stats.ttest_ind(vb, va, equal_var=False).confidence_interval(0.95)
    assert (unpaired.t_low, unpaired.t_high) == pytest.approx((welch.low, welch.high))
    assert unpaired.seed_variance_measured


def test_reported_interval_and_p_are_the_conservative_union():
    for seeds_b in ((0, 1), (5, 6)):
        result = compare_arms(*small_arms(seeds_b=seeds_b), IMAGE_IDS, n_boot=500)["miou"]
        assert (result.ci_low, result.ci_high) == (min(result.boot_low, result.t_low),
                                                   max(result.boot_high, result.t_high))
        assert result.p_value >= result.p_boot
        assert result.significant == (result.ci_low > 0 or result.ci_high < 0)


def test_p_value_is_the_share_of_replicates_on_the_other_side_of_zero():
    a, b = small_arms()
    forward = compare_arms(a, b, IMAGE_IDS, n_boot=2000, seed=5)["miou"]
    replicates = stats._bootstrap(a, b, IMAGE_IDS, True, 2000, 5)["miou"]
    assert forward.delta > 0 and 0 < forward.p_boot < 0.5
    assert forward.p_boot == np.mean(replicates <= 0)
    backward = compare_arms(b, a, IMAGE_IDS, n_boot=2000, seed=5)["miou"]  # same draws, negated
    assert backward.delta == pytest.approx(-forward.delta)
    assert (backward.p_boot, backward.p_value) == pytest.approx((forward.p_boot, forward.p_value))
    assert (backward.ci_low, backward.ci_high) == pytest.approx((-forward.ci_high, -forward.ci_low))


def test_seed_summary():
    mean, std = seed_summary([0.290, 0.304, 0.254])
    assert mean == pytest.approx(0.848 / 3) and std == pytest.approx(np.std([0.290, 0.304, 0.254], ddof=1))
    assert math.isnan(seed_summary([0.3])[1])


def test_power_line_by_hand():
    line = power_line(0.026, 3)
    assert line["min_detectable_delta"] == pytest.approx((1.959964 + 0.841621) * 0.026 / math.sqrt(3))
    assert line["seeds_needed"] == 54  # (2.801585 * 2.6)^2 = 53.06
    assert power_line(math.nan, 1) == {"min_detectable_delta": pytest.approx(math.nan, nan_ok=True),
                                       "seeds_needed": None}


def test_clear_errors():
    with pytest.raises(ValueError, match="same n_seeds x n_expressions"):
        Arm(np.zeros((2, 3)), np.zeros((2, 4)), (0, 1))
    with pytest.raises(ValueError, match="distinct seed id per row"):
        Arm(np.zeros((2, 3)), np.zeros((2, 3)), (0,))
    with pytest.raises(ValueError, match="inter <= union"):
        Arm(np.ones((1, 3)), np.zeros((1, 3)), (0,))
    a, b = small_arms()
    with pytest.raises(ValueError, match="same expressions"):
        compare_arms(a, Arm(INTER_B[:, :9], UNION_B[:, :9], (0, 1)), IMAGE_IDS)
    with pytest.raises(ValueError, match="one image id per expression"):
        compare_arms(a, b, IMAGE_IDS[:9])


# ----------------------------------------------------------------------------- tables

def long_table(inter, union, seeds, sentence_idx, image_ids):
    return pd.DataFrame([
        {"seed": seed, "sentence_idx": sentence_idx[i], "image_id": image_ids[i],
         "inter": inter[row, i], "union": union[row, i]}
        for row, seed in enumerate(seeds) for i in range(inter.shape[1])
    ])


def test_compare_tables_aligns_by_sentence_and_drops_incomplete_expressions():
    sentence_idx = np.arange(10) * 7 + 3
    base = long_table(INTER_A, UNION_A, (0, 1), sentence_idx, IMAGE_IDS)
    variant = long_table(INTER_B, UNION_B, (0, 1), sentence_idx, IMAGE_IDS)
    variant = variant[~((variant["seed"] == 1) & (variant["sentence_idx"] == sentence_idx[4]))]
    shuffled = variant.sample(frac=1.0, random_state=0)
    keep = np.arange(10) != 4
    expected = compare_arms(Arm(INTER_A[:, keep], UNION_A[:, keep], (0, 1)),
                            Arm(INTER_B[:, keep], UNION_B[:, keep], (0, 1)), IMAGE_IDS[keep], n_boot=300)
    assert compare_tables(base.sample(frac=1.0, random_state=1), shuffled, n_boot=300) == expected


def test_compare_tables_errors():
    base = long_table(INTER_A, UNION_A, (0, 1), np.arange(10), IMAGE_IDS)
    elsewhere = long_table(INTER_B, UNION_B, (0, 1), np.arange(10) + 100, IMAGE_IDS)
    with pytest.raises(ValueError, match="share no expression"):
        compare_tables(base, elsewhere)
    with pytest.raises(ValueError, match="lacks columns"):
        compare_tables(base.drop(columns="image_id"), base)
    with pytest.raises(ValueError, match="more than one row"):
        compare_tables(pd.concat([base, base.head(1)]), base)
