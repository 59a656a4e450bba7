"""`amp_lib.speed`: the regions a speed-up's interval is classified into, the Holm-corrected verdicts of a hand-made
timing record (checked against intervals computed here by hand), the reasons a reader sees, the fallback on the
training runs' own throughput, and the interleaved timing itself on this CPU. Timings are never asserted as
numbers: only the structure of a measurement and the rules its verdicts follow."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import replace

import pytest
from factories import history, make_result
from scipy.stats import t as student_t

from amp_lib.config import RunConfig
from amp_lib.results import RunResult, TimingBlock, TimingRecord
from amp_lib.speed import (
    FASTER,
    MIN_ROUNDS,
    NO_GAIN,
    SLOWER,
    SPEED_MARGIN,
    UNDECIDED,
    UNRELIABLE,
    SpeedVerdict,
    classify,
    runs_speed,
    speed_verdicts,
    step_time_drift,
    time_precisions,
    timing_problems,
    timing_reason,
)
from amp_lib.stats import Interval, ratio_interval


def iv(low: float, high: float, mean: float | None = None) -> Interval:
    return Interval(math.sqrt(low * high) if mean is None else mean, low, high, 5, "log")


def record(
    step_ms: dict[str, list[float]],
    *,
    dropped: set[tuple[int, str]] = frozenset(),
    failed: dict[str, str] | None = None,
    margin: float = SPEED_MARGIN,
    elapsed_s: float = 12.0,
    budget_s: float = 20.0,
) -> TimingRecord:
    """A timing record whose blocks have these median step times, round by round, in ABBA order; the first
    precision is the baseline; `dropped` names the (round, precision) blocks a disturbed machine spoiled."""
    names = list(step_ms) + [p for p in failed or {} if p not in step_ms]
    timed = list(step_ms)
    blocks = []
    for r in range(len(step_ms[timed[0]])):
        for p in timed if r % 2 == 0 else reversed(timed):
            bad = (r, p) in dropped
            blocks.append(TimingBlock(r, p, 10, step_ms[p][r], 4.0 if bad else 1.1, bad))
    return TimingRecord(
        precisions=tuple(names),
        effective={p: p for p in names},
        blocks=tuple(blocks),
        block_steps=10,
        budget_s=budget_s,
        elapsed_s=elapsed_s,
        stopped="budget",
        margin=margin,
        spread_limit=3.0,
        failed=dict(failed or {}),
    )


def by_hand(logs: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(geometric mean, low, high) of the speed-up whose per-round logs are `logs`, at `confidence`."""
    m, n = statistics.fmean(logs), len(logs)
    half = student_t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


# --- classify: the region an interval lies wholly in --------------------------------------------------


def test_classify_names_the_region_an_interval_lies_wholly_in() -> None:
    assert classify(iv(1.30, 1.60)) == FASTER  # the whole interval above 1 + margin
    assert classify(iv(0.50, 0.80)) == SLOWER  # the whole interval below 1 / (1 + margin)
    assert classify(iv(0.97, 1.03)) == NO_GAIN  # within [1 / 1.05, 1.05]
    assert classify(iv(0.90, 1.30)) == UNDECIDED  # straddles 1
    assert classify(iv(1.02, 1.10)) == UNDECIDED  # above 1, but not shown above 1 + margin
    assert classify(iv(0.94, 1.01)) == UNDECIDED  # reaches below 1 / (1 + margin) and above 1
    assert classify(None) == UNDECIDED  # no interval: too few rounds


