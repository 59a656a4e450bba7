"""Speed as a paired, interleaved measurement: what a precision buys in time, decided on any machine.

Training runs time themselves, but one after the other: a machine whose load drifts over a sweep puts
the drift into the comparison, and a noisy seed vetoes it. Here the precisions of one setting are built
side by side (the same model init, batches and threads) and timed in alternating short blocks, ABBA
order, so load that changes over the measurement hits every precision alike. Each block gives a robust
step time (its median); each round pairs the baseline's block with every other precision's; the speed-up
is the geometric mean of the paired ratios with a Student t interval on their logs. Rounds are added
until every interval lies in one region (`classify`: faster, slower, no measurable gain) or the time
budget runs out (undecided, with the interval). A block whose own steps spread beyond `spread_limit`
(p90 / p10) was disturbed mid-block: it is dropped, with its round's pair, and counted.

    result = time_precisions(RunConfig(device="cpu", recipe="shakespeare-char-tiny"), ["fp32", "bf16-mixed"])
    result.timing.paired_logs("bf16-mixed")        # the log speed-ups, one per round
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from amp_lib.config import RunConfig
from amp_lib.diagnose import machine_context
from amp_lib.measure import StepTimer, percentile
from amp_lib.models import Workload, build_workload
from amp_lib.precision import PrecisionPlan, parse_precision, probe, resolve_device, resolve_precision
from amp_lib.results import RunResult, TimingBlock, TimingRecord
from amp_lib.stats import CONFIDENCE, Interval, holm_levels, log_interval, p_above, ratio_interval
from amp_lib.train import make_optimizer, seed_everything

SPEED_MARGIN = 0.05  # "faster": wholly above 1 + m; "slower": wholly below 1/(1 + m); "no gain": within both
STEP_SPREAD_LIMIT = 1.5  # a training run whose p90 step time is above this many times its p10 was timed under contention
DRIFT_LIMIT = 1.25  # a training run whose second half of timed steps is this much slower or faster than its first drifted
SPREAD_LIMIT = 3.0  # a block whose p90 step time is more than this many times its p10 was disturbed: dropped
MIN_ROUNDS = 5  # rounds before a verdict may stop the measurement
DEFAULT_BUDGET_S = {"cpu": 20.0, "cuda": 60.0}  # per setting: keeps `make sweep` within its 2 minutes on 2 cores

FASTER = "faster"
SLOWER = "slower"
NO_GAIN = "no measurable gain"
UNDECIDED = "undecided"
UNRELIABLE = "unreliable"
EMULATED = "emulated: no speed verdict"  # an emulated fp8 run: its timings say nothing about fp8's speed


def classify(interval: Interval | None, margin: float = SPEED_MARGIN) -> str:
    """The region a speed-up's interval lies wholly in; undecided when it straddles a region's edge. The
    regions are disjoint and symmetric on the log scale, so more rounds narrow a verdict, never flip it."""
    if interval is None:
        return UNDECIDED
    edge = 1e-12  # a ratio at an edge exactly, after a round trip through logs, is at it, not past it
    if interval.low > (1 + margin) * (1 + edge):
        return FASTER
    if interval.high < 1 / (1 + margin) * (1 - edge):
        return SLOWER
    if interval.low >= 1 / (1 + margin) * (1 - edge) and interval.high <= (1 + margin) * (1 + edge):
        return NO_GAIN
    return UNDECIDED


@dataclass(frozen=True)
class SpeedVerdict:
    """One precision's speed-up over the baseline from a timing record: its interval at the confidence that
    decides (Holm-corrected when several precisions are compared), the verdict, and what went in."""

    precision: str
    interval: Interval | None
    verdict: str
    rounds: int  # paired rounds that went in
    dropped: int  # this precision's blocks dropped for a disturbed machine
    corrected_for: int  # how many comparisons the interval is corrected for (1: none)


def speed_verdicts(record: TimingRecord, margin: float | None = None) -> dict[str, SpeedVerdict]:
    """Every timed precision against the baseline. With several, each interval is widened by Holm's step-down
    (the smallest p-value of "not faster" is judged at 1 - 0.05/m, the next at 1 - 0.05/(m-1), ...), and once one
    is not shown faster no later one is."""
    margin = record.margin if margin is None else margin
    candidates = [p for p in record.precisions[1:] if p not in record.failed]
    logs = {p: record.paired_logs(p) for p in candidates}
    plain = {p: log_interval(v) for p, v in logs.items()}
    pvalues = [p_above(plain[p], 1 + margin, log=True) if plain[p] else 1.0 for p in candidates]
    levels = holm_levels(pvalues) if candidates else []
    out: dict[str, SpeedVerdict] = {}
    shown = True
    for i in sorted(range(len(candidates)), key=lambda i: pvalues[i]):
        p = candidates[i]
        interval = log_interval(logs[p], levels[i])
        verdict = classify(interval, margin)
        if verdict == FASTER and not shown:
            verdict = UNDECIDED
        shown = shown and verdict == FASTER
        out[p] = SpeedVerdict(p, interval, verdict, len(logs[p]), record.dropped(p), len(candidates))
    return {p: out[p] for p in candidates}


def timing_reason(v: SpeedVerdict, timing: TimingRecord) -> str:
    """What a reader must know about an interleaved timing's verdict, in one line ("" when nothing)."""
    if v.verdict != UNDECIDED:
        return f"{v.dropped} disturbed block{'s' if v.dropped > 1 else ''} dropped" if v.dropped else ""
    if v.interval is None:
        return "too few undisturbed rounds for an interval"
    if timing.stopped == "rounds":
        return f"undecided after {v.rounds} rounds, the most asked for"
    return f"undecided after {timing.elapsed_s:.0f} s of timing (budget {timing.budget_s:.0f} s): raise --speed-budget"


