"""Everything a report says in words, in the order a reader needs it: the context (machine, versions, model,
recipe, seeds, tolerance), the answer with its caveat, one line per verdict, and the details once, later
(caveats, causes, timing, noise, every measurement, the rules). Pure functions of a `SweepReport`: the
numbers are computed once, in `amp_lib.report`; this module only writes them down, as markdown (summary.md,
the notebook), HTML tables (the notebook) or plain text (a terminal)."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from datetime import datetime

from amp_lib.config import recipe_of
from amp_lib.report import (
    BASELINE,
    BETTER,
    FAILED,
    INCONCLUSIVE,
    MATCHES,
    NO_BASELINE,
    NOT_WORSE,
    Group,
    MemorySplit,
    NoiseFloor,
    Recommendation,
    SweepReport,
    TimeToQuality,
)
from amp_lib.speed import (
    EMULATED,
    FASTER,
    NO_GAIN,
    SLOWER,
    UNDECIDED,
    UNRELIABLE,
)
from amp_lib.stats import Interval, Stat
from amp_lib.table import Measurements

CELL_LIMIT = 60  # characters in a verdict-table cell

# -- the context ---------------------------------------------------------------------------------


def _machine(report: SweepReport) -> str:
    machines = [r.plan.machine for r in report.results if r.plan.machine]
    if not machines:
        names = sorted({str(r.plan.device_name) for r in report.results if r.plan.device_name})
        return ", ".join(names) or "not recorded"
    m = machines[0]
    if m.get("device_type") == "cuda":
        cc = m.get("compute_capability") or []
        return f"{m.get('device_name')} (compute capability {'.'.join(map(str, cc))})"
    isa = ", ".join(m.get("cpu_isa") or []) or "no half-precision ISA"
    return f"{m.get('cpu_model') or 'CPU'} ({isa})"


def _versions(report: SweepReport) -> str:
    m = next((r.plan.machine for r in report.results if r.plan.machine), {})
    torch_version = m.get("torch") or next((r.plan.torch_version for r in report.results if r.plan.torch_version), "?")
    parts = [f"torch {torch_version}", f"CUDA {m['cuda']}" if m.get("cuda") else "no CUDA"]
    parts.append(f"amp-workbook {m.get('amp_workbook') or '?'}" + (f" ({m['commit']})" if m.get("commit") else ""))
    return ", ".join(parts)


def _dates(report: SweepReport) -> str:
    stamps = sorted(d for r in report.results if isinstance(d := r.plan.machine.get("date"), str))
    if not stamps:
        return "not recorded"
    first, last = (datetime.fromisoformat(s).strftime("%Y-%m-%d %H:%M UTC") for s in (stamps[0], stamps[-1]))
    return first if first == last else f"{first} to {last[11:] if first[:10] == last[:10] else last}"


def _model(report: SweepReport) -> str:
    models = {}
    for r in report.results:
        count = r.metrics.param_count
        models.setdefault(r.model, count)
    return ", ".join(f"{m} ({c / 1e6:.2f}M parameters)" if c else m for m, c in models.items()) or "?"


def _training(report: SweepReport) -> str:
    first = report.results[0].config
    name, changed = recipe_of(first)
    keys = [k for k in ("steps", "batch_size", "seq_len", "grad_accum") if k in first and k not in changed]
    values = ", ".join(f"{k}={first.get(k)}" for k in keys)  # each value once: a changed one is named with the recipe
    recipe = f"recipe {name}" + (f" with {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else "")
    return "; ".join(part for part in (recipe if name else "", values) if part)


def _varying(report: SweepReport) -> str:
    settings = list(dict.fromkeys(g.setting for g in report.groups))
    return "; ".join(settings) if len(settings) > 1 else ""


def context(report: SweepReport) -> list[tuple[str, str]]:
    """What a reader must know before the answer: where and when it ran, on what, judged how."""
    if not report.results:
        return []
    seeds = sorted({r.seed for r in report.results if r.seed is not None})
    executors = sorted({r.plan.executor for r in report.results if r.plan.executor})
    concurrent = max((r.plan.concurrent_runs or 1 for r in report.results), default=1)
    facts = [
        ("Machine", _machine(report)),
        ("Versions", _versions(report)),
        ("Date", _dates(report)),
        ("Model", _model(report)),
        ("Training", _training(report)),
        ("Settings", _varying(report)),
        ("Seeds", ", ".join(map(str, seeds)) or "—"),
        ("Tolerance", f"best eval loss within ±{100 * report.tolerance:g}% of fp32's"),
        ("Runs", f"{', '.join(executors) or 'in-process'}, {concurrent} at a time"
                 + (f"; speed timed in {len(report.timings)} interleaved measurement(s)" if report.timings else "")),
    ]  # fmt: skip
    return [(k, v) for k, v in facts if v]


def context_markdown(report: SweepReport) -> str:
    return "\n".join(f"- **{k}:** {v}" for k, v in context(report))


# -- cells: one line each ------------------------------------------------------------------------


def stat_text(stat: Stat | None, spec: str, suffix: str = "") -> str:
    return "—" if stat is None else stat.format(spec, suffix)


def ratio_text(interval: Interval | None, point: float | None = None) -> str:
    """`1.31x [1.24x, 1.38x]`, or a point alone (`0.62x (one seed)`), or `—`."""
    if interval is not None:
        return interval.format(".2f", "x")
    return "—" if point is None else f"{point:.2f}x (one seed)"


def pct_text(interval: Interval | None) -> str:
    return "—" if interval is None else interval.format("+.2f", "%")


def _diff_cell(g: Group) -> str:
    if g.is_baseline:
        return "—"
    if g.loss_diff_pct is not None:
        return pct_text(g.loss_diff_pct) + (" †" if g.compared > 1 else "")
    if g.point_diff is not None and g.base_mean:
        return f"{100 * g.point_diff / abs(g.base_mean):+.2f}% (one seed)"
    return "—"


def _quality_cell(g: Group) -> str:
    if g.verdict.startswith("worse by") and g.loss_diff_pct is not None:
        return f"worse by {g.loss_diff_pct.mean:.1f}%"
    return "inconclusive" if g.verdict == INCONCLUSIVE else g.verdict


def _speed_cell(g: Group) -> str:
    if g.is_baseline:
        return "1.00x"
    return ratio_text(g.speedup, g.point_speedup) + (" †" if g.compared > 1 and g.speedup is not None else "")


def _speed_verdict_cell(g: Group) -> str:
    if g.is_baseline:
        return "baseline" + (" (timing unreliable)" if g.speed_reason else "")
    source = {"interleaved timing": "timed", "training runs": "runs"}.get(g.speed_source, "")
    return f"{g.speed_verdict} ({source})" if source and g.speed_verdict != "—" else g.speed_verdict


def format_ttq(ttq: TimeToQuality) -> str:
    """Time to fp32's quality: the time and steps, and how many seeds never got there."""
    if ttq.reached == 0:
        return f"never reached in {ttq.horizon} steps"
    time = "—" if ttq.time_s is None else ttq.time_s.format(".3g", " s")
    text = f"{time}, {ttq.steps.format('.0f') if ttq.steps else '?'} steps"
    if ttq.reached < ttq.runs:
        text += f" ({ttq.reached} of {ttq.runs} seeds; the rest never in {ttq.horizon} steps)"
    return text


