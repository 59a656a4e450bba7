"""The statistics behind the verdicts: a value over seeds, 95% intervals of differences and of ratios.

Pure functions of numbers: no results, no report. A difference between precisions is paired by seed
where at least two seeds ran in both (what a seed shares, model init and data order, cancels), else
Welch; a ratio (a speed-up) lives on the log scale: the geometric mean of per-pair ratios with a
Student t interval on the log ratios, so it can never be negative and agrees with the ratio of
geometric means of the two sides.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy.stats import t as _t

CONFIDENCE = 0.95

def finite(value: Any) -> float | None:
    """A float for a finite number, None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Stat:
    """A value over the seeds of one row: mean, sample standard deviation (None for one value), count."""

    mean: float
    std: float | None = None
    n: int = 1

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        clean = [v for v in map(finite, values) if v is not None]
        if not clean:
            return None
        std = statistics.stdev(clean) if len(clean) > 1 else None
        return cls(statistics.fmean(clean), std, len(clean))

    def format(self, spec: str = ".4g", suffix: str = "") -> str:
        if self.std is None:
            return f"{self.mean:{spec}}{suffix}"
        return f"{self.mean:{spec}} ± {self.std:{spec.lstrip('+')}}{suffix}"


def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """Student t's two-sided `confidence` quantile for `df` degrees of freedom (2.776 for df 4 at 95%; the
    normal's 1.960 for infinite df), from SciPy."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence!r}")
    return float(_t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval [low, high] over `n` seeds (or blocks); `method` is "paired"
    (per-seed differences), "Welch" (two independent groups) or "log" (a ratio: geometric mean with the
    interval of the log ratios); `confidence` is 0.95 unless a multiplicity correction widened it."""

    mean: float
    low: float
    high: float
    n: int
    method: str
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, spec: str = "+.4f", suffix: str = "") -> str:
        return f"{self.mean:{spec}}{suffix} [{self.low:{spec}}{suffix}, {self.high:{spec}}{suffix}]"


Samples = Sequence[tuple[Any, float]]  # (seed, value) per run


def clean(samples: Samples) -> list[tuple[Any, float]]:
    return [(seed, v) for seed, v in ((s, finite(x)) for s, x in samples) if v is not None]


def paired(a: Samples, b: Samples) -> list[tuple[float, float]]:
    """The (a, b) value pairs of the seeds that ran once in each (a seed of None pairs with nothing)."""

    def unique(samples: Samples) -> dict[Any, float]:
        counts = Counter(s for s, _ in samples)
        return {s: v for s, v in samples if s is not None and counts[s] == 1}

    ua, ub = unique(a), unique(b)
    return [(ua[s], ub[s]) for s in sorted(set(ua) & set(ub), key=str)]


def t_interval(values: Sequence[float], method: str, confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` with its Student t interval (at least two values)."""
    n, mean = len(values), statistics.fmean(values)
    half = t_quantile(n - 1, confidence) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method, confidence)


def welch(mean: float, parts: Sequence[tuple[float, int]], confidence: float = CONFIDENCE) -> Interval:
    """An interval around `mean` from independent groups' variance-of-mean terms (var/n, n)."""
    se2 = sum(v for v, _ in parts)
    denominator = sum(v * v / (n - 1) for v, n in parts)
    df = se2 * se2 / denominator if denominator > 0 else sum(n for _, n in parts) - len(parts)
    half = t_quantile(max(df, 1.0), confidence) * math.sqrt(se2)
    return Interval(mean, mean - half, mean + half, min(n for _, n in parts), "Welch", confidence)


def difference_interval(a: Samples, b: Samples, confidence: float = CONFIDENCE) -> Interval | None:
    """The interval of mean(a) - mean(b): paired by seed where at least two seeds ran in both, else Welch
    when each side has two or more values, else None (one seed: no noise estimate)."""
    a, b = clean(a), clean(b)
    pairs = paired(a, b)
    if len(pairs) >= 2:
        return t_interval([x - y for x, y in pairs], "paired", confidence)
    xs, ys = [v for _, v in a], [v for _, v in b]
    if len(xs) >= 2 and len(ys) >= 2:
        parts = [(statistics.variance(xs) / len(xs), len(xs)), (statistics.variance(ys) / len(ys), len(ys))]
        return welch(statistics.fmean(xs) - statistics.fmean(ys), parts, confidence)
    return None


def log_interval(log_values: Sequence[float], confidence: float = CONFIDENCE) -> Interval | None:
    """A ratio from its logs (per pair): the geometric mean with the exponentiated t interval of the mean log
    (method "log"). Never negative, and symmetric on the log scale: 2x and 0.5x are equally far from 1."""
    if len(log_values) < 2:
        return None
    on_log = t_interval(log_values, "log", confidence)
    return Interval(math.exp(on_log.mean), math.exp(on_log.low), math.exp(on_log.high), on_log.n, "log", confidence)


def ratio_interval(a: Samples, b: Samples, confidence: float = CONFIDENCE) -> Interval | None:
    """The interval of a / b (a speed-up) on the log scale: the geometric mean of per-seed ratios where at least
    two seeds ran in both, else the ratio of geometric means with Welch on the log values; None with fewer than
    two positive values on a side."""
    a = [(s, v) for s, v in clean(a) if v > 0]
    b = [(s, v) for s, v in clean(b) if v > 0]
    pairs = paired(a, b)
    if len(pairs) >= 2:
        return log_interval([math.log(x / y) for x, y in pairs], confidence)
    xs, ys = [math.log(v) for _, v in a], [math.log(v) for _, v in b]
    if len(xs) >= 2 and len(ys) >= 2:
        parts = [(statistics.variance(xs) / len(xs), len(xs)), (statistics.variance(ys) / len(ys), len(ys))]
        on_log = welch(statistics.fmean(xs) - statistics.fmean(ys), parts, confidence)
        return Interval(math.exp(on_log.mean), math.exp(on_log.low), math.exp(on_log.high), on_log.n, "log Welch",
                        confidence)  # fmt: skip
    return None


def p_above(interval: Interval, bound: float, log: bool = False) -> float:
    """One-sided p-value of "the true mean is at or below `bound`" given the t interval it came from (on the log
    scale for a ratio): small when the interval lies well above the bound."""
    center, low = (math.log(interval.mean), math.log(interval.low)) if log else (interval.mean, interval.low)
    target = math.log(bound) if log else bound
    df = max(interval.n - 1, 1)
    se = (center - low) / t_quantile(df, interval.confidence)
    if se <= 0:
        return 0.0 if center > target else 1.0
    return float(_t.sf((center - target) / se, df))


def holm_levels(pvalues: Sequence[float], alpha: float = 1 - CONFIDENCE) -> list[float]:
    """Holm's step-down: the two-sided confidence at which each test's interval decides, in the tests' own
    order. The smallest p-value is judged at 1 - alpha/m, the next at 1 - alpha/(m-1), ..., the largest at
    1 - alpha; with one test this is the plain interval. (A test after one that failed cannot succeed at its
    own level either, as Holm requires: its p-value is larger and its level is laxer only in name.)"""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    levels = [0.0] * m
    for rank, i in enumerate(order):
        levels[i] = 1 - alpha / (m - rank)
    return levels


def seeds_needed(sd: float, width: float, most: int = 100) -> int | None:
    """The fewest seeds whose paired 95% interval (of differences with standard deviation `sd`) is at most
    `width` wide; None beyond `most`."""
    if sd <= 0:
        return 2
    return next((n for n in range(2, most + 1) if 2 * t_quantile(n - 1) * sd / math.sqrt(n) <= width), None)
