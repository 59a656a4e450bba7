"""The comparison against FP32: one table over many result files, seed aggregation, a recommendation.

Everything the report notebook, summary.md and the sweep's printout show is one `SweepReport`,
computed once from the results, so the same answer is one call away in Python:

    from amp_lib.results import load_sweep
    from amp_lib.report import build_report
    report = build_report(load_sweep("sweeps/default"))
    print(report.summary_markdown())

Each run is compared with the FP32 run of the same setting (every config value except precision,
seed, run_name and out_dir) and, where there is one, the same seed; several seeds of one precision
become one row with mean and spread.

The verdicts (`compare` -> `Comparison`, `NoiseFloor`) judge each precision against fp32 with 95%
confidence intervals over seeds (Student t from a small table; paired by seed, else Welch): best eval
loss within a relative tolerance, a speed-up measurably above 1 + SPEED_MARGIN (never from a timing
taken under contention), the time to reach fp32's quality, and the memory split. The recommendation is
built from those verdicts only; `rules_markdown` states the rules exactly as the report applies them.
"""

from __future__ import annotations

import html
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from amp_lib.config import NON_SETTING_FIELDS
from amp_lib.diagnose import StepProfile, explain
from amp_lib.headroom import way_out
from amp_lib.precision import CANONICAL, parallel_label, parse_precision
from amp_lib.results import RunResult, finite_or_none

BASELINE = "fp32"
DEFAULT_TOLERANCE = 0.02  # eval loss may differ from fp32's by 2% (relative)


@dataclass(frozen=True)
class Stat:
    """A value over the seeds of one row: mean, sample standard deviation (None for one value), count."""

    mean: float
    std: float | None = None
    n: int = 1

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        clean = [v for v in map(finite_or_none, values) if v is not None]
        if not clean:
            return None
        std = statistics.stdev(clean) if len(clean) > 1 else None
        return cls(statistics.fmean(clean), std, len(clean))

    def format(self, spec: str = ".4g", suffix: str = "") -> str:
        if self.std is None:
            return f"{self.mean:{spec}}{suffix}"
        return f"{self.mean:{spec}} ± {self.std:{spec.lstrip('+')}}{suffix}"


@dataclass(frozen=True)
class Row:
    """One line of the comparison: one run, or the seeds of one precision in one setting."""

    setting: str
    requested: str
    effective: str | None
    status: str  # "ok", or e.g. "ok×2, diverged×1" over seeds
    runs: int
    ok_runs: int
    seeds: tuple[int, ...]
    run_names: tuple[str, ...]
    throughput_unit: str
    items_per_s: Stat | None
    speedup: Stat | None  # throughput / fp32 throughput
    peak_memory_mb: Stat | None
    memory_saved_pct: Stat | None  # (fp32 peak - this peak) / fp32 peak * 100
    final_loss: Stat | None
    eval_loss: Stat | None
    loss_diff: Stat | None  # eval loss - fp32 eval loss
    skipped_steps: Stat | None
    final_loss_scale: Stat | None
    min_loss_scale: Stat | None
    fallback_reason: str | None
    error: str | None  # first line of the first error among the runs

    @property
    def is_baseline(self) -> bool:
        return _canonical(base_precision(self.requested)) == BASELINE and self.effective == BASELINE

    @property
    def all_ok(self) -> bool:
        return self.runs > 0 and self.ok_runs == self.runs


@dataclass(frozen=True)
class Recommendation:
    """Which precision to train in for one setting, the tolerance it was judged by, and the evidence."""

    setting: str
    precision: str | None  # effective precision to use; None when there is no FP32 baseline to judge by
    requested: str | None  # what to ask for to get it (differs when a request fell back)
    tolerance: float
    reason: str
    evidence: tuple[str, ...]

    @property
    def stay_in_fp32(self) -> bool:
        return self.precision == BASELINE

    def to_markdown(self) -> str:
        where = f" ({self.setting})" if self.setting else ""
        head = f"**Recommendation{where}: {self.precision or 'none'}** — {self.reason}"
        rule = f"_Tolerance: best eval loss within ±{100 * self.tolerance:g}% of fp32's (95% interval). Evidence:_"
        return "\n".join([head, "", rule, "", *(f"- {line}" for line in self.evidence)])


# -- table ---------------------------------------------------------------------------------------


def _canonical(name: Any) -> str:
    try:
        return parse_precision(name)
    except ValueError:
        return str(name)


def _order(name: str) -> int:
    return CANONICAL.index(name) if name in CANONICAL else len(CANONICAL)


def _setting_key(result: RunResult) -> tuple[tuple[str, str], ...]:
    """Everything a run shares with the runs it is compared with: its config but the precision, the seed, the
    name and the reduce dtype (a choice of precision under FSDP: a row of its own, against the same fp32).
    The parallelism, the processes and the batch per process stay: rows compare runs of one global batch."""
    return tuple(
        sorted((k, repr(v)) for k, v in result.config.items() if k not in (*NON_SETTING_FIELDS, "reduce_dtype"))
    )


def _label(result: RunResult) -> str:
    """A row's name: the canonical requested precision, with the parallelism and FSDP's reduce dtype around it
    (`fsdp bf16-mixed (reduce fp32)`); a single-device run is its precision alone."""
    precision = _canonical(result.config.get("precision", result.plan.get("requested")))
    parallelism = str(result.config.get("parallelism", "none"))
    return parallel_label(precision, parallelism, result.plan.get("reduce_dtype") or result.config.get("reduce_dtype"))


def base_precision(label: str) -> str:
    """The precision inside a row's name: `fsdp bf16-mixed (reduce fp32)` -> `bf16-mixed`."""
    return label.split(" (", 1)[0].split(" ")[-1]


def setting_labels(results: Sequence[RunResult]) -> dict[tuple[tuple[str, str], ...], str]:
    """A short label per setting: the model plus the config values that differ between settings."""
    keys = {_setting_key(r): r for r in results}
    names = sorted({k for key in keys for k, _ in key})
    varying = [k for k in names if k != "model" and len({dict(key).get(k) for key in keys}) > 1]
    labels = {}
    for key, result in keys.items():
        parts = [str(result.config.get("model", ""))]
        parts += [f"{k}={result.config.get(k)!r}" for k in varying]
        labels[key] = " ".join(p for p in parts if p)
    return labels


@dataclass(frozen=True)
class _Run:
    result: RunResult
    setting: str
    requested: str
    seed: int | None