def _ttq_cell(g: Group) -> str:
    t = g.ttq
    if t is None:
        return "—"
    if g.is_baseline:
        return format_ttq(t) if t.reached < t.runs else ("—" if t.time_s is None else t.time_s.format(".3g", " s"))
    if t.reached == 0:
        return f"never ({t.runs} seeds, {t.horizon} steps)"
    shown = ratio_text(t.speedup, t.point_speedup)
    return f"at most {shown} ({t.censored} censored)" if t.censored else shown


def memory_text(ratio: float | None) -> str:
    """Peak memory against fp32's (a ratio) in words: "uses 12.0% less", "uses 2.4% more", "same as fp32"."""
    if ratio is None:
        return ""
    change = (ratio - 1) * 100
    if round(change, 1) == 0:
        return "same as fp32"
    return f"uses {abs(change):.1f}% {'less' if change < 0 else 'more'}"


def _memory_cell(g: Group) -> str:
    if g.is_baseline or g.memory_ratio is None:
        return "—"
    return memory_text(g.memory_ratio.mean)


def _seeds_cell(g: Group) -> str:
    return f"{g.runs}" if g.ok_runs == g.runs else f"{g.ok_runs} of {g.runs} ok"


VERDICT_COLUMNS: tuple[tuple[str, Callable[[Group], str]], ...] = (
    ("setting", lambda g: g.setting),
    ("precision", lambda g: g.name),
    ("seeds", _seeds_cell),
    ("quality", _quality_cell),
    ("Δ best eval loss [95% CI]", _diff_cell),
    ("speed-up [95% CI]", _speed_cell),
    ("speed", _speed_verdict_cell),
    ("time to fp32's quality", _ttq_cell),
    ("memory vs fp32", _memory_cell),
)

