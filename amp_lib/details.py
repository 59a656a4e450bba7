"""What a report says once, after its answer: the caveats, why a precision fails or doesn't pay, how speed
was measured, fp8 layers and MFU, energy, fp32's noise, every measurement, the rules; and `summary_markdown`,
the whole report as markdown (a sweep's summary.md). Pure functions of a `SweepReport`, like `amp_lib.render`,
whose cells, tables and answer they reuse."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from amp_lib.diagnose import Diagnosis
from amp_lib.fp8 import MFU_LABELS
from amp_lib.render import (
    answer,
    context_markdown,
    format_floor,
    format_memory,
    format_table,
    format_verdicts,
    memory_note,
    ratio_text,
    stat_text,
)
from amp_lib.report import SweepReport
from amp_lib.speed import DRIFT_LIMIT, SPEED_MARGIN, SPREAD_LIMIT, STEP_SPREAD_LIMIT, speed_verdicts, timing_problems
from amp_lib.stats import Stat

# -- the details ---------------------------------------------------------------------------------


def caveats_markdown(report: SweepReport) -> str:
    """What each verdict rests on that its cell cannot say: fallbacks, errors, why a speed is undecided or
    unreliable, multiplicity, censored times."""
    lines = []
    for g in report.groups:
        notes = [g.fallback_reason and f"ran as {g.effective}: {g.fallback_reason}", g.error,
                 g.speed_reason and f"speed ({g.speed_source or 'runs'}): {g.speed_reason}"]  # fmt: skip
        if g.emulated:
            notes.append("emulated fp8 (no fp8 GEMMs on this device): a quality verdict only, never a speed one")
        if g.compared > 1 and not g.is_baseline:
            notes.append(f"intervals marked † are corrected for {g.compared} comparisons with fp32 (Holm)")
        if g.ttq is not None and g.ttq.censored:
            n = g.ttq.censored
            notes.append(f"{n} seed{'s' if n > 1 else ''} never reached fp32's quality: censored at the run's whole time")
        disturbed = next((p for r in g.results for p in timing_problems(r)), None)
        if g.ttq is not None and disturbed and g.speed_source != "training runs":
            notes.append(f"time to quality is training-run wall time, and a run's was disturbed: {disturbed}")
        shown = [n for n in notes if n]
        if shown:
            where = f" ({g.setting})" if len({x.setting for x in report.groups}) > 1 else ""
            lines.append(f"- **{g.name}**{where}: " + "; ".join(shown))
    return "\n".join(lines)


def timing_markdown(report: SweepReport) -> str:
    """How each setting's speed was measured: rounds, blocks dropped, budget, and each comparison's interval."""
    lines = []
    for t in report.timings:
        record = t.timing
        assert record is not None
        if not record.blocks:
            why = t.error_line or "; ".join(record.failed.values()) or "no blocks"
            lines.append(f"- {t.run_name or t.model}: not timed ({why})")
            continue
        rounds = len({b.round for b in record.blocks})
        dropped = sum(b.dropped for b in record.blocks)
        how = "every comparison decided" if record.stopped == "decided" else f"the {record.budget_s:.0f} s budget ran out"
        lines.append(f"- {len(record.precisions)} precisions, {rounds} rounds of {record.block_steps}-step blocks in "
                     f"{record.elapsed_s:.0f} s ({how}); {dropped} disturbed blocks dropped")  # fmt: skip
        for p, v in speed_verdicts(record).items():
            lines.append(f"  - {p} vs {record.precisions[0]}: {ratio_text(v.interval)}, {v.verdict}, {v.rounds} rounds")
    return "\n".join(lines)


def noise_markdown(report: SweepReport) -> str:
    several = len(report.noise) > 1
    return "\n".join(f"- {f.setting + ': ' if several else ''}{format_floor(f)}" for f in report.noise)


def why_markdown(items: Sequence[Diagnosis]) -> str:
    several = len({d.setting for d in items}) > 1
    lines = []
    for d in items:
        lines.append(f"**{d.precision}**" + (f" ({d.setting})" if several else ""))
        lines += [f"- {text}" for text in (*d.causes, *d.overflows)]
        lines.append("")
    return "\n".join(lines).strip()


def memory_markdown(report: SweepReport) -> str:
    note = memory_note(report.groups)
    return format_memory(report.groups, "markdown") + (f"\n\n_{note}_" if note else "")


QUALITY_RULE = (
    "Quality: the difference in best eval loss from fp32 on the same setting, in percent of fp32's mean, with a "
    "95% confidence interval over seeds (Student t; paired by seed where both ran, else Welch). The tolerance is "
    "±{tol:g}% of fp32's mean best eval loss. *matches fp32*: the whole interval lies within the tolerance "
    "(equivalence); *better*: it lies below −tolerance; *not worse than fp32*: its upper end is at or below "
    "+tolerance (non-inferiority); *worse by X*: it lies above +tolerance; *inconclusive*: it reaches above "
    "+tolerance without lying above it; *diverged/failed*: a seed failed, ran out of memory or diverged (an ok "
    "run whose eval loss is not finite counts as diverged). A precision is eligible when it matches, is better or "
    "is not worse. With several precisions the intervals that decide are corrected for multiplicity (Holm's "
    "step-down: the smallest p-value at 1 − 0.05/m, the next at 1 − 0.05/(m − 1), …), marked †. One seed gives "
    "no noise estimate: it is shown, never judged."
)
SPEED_RULE = (
    "Speed: each setting's precisions are timed in one process against fp32, in alternating blocks (ABBA) of a "
    "few steps on the same model, batches and threads; a block's time is its median step, and a block whose "
    "steps spread more than {block_spread:g}x (p90/p10) was disturbed and is dropped with its pair. The speed-up "
    "is the geometric mean of the paired block ratios with a t interval on their logs (never negative). Blocks "
    "are added until the interval lies wholly above {margin:g}x (*faster*), wholly below {low:.3f}x (*slower*) or "
    "within [{low:.3f}x, {margin:g}x] (*no measurable gain*), or the time budget runs out (*undecided*). Where a setting "
    "was not timed (several processes, or no timing), its training runs' throughput is compared the same way, "
    "paired by seed; such a figure is *unreliable* when a run was timed beside other runs, its step times spread "
    "more than {spread:g}x, or drifted more than {drift:g}x — and an unreliable or undecided figure never decides."
)
TTQ_RULE = (
    "Time to quality (as MLPerf scores training): per seed, the training time (evals excluded) until the first "
    "eval at or below that seed's fp32 best eval loss plus the tolerance; the speed-up is fp32's time over the "
    "precision's, paired by seed, on the log scale. A run that never reaches the target is censored at its whole "
    "training time, so with censored seeds the figure is an upper bound (*at most*)."
)
MEMORY_RULE = (
    "Memory: peak memory over fp32's, paired by seed, on the log scale; the split is what held the memory at the "
    "peak of one untimed step, by PyTorch's MemTracker (FSDPMemTracker under FSDP2), else tensor sizes."
)
RECOMMENDATION_RULE = (
    "Recommendation: the precision with the largest speed-up among the eligible ones whose speed verdict is "
    "*faster*; otherwise stay in fp32, saying for each precision which half failed."
)


def rules_markdown(tolerance: float) -> str:
    """The rules every verdict follows, as the report states them."""
    rules = (
        QUALITY_RULE.format(tol=100 * tolerance),
        SPEED_RULE.format(
            block_spread=SPREAD_LIMIT,
            margin=1 + SPEED_MARGIN,
            low=1 / (1 + SPEED_MARGIN),
            spread=STEP_SPREAD_LIMIT,
            drift=DRIFT_LIMIT,
        ),
        TTQ_RULE,
        MEMORY_RULE,
        RECOMMENDATION_RULE,
    )
    return "\n".join(f"- {rule}" for rule in rules)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def fp8_markdown(report: SweepReport) -> str:
    """Each fp8 row's layer choices (which linears ran in fp8, why each other one did not, the tokens per step
    next to torchao's auto rule) and its MFU against both peaks, labelled."""
    several = len({g.setting for g in report.groups}) > 1
    lines = []
    for g in report.groups:
        plan = next((r.fp8_layers for r in g.results if r.fp8_layers is not None), None)
        if plan is None:
            continue
        lines.append(f"- **{g.name}**" + (f" ({g.setting})" if several else "") + f": {plan.summary}")
        lines.append(f"  - in fp8 ({', '.join(plan.fp8_gemms)} GEMMs): {', '.join(plan.fp8_fqns) or 'none'}")
        lines += [f"  - {d.fqn} (K={d.in_features}, N={d.out_features}): {d.reason}" for d in plan.decisions if not d.fp8]
        ok = [r.metrics for r in g.results if r.ok]
        for field, label in MFU_LABELS.items():
            stat = Stat.of(getattr(m, field) for m in ok)
            if stat is not None:
                lines.append(f"  - {label}: {_pct(stat.mean)}")
    return "\n".join(lines)