def _baseline_for(run: _Run, runs: Sequence[_Run]) -> list[RunResult]:
    """The ok FP32 runs this run is measured against: the same seed if it ran, else every seed."""
    pool = [
        r.result
        for r in runs
        if r.setting == run.setting
        and base_precision(r.requested) == BASELINE
        and r.result.ok
        and r.result.plan.get("effective") == BASELINE
    ]
    same_seed = [r for r in pool if r.config.get("seed") == run.seed]
    return same_seed or pool


def _mean(results: Sequence[RunResult], get: Callable[[RunResult], float | None]) -> float | None:
    stat = Stat.of(get(r) for r in results)
    return stat.mean if stat else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _per_run(run: _Run, runs: Sequence[_Run]) -> dict[str, float | None]:
    m = run.result.metrics
    base = _baseline_for(run, runs)
    base_tps = _mean(base, lambda r: r.metrics.items_per_s)
    base_mem = _mean(base, lambda r: r.metrics.peak_memory_mb)
    base_eval = _mean(base, lambda r: r.metrics.eval_loss)
    return {
        "items_per_s": m.items_per_s,
        "speedup": _ratio(m.items_per_s, base_tps),
        "peak_memory_mb": m.peak_memory_mb,
        "memory_saved_pct": None
        if m.peak_memory_mb is None or not base_mem
        else 100 * (base_mem - m.peak_memory_mb) / base_mem,
        "final_loss": m.final_train_loss,
        "eval_loss": m.eval_loss,
        "loss_diff": None if m.eval_loss is None or base_eval is None else m.eval_loss - base_eval,
        "skipped_steps": float(m.skipped_steps),
        "final_loss_scale": m.final_loss_scale,
        "min_loss_scale": m.min_loss_scale,
    }


def _status(results: Sequence[RunResult]) -> str:
    counts = Counter(r.status for r in results)
    if len(counts) == 1:
        return results[0].status
    return ", ".join(f"{s}×{n}" for s, n in sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0])))


def _row(setting: str, requested: str, members: Sequence[_Run], runs: Sequence[_Run]) -> Row:
    results = [m.result for m in members]
    values = [_per_run(m, runs) for m in members]
    effective = sorted({str(r.plan.get("effective")) for r in results if r.plan.get("effective")})
    reasons = sorted({r.plan["fallback_reason"] for r in results if r.plan.get("fallback_reason")})
    errors = [r.error_line for r in results if r.error_line]
    return Row(
        setting=setting,
        requested=requested,
        effective=", ".join(effective) or None,
        status=_status(results),
        runs=len(results),
        ok_runs=sum(r.ok for r in results),
        seeds=tuple(m.seed for m in members if m.seed is not None),
        run_names=tuple(str(r.config.get("run_name") or "") for r in results),
        throughput_unit=results[0].metrics.throughput_unit,
        fallback_reason="; ".join(reasons) or None,
        error=errors[0] if errors else None,
        **{key: Stat.of(v[key] for v in values) for key in values[0]},
    )


def _runs(results: Sequence[RunResult]) -> list[_Run]:
    labels = setting_labels(results)
    runs = [
        _Run(
            r,
            labels[_setting_key(r)],
            _label(r),
            r.config.get("seed"),
        )
        for r in results
    ]
    return sorted(runs, key=lambda r: (r.setting, _order(base_precision(r.requested)), r.requested, str(r.seed)))


def results_by_precision(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    """The results behind each comparison row, keyed by (setting label, requested precision), in row order."""
    groups: dict[tuple[str, str], list[RunResult]] = defaultdict(list)
    for r in _runs(results):
        groups[(r.setting, r.requested)].append(r.result)
    return dict(groups)


def run_table(results: Sequence[RunResult]) -> list[Row]:
    """One row per run, in setting / precision / seed order."""
    runs = _runs(results)
    return [_row(r.setting, r.requested, [r], runs) for r in runs]


def comparison_table(results: Sequence[RunResult]) -> list[Row]:
    """One row per (setting, requested precision): seeds aggregated into mean and spread."""
    runs = _runs(results)
    groups: dict[tuple[str, str], list[_Run]] = defaultdict(list)
    for r in runs:
        groups[(r.setting, r.requested)].append(r)
    return [_row(setting, requested, members, runs) for (setting, requested), members in groups.items()]


# -- formatting ----------------------------------------------------------------------------------

COLUMNS: tuple[tuple[str, Callable[[Row], str]], ...] = (
    ("setting", lambda r: r.setting),
    ("requested", lambda r: r.requested),
    ("effective", lambda r: r.effective or "?"),
    ("status", lambda r: r.status),
    ("run", lambda r: r.run_names[0] if r.runs == 1 else f"{r.runs} seeds ({', '.join(map(str, r.seeds))})"),
    ("throughput/s", lambda r: _fmt(r.items_per_s, ",.0f", f" {r.throughput_unit}")),
    ("speedup vs fp32", lambda r: _fmt(r.speedup, ".2f", "x")),
    ("peak MB", lambda r: _fmt(r.peak_memory_mb, ".1f")),
    ("memory saved", lambda r: _fmt(r.memory_saved_pct, ".1f", "%")),
    ("final loss", lambda r: _fmt(r.final_loss, ".4f")),
    ("eval loss", lambda r: _fmt(r.eval_loss, ".4f")),
    ("Δ eval vs fp32", lambda r: _fmt(r.loss_diff, "+.4f")),
    ("skipped steps", lambda r: _fmt(r.skipped_steps, ".3g")),
    ("final scale", lambda r: _fmt(r.final_loss_scale, ".3g")),
    ("min scale", lambda r: _fmt(r.min_loss_scale, ".3g")),
    ("fallback / error", lambda r: r.error or r.fallback_reason or ""),
)


def _fmt(stat: Stat | None, spec: str, suffix: str = "") -> str:
    return "—" if stat is None else stat.format(spec, suffix)


def format_table(rows: Sequence[Row], fmt: str = "markdown") -> str:
    """The table as `markdown` (summary.md), `html` (the notebook) or plain `text` (a terminal)."""
    columns = [c for c in COLUMNS if c[0] != "setting" or len({r.setting for r in rows}) > 1]
    return _render([name for name, _ in columns], [[get(r) for _, get in columns] for r in rows], fmt, "amp-comparison")


def _render(header: Sequence[str], body: Sequence[Sequence[str]], fmt: str, css_class: str) -> str:
    formats = ("markdown", "html", "text")
    if fmt not in formats:
        raise ValueError(f"invalid fmt {fmt!r}; valid: {', '.join(formats)}")
    if fmt == "html":
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
        return f'<table class="{css_class}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'
    if fmt == "markdown":
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in line] for line in body]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body])


