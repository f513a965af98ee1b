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


PLATEAU_SHARE = 0.2  # "trained to a plateau": judged over the last 20% of a run's epochs


def plateau_window(curve: list[float | None], epochs: list[int]) -> list[tuple[int, float]]:
    """The (epoch, top-1) evaluations in the last PLATEAU_SHARE of epochs, anchored by the last one before it."""
    points = [(e, v) for e, v in zip(epochs, curve) if v is not None]
    if len(points) < 2:
        return []
    start = points[-1][0] * (1 - PLATEAU_SHARE)  # e.g. 30 epochs: the window is epochs 25-30, measured from 24
    before = [p for p in points if p[0] <= start]
    return before[-1:] + [p for p in points if p[0] > start]


def reported_curve(run: dict, curve: dict) -> list:
    """The val top-1 curve of the number a run reports: the EMA model's where the run has one, else the model's."""
    return curve["ema_val_top1"] if run.get("top1_ema") is not None and "ema_val_top1" in curve else curve["val_top1"]


def plateau_range(curve: list[float | None], epochs: list[int]) -> float | None:
    """Largest spread of top-1 over the plateau window (max - min): single evaluations' noise included."""
    window = plateau_window(curve, epochs)
    return round(max(v for _, v in window) - min(v for _, v in window), 3) if len(window) >= 2 else None


def plateau_trend(curve: list[float | None], epochs: list[int]) -> float | None:
    """How far top-1 moved over the plateau window by its trend: the least-squares slope through the window's
    evaluations times the window's length in epochs (points; + still rising, - falling).

    The criterion "moves < 0.5 points" is judged on this rather than on the spread: a single evaluation on a
    few thousand images carries a binomial SE of ~0.4-0.9 points, so the spread of 5-7 evaluations exceeds
    0.5 on a curve that is flat, while the trend averages that noise out.
    """
    window = plateau_window(curve, epochs)
    if len(window) < 2:
        return None
    xs, ys = [float(e) for e, _ in window], [float(v) for _, v in window]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return round(slope * (xs[-1] - xs[0]), 3)


REPRODUCED_PAIRED, OPPOSITE, NO_EFFECT = "reproduced", "opposite", "no_effect"


def paired_verdict(delta: float | None, half: float | None, n: int, min_effect: float) -> Verdict:
    """Verdict on a claim `row > vs` from the paired Δ over seeds and its 95% CI half-width.

    - pending: no common seed; inconclusive (n<2 pairs) below two pairs;
    - reproduced: the CI lies above 0; opposite: the CI lies below 0;
    - not reproduced: the CI includes 0 and excludes every gain of `min_effect` points or more (the
      pre-registered smallest effect of interest: the data rule out a difference that large);
    - inconclusive: the CI includes 0 and also gains of `min_effect` or more (not enough power).
    """
    if delta is None:
        return Verdict(PENDING, "pending")
    if half is None:
        return Verdict(INCONCLUSIVE, "inconclusive (n<2 pairs)")
    lo, hi = delta - half, delta + half
    if lo > 0:
        return Verdict(REPRODUCED_PAIRED, "reproduced at this scale")
    if hi < 0:
        return Verdict(OPPOSITE, "opposite (CI below 0)")
    if hi < min_effect:
        return Verdict(NO_EFFECT, f"not reproduced (CI includes 0 and excludes gains >= {min_effect:g})")
    return Verdict(INCONCLUSIVE, f"inconclusive (CI includes 0 and gains >= {min_effect:g})")
