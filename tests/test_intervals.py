"""Bootstrap intervals: coverage on synthetic scorers with a known accuracy, resampling of whole
units, pairing of trials on the same samples, the paired test and the mean over benchmarks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from prunelab import intervals as I

P = 0.3  # the synthetic scorer's true accuracy
DRAWS = 1000  # samples (Bernoulli draws) per synthetic trial
EXPERIMENTS = 400  # synthetic trials per coverage estimate


def _coverage(units: list[str] | None, pairs: bool) -> float:
    """Share of ``EXPERIMENTS`` synthetic trials whose 95% interval holds the true score.

    Each trial scores ``DRAWS`` samples of accuracy ``P``; with ``pairs`` the samples come in
    pairs of one image whose two answers are both right or both wrong (a fully correlated
    unit, as MME's image pairs can be), else they are independent. Everything is drawn from
    fixed seeds, so the result is the same on every run.
    """
    rng = np.random.default_rng(20_240_601)
    covered = 0
    for experiment in range(EXPERIMENTS):
        if pairs:
            scores = np.repeat(rng.random(DRAWS // 2) < P, 2).astype(float)
        else:
            scores = (rng.random(DRAWS) < P).astype(float)
        replicates = I.mean_replicates(scores, units, seed=experiment)
        low, high = I.percentile_interval(replicates)
        covered += low <= 100 * P <= high
    return covered / EXPERIMENTS


def test_coverage_of_independent_samples_is_nominal():
    """The number of covering trials among 400 is Binomial(400, ~0.95) for a correct method,
    sd 0.011: the band 0.92..0.98 is 2.7 sd either side, so a correct method passes for
    almost every seed (and the seeds are fixed), while an interval of half the width (~68%
    coverage) or twice the width (~100%) fails."""
    assert 0.92 <= _coverage(None, pairs=False) <= 0.98


def test_coverage_needs_whole_units_when_samples_are_grouped():
    """Correlated pairs: resampling whole units keeps the 95% coverage; resampling samples
    one by one underestimates the variance by half (expected coverage ~83%, 6 sd below
    0.92)."""
    units = [f"image{i // 2}" for i in range(DRAWS)]
    assert 0.92 <= _coverage(units, pairs=True) <= 0.98
    assert _coverage(None, pairs=True) < 0.9


def test_units_are_resampled_whole():
    units = ["a", "a", "", "c", "c", "c", ""]
    for indices in I.resample_indices(units, n=200, seed=3):
        counts = Counter(indices.tolist())
        assert counts[0] == counts[1]  # unit a: both samples, equally often
        assert counts[3] == counts[4] == counts[5]  # unit c
        drawn = counts[0] + counts[3] + counts[2] + counts[6]  # units drawn (a, c, 2, 6)
        assert drawn == 4  # as many units as there are distinct units
        assert len(indices) == 2 * counts[0] + 3 * counts[3] + counts[2] + counts[6]
    # every unit is drawn in some replicate, and some replicate leaves each out
    assert {i for r in I.resample_indices(units, n=200, seed=3) for i in r} == set(range(7))


def test_resamples_are_deterministic_and_independent_of_sample_order():
    ids = [f"q{i}" for i in range(12)]
    units = [f"g{i // 3}" if i % 4 else "" for i in range(12)]
    first = I.resample_indices(units, n=50, seed=7, ids=ids)
    again = I.resample_indices(units, n=50, seed=7, ids=ids)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other_seed = I.resample_indices(units, n=50, seed=8, ids=ids)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed, strict=True))
    order = np.random.default_rng(0).permutation(12)
    shuffled = I.resample_indices([units[i] for i in order], n=50, seed=7,
                                  ids=[ids[i] for i in order])  # fmt: skip
    for a, b in zip(first, shuffled, strict=True):  # the same samples, by id, each time
        assert Counter(ids[i] for i in a) == Counter(ids[order[i]] for i in b)


def test_other_samples_get_other_resamples():
    """Two benchmarks of the same size: unrelated draws (unit ids are hashed into the seed)."""
    a = I.resample_indices(None, n=20, ids=[f"a{i}" for i in range(30)])
    b = I.resample_indices(None, n=20, ids=[f"b{i}" for i in range(30)])
    assert not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_mean_fast_path_matches_the_generic_path():
    rng = np.random.default_rng(5)
    values = rng.random(40)
    units = [f"u{i % 13}" if i % 5 else "" for i in range(40)]
    ids = [f"s{i}" for i in range(40)]
    fast = I.mean_replicates(values, units, scale=100.0, n=300, seed=2, ids=ids)
    generic = I.score_replicates(units, lambda i: 100.0 * values[i].mean(), n=300, seed=2,
                                 ids=ids)  # fmt: skip
    np.testing.assert_allclose(fast, generic, rtol=1e-12)
    assert fast.shape == (300,) and np.ptp(fast) > 0


def test_trials_on_the_same_samples_are_paired():
    """Same units: the same resamples, so a trial that differs from its baseline on two samples
    gets a tight ratio interval around the true ratio, far tighter than its score's."""
    units = [f"img{i // 2}" for i in range(200)]
    baseline = np.array([1.0 if i % 4 else 0.0 for i in range(200)])  # 75% right
    own = baseline.copy()
    own[[1, 2]] = 0.0  # two answers lost
    base_reps = I.mean_replicates(baseline, units, seed=1)
    own_reps = I.mean_replicates(own, units, seed=1)
    assert np.all(own_reps <= base_reps)  # same draws: own only ever loses answers
    low, high = I.ratio_interval(own_reps, base_reps)
    ratio = own.mean() / baseline.mean()  # 148 / 150
    assert low <= ratio <= high == 1.0 and high - low < 0.05
    score_low, score_high = I.percentile_interval(own_reps)
    assert score_high - score_low > 10  # the score alone: +-6 points or so
    unpaired = I.mean_replicates(baseline, units, seed=2)  # other resamples: not paired
    wide = I.ratio_interval(own_reps, unpaired)
    assert wide is not None and wide[1] - wide[0] > 5 * (high - low)


def test_percentile_interval_by_hand():
    values = np.arange(101, dtype=float)  # quantile q is 100 q exactly
    assert I.percentile_interval(values) == pytest.approx((2.5, 97.5))
    assert I.percentile_interval(values, level=0.5) == pytest.approx((25.0, 75.0))
    assert I.percentile_interval([*values, np.nan]) == pytest.approx((2.5, 97.5))
    with pytest.raises(ValueError):
        I.percentile_interval([np.nan])
    with pytest.raises(ValueError):
        I.percentile_interval(values, level=1.0)


def test_ratio_interval_by_hand():
    own = np.arange(1.0, 102.0)  # 1..101
    assert I.ratio_interval(own, 2 * own) == pytest.approx((0.5, 0.5))
    baseline = np.full(101, 10.0)
    assert I.ratio_interval(own, baseline) == pytest.approx((0.35, 9.85))
    baseline[:51] = 0.0  # zero baselines left out: own 52..101 / 10
    assert I.ratio_interval(own, baseline) == pytest.approx((5.2 + 0.025 * 4.9, 10.1 - 0.1225))
    assert I.ratio_interval(own, own[:-1]) is None
    assert I.ratio_interval(own, ()) is None and I.ratio_interval(None, own) is None
    assert I.ratio_interval(own, np.zeros(101)) is None


def test_not_worse_by_hand():
    best = np.linspace(50.0, 60.0, 100)
    assert not I.not_worse(best, best - 5.0)  # every replicate 5 points worse
    assert I.not_worse(best, best + 1.0)  # better
    assert I.not_worse(best, best)
    # differences -2, -1, ..., 97: the 2.5% quantile is -2 + 0.025 * 99 = 0.475 > 0: worse
    assert not I.not_worse(best, best - np.arange(-2.0, 98.0))
    # differences -3 .. 96: the 2.5% quantile is -0.525 <= 0: not significantly worse
    assert I.not_worse(best, best - np.arange(-3.0, 97.0))
    with pytest.raises(ValueError):
        I.not_worse(best, best[:-1])


def test_mean_interval_by_hand():
    a, b = np.arange(101.0), np.arange(101.0)[::-1] + 100.0
    # replicate-wise mean (a + b) / 2 = 100 for every replicate
    assert I.mean_interval([a, b]) == pytest.approx((100.0, 100.0))
    assert I.mean_interval([a, a]) == I.percentile_interval(a)
    with_nan = a.copy()
    with_nan[0] = np.nan  # that replicate is left out of the mean
    assert I.mean_interval([with_nan, a]) == I.percentile_interval(a[1:])
    assert I.mean_interval([]) is None and I.mean_interval([a, a[:-1]]) is None
    assert I.mean_interval([a, None]) is None


def test_bad_input():
    with pytest.raises(ValueError, match="at least one sample"):
        I.resample_indices([])
    with pytest.raises(ValueError, match="units for"):
        I.mean_replicates([1.0, 0.0], ["a"])
    with pytest.raises(ValueError, match="ids for"):
        I.resample_indices(["a", "b"], ids=["x"])