def test_classify_edges() -> None:
    edge, past = 1 + SPEED_MARGIN, 1 + 1e-9  # `past`: a relative step beyond an edge, far above rounding
    assert classify(iv(edge, 1.2)) == UNDECIDED  # "faster" needs the lower bound above 1 + margin, not at it
    assert classify(iv(math.exp(math.log(edge)), 1.2)) == UNDECIDED  # at the edge after a round trip through logs
    assert classify(iv(math.nextafter(edge, 2), 1.2)) == UNDECIDED  # one rounding step is still at it
    assert classify(iv(edge * past, 1.2)) == FASTER
    assert classify(iv(0.90, 1 / edge)) == UNDECIDED  # "slower" needs the upper bound below 1 / (1 + margin)
    assert classify(iv(0.90, math.exp(-math.log(edge)))) == UNDECIDED
    assert classify(iv(0.90, 1 / edge / past)) == SLOWER
    assert classify(iv(1 / edge, edge)) == NO_GAIN  # the no-gain region includes its edges
    assert classify(iv(math.exp(-math.log(edge)), math.exp(math.log(edge)))) == NO_GAIN
    assert classify(iv(1 / edge / past, 1.0)) == UNDECIDED
    assert classify(iv(1.0, edge * past)) == UNDECIDED
    assert classify(iv(edge, edge)) == NO_GAIN  # a point exactly at the margin is not faster
    # the regions are disjoint: a slowdown within the margin is no measurable gain however narrow its interval,
    # so adding rounds narrows a verdict and never flips it from one region to another
    assert classify(iv(0.96, 0.99)) == NO_GAIN
    assert classify(iv(0.96, 0.9600001)) == NO_GAIN


def test_classify_takes_its_margin() -> None:
    assert classify(iv(1.08, 1.20)) == FASTER
    assert classify(iv(1.08, 1.20), margin=0.10) == UNDECIDED
    assert classify(iv(0.92, 1.08), margin=0.10) == NO_GAIN and classify(iv(0.92, 1.08)) == UNDECIDED
    assert classify(iv(1.02, 1.20), margin=0.0) == FASTER


# --- speed_verdicts: paired rounds, dropped blocks, Holm's step-down ----------------------------------


def test_a_verdict_pairs_blocks_by_round_so_a_drifting_machine_cancels() -> None:
    # the machine slows down over the measurement; every round, bf16 runs its steps in a share of fp32's time
    base = [10.0, 14.0, 20.0, 28.0, 40.0, 56.0]
    ratios = [1.9, 2.1, 2.0, 1.95, 2.05, 2.0]
    timing = record({"fp32": base, "bf16-mixed": [b / r for b, r in zip(base, ratios, strict=True)]})
    v = speed_verdicts(timing)["bf16-mixed"]
    mean, low, high = by_hand([math.log(r) for r in ratios])
    assert (v.interval.mean, v.interval.low, v.interval.high) == pytest.approx((mean, low, high))
    assert v.interval.mean == pytest.approx(statistics.geometric_mean(ratios))  # the geometric mean of the ratios
    assert (v.interval.n, v.interval.method, v.interval.confidence) == (6, "log", 0.95)
    assert (v.precision, v.verdict, v.rounds, v.dropped, v.corrected_for) == ("bf16-mixed", FASTER, 6, 0, 1)
    # unpaired (the two sides' rates as independent groups), the drift would swamp the speed-up
    bf16_ms = [b / r for b, r in zip(base, ratios, strict=True)]
    unpaired = ratio_interval(
        [(("bf16", i), 1 / ms) for i, ms in enumerate(bf16_ms)], list(enumerate(1 / ms for ms in base))
    )
    assert unpaired.method == "log Welch" and unpaired.mean == pytest.approx(mean)
    assert unpaired.high / unpaired.low > 3 * (high / low) and classify(unpaired) == UNDECIDED


def test_a_dropped_block_leaves_its_round_out() -> None:
    base = [10.0, 10.5, 9.8, 10.2, 10.1, 9.9, 10.0]
    ratios = [1.30, 1.25, 5.00, 1.28, 0.20, 1.32, 1.27]  # rounds 2 and 4 were disturbed
    timing = record(
        {"fp32": base, "fp16-mixed": [b / r for b, r in zip(base, ratios, strict=True)]},
        dropped={(2, "fp16-mixed"), (4, "fp32")},  # the candidate's block in round 2, the baseline's in round 4
    )
    v = speed_verdicts(timing)["fp16-mixed"]
    kept = [r for i, r in enumerate(ratios) if i not in (2, 4)]
    assert (v.interval.mean, v.interval.low, v.interval.high) == pytest.approx(by_hand([math.log(r) for r in kept]))
    assert v.rounds == 5 and v.interval.n == 5
    assert v.dropped == 1  # its own dropped blocks; the baseline's round 4 left it out all the same
    assert v.verdict == FASTER


def test_one_round_gives_no_interval_and_no_verdict() -> None:
    v = speed_verdicts(record({"fp32": [10.0, 10.0], "bf16-mixed": [5.0, 5.0]}, dropped={(1, "fp32")}))["bf16-mixed"]
    assert (v.interval, v.verdict, v.rounds) == (None, UNDECIDED, 1)