# -- statistics ----------------------------------------------------------------------------------

CONFIDENCE = 0.95
SPEED_MARGIN = 0.05  # "faster" needs the speed-up's whole interval above 1 + this
STEP_SPREAD_LIMIT = 1.5  # a run whose p90 step time is above this many times its p10 was timed under contention
DRIFT_LIMIT = 1.25  # a run whose second half of timed steps is this much slower or faster than its first drifted

# Student t, 97.5% quantile (two-sided 95%) by degrees of freedom; between rows the next lower row is used.
_T975: dict[int, float] = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
    29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t_quantile(df: float) -> float:
    """Student t's 97.5% quantile for `df` degrees of freedom (a 95% two-sided interval). A fractional df
    (Welch) or one between table rows rounds down, which widens the interval: the conservative side."""
    if not df >= 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df!r}")
    if math.isinf(df):
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% confidence interval [low, high] over `n` seeds; `method` is "paired" (per-seed
    differences) or "Welch" (two independent groups)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, spec: str = "+.4f", suffix: str = "") -> str:
        return f"{self.mean:{spec}}{suffix} [{self.low:{spec}}{suffix}, {self.high:{spec}}{suffix}]"


Samples = Sequence[tuple[Any, float]]  # (seed, value) per run


def _clean(samples: Samples) -> list[tuple[Any, float]]:
    return [(seed, v) for seed, v in ((s, finite_or_none(x)) for s, x in samples) if v is not None]


def _paired(a: Samples, b: Samples) -> list[tuple[float, float]]:
    """The (a, b) value pairs of the seeds that ran once in each (a seed of None pairs with nothing)."""

    def unique(samples: Samples) -> dict[Any, float]:
        counts = Counter(s for s, _ in samples)
        return {s: v for s, v in samples if s is not None and counts[s] == 1}

    ua, ub = unique(a), unique(b)
    return [(ua[s], ub[s]) for s in sorted(set(ua) & set(ub), key=str)]


def _t_interval(values: Sequence[float], method: str) -> Interval:
    n, mean = len(values), statistics.fmean(values)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, method)


def _welch(mean: float, parts: Sequence[tuple[float, int]], scale: float = 1.0) -> Interval:
    """An interval around `mean` from independent groups' variance-of-mean terms (var/n, n)."""
    se2 = sum(v for v, _ in parts)
    denominator = sum(v * v / (n - 1) for v, n in parts)
    df = se2 * se2 / denominator if denominator > 0 else sum(n for _, n in parts) - len(parts)
    half = scale * t_quantile(max(df, 1.0)) * math.sqrt(se2)
    return Interval(mean, mean - half, mean + half, min(n for _, n in parts), "Welch")


def difference_interval(a: Samples, b: Samples) -> Interval | None:
    """95% interval of mean(a) - mean(b): paired by seed where at least two seeds ran in both, else Welch
    when each side has two or more values, else None (one seed: no noise estimate)."""
    a, b = _clean(a), _clean(b)
    pairs = _paired(a, b)
    if len(pairs) >= 2:
        return _t_interval([x - y for x, y in pairs], "paired")
    xs, ys = [v for _, v in a], [v for _, v in b]
    if len(xs) >= 2 and len(ys) >= 2:
        mean = statistics.fmean(xs) - statistics.fmean(ys)
        return _welch(
            mean, [(statistics.variance(xs) / len(xs), len(xs)), (statistics.variance(ys) / len(ys), len(ys))]
        )
    return None


def ratio_interval(a: Samples, b: Samples) -> Interval | None:
    """95% interval of a / b (a speed-up): the mean of per-seed ratios where at least two seeds ran in
    both, else the ratio of means with Welch on the relative spreads; None with one value on a side."""
    a = [(s, v) for s, v in _clean(a) if v > 0]
    b = [(s, v) for s, v in _clean(b) if v > 0]
    pairs = _paired(a, b)
    if len(pairs) >= 2:
        return _t_interval([x / y for x, y in pairs], "paired")
    xs, ys = [v for _, v in a], [v for _, v in b]
    if len(xs) >= 2 and len(ys) >= 2:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        parts = [(statistics.variance(v) / (m * m * len(v)), len(v)) for v, m in ((xs, mx), (ys, my))]
        return _welch(mx / my, parts, scale=mx / my)
    return None


# -- per-run figures behind the verdicts ---------------------------------------------------------


def eval_curve(result: RunResult) -> list[tuple[int, float, float | None]]:
    """(step, loss, elapsed_s) of each finite eval. A result without evals (schema 1, or none recorded)
    counts its final `eval_loss` as one eval at its last step (config `steps`, else its history's), timed
    by `train_time_s` when recorded; with neither, there is no curve."""
    rows = [
        (e.step, loss, finite_or_none(e.elapsed_s))
        for e in result.evals
        if (loss := finite_or_none(e.loss)) is not None
    ]
    if rows or result.evals:
        return rows
    loss = finite_or_none(result.metrics.eval_loss)
    if loss is None:
        return []
    step = result.config.get("steps") or (result.history[-1].step + 1 if result.history else None)
    if not isinstance(step, int) or isinstance(step, bool):  # when it was is unknown: no curve to time
        return []
    return [(step, loss, finite_or_none(result.metrics.train_time_s))]


def best_eval_loss(result: RunResult) -> float | None:
    """The lowest eval loss of a run: its eval curve, else `metrics.best_eval_loss`, else `eval_loss`."""
    losses = [loss for _, loss, _ in eval_curve(result)] if result.evals else []
    if losses:
        return min(losses)
    best = finite_or_none(result.metrics.best_eval_loss)
    return best if best is not None else finite_or_none(result.metrics.eval_loss)


def first_reach(result: RunResult, target: float) -> tuple[int, float | None] | None:
    """(step, elapsed_s) of the first eval at or below `target`; None when the run never got there."""
    return next(((step, t) for step, loss, t in eval_curve(result) if loss <= target), None)