def _optimizer_saved_cell(g: Group) -> str:
    """The optimizer state a row of another optimizer saves against fp32's: `saves 0.68 MB (75%)`."""
    saved, fp32 = g.optimizer_saved_mb, None
    if saved is None or g.memory is None or g.memory.optimizer_mb is None:
        return "—"
    fp32 = g.memory.optimizer_mb + saved
    share = f" ({100 * abs(saved) / fp32:.0f}%)" if fp32 else ""
    return f"{'saves' if saved >= 0 else 'adds'} {abs(saved):,.2f} MB{share}"


def _measured_as(m: MemorySplit) -> str:
    """The peak's kind, and where the split came from: `cpu_rss, MemTracker`, `cuda_allocated, tensor count`."""
    source = None if m.source is None else "tensor count" if m.source.startswith("tensor count") else m.source
    return ", ".join(part for part in (m.kind or "?", source) if part)


def _mem(get: Callable[[MemorySplit], float | None]) -> Callable[[Group], str]:
    return lambda g: _mb(get(g.memory)) if g.memory else "—"


MEMORY_COLUMNS: tuple[tuple[str, Callable[[Group], str]], ...] = (
    ("setting", lambda g: g.setting),
    ("precision", lambda g: g.name),
    ("peak MB", _mem(lambda m: m.peak_mb)),
    ("vs fp32 [95% CI]", lambda g: "—" if g.is_baseline else ratio_text(g.memory_ratio)),
    ("tensors at peak", _mem(lambda m: m.tensor_peak_mb)),  # where MemTracker measured a step
    ("parameters", _mem(lambda m: m.params_mb)),
    ("gradients", _mem(lambda m: m.grads_mb)),
    ("optimizer", _mem(lambda m: m.optimizer_mb)),
    ("optimizer state vs fp32", _optimizer_saved_cell),  # where a row trains with another optimizer
    ("activations", _mem(lambda m: m.activations_mb)),  # where MemTracker measured a step
    ("temporaries", _mem(lambda m: m.temporaries_mb)),  # where MemTracker measured a step
    ("rest (activations, workspace)", _mem(lambda m: m.rest_mb)),
    ("measured as", lambda g: _measured_as(g.memory) if g.memory else "—"),
)
TRACKED_COLUMNS = ("tensors at peak", "activations", "temporaries")

