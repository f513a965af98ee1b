"""Seed statistics: 95% confidence intervals of a mean and of a difference, and the claim verdicts."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache

@lru_cache(maxsize=512)
def t_quantile(p: float, dof: float) -> float:
    """Student-t quantile t_p(dof) for p in (0.5, 1) and any real dof >= 1 (Welch's are fractional).

    With t = sqrt(dof) tan(theta) the t density becomes proportional to cos(theta)^(dof - 1), so
    P(|T| <= t) = int_0^theta cos^(dof-1) / int_0^(pi/2) cos^(dof-1); the integral is Simpson's rule on
    [0, theta] (smooth there), the normaliser sqrt(pi) G(dof/2) / (2 G((dof+1)/2)), and theta is found by
    bisection. Above 200 dof the two-term Cornish-Fisher expansion around the normal quantile is used.
    """
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    if dof < 1:
        raise ValueError(f"need at least 1 degree of freedom, got {dof}")
    if dof > 200:
        z = statistics.NormalDist().inv_cdf(p)
        return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
    target = 2 * p - 1
    norm = math.sqrt(math.pi) * math.exp(math.lgamma(dof / 2) - math.lgamma((dof + 1) / 2)) / 2

    def mass(theta: float, n: int = 256) -> float:
        h = theta / n
        s = sum((4 if i % 2 else 2) * math.cos(i * h) ** (dof - 1) for i in range(1, n))
        return (1 + math.cos(theta) ** (dof - 1) + s) * h / 3 / norm

    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < target else (lo, mid)
    return math.sqrt(dof) * math.tan((lo + hi) / 2)


def t95(dof: float) -> float:
    """t_{0.975}(dof): the factor of a two-sided 95% interval."""
    return t_quantile(0.975, float(dof))


def ci95(values: list[float]) -> float | None:
    """Half-width of the 95% confidence interval of the mean (Student t; None below 2 values)."""
    n = len(values)
    if n < 2:
        return None
    return t95(n - 1) * statistics.stdev(values) / math.sqrt(n)


def diff_ci95(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """(mean(a) - mean(b), half-width of its 95% CI): Welch's interval (unequal variances, unpaired seeds).

    None for the half-width when either side has fewer than 2 values; 0 when both sides have no spread.
    """
    delta = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return delta, None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return delta, 0.0
    dof = se2 ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return delta, t95(max(dof, 1.0)) * math.sqrt(se2)


def paired_diff_ci95(a: dict, b: dict) -> tuple[float | None, float | None, int]:
    """(mean of a[s] - b[s] over the seeds s both have, half-width of its 95% CI, number of pairs).

    The same seed gives both rows the same init, data order and augmentation draws, so the per-seed
    differences cancel most seed-to-seed spread; the CI is Student's t on those differences. None for
    the mean without a common seed, for the half-width below 2 pairs.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return None, None, 0
    return statistics.fmean(diffs), ci95(diffs), len(diffs)


REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PENDING, CONSISTENT = (
    "reproduced", "not_reproduced", "inconclusive", "pending", "consistent")


@dataclass(frozen=True)
class Verdict:
    kind: str  # one of the constants above
    text: str  # what the report prints


def verdict(paper_delta: float | None, a: list[float] | None, b: list[float] | None) -> Verdict:
    """Is the paper's claimed difference (row a minus row b) reproduced by the seeds a and b?

    - a side not run yet (None): pending;
    - fewer than 2 seeds on a side: "inconclusive (n<2 seeds)";
    - the paper claims a difference: "reproduced at this scale" when the reproduced difference has the
      paper's sign and its 95% CI excludes 0, else "not reproduced" (with the reason);
    - the paper reports no difference (Δ = 0): "consistent" when the CI includes 0, else "not reproduced".
    """
    if a is None or b is None:
        return Verdict(PENDING, "pending")
    if paper_delta is None:
        return Verdict(INCONCLUSIVE, "no paper value")
    if len(a) < 2 or len(b) < 2:
        return Verdict(INCONCLUSIVE, "inconclusive (n<2 seeds)")
    delta, half = diff_ci95(a, b)
    excludes_zero = abs(delta) > half
    if paper_delta == 0:
        if excludes_zero:
            return Verdict(NOT_REPRODUCED, "not reproduced (paper: no difference; CI excludes 0)")
        return Verdict(CONSISTENT, "consistent (paper: no difference; CI includes 0)")
    if not excludes_zero:
        return Verdict(NOT_REPRODUCED, "not reproduced (CI includes 0)")
    if (delta > 0) != (paper_delta > 0):
        return Verdict(NOT_REPRODUCED, "not reproduced (opposite sign)")
    return Verdict(REPRODUCED, "reproduced at this scale")