# -- speed from the training runs themselves (no timing of the setting) ----------------------------------


def step_time_drift(result: RunResult) -> float | None:
    """Median step time of the second half of a run's timed steps over the first half's: far from 1 when the
    machine got busier (or quieter) while the run was timed — contention that a spread can hide."""
    times = [r.step_time_ms for r in result.history if r.step_time_ms is not None and r.step_time_ms > 0]
    if len(times) < 4:
        return None
    half = len(times) // 2
    return statistics.median(times[half:]) / statistics.median(times[:half])


def timing_problems(result: RunResult) -> list[str]:
    """Why a training run's throughput can't be trusted: timed in parallel with other runs, a wide step-time
    spread, or a drift."""
    problems = []
    if result.plan.timed_in_parallel:
        problems.append(f"timed while {result.plan.concurrent_runs} runs trained at once on one machine")
    p10, p90 = result.metrics.step_time_ms_p10, result.metrics.step_time_ms_p90
    if p10 and p90 and p10 > 0 and p90 / p10 > STEP_SPREAD_LIMIT:
        problems.append(f"step times spread {p90 / p10:.1f}x from p10 to p90 (limit {STEP_SPREAD_LIMIT:g}x)")
    drift = step_time_drift(result)
    if drift is not None and max(drift, 1 / drift) > DRIFT_LIMIT:
        problems.append(f"step times drifted {drift:.2f}x from the first to the second half of the timed steps")
    return problems


def runs_speed(
    mine: Sequence[RunResult], base: Sequence[RunResult], confidence: float = CONFIDENCE
) -> tuple[Interval | None, float | None, str, str]:
    """The speed-up of `mine` over `base` from the training runs' own throughput, paired by seed on the log
    scale: (interval, geometric-mean point, verdict, one-line reason). A figure taken under contention is
    unreliable and never decides."""
    a = [(r.seed, r.metrics.items_per_s) for r in mine if r.metrics.items_per_s]
    b = [(r.seed, r.metrics.items_per_s) for r in base if r.metrics.items_per_s]
    if not a or not b:
        return None, None, "—", "no throughput to compare"
    interval = ratio_interval(a, b, confidence)  # paired by seed: its mean is the point whenever there is one
    point = interval.mean if interval is not None else math.exp(
        statistics.fmean(math.log(v) for _, v in a) - statistics.fmean(math.log(v) for _, v in b)
    )
    problems = list(dict.fromkeys(p for r in [*mine, *base] for p in timing_problems(r)))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return interval, point, UNRELIABLE, problems[0] + more
    if interval is None:
        return None, point, UNDECIDED, "one seed: no interval"
    verdict = classify(interval)
    return interval, point, verdict, "" if verdict != UNDECIDED else "the interval straddles an edge: run more seeds"


def _decided(record: TimingRecord) -> bool:
    """Whether every comparison is decided at the Bonferroni level (at least as strict as Holm's, so a stop
    here is a decision the report's Holm intervals keep)."""
    candidates = [p for p in record.precisions[1:] if p not in record.failed]
    confidence = 1 - (1 - CONFIDENCE) / max(len(candidates), 1)
    return bool(candidates) and all(
        classify(log_interval(record.paired_logs(p), confidence), record.margin) != UNDECIDED for p in candidates
    )


class _Stepper:
    """One precision's model, optimizer and scaler, stepping through the setting's batches as the loop does."""

    def __init__(self, config: RunConfig, plan: PrecisionPlan, device: torch.device) -> None:
        seed_everything(config.seed)  # the same initial weights and batches for every precision
        self.workload: Workload = build_workload(config, device)
        self.plan, self.device, self.config = plan, device, config
        self.model = plan.prepare_model(self.workload.model, device, config.compile)
        self.model.train()
        self.optimizer = make_optimizer(self.model, config, device)
        self.scaler = plan.scaler(config.init_scale, config.growth_interval)
        self.autocast, self.timer, self.done = plan.autocast(), StepTimer(device), 0

    def run(self, steps: int, timed: bool) -> list[float]:
        """`steps` optimizer steps on the next batches; their step times in ms when `timed`."""
        batches, accum, clip = self.workload.train_batches, self.config.grad_accum, self.config.grad_clip or None
        with self.plan.tf32_scope():
            for _ in range(steps):
                if timed:
                    self.timer.start()
                for micro in range(accum):
                    x, y = batches[(self.done * accum + micro) % len(batches)]
                    with self.autocast:
                        loss = self.workload.loss_fn(self.model(self.plan.convert_input(x)), y) / accum
                    self.scaler.step(loss, self.optimizer, clip, update=micro == accum - 1)
                self.optimizer.zero_grad(set_to_none=True)
                if timed:
                    self.timer.stop()
                self.done += 1
        return self.timer.read_ms() if timed else []