def holm_case() -> tuple[TimingRecord, dict[str, list[float]]]:
    """Three candidates over 5 rounds whose one-sided t statistics against log(1.05) are 20, 3.0 and 2.9:
    p-values of about 2e-5, 0.020 and 0.022, listed in the record in another order than their p-values'."""
    se, offsets = 0.01 * math.sqrt(2.5 / 5), [-0.02, -0.01, 0.0, 0.01, 0.02]  # sd 0.01 * sqrt(2.5)
    logs = {
        "fp16-true": [math.log(1.05) + 2.9 * se + o for o in offsets],
        "bf16-mixed": [math.log(1.05) + 20.0 * se + o for o in offsets],
        "fp16-mixed": [math.log(1.05) + 3.0 * se + o for o in offsets],
    }
    base = [10.0, 11.0, 10.5, 12.0, 10.0]
    step_ms = {"fp32": base, **{p: [b / math.exp(x) for b, x in zip(base, v, strict=True)] for p, v in logs.items()}}
    return record(step_ms), logs


def test_holm_corrects_three_candidates_and_steps_down() -> None:
    timing, logs = holm_case()
    t_stats = {
        p: (statistics.fmean(v) - math.log(1.05)) / (statistics.stdev(v) / math.sqrt(5)) for p, v in logs.items()
    }
    pvalues = {p: student_t.sf(t, 4) for p, t in t_stats.items()}
    assert pvalues["bf16-mixed"] < pvalues["fp16-mixed"] < pvalues["fp16-true"] < 0.025
    verdicts = speed_verdicts(timing)
    assert list(verdicts) == ["fp16-true", "bf16-mixed", "fp16-mixed"]  # the record's order, not the p-values'
    levels = {"bf16-mixed": 1 - 0.05 / 3, "fp16-mixed": 1 - 0.05 / 2, "fp16-true": 1 - 0.05}  # by p-value rank
    for p, v in verdicts.items():
        assert v.interval.confidence == pytest.approx(levels[p]) and v.corrected_for == 3 and v.rounds == 5
        assert (v.interval.mean, v.interval.low, v.interval.high) == pytest.approx(by_hand(logs[p], levels[p]))
    # the smallest p-value decides at 1 - 0.05/3; the next does not at 1 - 0.05/2 (its interval straddles 1.05) ...
    assert verdicts["bf16-mixed"].verdict == FASTER
    assert verdicts["fp16-mixed"].interval.low < 1.05 < verdicts["fp16-mixed"].interval.high
    assert verdicts["fp16-mixed"].verdict == UNDECIDED
    # ... so the third is not shown faster either, although its own 95% interval lies above 1.05
    assert by_hand(logs["fp16-true"], 0.95)[1] > 1.05 and verdicts["fp16-true"].interval.low > 1.05
    assert verdicts["fp16-true"].verdict == UNDECIDED


def test_without_the_blocking_candidate_the_next_one_is_faster() -> None:
    """The step-down rule, seen from the other side: drop the candidate that was not shown faster, and the one
    after it decides at its (now stricter) Holm level."""
    timing, _ = holm_case()
    two = record(
        {p: [b.step_ms for b in timing.blocks if b.precision == p] for p in ("fp32", "bf16-mixed", "fp16-true")}
    )
    verdicts = speed_verdicts(two)
    assert verdicts["fp16-true"].interval.confidence == pytest.approx(1 - 0.05)
    assert verdicts["fp16-true"].corrected_for == 2 and verdicts["fp16-true"].verdict == FASTER
    assert (verdicts["bf16-mixed"].verdict, verdicts["bf16-mixed"].interval.confidence) == (
        FASTER,
        pytest.approx(0.975),
    )