# Every figure of every run or row: the details a reader opens when the verdicts raise a question.
COLUMNS: tuple[tuple[str, Callable[[Measurements], str]], ...] = (
    ("setting", lambda r: r.setting),
    ("requested", lambda r: r.requested),
    ("effective", lambda r: r.effective or "?"),
    ("status", lambda r: r.status),
    ("run", lambda r: r.run_names[0] if r.runs == 1 else f"{r.runs} seeds ({', '.join(map(str, r.seeds))})"),
    ("throughput/s", lambda r: stat_text(r.items_per_s, ",.0f", f" {r.throughput_unit}")),
    ("speedup vs fp32", lambda r: stat_text(r.speedup, ".2f", "x")),
    ("peak MB", lambda r: stat_text(r.peak_memory_mb, ".1f")),
    ("memory saved", lambda r: stat_text(r.memory_saved_pct, ".1f", "%")),
    ("final loss", lambda r: stat_text(r.final_loss, ".4f")),
    ("eval loss", lambda r: stat_text(r.eval_loss, ".4f")),
    ("Δ eval vs fp32", lambda r: stat_text(r.loss_diff, "+.4f")),
    ("skipped steps", lambda r: stat_text(r.skipped_steps, ".3g")),
    ("final scale", lambda r: stat_text(r.final_loss_scale, ".3g")),
    ("min scale", lambda r: stat_text(r.min_loss_scale, ".3g")),
    ("fallback / error", lambda r: r.error or r.fallback_reason or ""),
)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


NOWRAP = 30  # an html cell this short stays on one line: "fp16-mixed" never breaks at its hyphen


def _td(cell: str) -> str:
    style = ' style="white-space:nowrap"' if len(cell) <= NOWRAP else ""
    return f"<td{style}>{html.escape(cell)}</td>"


def _render(header: Sequence[str], body: Sequence[Sequence[str]], fmt: str, css_class: str) -> str:
    formats = ("markdown", "html", "text")
    if fmt not in formats:
        raise ValueError(f"invalid fmt {fmt!r}; valid: {', '.join(formats)}")
    if fmt == "html":
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(_td(c) for c in line) + "</tr>" for line in body)
        return f'<table class="{css_class}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'
    if fmt == "markdown":
        cells = [[c.replace("|", "\\|").replace("\n", " ") for c in line] for line in body]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in cells])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *body])


def _table(columns: Sequence[tuple[str, Callable[..., str]]], rows: Sequence[object], fmt: str, css: str) -> str:
    several = len({getattr(r, "setting", "") for r in rows}) > 1
    shown = [c for c in columns if c[0] != "setting" or several]
    return _render([name for name, _ in shown], [[get(r) for _, get in shown] for r in rows], fmt, css)


def format_table(rows: Sequence[Measurements], fmt: str = "markdown") -> str:
    """Every measurement as `markdown` (summary.md), `html` (the notebook) or plain `text` (a terminal)."""
    return _table(COLUMNS, rows, fmt, "amp-comparison")


def format_verdicts(groups: Sequence[Group], fmt: str = "markdown") -> str:
    """The verdict table: one line per precision, each cell one short line (the details come later)."""
    return _table(VERDICT_COLUMNS, groups, fmt, "amp-verdicts")


def format_memory(groups: Sequence[Group], fmt: str = "markdown") -> str:
    """Peak memory per precision, its ratio to fp32's, and the parts that held it (MB): parameters, gradients and
    optimizer state, and where MemTracker measured a step also activations, temporaries and the tensors' total;
    the optimizer state a row of another optimizer saved, where there is one."""
    tracked = any(g.memory is not None and g.memory.tracked for g in groups)
    other_optimizer = any(g.optimizer_saved_mb is not None for g in groups)
    columns = [
        (name, get) for name, get in MEMORY_COLUMNS
        if (tracked or name not in TRACKED_COLUMNS) and (other_optimizer or name != "optimizer state vs fp32")
    ]  # fmt: skip
    if tracked:
        columns = [("rest", get) if name.startswith("rest") else (name, get) for name, get in columns]
    return _table(columns, groups, fmt, "amp-memory")


def memory_note(groups: Sequence[Group]) -> str:
    """What a reader must know about the memory figures: where the split comes from, and on a CPU that the peak
    is the whole process's resident set, tensor memory a part of it."""
    notes = []
    if any(g.memory is not None and g.memory.kind == "cpu_rss" for g in groups):
        if any(g.memory is not None and g.memory.tracked for g in groups):
            notes.append("CPU: the peak is the whole process's resident set; the tensors at peak are what MemTracker "
                         "counted of it, the rest is the Python process, its libraries and the allocator's pages")  # fmt: skip
        else:
            notes.append("CPU: the peak is the whole process's resident set, so the rest is mostly the Python process")
    sources = sorted({g.memory.source for g in groups if g.memory is not None and g.memory.source})
    if sources and sources != ["MemTracker"]:
        notes.append("split by " + "; ".join(sources))
    return ". ".join(notes)


