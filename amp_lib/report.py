"""The comparison against FP32, as data: one `Group` per setting × precision, its verdicts, the
recommendation. Text (tables, the answer) is `amp_lib.render`'s, the details and summary.md
`amp_lib.details`' (`summary_markdown(build_report(load_sweep("sweeps/default")))`); figures are `plots`'.

Each run is compared with the FP32 run of the same setting (every config value except precision,
seed, run_name and out_dir) and, where there is one, the same seed; the seeds of one precision are one
`Group`, aggregated once: its measurements (mean and spread of every figure), the quality and speed
verdicts with 95% intervals (Student t; paired by seed, else Welch), the time to reach fp32's quality
and the memory split. The recommendation is built from those verdicts only.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amp_lib.diagnose import Diagnosis, diagnose
from amp_lib.results import RowKey, RunResult
from amp_lib.speed import (
    EMULATED,
    FASTER,
    SPEED_MARGIN,
    runs_speed,
    speed_verdicts,
    timing_problems,
    timing_reason,
)
from amp_lib.stats import (
    Interval,
    Stat,
    difference_interval,
    finite,
    holm_levels,
    log_interval,
    p_above,
    ratio_interval,
    seeds_needed,
    t_quantile,
)
from amp_lib.table import (
    BASELINE,
    Measurements,
    Run,
    is_baseline_key,
    is_baseline_run,
    measure,
    place,
    run_table,
    setting_labels,
    status_of,
)

DEFAULT_TOLERANCE = 0.02  # eval loss may differ from fp32's by 2% (relative)

MATCHES = "matches fp32"
BETTER = "better"
INCONCLUSIVE = "inconclusive — run more seeds"
FAILED = "diverged/failed"
BASELINE_VERDICT = "baseline"
NO_BASELINE = "no fp32 baseline"
NOT_WORSE = "not worse than fp32"
ONE_SEED = "no noise estimate (one seed)"
SOURCES = ("interleaved timing", "training runs")


def check_tolerance(tolerance: float) -> float:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not (tolerance >= 0 and math.isfinite(tolerance))
    ):
        raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (relative, e.g. 0.02 for 2%)")
    return float(tolerance)


# -- the records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeToQuality:
    """Time and steps until a precision's runs first reached fp32's quality: per seed, that seed's fp32 best eval
    loss plus the tolerance (`target` is their mean). The speed-up is paired by seed (fp32's time to its own target
    over this run's), on the log scale; a run that never got there is censored at its whole training time, so with
    censored seeds the interval is an upper bound ("at most")."""

    target: float
    runs: int  # ok runs with an eval curve
    reached: int
    steps: Stat | None  # over the runs that reached it
    time_s: Stat | None
    horizon: int | None  # the most steps any of the runs trained (for "never reached in N steps")
    speedup: Interval | None  # fp32's time / this time, paired by seed; None with fewer than two pairs
    point_speedup: float | None = None  # the geometric mean of the pairs, also with one
    censored: int = 0  # pairs whose run never reached the target (their time: the run's whole training time)


@dataclass(frozen=True)
class MemorySplit:
    """Peak memory and what held it (mean over ok seeds): parameters, gradients and optimizer state always;
    activations, temporaries and the tensor total at the peak where MemTracker measured a step (`tracked`).
    `rest` is the peak less the parts known: activations and workspace, or on a CPU the rest of the process."""

    peak_mb: float | None
    params_mb: float | None
    grads_mb: float | None
    optimizer_mb: float | None
    kind: str | None  # "cuda_allocated" or "cpu_rss"
    activations_mb: float | None = None
    temporaries_mb: float | None = None  # made in backward, and the tracker's "other"
    tensor_peak_mb: float | None = None  # the tracker's tensor memory at the step's peak
    source: str | None = None  # "MemTracker", "FSDPMemTracker" or "tensor count (<why the tracker could not run>)"

    @property
    def tracked(self) -> bool:
        return self.tensor_peak_mb is not None

    @property
    def rest_mb(self) -> float | None:
        parts = (self.params_mb, self.grads_mb, self.optimizer_mb)
        if self.peak_mb is None or any(p is None for p in parts):
            return None
        extra = (self.activations_mb or 0.0) + (self.temporaries_mb or 0.0)
        return self.peak_mb - sum(parts) - extra  # type: ignore[arg-type]


@dataclass(frozen=True)
class EnergyFigures:
    """A row's energy (mean over ok seeds with a reading), or the reason there is none."""

    joules: Stat | None  # over the timed steps
    per_item_j: Stat | None
    watts: Stat | None
    to_quality_j: Stat | None  # per item x the items trained until fp32's quality (seeds that reached it)
    reason: str | None = None  # why a run has no reading


@dataclass(frozen=True)
class NoiseFloor:
    """fp32's own seed-to-seed spread of best eval loss on one setting, and the tolerance in loss units."""

    setting: str
    best_eval_loss: Stat | None
    half_width: float | None  # 95% interval half-width of fp32's mean best eval loss
    tolerance_abs: float | None
    status: str  # fp32's status over seeds ("missing" when no fp32 ran)
    seeds_needed: int | None = None  # seeds whose interval fp32's noise would make narrower than the tolerance


@dataclass(frozen=True)
class Group:
    """The seeds of one precision (a row) in one setting, aggregated once: who they are, every measurement,
    the quality and speed verdicts against fp32 with their intervals, time to quality and the memory split."""

    setting: str
    key: RowKey
    results: tuple[RunResult, ...]
    measurements: Measurements
    best_eval_loss: Stat | None
    loss_diff: Interval | None  # best eval loss - fp32's at the confidence that decides (None: no noise estimate)
    point_diff: float | None  # the mean difference, also without an interval
    tolerance_abs: float | None  # the tolerance in loss units (relative tolerance x fp32's mean best)
    verdict: str
    speedup: Interval | None  # at the confidence that decides, on the log scale
    point_speedup: float | None
    speed_verdict: str
    speed_reason: str  # why unreliable or undecided, in one line
    ttq: TimeToQuality | None
    memory: MemorySplit | None
    eligible: bool = False  # non-inferior to fp32 (the decisive interval's upper end <= +tolerance)
    base_mean: float | None = None  # fp32's mean best eval loss: the loss difference in percent of it
    seeds_used: int = 0  # the seeds the quality interval was computed from (of `runs`)
    speed_source: str = ""  # "interleaved timing" or "training runs"
    compared: int = 1  # how many precisions were compared with fp32 on this setting (Holm's m)
    memory_ratio: Interval | None = None  # peak memory / fp32's, paired by seed, on the log scale
    optimizer_saved_mb: float | None = None  # fp32's optimizer state less this row's (rows of another optimizer)
    energy: EnergyFigures | None = None  # where a run has an energy record

    @property
    def emulated(self) -> bool:
        """Its runs emulated an fp8 recipe (no fp8 hardware): a quality verdict only, never a speed one."""
        return any(r.plan.emulated for r in self.results)

    @property
    def loss_diff_pct(self) -> Interval | None:
        """The loss difference in percent of fp32's mean best eval loss."""
        if self.loss_diff is None or not self.base_mean:
            return None
        k = 100 / abs(self.base_mean)
        d = self.loss_diff
        return Interval(d.mean * k, d.low * k, d.high * k, d.n, d.method, d.confidence)

    @property
    def requested(self) -> str:
        return self.key.label

    @property
    def effective(self) -> str | None:
        return self.measurements.effective

    @property
    def status(self) -> str:
        return self.measurements.status

    @property
    def runs(self) -> int:
        return self.measurements.runs

    @property
    def ok_runs(self) -> int:
        return self.measurements.ok_runs

    @property
    def fallback_reason(self) -> str | None:
        return self.measurements.fallback_reason

    @property
    def error(self) -> str | None:
        return self.measurements.error

    @property
    def is_baseline(self) -> bool:
        return self.verdict == BASELINE_VERDICT

    @property
    def quality_ok(self) -> bool:
        return self.eligible

    @property
    def name(self) -> str:
        if self.emulated:
            return f"{self.requested} (emulated)"
        if self.effective in (None, self.key.requested):
            return self.requested
        return f"{self.requested} (ran as {self.effective})"


@dataclass(frozen=True)
class Recommendation:
    """Which precision to train in for one setting, the tolerance it was judged by, and the groups it was
    decided from (`render.reason` and `render.evidence` put them in words)."""

    setting: str
    precision: str | None  # effective precision to use; None when there is no FP32 baseline to judge by
    requested: str | None  # what to ask for to get it (differs when a request fell back)
    tolerance: float
    winner: Group | None = None  # the recommended precision's group
    candidates: tuple[Group, ...] = ()  # every other precision of the setting, fp32 aside
    baseline: Group | None = None  # fp32's group, when fp32 ran

    @property
    def stay_in_fp32(self) -> bool:
        return self.precision == BASELINE


def comparison_table(results: Sequence[RunResult]) -> list[Measurements]:
    """One row per (setting, row): seeds aggregated into mean and spread."""
    return [g.measurements for g in build_groups(results)[0]]



# -- verdicts ------------------------------------------------------------------------------------------


def _samples(runs: Sequence[Run], get: Callable[[RunResult], float | None]) -> list[tuple[Any, float]]:
    return [(r.seed, v) for r in runs if (v := finite(get(r.result))) is not None]


def _noise_floor(setting: str, base: Sequence[Run], all_fp32: Sequence[Run], tolerance: float) -> NoiseFloor:
    stat = Stat.of(v for _, v in _samples(base, lambda r: r.best_eval_loss))
    half = needed = None
    tol = None if stat is None else tolerance * abs(stat.mean)
    if stat is not None and stat.std is not None:
        half = t_quantile(stat.n - 1) * stat.std / math.sqrt(stat.n)
        # a difference of two runs varies by about sqrt(2) x one run's spread: the seeds for an interval of it
        # narrower than the tolerance (half of it on either side of the difference)
        needed = seeds_needed(stat.std * math.sqrt(2), tol) if tol else None
    status = status_of([r.result for r in all_fp32]) if all_fp32 else "missing"
    return NoiseFloor(setting, stat, half, tol, status, needed)


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
    if diff.high <= tol:
        return NOT_WORSE  # non-inferior: better or within the tolerance, though not shown to be within both edges
    return INCONCLUSIVE


def _time_to_quality(members: Sequence[Run], fp32: dict[Any, RunResult], tol: float) -> TimeToQuality | None:
    """Time to quality per seed against that seed's fp32 run (its best eval loss + `tol`), paired, censored."""
    ok = [m.result for m in members if m.result.ok and m.result.eval_curve]
    targets = {r.seed: fp32[r.seed].best_eval_loss + tol for r in ok if r.seed in fp32 and fp32[r.seed].best_eval_loss is not None}
    ok = [r for r in ok if r.seed in targets]
    if not ok:
        return None
    hits = {r.seed: r.first_reach(targets[r.seed]) for r in ok}
    reached = [h for h in hits.values() if h is not None]
    logs, censored = [], 0
    for r in ok:
        own = fp32[r.seed].first_reach(targets[r.seed])
        mine = hits[r.seed][1] if hits[r.seed] else r.eval_curve[-1][2]  # censored: its whole training time
        censored += hits[r.seed] is None
        if own and own[1] and mine:
            logs.append(math.log(own[1] / mine))
    horizon = max(r.eval_curve[-1][0] for r in ok)
    return TimeToQuality(
        target=statistics.fmean(targets.values()), runs=len(ok), reached=len(reached),
        steps=Stat.of(float(s) for s, _ in reached), time_s=Stat.of(t for _, t in reached), horizon=horizon,
        speedup=log_interval(logs), point_speedup=math.exp(statistics.fmean(logs)) if logs else None, censored=censored,
    )  # fmt: skip


def _memory(members: Sequence[Run]) -> MemorySplit | None:
    ok = [m.result.metrics for m in members if m.result.ok]
    if not ok:
        return None

    def mean(attr: str) -> float | None:
        stat = Stat.of(getattr(m, attr) for m in ok)
        return stat.mean if stat else None

    kinds = sorted({m.peak_memory_kind for m in ok if m.peak_memory_kind})
    splits = [m.result.memory for m in members if m.result.ok and m.result.memory is not None]
    tracked = [s for s in splits if s.tracked]
    sources = ", ".join(sorted({s.source for s in splits})) or None

    def tracked_mean(get: Callable[[Any], float | None]) -> float | None:
        stat = Stat.of(get(s) for s in tracked)
        return stat.mean if stat else None

    if not tracked:  # tensor sizes, as the runs counted them
        return MemorySplit(mean("peak_memory_mb"), mean("param_memory_mb"), mean("grad_memory_mb"),
                           mean("optimizer_memory_mb"), ", ".join(kinds) or None, source=sources)  # fmt: skip
    def total(*parts: float | None) -> float | None:  # a part MemTracker did not report is not a zero
        known = [p for p in parts if p is not None]
        return sum(known) if known else None

    return MemorySplit(
        mean("peak_memory_mb"), tracked_mean(lambda s: total(s.parameters_mb, s.buffers_mb)),
        tracked_mean(lambda s: s.gradients_mb), tracked_mean(lambda s: s.optimizer_state_mb), ", ".join(kinds) or None,
        tracked_mean(lambda s: s.activations_mb), tracked_mean(lambda s: total(s.temporaries_mb, s.other_mb)),
        tracked_mean(lambda s: s.peak_mb), sources,
    )  # fmt: skip


def _energy(members: Sequence[Run], fp32: dict[Any, RunResult], tol: float) -> EnergyFigures | None:
    """Energy over the timed steps, per item, and to fp32's quality: per seed, joules per item times the items
    trained until the first eval at that seed's fp32 best plus `tol` (seeds that never got there left out)."""
    ok = [m.result for m in members if m.result.ok and m.result.energy is not None]
    if not ok:
        return None
    readings = [(r, r.energy) for r in ok if r.energy is not None and r.energy.joules is not None]
    to_quality = []
    for r, e in readings:
        base, per_step = fp32.get(r.seed), r.metrics.items_per_step
        target = None if base is None or base.best_eval_loss is None else base.best_eval_loss + tol
        if target is not None and e.joules_per_item and per_step and (hit := r.first_reach(target)) is not None:
            to_quality.append(e.joules_per_item * per_step * hit[0])
    reasons = sorted({r.energy.reason for r in ok if r.energy is not None and r.energy.reason})
    return EnergyFigures(
        Stat.of(e.joules for _, e in readings), Stat.of(e.joules_per_item for _, e in readings),
        Stat.of(e.watts for _, e in readings), Stat.of(to_quality), "; ".join(reasons) or None,
    )  # fmt: skip


@dataclass(frozen=True)
class _Quality:
    best: Stat | None
    mine: list[tuple[Any, float]]
    base: list[tuple[Any, float]]
    point: float | None


def _quality_samples(members: Sequence[Run], base: Sequence[Run]) -> _Quality:
    mine = _samples([m for m in members if m.result.ok], lambda r: r.best_eval_loss)
    b = _samples(base, lambda r: r.best_eval_loss)
    point = statistics.fmean(v for _, v in mine) - statistics.fmean(v for _, v in b) if mine and b else None
    return _Quality(Stat.of(v for _, v in mine), mine, b, point)


def _setting_groups(setting: str, rows: dict[RowKey, list[Run]], runs: Sequence[Run], tolerance: float,
                    timed_by: RunResult | None) -> tuple[list[Group], NoiseFloor]:  # fmt: skip
    """The groups of one setting: fp32 (with the setting's baseline optimizer) first as the baseline; the others
    judged against it, their deciding intervals corrected together for multiplicity (Holm), quality and speed
    each. The interleaved timing `timed_by` times the rows of its own optimizer; emulated fp8 gets no speed."""
    base_optimizer = next(iter(rows.values()))[0].base_optimizer
    timing = timed_by.timing if timed_by is not None else None
    timed_optimizer = timed_by.optimizer if timed_by is not None else None
    all_fp32 = next((v for k, v in rows.items() if is_baseline_key(k, base_optimizer)), [])
    base = [r for r in all_fp32 if is_baseline_run(r)]
    floor = _noise_floor(setting, base, all_fp32, tolerance)
    tol = floor.tolerance_abs or 0.0
    base_mean = floor.best_eval_loss.mean if floor.best_eval_loss else None
    fp32_by_seed = {r.result.seed: r.result for r in base}
    is_base_row = {k: is_baseline_key(k, base_optimizer) and bool(base) and all(x in base for x in m)
                   for k, m in rows.items()}  # fmt: skip
    others = [(k, m) for k, m in rows.items() if not is_base_row[k]]
    quality = {k: _quality_samples(m, base) for k, m in others}
    # Holm over the candidates, quality by "not worse than +tolerance", speed by "faster than 1 + margin"
    plain_q = {k: difference_interval(q.mine, q.base) for k, q in quality.items()}
    q_levels = dict(zip(quality, holm_levels([1.0 if plain_q[k] is None else 1 - p_above(plain_q[k], tol) for k in quality])))
    timed = speed_verdicts(timing) if timing is not None and timing.blocks else {}
    base_results = [r.result for r in base]
    run_plain = {k: runs_speed([r.result for r in m if r.result.ok], base_results)[0] for k, m in others}
    s_levels = dict(zip(quality, holm_levels([1.0 if run_plain[k] is None else p_above(run_plain[k], 1 + SPEED_MARGIN, log=True)
                                              for k in quality])))  # fmt: skip
    base_memory = _memory(base)
    groups = []
    for key, members in rows.items():
        ok = [m for m in members if m.result.ok]
        is_base = is_base_row[key]
        if is_base:
            q = _quality_samples(members, base)
            # fp32's own speed figure: the training runs' throughput matters only where the setting was not timed
            problems = list(dict.fromkeys(p for m in base for p in timing_problems(m.result)))
            reason = problems[0] if problems and timing is None else ""
            own = _time_to_quality(base, fp32_by_seed, tol)
            groups.append(Group(
                setting, key, tuple(m.result for m in members), measure(members, runs), q.best, None, None, tol,
                BASELINE_VERDICT, None, 1.0, BASELINE_VERDICT, reason, own, _memory(members), eligible=False,
                base_mean=base_mean, seeds_used=len(q.mine), speed_source="", compared=len(others),
                energy=_energy(members, fp32_by_seed, tol),
            ))  # fmt: skip
            continue
        q = quality[key]
        diff = difference_interval(q.mine, q.base, q_levels[key])
        verdict = FAILED if len(ok) < len(members) else _quality_verdict(diff, q.point, tol, base_mean or 0.0)
        eligible = verdict in (MATCHES, BETTER, NOT_WORSE)
        emulated = any(m.result.plan.emulated for m in members)  # its time says nothing about fp8's
        if emulated:
            speed = (None, None, EMULATED, "", "")
        elif key.parallelism == "none" and key.optimizer == timed_optimizer and key.requested in timed:
            v = timed[key.requested]
            assert timing is not None
            speed = (v.interval, v.interval.mean if v.interval else None, v.verdict, timing_reason(v, timing), SOURCES[0])
        else:
            interval, point, verdict_s, why = runs_speed([r.result for r in ok], base_results, s_levels[key])
            speed = (interval, point, verdict_s, why, SOURCES[1])
        memory_ratio = ratio_interval(_samples(ok, lambda r: r.metrics.peak_memory_mb),
                                      _samples(base, lambda r: r.metrics.peak_memory_mb))  # fmt: skip
        memory, ttq = _memory(members), None if emulated else _time_to_quality(members, fp32_by_seed, tol)
        saved = None
        if key.optimizer != base_optimizer and memory and base_memory:
            mine, fp32_state = memory.optimizer_mb, base_memory.optimizer_mb
            saved = None if mine is None or fp32_state is None else fp32_state - mine
        groups.append(Group(
            setting, key, tuple(m.result for m in members), measure(members, runs), q.best, diff, q.point, tol,
            verdict, speed[0], speed[1], speed[2], speed[3], ttq,
            memory, eligible=eligible, base_mean=base_mean, seeds_used=diff.n if diff else len(q.mine),
            speed_source=speed[4], compared=len(others), memory_ratio=memory_ratio, optimizer_saved_mb=saved,
            energy=_energy(members, fp32_by_seed, tol),
        ))  # fmt: skip
    return groups, floor


def build_groups(
    results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE, timings: Sequence[RunResult] = ()
) -> tuple[list[Group], list[NoiseFloor]]:
    """Each row of each setting against fp32 on that setting (speed from the setting's interleaved timing where
    one of `timings` is for it, else from the training runs), and each setting's fp32 noise floor."""
    runs = place(results)
    labels = setting_labels(results)
    timing_of = {labels[t.setting_key]: t for t in timings if t.setting_key in labels and t.timing}
    by_setting: dict[str, dict[RowKey, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_setting[r.setting][r.key].append(r)
    groups: list[Group] = []
    floors: list[NoiseFloor] = []
    for setting, rows in by_setting.items():
        found, floor = _setting_groups(setting, rows, runs, tolerance, timing_of.get(setting))
        groups += found
        floors.append(floor)
    return groups, floors


# -- recommendation ------------------------------------------------------------------------------------


def recommendations(groups: Sequence[Group], floors: Sequence[NoiseFloor], tolerance: float) -> list[Recommendation]:
    """One recommendation per setting, built from the verdicts: the largest speed-up among the precisions
    that match fp32 (or do better) and are measurably faster; otherwise stay in fp32 (None without an fp32
    baseline to judge by)."""
    by_setting: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_setting[g.setting].append(g)
    has_base = {f.setting for f in floors if f.best_eval_loss is not None}
    out = []
    for setting, rows in by_setting.items():
        base_optimizer = rows[0].measurements.base_optimizer
        fp32 = next((g for g in rows if is_baseline_key(g.key, base_optimizer)), None)
        others = tuple(g for g in rows if g is not fp32)
        if setting not in has_base:
            out.append(Recommendation(setting, None, None, tolerance, None, others, fp32))
            continue
        winners = [g for g in others if g.quality_ok and g.speed_verdict == FASTER
                   and (g.effective != BASELINE or g.key.optimizer != base_optimizer)]  # fmt: skip
        if winners:
            best = max(winners, key=lambda g: g.speedup.mean if g.speedup else 0.0)
            out.append(Recommendation(setting, best.effective, best.requested, tolerance, best, others, fp32))
        else:
            out.append(Recommendation(setting, BASELINE, BASELINE, tolerance, None, others, fp32))
    return out


# -- why -------------------------------------------------------------------------------------------------


def diagnoses(groups: Sequence[Group]) -> list[Diagnosis]:
    """For each precision that is not *faster*, the ranked causes (from profiled steps: `profile_step`);
    for each that skipped steps or diverged, the first module to overflow fp16 and the way out (from the
    headroom map: `headroom_every`). Precisions with nothing to say are left out."""
    out = []
    for g in groups:
        fp32 = [r for other in groups if other.setting == g.setting
                and is_baseline_key(other.key, other.measurements.base_optimizer)
                for r in other.results if r.ok and r.effective == BASELINE]  # fmt: skip
        if not g.is_baseline and (found := diagnose(g.setting, g.requested, g.effective or g.key.requested,
                                                    g.results, fp32, explain_speed=g.speed_verdict != FASTER)):  # fmt: skip
            out.append(found)
    return out


@dataclass(frozen=True)
class SweepReport:
    """Everything a sweep's report shows, computed once from its results (the words: `amp_lib.render`)."""

    results: tuple[RunResult, ...]
    runs: tuple[Measurements, ...]  # one row per run
    groups: tuple[Group, ...]  # per setting and row: measurements and verdicts against fp32
    recommendations: tuple[Recommendation, ...]
    tolerance: float
    noise: tuple[NoiseFloor, ...] = ()  # per setting: fp32's own seed-to-seed spread
    why: tuple[Diagnosis, ...] = ()  # precisions that failed or did not pay: the causes and the way out
    timings: tuple[RunResult, ...] = ()  # the settings' interleaved speed measurements (amp_lib.speed)

    @property
    def table(self) -> tuple[Measurements, ...]:
        """One row per setting and precision, seeds aggregated."""
        return tuple(g.measurements for g in self.groups)


def build_report(results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> SweepReport:
    """Group `results` per setting and precision, judge each against fp32, and recommend, once. The results of
    interleaved timings among them (`amp_lib.speed`) give their settings' speed verdicts."""
    check_tolerance(tolerance)
    timings = tuple(r for r in results if r.timing is not None)
    trained = [r for r in results if r.timing is None]
    groups, floors = build_groups(trained, tolerance, timings)
    return SweepReport(
        results=tuple(trained),
        runs=tuple(run_table(trained)),
        groups=tuple(groups),
        recommendations=tuple(recommendations(groups, floors, tolerance)),
        tolerance=tolerance,
        noise=tuple(floors),
        why=tuple(diagnoses(groups)),
        timings=timings,
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