def timing_problems(result: RunResult) -> list[str]:
    """Why this run's throughput can't be trusted: timed in parallel with other runs, or a wide step-time spread."""
    problems = []
    concurrent = result.plan.get("concurrent_runs")
    if isinstance(concurrent, int) and not isinstance(concurrent, bool) and concurrent > 1:
        problems.append(f"timed while {concurrent} runs trained at once on one machine")
    p10, p90 = finite_or_none(result.metrics.step_time_ms_p10), finite_or_none(result.metrics.step_time_ms_p90)
    if p10 and p90 and p10 > 0 and p90 / p10 > STEP_SPREAD_LIMIT:
        problems.append(f"step times spread {p90 / p10:.1f}x from p10 to p90 (limit {STEP_SPREAD_LIMIT:g}x)")
    drift = step_time_drift(result)
    if drift is not None and max(drift, 1 / drift) > DRIFT_LIMIT:
        problems.append(f"step times drifted {drift:.2f}x from the first to the second half of the timed steps")
    return problems


def step_time_drift(result: RunResult) -> float | None:
    """Median step time of the second half of the timed steps over the first half's: far from 1 when the
    machine got busier (or quieter) while the run was timed — contention that a spread can hide."""
    times = [t for t in (finite_or_none(r.step_time_ms) for r in result.history) if t is not None and t > 0]
    if len(times) < 4:
        return None
    half = len(times) // 2
    return statistics.median(times[half:]) / statistics.median(times[:half])


# -- comparisons against fp32 --------------------------------------------------------------------

MATCHES = "matches fp32"
BETTER = "better"
INCONCLUSIVE = "inconclusive — run more seeds"
FAILED = "diverged/failed"
BASELINE_VERDICT = "baseline"
NO_BASELINE = "no fp32 baseline"
FASTER = "faster"
NO_GAIN = "no measurable gain"
UNRELIABLE = "unreliable"
ONE_SEED = "no noise estimate (one seed)"

QUALITY_RULE = (
    "Quality: the difference in best eval loss from fp32 on the same setting, mean over seeds with a 95% "
    "confidence interval (Student t; paired by seed where both ran, else Welch). The tolerance is "
    "±{tol:g}% of fp32's mean best eval loss. *matches fp32*: the whole interval lies within the tolerance; "
    "*worse by X* (X: the mean difference): the whole interval lies above +tolerance; *better*: the whole interval lies below "
    "−tolerance; *inconclusive — run more seeds*: the interval is wider than the tolerance band or straddles "
    "its edge; *diverged/failed*: any seed failed, ran out of memory or diverged. With one seed on either side "
    "there is no noise estimate: the single difference is shown but not judged (inconclusive)."
)
SPEED_RULE = (
    "Speed: the speed-up over fp32 (throughput ratio, per seed where both ran) with its 95% interval; "
    "*faster* only when the interval's lower end is above {margin:g}x, otherwise *no measurable gain*. "
    "A throughput figure is *unreliable* when any of its runs or fp32's was timed while other runs trained "
    "on the same machine, its step times spread more than {spread:g}x from p10 to p90, or they drifted more "
    "than {drift:g}x between the first and second half of the timed steps; an unreliable figure never "
    "decides a recommendation."
)
TTQ_RULE = (
    "Time to quality: the training time (evals excluded) and the steps until the first eval at or below "
    "fp32's quality — its best eval loss (mean over seeds) plus the tolerance, the loss that counts as "
    "matching fp32 — mean over seeds; fp32 is timed to the same target. The time-to-quality speed-up is "
    "fp32's time divided by the precision's, given when every seed of both reached the target; *never "
    "reached in N steps* when no seed did."
)
RECOMMENDATION_RULE = (
    "Recommendation: the precision with the largest speed-up among those whose quality verdict is *matches "
    "fp32* or *better* and whose speed verdict is *faster*; otherwise stay in fp32."
)


@dataclass(frozen=True)
class TimeToQuality:
    """Time and steps until a precision's runs first reached `target`: fp32's mean best eval loss plus
    the tolerance (the loss that counts as matching fp32)."""

    target: float
    runs: int  # ok runs with an eval curve
    reached: int
    steps: Stat | None  # over the runs that reached it
    time_s: Stat | None
    horizon: int | None  # the most steps any of the runs trained (for "never reached in N steps")
    speedup: float | None  # fp32's time to the target / this time; None unless every run of both reached it

    def format(self) -> str:
        if self.reached == 0:
            return f"never reached in {self.horizon} steps"
        time = "—" if self.time_s is None else self.time_s.format(".3g", " s")
        text = f"{time}, {self.steps.format('.0f') if self.steps else '?'} steps"
        if self.reached < self.runs:
            text += f" ({self.reached} of {self.runs} seeds; the rest never in {self.horizon} steps)"
        return text


@dataclass(frozen=True)
class MemorySplit:
    """Peak memory split into tensor sizes (mean over ok seeds); `rest` is activations and workspace."""

    peak_mb: float | None
    params_mb: float | None
    grads_mb: float | None
    optimizer_mb: float | None
    kind: str | None  # "cuda_allocated" or "cpu_rss"

    @property
    def rest_mb(self) -> float | None:
        parts = (self.params_mb, self.grads_mb, self.optimizer_mb)
        if self.peak_mb is None or any(p is None for p in parts):
            return None
        return self.peak_mb - sum(parts)  # type: ignore[arg-type]

    @property
    def note(self) -> str:
        if self.kind == "cpu_rss":
            return "CPU: the peak is the whole process's resident set, so the rest is mostly the Python process"
        return ""


@dataclass(frozen=True)
class Comparison:
    """One precision against fp32 on one setting: the quality and speed verdicts with their intervals,
    the time to fp32's quality and the memory split."""

    setting: str
    requested: str
    effective: str | None
    status: str
    runs: int
    ok_runs: int
    best_eval_loss: Stat | None
    loss_diff: Interval | None  # best eval loss - fp32's, 95% interval (None: no noise estimate)
    point_diff: float | None  # the mean difference, also without an interval
    tolerance_abs: float | None  # the tolerance in loss units (relative tolerance x fp32's mean best)
    verdict: str
    speedup: Interval | None
    point_speedup: float | None
    speed_verdict: str
    speed_reason: str  # why unreliable, or why no verdict
    ttq: TimeToQuality | None
    memory: MemorySplit | None
    fallback_reason: str | None
    error: str | None

    @property
    def is_baseline(self) -> bool:
        return self.verdict == BASELINE_VERDICT

    @property
    def quality_ok(self) -> bool:
        return self.verdict in (MATCHES, BETTER)

    @property
    def name(self) -> str:
        if self.effective in (None, self.requested):
            return self.requested
        return f"{self.requested} (ran as {self.effective})"