def test_the_holm_order_is_by_the_p_value_of_not_faster_than_the_margin() -> None:
    """bf16-mixed gains a steady 4%: far more significant against 1 than fp16-mixed's noisy 50%, but no evidence
    of beating 1 + margin. Ranked by "not faster than 1.05", fp16-mixed goes first and decides; bf16-mixed,
    second, shows no measurable gain, and does not block it."""
    offsets = [-2, -1, 0, 1, 2]
    logs = {
        "bf16-mixed": [math.log(1.04) + 0.002 * o for o in offsets],
        "fp16-mixed": [math.log(1.5) + 0.05 * o for o in offsets],
    }
    step_ms = {"fp32": [10.0] * 5, **{p: [10.0 / math.exp(x) for x in v] for p, v in logs.items()}}
    verdicts = speed_verdicts(record(step_ms))
    assert verdicts["fp16-mixed"].interval.confidence == pytest.approx(1 - 0.05 / 2)
    assert verdicts["bf16-mixed"].interval.confidence == pytest.approx(1 - 0.05)
    assert (verdicts["fp16-mixed"].verdict, verdicts["bf16-mixed"].verdict) == (FASTER, NO_GAIN)
    for p, v in verdicts.items():
        assert (v.interval.mean, v.interval.low, v.interval.high) == pytest.approx(
            by_hand(logs[p], v.interval.confidence)
        )


def test_a_failed_precision_is_left_out_of_the_verdicts_and_of_the_correction() -> None:
    ratios = [1.5, 1.6, 1.55, 1.45, 1.5]
    timing = record(
        {"fp32": [10.0] * 5, "bf16-mixed": [10.0 / r for r in ratios]},
        failed={"bf16-true": "NotImplementedError: this loss has no torch.bfloat16 kernel"},
    )
    assert timing.precisions == ("fp32", "bf16-mixed", "bf16-true")
    verdicts = speed_verdicts(timing)
    assert list(verdicts) == ["bf16-mixed"]
    v = verdicts["bf16-mixed"]
    assert v.corrected_for == 1 and v.interval.confidence == 0.95 and v.verdict == FASTER
    assert (v.interval.mean, v.interval.low, v.interval.high) == pytest.approx(by_hand([math.log(r) for r in ratios]))


def test_the_verdicts_take_the_records_margin_unless_given_one() -> None:
    ratios = [1.08, 1.09, 1.07, 1.08, 1.085, 1.075]
    step_ms = {"fp32": [10.0] * 6, "bf16-mixed": [10.0 / r for r in ratios]}
    _, low, high = by_hand([math.log(r) for r in ratios])
    assert 1.05 < low and high < 1.10
    assert speed_verdicts(record(step_ms))["bf16-mixed"].verdict == FASTER
    assert speed_verdicts(record(step_ms, margin=0.10))["bf16-mixed"].verdict == NO_GAIN
    assert speed_verdicts(record(step_ms, margin=0.10), margin=0.05)["bf16-mixed"].verdict == FASTER


def test_slower_and_no_gain_verdicts() -> None:
    slower = record({"fp32": [10.0] * 5, "bf16-mixed": [20.0, 21.0, 19.0, 20.5, 19.5]})
    assert speed_verdicts(slower)["bf16-mixed"].verdict == SLOWER
    same = record({"fp32": [10.0] * 5, "bf16-mixed": [10.05, 9.98, 10.02, 9.97, 10.01]})
    assert speed_verdicts(same)["bf16-mixed"].verdict == NO_GAIN


# --- timing_reason: what a reader must know -----------------------------------------------------------


def test_timing_reason() -> None:
    timing = record({"fp32": [10.0] * 5, "bf16-mixed": [5.0] * 5}, elapsed_s=19.6, budget_s=20.0)
    decided = SpeedVerdict("bf16-mixed", iv(1.9, 2.1), FASTER, 5, 0, 1)
    assert timing_reason(decided, timing) == ""
    assert timing_reason(replace(decided, dropped=2), timing) == "2 disturbed blocks dropped"
    assert timing_reason(replace(decided, verdict=SLOWER, dropped=1), timing) == "1 disturbed block dropped"
    undecided = SpeedVerdict("bf16-mixed", iv(0.9, 1.3), UNDECIDED, 5, 0, 1)
    assert timing_reason(undecided, timing) == "undecided after 20 s of timing (budget 20 s): raise --speed-budget"
    assert (
        timing_reason(replace(undecided, interval=None, rounds=1), timing)
        == "too few undisturbed rounds for an interval"
    )
    capped = replace(timing, stopped="rounds")  # stopped by max_rounds, not by the clock
    assert timing_reason(undecided, capped) == "undecided after 5 rounds, the most asked for"


