"""95% bootstrap intervals of trial scores, paired across trials evaluated on the same samples.

Method: the nonparametric bootstrap with the percentile interval. A *replicate* is the trial's
score recomputed on a resample of its samples: whole *units* drawn with replacement, as many as
there are distinct units, each drawn unit contributing all of its samples. A unit is what a
benchmark scores together (MME's two questions of an image, MMBench's circular variants of a
question); a sample without one is its own unit. The score of a replicate is computed by the
benchmark's own aggregate (a mean, MME's acc + acc+ sums, POPE's F1, ...), so intervals hold for
scores that are not per-sample means. The interval at level ``L`` is the ``(1 - L) / 2`` and
``(1 + L) / 2`` percentiles of the replicates (linear interpolation).

Pairing: the resamples depend only on the multiset of unit ids (and ``n``, ``seed``), never on
the order of the samples or on their scores. Two trials evaluated on the same samples (same
benchmark, eval ``limit`` and ``sample_seed``) therefore get the same resamples, replicate ``r``
of one and of the other are scored on the same draw, and replicate-wise differences and ratios
are paired statistics: :func:`ratio_interval` (score / unpruned score) and :func:`not_worse`
(is a method significantly worse than the best?) rest on it. The unit ids are hashed into the
random stream, so trials on different samples (e.g. two benchmarks) get unrelated resamples.

Plain numpy and the standard library: no torch, no MLflow, no database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "LEVEL",
    "N_REPLICATES",
    "mean_interval",
    "mean_replicates",
    "not_worse",
    "percentile_interval",
    "ratio_interval",
    "ratio_replicates",
    "resample_indices",
    "score_replicates",
]

N_REPLICATES = 1000
"""Bootstrap replicates per trial."""

LEVEL = 0.95
"""Confidence level of every interval."""

Replicates = Sequence[float] | np.ndarray


class _Units:
    """The samples grouped by unit, units in sorted order of their ids.

    ``order``: sample indices sorted by unit; ``starts`` / ``sizes``: each unit's slice of
    ``order``; ``digest``: a hash of the sorted unit ids and their sizes (the multiset of units).
    """

    def __init__(self, units: Sequence[str] | None, count: int, ids: Sequence[str] | None):
        if units is not None and len(units) != count:
            raise ValueError(f"{len(units)} units for {count} samples")
        if ids is not None and len(ids) != count:
            raise ValueError(f"{len(ids)} ids for {count} samples")
        if count == 0:
            raise ValueError("resampling needs at least one sample (give units or ids)")
        keys = [self._key(units, ids, index) for index in range(count)]
        distinct = sorted(set(keys))
        position = {key: number for number, key in enumerate(distinct)}
        of_sample = np.fromiter((position[key] for key in keys), dtype=np.int64, count=count)
        self.order = np.argsort(of_sample, kind="stable")
        self.sizes = np.bincount(of_sample, minlength=len(distinct))
        self.starts = np.concatenate(([0], np.cumsum(self.sizes)[:-1]))
        self.of_sample = of_sample
        text = "\n".join(f"{kind}:{name}:{size}" for (kind, name), size in
                         zip(distinct, self.sizes.tolist(), strict=True))  # fmt: skip
        self.digest = hashlib.sha256(text.encode()).digest()

    @staticmethod
    def _key(units: Sequence[str] | None, ids: Sequence[str] | None, index: int) -> tuple:
        """A named unit ``(0, unit)``; a sample that is its own unit ``(1, id or index)``."""
        unit = units[index] if units is not None else ""
        if unit:
            return (0, str(unit))
        return (1, str(ids[index]) if ids is not None else f"{index:012d}")

    def __len__(self) -> int:
        return len(self.sizes)

    def draws(self, n: int, seed: int) -> np.ndarray:
        """(n, units) indices of the units each replicate draws, with replacement."""
        if n < 1:
            raise ValueError("n must be at least 1")
        words = np.frombuffer(self.digest[:16], dtype=np.uint32).tolist()
        rng = np.random.default_rng([int(seed), *words])
        return rng.integers(0, len(self), size=(n, len(self)))

    def indices(self, drawn: np.ndarray) -> np.ndarray:
        """The sample indices of the drawn units, each unit's samples together."""
        lengths = self.sizes[drawn]
        begins = np.cumsum(lengths) - lengths
        within = np.arange(int(lengths.sum())) - np.repeat(begins, lengths)
        return self.order[np.repeat(self.starts[drawn], lengths) + within]