@dataclass(frozen=True)
class NoiseFloor:
    """fp32's own seed-to-seed spread of best eval loss on one setting, and the tolerance in loss units."""

    setting: str
    best_eval_loss: Stat | None
    half_width: float | None  # 95% interval half-width of fp32's mean best eval loss
    tolerance_abs: float | None
    status: str  # fp32's status over seeds ("missing" when no fp32 ran)

    def format(self) -> str:
        if self.best_eval_loss is None:
            return f"no fp32 baseline ({self.status})"
        if self.best_eval_loss.std is None or self.half_width is None:
            return f"fp32 best eval loss {self.best_eval_loss.mean:.4f}: {ONE_SEED}"
        return (
            f"fp32 best eval loss {self.best_eval_loss.mean:.4f}, std {self.best_eval_loss.std:.4f} over "
            f"{self.best_eval_loss.n} seeds (95% CI ±{self.half_width:.4f})"
        )


def _samples(runs: Sequence[_Run], get: Callable[[RunResult], float | None]) -> list[tuple[Any, float]]:
    return [(r.seed, v) for r in runs if (v := finite_or_none(get(r.result))) is not None]


def _noise_floor(setting: str, base: Sequence[_Run], all_fp32: Sequence[_Run], tolerance: float) -> NoiseFloor:
    values = [v for _, v in _samples(base, best_eval_loss)]
    stat = Stat.of(values)
    half = None
    if stat is not None and stat.std is not None:
        half = t_quantile(stat.n - 1) * stat.std / math.sqrt(stat.n)
    tol = None if stat is None else tolerance * abs(stat.mean)
    status = _status([r.result for r in all_fp32]) if all_fp32 else "missing"
    return NoiseFloor(setting, stat, half, tol, status)


def _quality_verdict(diff: Interval | None, point: float | None, tol: float, base_mean: float) -> str:
    if point is None:
        return NO_BASELINE
    if diff is None:
        return INCONCLUSIVE
    if diff.low >= -tol and diff.high <= tol:
        return MATCHES
    if diff.low > tol:
        return f"worse by {diff.mean:+.4f}" + (f" ({100 * diff.mean / abs(base_mean):+.1f}%)" if base_mean else "")
    if diff.high < -tol:
        return BETTER
    return INCONCLUSIVE


def _speed(members: Sequence[_Run], base: Sequence[_Run]) -> tuple[Interval | None, float | None, str, str]:
    ok = [m for m in members if m.result.ok]
    a, b = _samples(ok, lambda r: r.metrics.items_per_s), _samples(base, lambda r: r.metrics.items_per_s)
    point = None
    if a and b and statistics.fmean(v for _, v in b) > 0:
        point = statistics.fmean(v for _, v in a) / statistics.fmean(v for _, v in b)
    interval = ratio_interval(a, b)
    problems: list[str] = []
    for run in [*ok, *base]:
        for p in timing_problems(run.result):
            label = f"{run.requested} seed {run.seed}: {p}" if "spread" in p else p
            if label not in problems:
                problems.append(label)
    if point is None:
        return interval, None, "—", "no throughput to compare"
    if problems:
        return interval, point, UNRELIABLE, "; ".join(problems)
    if interval is None:
        return None, point, NO_GAIN, ONE_SEED
    if interval.low > 1 + SPEED_MARGIN:
        return interval, point, FASTER, ""
    return interval, point, NO_GAIN, f"interval reaches below {1 + SPEED_MARGIN:g}x"


def _time_to_quality(members: Sequence[_Run], target: float | None, reference: float | None) -> TimeToQuality | None:
    ok = [m.result for m in members if m.result.ok and eval_curve(m.result)]
    if target is None or not ok:
        return None
    hits = [first_reach(r, target) for r in ok]
    reached = [h for h in hits if h is not None]
    steps = Stat.of(float(s) for s, _ in reached)
    time_s = Stat.of(t for _, t in reached)
    speedup = None
    if len(reached) == len(ok) and time_s is not None and reference and time_s.mean > 0:
        speedup = reference / time_s.mean
    horizon = max(curve[-1][0] for curve in map(eval_curve, ok))
    return TimeToQuality(target, len(ok), len(reached), steps, time_s, horizon, speedup)


def _memory(members: Sequence[_Run]) -> MemorySplit | None:
    ok = [m.result.metrics for m in members if m.result.ok]
    if not ok:
        return None

    def mean(attr: str) -> float | None:
        stat = Stat.of(getattr(m, attr) for m in ok)
        return stat.mean if stat else None

    kinds = sorted({m.peak_memory_kind for m in ok if m.peak_memory_kind})
    return MemorySplit(
        mean("peak_memory_mb"), mean("param_memory_mb"), mean("grad_memory_mb"), mean("optimizer_memory_mb"),
        ", ".join(kinds) or None,
    )  # fmt: skip