def test_timing_reason_of_a_real_verdict() -> None:
    noisy = record({"fp32": [10.0] * 5, "bf16-mixed": [5.0, 15.0, 8.0, 12.0, 10.0]}, dropped={(3, "bf16-mixed")})
    v = speed_verdicts(noisy)["bf16-mixed"]
    assert (v.verdict, v.dropped) == (UNDECIDED, 1)
    assert timing_reason(v, noisy) == "undecided after 12 s of timing (budget 20 s): raise --speed-budget"


# --- training runs as a fallback: step-time drift, timing problems, runs_speed ------------------------


def timed_rows(*step_ms: float | None) -> tuple:
    return tuple(replace(row, step_time_ms=t) for row, t in zip(history(len(step_ms)), step_ms, strict=True))


def test_step_time_drift_compares_the_medians_of_the_two_halves() -> None:
    assert step_time_drift(make_result(rows=timed_rows(10, 10, 10, 10))) == 1.0
    assert step_time_drift(make_result(rows=timed_rows(10, 11, 9, 20, 22, 21))) == pytest.approx(21 / 10)
    # an odd count: the second half takes the middle step
    assert step_time_drift(make_result(rows=timed_rows(10, 12, 30, 31, 29))) == pytest.approx(30 / 11)
    # untimed (None) and zero step times are left out before halving
    assert step_time_drift(make_result(rows=timed_rows(None, 8, 0.0, 8, 4, None, 4))) == pytest.approx(0.5)
    assert step_time_drift(make_result(rows=timed_rows(10, None, 10, 10))) is None  # fewer than 4 timed steps
    assert step_time_drift(make_result()) is None  # no history


def test_timing_problems_name_parallel_runs_a_wide_spread_and_a_drift() -> None:
    assert (
        timing_problems(make_result(rows=history(8), metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 12.0}))
        == []
    )
    parallel = make_result(plan={"concurrent_runs": 3})
    assert timing_problems(parallel) == ["timed while 3 runs trained at once on one machine"]
    assert timing_problems(make_result(plan={"concurrent_runs": 1})) == []
    spread = make_result(metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 20.0})
    assert timing_problems(spread) == ["step times spread 2.0x from p10 to p90 (limit 1.5x)"]
    assert (
        timing_problems(make_result(metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 15.0})) == []
    )  # at the limit
    slower = make_result(rows=timed_rows(10, 10, 10, 10, 13, 13, 13, 13))
    assert timing_problems(slower) == ["step times drifted 1.30x from the first to the second half of the timed steps"]
    quieter = make_result(rows=timed_rows(13, 13, 10, 10))
    assert timing_problems(quieter) == ["step times drifted 0.77x from the first to the second half of the timed steps"]
    assert timing_problems(make_result(rows=timed_rows(10, 10, 12.5, 12.5))) == []  # 1.25x: at the limit
    everything = make_result(
        plan={"concurrent_runs": 2},
        metrics={"step_time_ms_p10": 1.0, "step_time_ms_p90": 3.0},
        rows=timed_rows(1, 1, 3, 3),
    )
    assert len(timing_problems(everything)) == 3


def test_runs_speed_pairs_seeds_on_the_log_scale() -> None:
    mine = [make_result("bf16-mixed", s, tps=t) for s, t in enumerate([2000.0, 2200.0, 1900.0])]
    base = [make_result("fp32", s, tps=t) for s, t in enumerate([1000.0, 1050.0, 1000.0])]
    interval, point, verdict, why = runs_speed(mine, base)
    ratios = [2.0, 2200 / 1050, 1.9]
    assert (interval.mean, interval.low, interval.high) == pytest.approx(by_hand([math.log(r) for r in ratios]))
    assert point == pytest.approx(statistics.geometric_mean(ratios)) == interval.mean
    assert (interval.method, verdict, why) == ("log", FASTER, "")
    wide, *_ = runs_speed(mine, base, confidence=0.99)
    assert (wide.low, wide.high) == pytest.approx(by_hand([math.log(r) for r in ratios], 0.99)[1:])


def test_runs_speed_without_an_interval_or_a_decision() -> None:
    one = runs_speed([make_result("bf16-mixed", tps=2000.0)], [make_result(tps=1000.0)])
    assert one == (None, pytest.approx(2.0), UNDECIDED, "one seed: no interval")
    noisy = runs_speed(
        [make_result("bf16-mixed", s, tps=t) for s, t in enumerate([900.0, 1500.0, 1100.0])],
        [make_result("fp32", s, tps=1000.0) for s in range(3)],
    )
    assert noisy[2:] == (UNDECIDED, "the interval straddles an edge: run more seeds")
    assert runs_speed([], [make_result()]) == (None, None, "—", "no throughput to compare")