def energy_markdown(report: SweepReport) -> str:
    """Each row's energy where the hardware reported it (joules per item, mean power, energy to fp32's quality),
    or why there is none."""
    several = len({g.setting for g in report.groups}) > 1
    lines, reasons = [], []
    for g in report.groups:
        e = g.energy
        if e is None:
            continue
        if e.per_item_j is None:
            reasons += [e.reason] if e.reason else []
            continue
        unit = g.measurements.throughput_unit.rstrip("s") or "item"
        parts = [f"{e.per_item_j.format('.3g', ' J')} per {unit}", stat_text(e.watts, ".0f", " W")]
        parts.append(f"to fp32's quality {stat_text(e.to_quality_j, '.3g', ' J')}" if e.to_quality_j else "never reached fp32's quality")
        lines.append(f"- **{g.name}**" + (f" ({g.setting})" if several else "") + ": " + ", ".join(parts))
    if reasons:
        lines.append("- not measured: " + "; ".join(dict.fromkeys(reasons)))
    return "\n".join(lines)


# -- summary.md ----------------------------------------------------------------------------------

DETAILS: tuple[tuple[str, Callable[[SweepReport], str]], ...] = (
    ("Caveats", caveats_markdown),
    ("Why a precision fails or doesn't pay", lambda r: why_markdown(r.why)),
    ("How speed was measured", timing_markdown),
    ("fp8 layers and MFU", fp8_markdown),
    ("Energy", energy_markdown),
    ("fp32's noise", noise_markdown),
    ("Every measurement (seeds aggregated)", lambda r: format_table(r.table, "markdown")),
    ("Every run", lambda r: format_table(r.runs, "markdown")),
    ("Rules", lambda r: rules_markdown(r.tolerance)),
)


def verdict_markdown(report: SweepReport) -> str:
    return format_verdicts(report.groups, "markdown")


def summary_markdown(report: SweepReport) -> str:
    """The report as markdown (a sweep's summary.md): context, the answer, one line per verdict, memory, then
    the details, each once."""
    parts = ["# AMP Workbook sweep summary", ""]
    if report.results:
        parts += [context_markdown(report), ""]
    if report.recommendations:
        parts += ["## Answer", "", answer(report), ""]
    parts += ["## Verdicts against fp32", "", verdict_markdown(report), ""]
    parts += ["## Memory", "", memory_markdown(report), ""]
    for title, body in DETAILS:
        text = body(report)
        if text:
            parts += [f"## {title}", "", text, ""]
    return "\n".join(parts)