def format_floor(floor: NoiseFloor) -> str:
    """fp32's own seed-to-seed noise on one setting, and the seeds it asks for, in words."""
    if floor.best_eval_loss is None:
        return f"no fp32 baseline ({floor.status})"
    if floor.best_eval_loss.std is None or floor.half_width is None:
        return f"fp32 best eval loss {floor.best_eval_loss.mean:.4f}: {floor.status}, one seed — no noise estimate"
    text = (
        f"fp32 best eval loss {floor.best_eval_loss.mean:.4f}, std {floor.best_eval_loss.std:.4f} over "
        f"{floor.best_eval_loss.n} seeds (95% CI ±{floor.half_width:.4f}); tolerance ±{floor.tolerance_abs:.4f}"
    )
    if floor.seeds_needed:
        text += f"; {floor.seeds_needed} seeds give a difference interval narrower than the tolerance"
    return text


# -- the answer ----------------------------------------------------------------------------------


def _quality_phrase(g: Group) -> str:
    return {MATCHES: "matches fp32", BETTER: "is better than fp32", NOT_WORSE: "is not worse than fp32"}[g.verdict]


def _why_not(g: Group) -> str:
    """Why `g` is not recommended over fp32, in one line."""
    if g.verdict == FAILED:
        return f"not safe: {g.status}" + (f" ({g.error})" if g.error else "")
    if g.effective == BASELINE and g.key.requested != BASELINE:  # a fallback (fp32 of another optimizer is no such)
        return f"runs as fp32 on this machine ({g.fallback_reason or 'no fallback reason recorded'})"
    if g.verdict == NO_BASELINE:
        return "no eval loss to compare with fp32"
    if not g.eligible:
        seeds = f"{g.seeds_used} seeds" if g.seeds_used != 1 else "one seed: no noise estimate"
        return f"{_quality_cell(g)} on quality (Δ {_diff_cell(g)}, {seeds})"
    head = f"{_quality_phrase(g)} on quality"
    speed = _speed_cell(g)
    if g.speed_verdict == SLOWER:
        return f"{head} but is slower: {speed}"
    if g.speed_verdict == NO_GAIN:
        return f"{head}, but shows no measurable speed gain: {speed}"
    if g.speed_verdict == UNDECIDED:
        return f"{head}; its speed was not decided ({speed}): {g.speed_reason or 'too little evidence'}"
    if g.speed_verdict == UNRELIABLE:
        return f"{head}; its speed figure is unreliable ({g.speed_reason})"
    if g.speed_verdict == EMULATED:
        return f"{head} (emulated: a forecast of fp8's loss); its speed needs fp8 hardware to measure"
    return f"{head}, but has no speed to compare with fp32"


def _no_baseline_reason(rec: Recommendation) -> str:
    fp32 = rec.baseline
    if fp32 is None:
        return "no fp32 run in this setting to compare against: add fp32 to the sweep"
    if fp32.ok_runs == 0:
        error = f": {fp32.error}" if fp32.error else ""
        return f"fp32 failed ({fp32.status}{error}), so there is no baseline to compare against: fix the fp32 run first"
    return f"fp32 ran as {fp32.effective} ({fp32.fallback_reason or 'no fallback reason recorded'}), so there is no fp32 baseline"


def reason(rec: Recommendation) -> str:
    """Why the recommendation is what it is: the winner's evidence, or one clause per other precision."""
    if rec.precision is None:
        return _no_baseline_reason(rec)
    best = rec.winner
    if best is None:
        text = "; ".join(f"{g.name} {_why_not(g)}" for g in rec.candidates) or "fp32 is the only precision in the sweep"
        if rec.baseline is not None and rec.baseline.verdict == FAILED:
            text += f"; note: fp32 itself {rec.baseline.status}"
        return f"stay in fp32: {text}"
    text = f"{_quality_phrase(best)} (Δ {_diff_cell(best)}) and {FASTER}: {_speed_cell(best)}"
    if best.ttq is not None and best.ttq.speedup is not None and not best.ttq.censored:
        text += f"; reaches fp32's quality {best.ttq.speedup.mean:.2f}x sooner"
    if best.effective != best.key.requested:
        text += f" (ask for {best.requested!r}; it runs as {best.effective}: {best.fallback_reason})"
    return text


