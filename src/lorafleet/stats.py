"""Paired statistics for comparisons: runs of one seed share partition, fleet and initial
adapter, so the difference between two methods is measured seed by seed.

For a reference method R and another method M with per-seed values r_s and m_s over the same
seeds s, the paired difference is d_s = r_s − m_s; :func:`paired_difference` reports its mean
and a confidence interval, either Student's t (``mean ± t_{n−1} · sd / √n``, the default:
right for a handful of seeds) or a seeded percentile bootstrap of the mean of d. A difference
is *significant* when its interval excludes 0.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lorafleet.errors import LorafleetError

__all__ = ["PairedDifference", "paired_difference", "student_t_quantile"]

Interval = Literal["t", "bootstrap"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on its
    CDF; e.g. ``student_t_quantile(0.975, 4) = 2.7764``)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while _student_t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedDifference:
    """reference − method over paired seeds.

    Attributes:
        reference, method: the two methods (the difference is reference − method).
        quantity: what is compared (e.g. ``final``, ``best``, ``time_to_target``).
        seeds: the paired seeds used.
        mean: mean of the per-seed differences.
        low, high: the confidence interval (NaN with fewer than 2 seeds).
        confidence: e.g. 0.95.
        interval: ``t`` or ``bootstrap``.
    """

    reference: str
    method: str
    quantity: str
    seeds: tuple[int, ...]
    mean: float
    low: float
    high: float
    confidence: float
    interval: Interval

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (False when it is undefined)."""
        return math.isfinite(self.low) and (self.low > 0.0 or self.high < 0.0)

    def sentence(self, spec: str = "+.4g") -> str:
        """``fslora − hetlora: +0.012 [−0.004, +0.028], not significant at 5 seeds``."""
        def fmt(x: float) -> str:
            return format(x, spec).replace("-", "−") if math.isfinite(x) else "n/a"

        verdict = ("significant" if self.significant else "not significant")
        if not math.isfinite(self.low):
            verdict = "no interval with one seed"
        return (f"{self.reference} − {self.method}: {fmt(self.mean)} [{fmt(self.low)}, "
                f"{fmt(self.high)}], {verdict} at {self.n} seed{'s' if self.n != 1 else ''}")


def paired_difference(
    reference: Mapping[int, float],
    method: Mapping[int, float],
    *,
    names: tuple[str, str] = ("reference", "method"),
    quantity: str = "final",
    confidence: float = 0.95,
    interval: Interval = "t",
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """The paired difference reference − method over their common seeds.

    Args:
        reference, method: per-seed values of each method.
        names: (reference name, method name) for messages.
        quantity: the compared quantity's name.
        confidence: the interval's coverage, in (0, 1).
        interval: ``t`` (Student's t on the differences) or ``bootstrap`` (percentile
            bootstrap of their mean, ``resamples`` draws seeded by ``seed``).

    Raises:
        LorafleetError: the two methods were not run on the same seeds (unpaired), or a
            value is not finite.
    """
    if not 0.0 < confidence < 1.0:
        raise LorafleetError(f"confidence {confidence} must be in (0, 1)")
    if set(reference) != set(method):
        only_ref = sorted(set(reference) - set(method))
        only_met = sorted(set(method) - set(reference))
        raise LorafleetError(
            f"{names[0]} and {names[1]} are not paired: seeds {only_ref} only in {names[0]}, "
            f"{only_met} only in {names[1]}; run both on the same seeds")
    if not reference:
        raise LorafleetError(f"{names[0]} and {names[1]} share no seed to compare")
    seeds = tuple(sorted(reference))
    diffs = [float(reference[s]) - float(method[s]) for s in seeds]
    if not all(math.isfinite(d) for d in diffs):
        raise LorafleetError(f"{quantity} of {names[0]} or {names[1]} is not finite on some "
                             "seed; paired differences need finite values")
    mean = math.fsum(diffs) / len(diffs)
    low = high = math.nan
    if len(diffs) >= 2:
        if interval == "t":
            half = (student_t_quantile(0.5 + confidence / 2.0, len(diffs) - 1)
                    * statistics.stdev(diffs) / math.sqrt(len(diffs)))
            low, high = mean - half, mean + half
        elif interval == "bootstrap":
            rng = random.Random(seed)
            means = sorted(math.fsum(rng.choices(diffs, k=len(diffs))) / len(diffs)
                           for _ in range(resamples))
            tail = (1.0 - confidence) / 2.0
            low = means[int(math.floor(tail * (resamples - 1)))]
            high = means[int(math.ceil((1.0 - tail) * (resamples - 1)))]
        else:
            raise LorafleetError(f"interval {interval!r} must be t or bootstrap")
    return PairedDifference(reference=names[0], method=names[1], quantity=quantity,
                            seeds=seeds, mean=mean, low=low, high=high,
                            confidence=confidence, interval=interval)
