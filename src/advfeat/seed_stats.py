"""Small statistics for comparing runs: mean ± standard deviation and paired Student-t intervals.

Comparisons in this field pair runs by seed (same initialisation, same data order), so the
interval of a difference between two methods is the paired one: with per-seed differences
``d_1 … d_n``, ``mean(d) ± t_{0.975, n−1} · sd(d) / √n``. No SciPy: the Student-t quantile is
computed from the regularized incomplete beta function (continued fraction, Lentz's method) and
bisection, exact to about 1e-10.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from advfeat.errors import AdvfeatError

__all__ = [
    "PairedDifference",
    "Summary",
    "paired_difference",
    "student_t_cdf",
    "student_t_ppf",
    "summarize",
]


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def _regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, for ``0 ≤ x ≤ 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise AdvfeatError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (e.g. ``student_t_ppf(0.975, 2) = 4.3027``)."""
    if not 0.0 < p < 1.0:
        raise AdvfeatError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``n − 1``) of one metric over seeds."""

    n: int
    mean: float
    std: float | None


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (``std`` is ``None`` for a single value)."""
    if not values:
        raise AdvfeatError("cannot summarize an empty list of values")
    std = statistics.stdev(values) if len(values) > 1 else None
    return Summary(len(values), statistics.fmean(values), std)


@dataclass(frozen=True)
class PairedDifference:
    """``treatment − baseline`` paired by seed, with its two-sided ``level`` Student-t interval.

    ``low``/``high`` are ``None`` with fewer than two pairs (no spread to estimate).
    """

    n: int
    mean: float
    std: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(
    treatment: Sequence[float], baseline: Sequence[float], level: float = 0.95
) -> PairedDifference:
    """Paired difference of two equally long, seed-aligned sequences (Student t, ``n − 1`` df)."""
    if len(treatment) != len(baseline):
        raise AdvfeatError(
            f"paired values need the same seeds: {len(treatment)} against {len(baseline)}"
        )
    diffs = [a - b for a, b in zip(treatment, baseline, strict=True)]
    s = summarize(diffs)
    if s.std is None:
        return PairedDifference(s.n, s.mean, None, None, None, level)
    half = student_t_ppf(0.5 + level / 2.0, s.n - 1) * s.std / math.sqrt(s.n)
    return PairedDifference(s.n, s.mean, s.std, s.mean - half, s.mean + half, level)