def short_reason(rec: Recommendation, limit: int = 150) -> str:
    """The reason in one short line (a terminal's last line): each candidate's verdicts in a few words."""
    if rec.precision is None or rec.winner is not None or not rec.candidates:
        text = reason(rec)
    else:
        speed = {g.name: f", {g.speed_verdict} {_speed_cell(g)}" if g.speed_verdict != "—" else "" for g in rec.candidates}
        text = "stay in fp32: " + "; ".join(f"{g.name} {_quality_cell(g)}{speed[g.name]}" for g in rec.candidates)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _answer(rec: Recommendation, several: bool) -> str:
    where = f"{rec.setting}: " if several and rec.setting else ""
    if rec.precision is None:
        return f"{where}No answer: {reason(rec)}."
    best = rec.winner
    if best is None:
        if not rec.candidates:
            return f"{where}Stay in fp32: it is the only precision in the sweep."
        lines = [f"{where}Stay in fp32 — no other precision was shown to be as good and measurably faster:"]
        return "\n".join([*lines, *(f"- {g.name} {_why_not(g)}." for g in rec.candidates)])
    n = f", {best.seeds_used} seeds" if best.seeds_used else ""
    text = f"{where}Use {best.requested}: it {_quality_phrase(best)} (Δ {_diff_cell(best)}{n}) and is "
    text += f"{best.speedup.mean:.2f}x as fast [{best.speedup.low:.2f}x, {best.speedup.high:.2f}x]" if best.speedup else "faster"
    if best.ttq is not None and best.ttq.speedup is not None and not best.ttq.censored:
        text += f", reaching fp32's quality {best.ttq.speedup.mean:.2f}x sooner"
    if best.effective != best.key.requested:
        text += f" (it runs as {best.effective} here: {best.fallback_reason})"
    return text + "."


def answer(report: SweepReport) -> str:
    """The answer, with its caveat: per setting, the precision to use and what it buys, or why fp32 stays."""
    several = len(report.recommendations) > 1
    return "\n\n".join(_answer(rec, several) for rec in report.recommendations)


def _evidence(g: Group) -> str:
    parts = [f"{g.runs} seed{'s' if g.runs != 1 else ''}" + ("" if g.ok_runs == g.runs else f" ({g.status})")]
    if g.is_baseline:
        parts.append("baseline" + (f", best eval loss {g.best_eval_loss.format('.4f')}" if g.best_eval_loss else ""))
    else:
        parts += [f"{_quality_cell(g)} (Δ {_diff_cell(g)})", f"{_speed_verdict_cell(g)} {_speed_cell(g)}"]
        parts += [f"time to quality {_ttq_cell(g)}" for _ in [g.ttq] if g.ttq is not None]
        parts += [m for m in [_memory_cell(g)] if m != "—"]
    return f"{g.name}: " + ", ".join(parts)


def evidence(rec: Recommendation) -> tuple[str, ...]:
    """One line per precision of the setting: its seeds and verdicts."""
    rows = ([rec.baseline] if rec.baseline is not None else []) + list(rec.candidates)
    return tuple(map(_evidence, rows))


def recommendation_markdown(rec: Recommendation) -> str:
    where = f" ({rec.setting})" if rec.setting else ""
    head = f"**Recommendation{where}: {rec.precision or 'none'}** — {reason(rec)}"
    rule = f"_Tolerance: best eval loss within ±{100 * rec.tolerance:g}% of fp32's (95% interval). Evidence:_"
    return "\n".join([head, "", rule, "", *(f"- {line}" for line in evidence(rec))])


def recommendations_markdown(report: SweepReport) -> str:
    return "\n\n".join(map(recommendation_markdown, report.recommendations))