def test_a_nan_throughput_in_an_ok_result_is_no_throughput() -> None:
    nan = make_result("bf16-mixed", tps=math.nan)
    assert nan.ok and nan.metrics.items_per_s is None
    assert runs_speed([nan], [make_result(tps=1000.0)]) == (None, None, "—", "no throughput to compare")
    # beside finite ones, it is left out: the other two seeds pair
    mine = [nan, *(make_result("bf16-mixed", s, tps=2000.0 * s) for s in (1, 2))]
    base = [make_result("fp32", s, tps=1000.0 * s) for s in (1, 2)]
    interval, point, verdict, why = runs_speed(mine, base)
    assert (interval.n, interval.method, verdict, why) == (2, "log", FASTER, "")
    assert (interval.mean, interval.low, interval.high, point) == pytest.approx((2.0, 2.0, 2.0, 2.0))


def test_the_point_is_the_paired_geometric_mean_when_a_seed_ran_on_one_side_only() -> None:
    """Seed 0's bf16 run has no throughput (NaN): seeds 1 and 2 pair, each 2x. The point a report prints beside
    the interval must be the interval's own centre, the geometric mean of the paired ratios (2.0), not the ratio
    of all runs' geometric means (1.56 here, outside its own interval [2.0, 2.0])."""
    mine = [make_result("bf16-mixed", 0, tps=math.nan), *(make_result("bf16-mixed", s, tps=2000.0 * s) for s in (1, 2))]
    base = [make_result("fp32", s, tps=1000.0 * s) for s in (1, 2, 3)]  # seed 3 has no bf16 run to pair with
    interval, point, verdict, _ = runs_speed(mine, base)
    assert (interval.n, interval.mean, verdict) == (2, pytest.approx(2.0), FASTER)
    assert interval.low <= point <= interval.high
    assert point == pytest.approx(statistics.geometric_mean([2000 / 1000, 4000 / 2000]))


def test_a_figure_taken_under_contention_never_decides() -> None:
    mine = [make_result("bf16-mixed", s, tps=t, plan={"concurrent_runs": 2}) for s, t in enumerate([2000.0, 2100.0])]
    base = [
        make_result("fp32", s, tps=1000.0, metrics={"step_time_ms_p10": 1.0, "step_time_ms_p90": 2.0}) for s in (0, 1)
    ]
    interval, _, verdict, why = runs_speed(mine, base)
    assert interval is not None and interval.low > 1.05  # the interval alone would say faster
    assert verdict == UNRELIABLE
    assert why == "timed while 2 runs trained at once on one machine (+1 more)"  # each problem once


# --- time_precisions: the interleaved timing ----------------------------------------------------------


def tiny(**overrides) -> RunConfig:
    return RunConfig(**{"device": "cpu", "model": "user_models:build_ok", "steps": 10, "timing_warmup_steps": 2,
                        "batch_size": 4, **overrides})  # fmt: skip


def rounds_of(timing: TimingRecord) -> dict[int, list[str]]:
    """Each round's precisions, in the order its blocks ran."""
    return {r: [b.precision for b in blocks] for r, blocks in itertools.groupby(timing.blocks, key=lambda b: b.round)}


def test_timing_refuses_parallelism_and_fewer_than_two_precisions() -> None:
    with pytest.raises(
        ValueError, match=r"^timing runs in one process; parallelism='ddp' is timed by its training runs$"
    ):
        time_precisions(RunConfig(device="cpu", parallelism="ddp"), ["fp32", "bf16-mixed"])
    with pytest.raises(ValueError, match=r"^precisions \['fp32'\]: timing compares at least two$"):
        time_precisions(RunConfig(device="cpu"), ["fp32"])
    with pytest.raises(ValueError, match=r"^precisions \['bf16', 'bf16-mixed'\]: timing compares at least two$"):
        time_precisions(RunConfig(device="cpu"), ["bf16", "bf16-mixed"])  # one precision, spelled twice
    with pytest.raises(ValueError, match=r"^invalid precision 'fp12'; valid values are: fp32, "):
        time_precisions(RunConfig(device="cpu"), ["fp32", "fp12"])