def time_precisions(
    config: RunConfig,
    precisions: Sequence[Any],
    *,
    budget_s: float | None = None,
    margin: float = SPEED_MARGIN,
    block_s: float = 0.25,
    spread_limit: float = SPREAD_LIMIT,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = 1000,
    clock: Callable[[], float] = time.perf_counter,
) -> RunResult:
    """Time `precisions` (the first is the baseline) on `config`'s model and batches in alternating blocks of
    about `block_s` seconds, until each comparison is decided or `budget_s` (default: the device's) is spent.
    Returns a result whose `timing` holds every block; `failed` (with the reason) when nothing could be timed."""
    if config.parallelism != "none":
        raise ValueError(f"timing runs in one process; parallelism={config.parallelism!r} is timed by its training runs")
    names = list(dict.fromkeys(parse_precision(p) for p in precisions))
    if len(names) < 2:
        raise ValueError(f"precisions {list(precisions)!r}: timing compares at least two")
    device = resolve_device(config.device)
    caps = probe(device)
    budget = DEFAULT_BUDGET_S.get(device.type, 60.0) if budget_s is None else budget_s
    plans = {
        p: resolve_precision(
            p, caps, allow_slow=config.allow_slow, emulate_fp8=config.emulate_fp8, fp8_layers=config.fp8_layers
        )
        for p in names
    }
    # emulated fp8 forecasts fp8's loss; its time says nothing about fp8's speed: not timed
    failed = {p: str(plans[p].emulation_note) for p in names if plans[p].emulated}
    steppers = {}
    for p in names:
        if p in failed:
            continue
        try:
            stepper = _Stepper(config, plans[p], device)
            stepper.run(max(config.timing_warmup_steps, 2), timed=False)  # warm-up: allocator, kernels, compile
            steppers[p] = stepper  # only a precision that built and stepped is timed
        except Exception as exc:  # noqa: BLE001 - a precision that cannot run is reported, the others are timed
            failed[p] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    ok = names[0] in steppers and len(steppers) >= 2
    timed = [p for p in names if p in steppers] if ok else []  # nothing to compare with: no block, no budget spent
    probe_ms = {p: statistics.median(steppers[p].run(3, timed=True)) for p in timed}
    began = clock()  # the budget is for timed rounds: building and warming up (slow on a busy machine) is not in it
    block_steps = max(3, min(50, round(block_s * 1e3 / max(max(probe_ms.values(), default=1.0), 1e-3))))
    blocks: list[TimingBlock] = []
    stopped = "rounds"
    for r in range(max_rounds if ok else 0):
        for p in timed if r % 2 == 0 else reversed(timed):  # ABBA: a load that changes within a round cancels
            times = steppers[p].run(block_steps, timed=True)
            low, high = percentile(times, 0.1) or 0.0, percentile(times, 0.9) or 0.0
            spread = high / low if low > 0 else math.inf
            blocks.append(TimingBlock(r, p, block_steps, statistics.median(times), spread, spread > spread_limit))
        record = _record(names, plans, blocks, block_steps, budget, clock() - began, stopped, margin, spread_limit, failed)
        if r + 1 >= min_rounds and _decided(record):
            stopped = "decided"
            break
        if clock() - began > budget:
            stopped = "budget"
            break
    record = _record(names, plans, blocks, block_steps, budget, clock() - began, stopped, margin, spread_limit, failed)
    baseline = plans[names[0]]
    # fp32 beside emulated fp8 alone has nothing to time, and nothing went wrong: the report says why not timed
    emulated_only = names[0] in steppers and bool(failed) and all(plans[p].emulated for p in failed)
    ok = ok or emulated_only
    return RunResult(
        config=config.to_dict(),
        plan={
            **baseline.to_dict(),
            "torch_version": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": machine_context(caps),
        },
        timing=record,
        status="ok" if ok else "failed",
        error=None if ok else "could not time: " + "; ".join(f"{p}: {why}" for p, why in failed.items()),
    )


def _record(names: list[str], plans: dict[str, PrecisionPlan], blocks: list[TimingBlock], block_steps: int,
            budget: float, elapsed: float, stopped: str, margin: float, spread_limit: float,
            failed: dict[str, str]) -> TimingRecord:  # fmt: skip
    return TimingRecord(
        precisions=tuple(names), effective={p: plans[p].effective for p in names}, blocks=tuple(blocks),
        block_steps=block_steps, budget_s=budget, elapsed_s=elapsed, stopped=stopped, margin=margin,
        spread_limit=spread_limit, failed=dict(failed),
    )  # fmt: skip
