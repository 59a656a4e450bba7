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
"""

from __future__ import annotations

import html
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from amp_lib.config import NON_SETTING_FIELDS
from amp_lib.precision import CANONICAL, parse_precision
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
        return _canonical(self.requested) == BASELINE and self.effective == BASELINE

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
        rule = f"_Tolerance: eval loss at most {100 * self.tolerance:g}% above fp32's. Evidence:_"
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
    return tuple(sorted((k, repr(v)) for k, v in result.config.items() if k not in NON_SETTING_FIELDS))


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
        and r.requested == BASELINE
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
            _canonical(r.config.get("precision", r.plan.get("requested"))),
            r.config.get("seed"),
        )
        for r in results
    ]
    return sorted(runs, key=lambda r: (r.setting, _order(r.requested), r.requested, str(r.seed)))


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
    formats = ("markdown", "html", "text")
    if fmt not in formats:
        raise ValueError(f"invalid fmt {fmt!r}; valid: {', '.join(formats)}")
    columns = [c for c in COLUMNS if c[0] != "setting" or len({r.setting for r in rows}) > 1]
    header = [name for name, _ in columns]
    body = [[get(r) for _, get in columns] for r in rows]
    if fmt == "html":
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in body)
        return f'<table class="amp-comparison"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'
    if fmt == "markdown":
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in line] for line in body]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body])


# -- recommendation ------------------------------------------------------------------------------


def _verdict(row: Row, base: Row, tolerance: float) -> str | None:
    """Why `row` can't be recommended over fp32, or None when it qualifies."""
    name = row.requested if row.effective in (None, row.requested) else f"{row.requested} (ran as {row.effective})"
    if not row.all_ok:
        why = f": {row.error}" if row.error else ""
        return f"{name} is not safe: {row.status}{why}"
    if row.effective == BASELINE:
        return f"{name} runs as fp32 on this machine ({row.fallback_reason or 'no fallback reason recorded'})"
    if row.eval_loss is None or base.eval_loss is None:
        return f"{name} has no eval loss to compare with fp32"
    diff = row.eval_loss.mean - base.eval_loss.mean
    # One-sided: a half precision that converges *better* than fp32 in the same steps is no reason to stay.
    if base.eval_loss.mean:  # relative to |fp32 loss|, so a higher loss reads as + even when losses are negative
        worse = diff / abs(base.eval_loss.mean)
        change = f"{100 * worse:+.2f}%"
    else:  # a zero fp32 loss: any higher loss is infinitely worse (and there is no percentage to quote)
        worse, change = (math.inf if diff > 0 else 0.0), f"{diff:+.4f} absolute"
    if worse > tolerance:
        return (
            f"{name}: eval loss {row.eval_loss.mean:.4f} vs fp32 {base.eval_loss.mean:.4f} "
            f"({change}) is worse than the {100 * tolerance:g}% tolerance"
        )
    if row.speedup is None:
        return f"{name} has no throughput to compare with fp32"
    if row.speedup.mean <= 1.0:
        return f"{name} is not faster than fp32 here ({row.speedup.mean:.2f}x fp32 throughput)"
    return None


def _evidence(row: Row) -> str:
    parts = [f"{row.requested}" + (f" → {row.effective}" if row.effective and row.effective != row.requested else "")]
    parts.append(row.status)
    if row.speedup:
        parts.append(f"{row.speedup.format('.2f', 'x')} fp32 throughput")
    if row.memory_saved_pct:
        parts.append(f"{row.memory_saved_pct.format('.1f', '%')} memory saved")
    if row.eval_loss:
        parts.append(f"eval loss {row.eval_loss.format('.4f')}")
    if row.loss_diff and not row.is_baseline:
        parts.append(f"Δ vs fp32 {row.loss_diff.format('+.4f')}")
    if row.skipped_steps and row.skipped_steps.mean:
        parts.append(f"{row.skipped_steps.format('.3g')} skipped steps")
    if row.runs > 1:
        parts.append(f"{row.runs} seeds")
    return ", ".join(parts)


def recommendations(table: Sequence[Row], tolerance: float = DEFAULT_TOLERANCE) -> list[Recommendation]:
    """One recommendation per setting of a comparison table: the fastest precision whose eval loss is at
    most `tolerance` above fp32's."""
    check_tolerance(tolerance)
    by_setting: dict[str, list[Row]] = defaultdict(list)
    for row in table:
        by_setting[row.setting].append(row)
    out = []
    for setting, rows in by_setting.items():
        evidence = tuple(_evidence(r) for r in rows)
        base = next((r for r in rows if r.is_baseline and r.ok_runs), None)
        if base is None:
            out.append(
                Recommendation(
                    setting,
                    None,
                    None,
                    tolerance,
                    "no successful fp32 run to compare against: add fp32 to the sweep",
                    evidence,
                )
            )
            continue
        verdicts = [(r, _verdict(r, base, tolerance)) for r in rows if r is not base]
        winners = sorted(
            (r for r, v in verdicts if v is None), key=lambda r: r.speedup.mean if r.speedup else 0, reverse=True
        )
        if winners:
            best = winners[0]
            reason = (
                f"the fastest precision whose eval loss stays within {100 * tolerance:g}% of fp32's (or below it): "
                f"{best.speedup.format('.2f', 'x') if best.speedup else '?'} fp32 throughput, "
                f"eval loss {best.eval_loss.format('.4f') if best.eval_loss else '?'} vs {base.eval_loss.format('.4f') if base.eval_loss else '?'}"
            )
            if best.effective != best.requested:
                reason += f" (request {best.requested!r}; it runs as {best.effective}: {best.fallback_reason})"
            out.append(Recommendation(setting, best.effective, best.requested, tolerance, reason, evidence))
        else:
            why = "; ".join(v for _, v in verdicts if v) or "fp32 is the only precision in the sweep"
            out.append(Recommendation(setting, BASELINE, BASELINE, tolerance, f"stay in fp32: {why}", evidence))
    return out


def check_tolerance(tolerance: float) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (relative, e.g. 0.02 for 2%)")
    return float(tolerance)


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepReport:
    """Everything a sweep's report shows, computed once from its results."""

    results: tuple[RunResult, ...]
    runs: tuple[Row, ...]  # one row per run
    table: tuple[Row, ...]  # one row per setting and precision, seeds aggregated
    recommendations: tuple[Recommendation, ...]
    tolerance: float

    def recommendation_markdown(self) -> str:
        return "\n\n".join(r.to_markdown() for r in self.recommendations)

    def summary_markdown(self) -> str:
        """The report as markdown: the comparison table and the recommendation(s) (a sweep's summary.md)."""
        parts = ["# AMP Workbook sweep summary", "", format_table(self.table, "markdown"), ""]
        parts += [rec.to_markdown() + "\n" for rec in self.recommendations]
        return "\n".join(parts)


def build_report(results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> SweepReport:
    """Tabulate `results` per run and per precision and recommend, once."""
    check_tolerance(tolerance)
    table = comparison_table(results)
    return SweepReport(
        results=tuple(results),
        runs=tuple(run_table(results)),
        table=tuple(table),
        recommendations=tuple(recommendations(table, tolerance)),
        tolerance=tolerance,
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