def compare(
    results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE
) -> tuple[list[Comparison], list[NoiseFloor]]:
    """Each precision of each setting against fp32 on that setting, and each setting's fp32 noise floor."""
    check_tolerance(tolerance)
    runs = _runs(results)
    groups: dict[str, dict[str, list[_Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[r.setting][r.requested].append(r)
    comparisons: list[Comparison] = []
    floors: list[NoiseFloor] = []
    for setting, by_precision in groups.items():
        all_fp32 = next((v for k, v in by_precision.items() if base_precision(k) == BASELINE), [])
        base = [r for r in all_fp32 if r.result.ok and r.result.plan.get("effective") == BASELINE]
        floor = _noise_floor(setting, base, all_fp32, tolerance)
        floors.append(floor)
        base_mean = floor.best_eval_loss.mean if floor.best_eval_loss else None
        target = None if base_mean is None else base_mean + (floor.tolerance_abs or 0.0)
        own = _time_to_quality(base, target, None)
        reference = own.time_s.mean if own and own.time_s and own.reached == own.runs else None
        if own is not None and reference:
            own = replace(own, speedup=1.0)
        for requested, members in by_precision.items():
            results_ = [m.result for m in members]
            ok = [m for m in members if m.result.ok]
            is_base = base_precision(requested) == BASELINE and bool(base) and all(m in base for m in members)
            mine = _samples(ok, best_eval_loss)
            b = _samples(base, best_eval_loss)
            point = None
            if mine and b:
                point = statistics.fmean(v for _, v in mine) - statistics.fmean(v for _, v in b)
            diff = difference_interval(mine, b)
            tol = floor.tolerance_abs
            if is_base:
                verdict = BASELINE_VERDICT
            elif len(ok) < len(members):
                verdict = FAILED
            else:
                verdict = _quality_verdict(diff, point, tol or 0.0, base_mean or 0.0)
            if is_base:
                speed = (
                    None,
                    1.0,
                    BASELINE_VERDICT,
                    "; ".join(dict.fromkeys(p for m in base for p in timing_problems(m.result))),
                )
            else:
                speed = _speed(members, base)
            effective = sorted({str(r.plan.get("effective")) for r in results_ if r.plan.get("effective")})
            reasons = sorted({r.plan["fallback_reason"] for r in results_ if r.plan.get("fallback_reason")})
            errors = [r.error_line for r in results_ if r.error_line]
            comparisons.append(
                Comparison(
                    setting=setting,
                    requested=requested,
                    effective=", ".join(effective) or None,
                    status=_status(results_),
                    runs=len(members),
                    ok_runs=len(ok),
                    best_eval_loss=Stat.of(v for _, v in mine),
                    loss_diff=None if is_base else diff,
                    point_diff=None if is_base else point,
                    tolerance_abs=tol,
                    verdict=verdict,
                    speedup=speed[0],
                    point_speedup=speed[1],
                    speed_verdict=speed[2],
                    speed_reason=speed[3],
                    ttq=own if is_base else _time_to_quality(members, target, reference),
                    memory=_memory(members),
                    fallback_reason="; ".join(reasons) or None,
                    error=errors[0] if errors else None,
                )
            )
    return comparisons, floors


# -- verdict and memory tables -------------------------------------------------------------------


def _diff_cell(c: Comparison) -> str:
    if c.loss_diff is not None:
        return c.loss_diff.format("+.4f")
    if c.point_diff is not None:
        return f"{c.point_diff:+.4f} (one seed)"
    return "—"


def _speed_cell(c: Comparison) -> str:
    if c.is_baseline:
        return "1.00x"
    if c.speedup is not None:
        return c.speedup.format(".2f", "x")
    if c.point_speedup is not None:
        return f"{c.point_speedup:.2f}x (one seed)"
    return "—"


def _speed_verdict_cell(c: Comparison) -> str:
    if c.speed_verdict in (UNRELIABLE, BASELINE_VERDICT) and c.speed_reason:
        return (
            f"{c.speed_verdict}: {c.speed_reason}"
            if c.speed_verdict == UNRELIABLE
            else f"timing unreliable: {c.speed_reason}"
        )
    if c.speed_verdict == NO_GAIN and c.speed_reason == ONE_SEED:
        return f"{NO_GAIN} (one seed: no interval)"
    return c.speed_verdict


def _noise_cell(c: Comparison, floors: dict[str, NoiseFloor]) -> str:
    floor = floors.get(c.setting)
    if floor is None or floor.best_eval_loss is None:
        return "—"
    if floor.half_width is None or floor.best_eval_loss.std is None:
        return ONE_SEED
    return f"std {floor.best_eval_loss.std:.4f}, CI ±{floor.half_width:.4f}"


def _timing_unreliable(c: Comparison) -> bool:
    return c.speed_verdict == UNRELIABLE or (c.is_baseline and bool(c.speed_reason))


def _ttq_speedup_cell(c: Comparison) -> str:
    """The time-to-quality speed-up; wall time too, so it carries the throughput's unreliable mark."""
    if c.ttq is None or c.ttq.speedup is None:
        return "—"
    return f"{c.ttq.speedup:.2f}x" + (" (timing unreliable)" if _timing_unreliable(c) else "")


VERDICT_COLUMNS: tuple[tuple[str, Callable[[Comparison, dict[str, NoiseFloor]], str]], ...] = (
    ("setting", lambda c, f: c.setting),
    ("precision", lambda c, f: c.name),
    ("runs", lambda c, f: f"{c.runs} ({c.status})"),
    ("best eval loss", lambda c, f: _fmt(c.best_eval_loss, ".4f")),
    ("Δ vs fp32 [95% CI]", lambda c, f: _diff_cell(c)),
    ("fp32 noise", _noise_cell),
    ("tolerance", lambda c, f: "—" if c.tolerance_abs is None else f"±{c.tolerance_abs:.4f}"),
    ("quality", lambda c, f: c.verdict),
    ("speed-up [95% CI]", lambda c, f: _speed_cell(c)),
    ("speed", lambda c, f: _speed_verdict_cell(c)),
    ("time to fp32's quality", lambda c, f: "—" if c.ttq is None else c.ttq.format()),
    ("TTQ speed-up", lambda c, f: _ttq_speedup_cell(c)),
)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


MEMORY_COLUMNS: tuple[tuple[str, Callable[[Comparison], str]], ...] = (
    ("setting", lambda c: c.setting),
    ("precision", lambda c: c.name),
    ("peak MB", lambda c: _mb(c.memory.peak_mb) if c.memory else "—"),
    ("parameters", lambda c: _mb(c.memory.params_mb) if c.memory else "—"),
    ("gradients", lambda c: _mb(c.memory.grads_mb) if c.memory else "—"),
    ("optimizer", lambda c: _mb(c.memory.optimizer_mb) if c.memory else "—"),
    ("rest (activations, workspace)", lambda c: _mb(c.memory.rest_mb) if c.memory else "—"),
    ("measured as", lambda c: (c.memory.kind or "?") if c.memory else "—"),
)


def format_verdicts(comparisons: Sequence[Comparison], floors: Sequence[NoiseFloor] = (), fmt: str = "markdown") -> str:
    """The verdict table: per precision, quality and speed against fp32 with intervals, and time to quality."""
    by_setting = {f.setting: f for f in floors}
    several = len({c.setting for c in comparisons}) > 1
    columns = [c for c in VERDICT_COLUMNS if c[0] != "setting" or several]
    body = [[get(c, by_setting) for _, get in columns] for c in comparisons]
    return _render([name for name, _ in columns], body, fmt, "amp-verdicts")


def format_memory(comparisons: Sequence[Comparison], fmt: str = "markdown") -> str:
    """The memory split table: peak memory as parameters, gradients, optimizer state and the rest, in MB."""
    several = len({c.setting for c in comparisons}) > 1
    columns = [c for c in MEMORY_COLUMNS if c[0] != "setting" or several]
    body = [[get(c) for _, get in columns] for c in comparisons]
    return _render([name for name, _ in columns], body, fmt, "amp-memory")


def memory_note(comparisons: Sequence[Comparison]) -> str:
    """What a reader must know about the memory figures (a CPU's peak is the whole process)."""
    return next((c.memory.note for c in comparisons if c.memory and c.memory.note), "")


# -- recommendation ------------------------------------------------------------------------------


def _why_not(c: Comparison) -> str:
    """Why `c` is not recommended over fp32."""
    if c.verdict == FAILED:
        return f"{c.name} is not safe: {c.status}" + (f": {c.error}" if c.error else "")
    if c.effective == BASELINE:
        return f"{c.name} runs as fp32 on this machine ({c.fallback_reason or 'no fallback reason recorded'})"
    if c.verdict == NO_BASELINE:
        return f"{c.name} has no eval loss to compare with fp32"
    if c.verdict == INCONCLUSIVE:
        why = ONE_SEED if c.loss_diff is None else "its interval is wider than the tolerance or straddles its edge"
        return f"{c.name}: quality {INCONCLUSIVE} (Δ best eval loss {_diff_cell(c)}; {why})"
    if not c.quality_ok:
        return f"{c.name} is {c.verdict} in best eval loss (Δ {_diff_cell(c)}, tolerance ±{c.tolerance_abs:.4f})"
    if c.speed_verdict == UNRELIABLE:
        return f"{c.name} {c.verdict}, but its speed figure is unreliable ({c.speed_reason})"
    if c.speed_verdict == NO_GAIN:
        return f"{c.name} {c.verdict}, but shows {NO_GAIN} in speed ({_speed_cell(c)})"
    return f"{c.name} {c.verdict}, but has no throughput to compare with fp32"


def _evidence(c: Comparison) -> str:
    parts = [c.name, c.status]
    if c.is_baseline:
        if c.best_eval_loss:
            parts.append(f"best eval loss {c.best_eval_loss.format('.4f')}")
    else:
        diff = _diff_cell(c)
        parts.append(f"quality {c.verdict}" + (f" (Δ {diff})" if diff != "—" else ""))
        if c.error:
            parts.append(c.error)
        if c.speed_verdict != "—":
            parts.append(f"speed {_speed_verdict_cell(c)} ({_speed_cell(c)})")
    if c.ttq is not None:
        ttq = f"time to fp32's quality {c.ttq.format()}"
        parts.append(ttq + (f", {c.ttq.speedup:.2f}x fp32" if c.ttq.speedup is not None and not c.is_baseline else ""))
    return ", ".join(parts)


def _no_baseline_reason(rows: Sequence[Comparison]) -> str:
    fp32 = next((c for c in rows if base_precision(c.requested) == BASELINE), None)
    if fp32 is None:
        return "no fp32 run in this setting to compare against: add fp32 to the sweep"
    if fp32.ok_runs == 0:
        return (
            f"fp32 failed ({fp32.status}"
            + (f": {fp32.error}" if fp32.error else "")
            + "), so there is no baseline to compare against: fix the fp32 run first"
        )
    return f"fp32 ran as {fp32.effective} ({fp32.fallback_reason or 'no fallback reason recorded'}), so there is no fp32 baseline"


def recommendations(
    comparisons: Sequence[Comparison], floors: Sequence[NoiseFloor], tolerance: float = DEFAULT_TOLERANCE
) -> list[Recommendation]:
    """One recommendation per setting, built from the verdicts: the largest speed-up among the precisions
    that match fp32 (or do better) and are measurably faster; otherwise stay in fp32, saying why."""
    check_tolerance(tolerance)
    by_setting: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        by_setting[c.setting].append(c)
    has_base = {f.setting for f in floors if f.best_eval_loss is not None}
    out = []
    for setting, rows in by_setting.items():
        evidence = tuple(_evidence(c) for c in rows)
        if setting not in has_base:
            out.append(Recommendation(setting, None, None, tolerance, _no_baseline_reason(rows), evidence))
            continue
        others = [c for c in rows if base_precision(c.requested) != BASELINE]
        winners = [c for c in others if c.quality_ok and c.speed_verdict == FASTER and c.effective != BASELINE]
        if winners:
            best = max(winners, key=lambda c: c.speedup.mean if c.speedup else 0.0)
            reason = f"{best.verdict} in best eval loss (Δ {_diff_cell(best)}) and {FASTER}: {_speed_cell(best)} fp32 throughput"
            if best.ttq is not None and best.ttq.speedup is not None:
                reason += f"; reaches fp32's quality {best.ttq.speedup:.2f}x sooner"
            if best.effective != best.requested:
                reason += f" (request {best.requested!r}; it runs as {best.effective}: {best.fallback_reason})"
            out.append(Recommendation(setting, best.effective, best.requested, tolerance, reason, evidence))
            continue
        why = "; ".join(_why_not(c) for c in others) or "fp32 is the only precision in the sweep"
        fp32 = next((c for c in rows if base_precision(c.requested) == BASELINE), None)
        if fp32 is not None and fp32.verdict == FAILED:
            why += f"; note: fp32 itself {fp32.status}"
        out.append(Recommendation(setting, BASELINE, BASELINE, tolerance, f"stay in fp32: {why}", evidence))
    return out


def check_tolerance(tolerance: float) -> float:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not (tolerance >= 0 and math.isfinite(tolerance))
    ):
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (relative, e.g. 0.02 for 2%)")
    return float(tolerance)


def rules_markdown(tolerance: float) -> str:
    """The rules every verdict follows, as the report states them."""
    return "\n".join(
        f"- {rule}"
        for rule in (
            QUALITY_RULE.format(tol=100 * tolerance),
            SPEED_RULE.format(margin=1 + SPEED_MARGIN, spread=STEP_SPREAD_LIMIT, drift=DRIFT_LIMIT),
            TTQ_RULE,
            RECOMMENDATION_RULE,
        )
    )


# -- the report ----------------------------------------------------------------------------------


def _answer(rec: Recommendation, rows: Sequence[Comparison], several: bool) -> str:
    where = f"For {rec.setting}, " if several and rec.setting else ""
    if rec.precision is None:
        return f"{where}there is no answer: {rec.reason}." if where else f"No answer: {rec.reason}."
    if rec.stay_in_fp32:
        head = f"{where}stay in fp32" if where else "Stay in fp32"
        text = f"{head}: no other precision was shown to match fp32's best eval loss and be measurably faster"
        open_ = [c.name for c in rows if c.verdict == INCONCLUSIVE]
        if open_:
            text += f" ({', '.join(open_)}: inconclusive — run more seeds)"
        return text + "."
    best = next(c for c in rows if c.requested == rec.requested)
    head = f"{where}train in {rec.requested}" if where else f"Train in {rec.requested}"
    quality = (
        "matches fp32's best eval loss" if best.verdict == MATCHES else "reaches a better best eval loss than fp32"
    )
    assert best.speedup is not None  # a winner is "faster", which needs an interval
    text = (
        f"{head}: it {quality} and is {best.speedup.mean:.2f}x as fast "
        f"(95% CI {best.speedup.low:.2f}–{best.speedup.high:.2f}x)"
    )
    if best.ttq is not None and best.ttq.speedup is not None:
        text += f", reaching fp32's quality {best.ttq.speedup:.2f}x sooner"
    return text + "."


@dataclass(frozen=True)
class Diagnosis:
    """Why one precision failed or did not pay on one setting, in words."""

    setting: str
    precision: str
    causes: tuple[str, ...]  # ranked, from its profiled step, fp32's and the machine facts
    overflows: tuple[str, ...]  # per run that skipped steps or diverged: the first module to overflow, the way out


def _profile(runs: Sequence[_Run]) -> tuple[StepProfile | None, dict[str, Any]]:
    for run in runs:
        if run.result.profile:
            return StepProfile.from_dict(run.result.profile), dict(run.result.profile.get("facts", {}))
    return None, {}


def diagnoses(results: Sequence[RunResult], comparisons: Sequence[Comparison]) -> list[Diagnosis]:
    """For each precision that is not *faster*, the ranked causes (from profiled steps: `profile_step`);
    for each that skipped steps or diverged, the first module to overflow fp16 and the way out (from the
    headroom map: `headroom_every`). Precisions with nothing to say are left out."""
    runs = _runs(results)
    out = []
    for c in comparisons:
        if c.is_baseline:
            continue
        mine = [r for r in runs if r.setting == c.setting and r.requested == c.requested]
        fp32 = [r for r in runs if r.setting == c.setting and base_precision(r.requested) == BASELINE and r.result.ok]
        causes: list[str] = []
        if c.speed_verdict != FASTER:
            profile, facts = _profile([r for r in mine if r.result.ok])
            if profile is not None or facts:
                causes = [
                    x.text
                    for x in explain(c.effective or c.requested, profile, _profile(fp32)[0], facts)
                ]
        overflows = []
        for run in mine:
            events = (run.result.headroom or {}).get("first_overflow", [])
            if events and (run.result.metrics.skipped_steps or run.result.status == "diverged"):
                cc = tuple((run.result.profile or {}).get("facts", {}).get("compute_capability") or (8, 0))
                bf16 = run.result.plan.get("device_type") != "cuda" or cc >= (8, 0)
                overflows.append(f"seed {run.seed}: {way_out(events[0], bf16)}")
        if causes or overflows:
            out.append(Diagnosis(c.setting, c.requested, tuple(causes), tuple(overflows)))
    return out


def why_markdown(items: Sequence[Diagnosis]) -> str:
    several = len({d.setting for d in items}) > 1
    lines = []
    for d in items:
        lines.append(f"**{d.precision}**" + (f" ({d.setting})" if several else ""))
        lines += [f"- {text}" for text in (*d.causes, *d.overflows)]
        lines.append("")
    return "\n".join(lines).strip()


@dataclass(frozen=True)
class SweepReport:
    """Everything a sweep's report shows, computed once from its results."""

    results: tuple[RunResult, ...]
    runs: tuple[Row, ...]  # one row per run
    table: tuple[Row, ...]  # one row per setting and precision, seeds aggregated
    recommendations: tuple[Recommendation, ...]
    tolerance: float
    comparisons: tuple[Comparison, ...] = ()  # per setting and precision: the verdicts against fp32
    noise: tuple[NoiseFloor, ...] = ()  # per setting: fp32's own seed-to-seed spread
    why: tuple[Diagnosis, ...] = ()  # precisions that failed or did not pay: the causes and the way out

    def answer(self) -> str:
        """The answer in one sentence per setting."""
        several = len(self.recommendations) > 1
        return " ".join(
            _answer(rec, [c for c in self.comparisons if c.setting == rec.setting], several)
            for rec in self.recommendations
        )

    def recommendation_markdown(self) -> str:
        return "\n\n".join(r.to_markdown() for r in self.recommendations)

    def verdict_markdown(self) -> str:
        return format_verdicts(self.comparisons, self.noise, "markdown")

    def memory_markdown(self) -> str:
        note = memory_note(self.comparisons)
        return format_memory(self.comparisons, "markdown") + (f"\n\n_{note}_" if note else "")

    def rules_markdown(self) -> str:
        return rules_markdown(self.tolerance)

    def summary_markdown(self) -> str:
        """The report as markdown (a sweep's summary.md): the answer, the verdicts, memory, the
        recommendation(s), every measurement, and the rules."""
        parts = ["# AMP Workbook sweep summary", ""]
        if self.recommendations:
            parts += [f"**Answer:** {self.answer()}", ""]
        parts += ["## Verdicts against fp32", "", self.verdict_markdown(), ""]
        parts += ["## Memory split", "", self.memory_markdown(), ""]
        if self.why:
            parts += ["## Why a precision fails or doesn't pay", "", why_markdown(self.why), ""]
        if self.recommendations:
            parts += ["## Recommendation", "", self.recommendation_markdown(), ""]
        parts += ["## Every measurement (seeds aggregated)", "", format_table(self.table, "markdown"), ""]
        parts += ["## Rules", "", self.rules_markdown(), ""]
        return "\n".join(parts)


def build_report(results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> SweepReport:
    """Tabulate `results` per run and per precision, judge each precision against fp32, and recommend, once."""
    check_tolerance(tolerance)
    comparisons, floors = compare(results, tolerance)
    return SweepReport(
        results=tuple(results),
        runs=tuple(run_table(results)),
        table=tuple(comparison_table(results)),
        recommendations=tuple(recommendations(comparisons, floors, tolerance)),
        tolerance=tolerance,
        comparisons=tuple(comparisons),
        noise=tuple(floors),
        why=tuple(diagnoses(results, comparisons)),
    )


def recommend(results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> Recommendation:
    """The recommendation for results that share one setting (`build_report` handles several)."""
    recs = build_report(results, tolerance).recommendations
    if len(recs) != 1:
        settings = ", ".join(repr(r.setting) for r in recs) or "none (no results)"
        raise ValueError(
            f"recommend() needs results of exactly one setting; got {len(recs)}: {settings}; use build_report()"
        )
    return recs[0]