def test_timing_stops_at_its_budget_after_whole_abba_rounds(user_models) -> None:
    ticks = itertools.count()  # a clock that advances one second per reading: the budget ends after round 2
    result = time_precisions(
        tiny(), ["fp32", "bf16-mixed"], budget_s=2.5, block_s=0.001, clock=lambda: float(next(ticks))
    )
    timing = result.timing
    assert result.ok and timing.stopped == "budget" and timing.budget_s == 2.5
    assert rounds_of(timing) == {0: ["fp32", "bf16-mixed"], 1: ["bf16-mixed", "fp32"]}
    assert timing.block_steps >= 3 and all(b.steps == timing.block_steps for b in timing.blocks)
    assert timing.precisions == ("fp32", "bf16-mixed") and timing.failed == {}
    assert timing.effective == {"fp32": "fp32", "bf16-mixed": "bf16-mixed"}


def test_the_budget_counts_timed_rounds_not_building_and_warming_up(user_models) -> None:
    """On a busy machine the set-up alone can take the whole budget: it must not leave the timing one round."""
    from user_models import BUILD_SLEEP_S

    config = replace(tiny(), model="user_models:build_slow_to_build")
    result = time_precisions(config, ["fp32", "bf16-mixed"], budget_s=BUILD_SLEEP_S / 2, block_s=0.001, max_rounds=4)
    assert result.ok and len(rounds_of(result.timing)) == 4 and result.timing.stopped == "rounds"
    assert result.timing.elapsed_s < BUILD_SLEEP_S  # two builds took 2 s: not in the timing's seconds


def test_timing_stops_after_max_rounds_and_alternates_three_precisions(user_models) -> None:
    result = time_precisions(tiny(), ["fp32", "bf16", "bf16-true"], block_s=0.001, min_rounds=10, max_rounds=3)
    assert result.ok and result.timing.stopped == "rounds"
    abc = ["fp32", "bf16-mixed", "bf16-true"]  # canonical names, the baseline first
    assert rounds_of(result.timing) == {0: abc, 1: abc[::-1], 2: abc}
    assert set(speed_verdicts(result.timing)) == {"bf16-mixed", "bf16-true"}


def test_timing_stops_once_decided_but_not_before_its_minimum_rounds(user_models) -> None:
    model = "user_models:build_slow_in_half"  # every bf16 step sleeps 20 ms: certainly slower than fp32's
    steady = {"block_s": 0.001, "budget_s": 120, "spread_limit": math.inf}  # no block dropped on a busy machine
    result = time_precisions(tiny(model=model), ["fp32", "bf16-mixed"], **steady)
    assert result.ok and result.timing.stopped == "decided"
    assert len(rounds_of(result.timing)) == MIN_ROUNDS  # decided from the first rounds on, but it waits for 5
    assert speed_verdicts(result.timing)["bf16-mixed"].verdict == SLOWER
    longer = time_precisions(tiny(model=model), ["fp32", "bf16-mixed"], **steady, min_rounds=7)
    assert longer.timing.stopped == "decided" and len(rounds_of(longer.timing)) == 7


def test_disturbed_blocks_are_dropped_counted_and_decide_nothing(user_models) -> None:
    # a spread limit below 1 calls every block disturbed (a block's p90 / p10 is at least 1)
    result = time_precisions(
        tiny(), ["fp32", "bf16-mixed"], block_s=0.001, spread_limit=0.5, min_rounds=2, max_rounds=4
    )
    timing = result.timing
    assert result.ok and timing.spread_limit == 0.5 and timing.stopped == "rounds"
    assert len(rounds_of(timing)) == 4 and all(b.dropped and b.spread >= 1 for b in timing.blocks)
    v = speed_verdicts(timing)["bf16-mixed"]
    assert (v.interval, v.verdict, v.rounds, v.dropped) == (None, UNDECIDED, 0, 4)
    assert timing_reason(v, timing) == "too few undisturbed rounds for an interval"