def resample_indices(
    units: Sequence[str] | None,
    n: int = N_REPLICATES,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """The sample indices of ``n`` bootstrap resamples of whole units.

    ``units``: one unit id per sample (None: every sample its own unit); an empty id makes the
    sample its own unit, identified by ``ids[i]`` (the sample's id) when given, else by its
    index ``i``. Each resample draws as many units as there are distinct units, uniformly with
    replacement; a drawn unit contributes all its samples (a unit drawn twice, twice).

    Deterministic in (the multiset of units, ``n``, ``seed``) and independent of sample order:
    distinct unit ids are sorted before drawing, and the sorted ids are hashed into the seed.
    Samples that are their own unit count as order-independent only when ``ids`` are given.
    Trials on the same samples get the same resamples (see the module docstring: pairing).
    """
    count = len(units) if units is not None else (len(ids) if ids is not None else 0)
    grouped = _Units(units, count, ids)
    return [grouped.indices(drawn) for drawn in grouped.draws(n, seed)]


def score_replicates(
    units: Sequence[str] | None,
    statistic: Callable[[np.ndarray], float],
    n: int = N_REPLICATES,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """``statistic(indices)`` of each resample of :func:`resample_indices` (same arguments):
    the bootstrap replicates of a score computed by the benchmark's own aggregate over the
    samples at ``indices``. Returns a float array of length ``n``."""
    count = len(units) if units is not None else (len(ids) if ids is not None else 0)
    grouped = _Units(units, count, ids)
    return np.array(
        [float(statistic(grouped.indices(drawn))) for drawn in grouped.draws(n, seed)],
        dtype=np.float64,
    )


def mean_replicates(
    values: Sequence[float] | np.ndarray,
    units: Sequence[str] | None,
    scale: float = 100.0,
    n: int = N_REPLICATES,
    seed: int = 0,
    ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Bootstrap replicates of ``scale x mean(values)`` (a mean-of-per-sample-score benchmark),
    vectorised: per replicate, the sum of the drawn units' value sums over the sum of their
    sizes. The same numbers as ``score_replicates(units, lambda i: scale *
    values[i].mean(), ...)`` up to floating-point summation order."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError("values: one number per sample")
    grouped = _Units(units, len(values), ids)
    sums = np.bincount(grouped.of_sample, weights=values, minlength=len(grouped))
    drawn = grouped.draws(n, seed)
    return scale * sums[drawn].sum(axis=1) / grouped.sizes[drawn].sum(axis=1)


def _finite(replicates: Replicates | None) -> np.ndarray:
    """The replicates as a float array (NaN kept; None: empty)."""
    return np.asarray(() if replicates is None else replicates, dtype=np.float64).reshape(-1)


def percentile_interval(replicates: Replicates, level: float = LEVEL) -> tuple[float, float]:
    """The percentile bootstrap interval: the ``(1 - level) / 2`` and ``(1 + level) / 2``
    quantiles of the replicates (linear interpolation; NaN replicates left out)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), not {level}")
    values = _finite(replicates)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite replicates")
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _paired(own: Replicates | None, other: Replicates | None) -> tuple[np.ndarray, np.ndarray]:
    """Both replicate vectors as arrays; empty arrays unless both exist with equal lengths."""
    a, b = _finite(own), _finite(other)
    if a.size == 0 or a.size != b.size:
        return np.empty(0), np.empty(0)
    return a, b


def ratio_replicates(own: Replicates | None, baseline: Replicates | None) -> np.ndarray | None:
    """Replicate-wise ``own / baseline`` of two trials on the same samples (paired), NaN where
    the baseline replicate is zero; None when a vector is missing or their lengths differ."""
    a, b = _paired(own, baseline)
    if a.size == 0:
        return None
    out = np.full(a.shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out


def ratio_interval(
    own: Replicates | None, baseline: Replicates | None, level: float = LEVEL
) -> tuple[float, float] | None:
    """Paired percentile interval of ``own score / baseline score``: the quantiles of the
    replicate-wise ratios (replicates with a zero baseline left out). None when a vector is
    missing, their lengths differ, or every baseline replicate is zero."""
    ratios = ratio_replicates(own, baseline)
    if ratios is None or not np.isfinite(ratios).any():
        return None
    return percentile_interval(ratios, level)


def not_worse(best: Replicates, other: Replicates, level: float = LEVEL) -> bool:
    """Paired bootstrap test of "``other`` is significantly worse than ``best``": False only
    when the percentile interval of the replicate-wise differences ``best - other`` lies above
    0. True when it contains 0 (no significant difference) or lies below it (``other`` is
    better). Both vectors must come from trials on the same samples (equal lengths)."""
    a, b = _paired(best, other)
    if a.size == 0:
        raise ValueError("not_worse needs two replicate vectors of equal, non-zero length")
    low, _ = percentile_interval(a - b, level)
    return low <= 0.0


def mean_interval(
    vectors: Sequence[Replicates | None], level: float = LEVEL
) -> tuple[float, float] | None:
    """Percentile interval of a mean over several scores (e.g. the mean score ratio over
    benchmarks): replicate-wise mean of the vectors, then :func:`percentile_interval`.
    Replicates where some vector is NaN are left out. The vectors of different benchmarks
    come from independent resamples, so their replicate-wise mean is a bootstrap replicate of
    the mean. None when there is no vector, one is missing, or their lengths differ."""
    arrays = [_finite(v) for v in vectors]
    if not arrays or any(a.size == 0 or a.size != arrays[0].size for a in arrays):
        return None
    means = np.stack(arrays).mean(axis=0)
    if not np.isfinite(means).any():
        return None
    return percentile_interval(means, level)