def test_a_precision_that_cannot_run_is_reported_and_the_others_timed(user_models) -> None:
    model = "user_models:build_fails_with_half_weights"  # fp32 and autocast run; bf16-true's first step raises
    result = time_precisions(tiny(model=model), ["fp32", "bf16-true", "bf16-mixed"], block_s=0.001, max_rounds=2)
    assert result.ok
    timing = result.timing
    assert timing.failed == {"bf16-true": "NotImplementedError: this loss has no torch.bfloat16 kernel"}
    assert timing.precisions == ("fp32", "bf16-true", "bf16-mixed")
    assert rounds_of(timing) == {0: ["fp32", "bf16-mixed"], 1: ["bf16-mixed", "fp32"]}
    assert list(speed_verdicts(timing)) == ["bf16-mixed"]


def test_with_fewer_than_two_precisions_running_nothing_is_timed(user_models) -> None:
    model = "user_models:build_fails_with_half_weights"
    result = time_precisions(tiny(model=model), ["fp32", "bf16-true"], block_s=0.001, budget_s=30)
    assert result.status == "failed"
    assert result.error == "could not time: bf16-true: NotImplementedError: this loss has no torch.bfloat16 kernel"
    assert result.timing.blocks == ()  # fp32 alone has nothing to be compared with: its budget is not spent


def test_a_model_that_cannot_be_built_fails_the_timing(user_models) -> None:
    result = time_precisions(tiny(model="user_models:build_fail"), ["fp32", "bf16-mixed"], block_s=0.001)
    assert result.status == "failed" and result.timing.blocks == ()
    assert result.error.startswith("could not time: fp32: ") and "; bf16-mixed: " in result.error
    assert "user factory exploded on purpose" in result.error
    assert set(result.timing.failed) == {"fp32", "bf16-mixed"}


@pytest.mark.slow
def test_timing_gpt_tiny_on_this_cpu(tmp_path) -> None:
    config = RunConfig(device="cpu", model="gpt-tiny", steps=10, timing_warmup_steps=2, batch_size=4, seq_len=32)
    result = time_precisions(config, ["fp32", "bf16-mixed"], budget_s=3)
    assert result.ok and result.error is None
    assert result.config == config.to_dict() and result.plan.requested == "fp32"
    assert result.plan.threads is not None and result.plan.machine
    timing = result.timing
    assert timing.stopped in ("decided", "budget") and timing.budget_s == 3
    assert timing.precisions == ("fp32", "bf16-mixed") and timing.failed == {}
    rounds = rounds_of(timing)
    assert len(rounds) >= 2 and len(timing.blocks) == 2 * len(rounds)
    for r, order in rounds.items():
        assert order == (["fp32", "bf16-mixed"] if r % 2 == 0 else ["bf16-mixed", "fp32"])
    assert all(b.step_ms > 0 and b.spread >= 1 and b.dropped == (b.spread > timing.spread_limit) for b in timing.blocks)
    v = speed_verdicts(timing)["bf16-mixed"]
    kept = len(timing.paired_logs("bf16-mixed"))
    assert v.rounds == kept and v.dropped == timing.dropped("bf16-mixed")
    if timing.stopped == "decided":  # a stop is a decision, from at least MIN_ROUNDS rounds
        assert v.verdict != UNDECIDED and len(rounds) >= 5
    else:
        assert timing.elapsed_s > timing.budget_s
    # the result is a result like any other: it survives its JSON file
    assert RunResult.load(result.save(tmp_path / "timing.json")).timing == timing


# --- emulated fp8: a forecast of its loss, never a speed ------------------------------------------------------


def test_an_emulated_fp8_recipe_is_left_out_of_the_timing_with_the_reason(user_models) -> None:
    config = tiny(emulate_fp8=True)
    result = time_precisions(config, ["fp32", "bf16-mixed", "fp8-rowwise"], block_s=0.001, max_rounds=2)
    timing = result.timing
    assert result.ok and timing.effective["fp8-rowwise"] == "fp8-rowwise"
    assert timing.failed["fp8-rowwise"].startswith("fp8-rowwise emulated on cpu")
    assert {b.precision for b in timing.blocks} == {"fp32", "bf16-mixed"}
    assert list(speed_verdicts(timing)) == ["bf16-mixed"]
    alone = time_precisions(config, ["fp32", "fp8-tensorwise"], block_s=0.001, budget_s=30)
    assert alone.ok and alone.error is None and alone.timing.blocks == ()  # nothing to time, and nothing went wrong
    assert list(alone.timing.failed) == ["fp8-tensorwise"]
