"""The report on hand-made results: setting labels, per-run and aggregated rows, Stat, the table's
formats, the verdicts behind a recommendation, and the SweepReport that computes them all once.

Pure Python (no torch runs). The exact text of whole tables and of summary.md lives in tests/golden/
(`make goldens` rewrites it); shorter pins stay inline. Written against mutation testing: a changed
format, threshold or ordering shows up as a failing test."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from factories import FP16_SCALED, SPLIT, SWEEP, THREE, eval_curve, history, make_result, seeds
from scipy.stats import t as scipy_t

from amp_lib import details as D
from amp_lib import render as T
from amp_lib import report as R
from amp_lib import stats as S
from amp_lib import table as TB
from amp_lib.details import summary_markdown, why_markdown
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.render import answer, format_memory, format_table, format_verdicts, reason
from amp_lib.report import (
    DEFAULT_TOLERANCE,
    Recommendation,
    SweepReport,
    build_groups,
    build_report,
    check_tolerance,
    comparison_table,
    recommend,
    recommendations,
    run_table,
    setting_labels,
)
from amp_lib.results import RowKey, RunResult, TimingBlock, TimingRecord, load_sweep
from amp_lib.stats import Stat


def cells(row: TB.Measurements) -> dict[str, str]:
    return {name: get(row) for name, get in T.COLUMNS}


def recs_of(results: list[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> list[Recommendation]:
    return list(build_report(results, tolerance).recommendations)


# --- settings and labels -------------------------------------------------------------------------


def test_setting_labels_name_the_model_and_the_varying_values() -> None:
    runs = [make_result("fp32", lr=0.001, steps=5, device="cpu"), make_result("fp32", lr=0.01, steps=5, device="cpu"),
            make_result("fp32", lr=0.01, steps=9, device="cpu"),
            make_result("fp32", lr=0.01, steps=9, device="cpu", model="mlp")]  # fmt: skip
    labels = sorted(setting_labels(runs).values())
    assert labels == ["gpt-tiny lr=0.001 steps=5", "gpt-tiny lr=0.01 steps=5", "gpt-tiny lr=0.01 steps=9",
                      "mlp lr=0.01 steps=9"]  # fmt: skip
    nomodel = RunResult(config={"precision": "fp32", "lr": 1}, plan={"effective": "fp32"})
    assert sorted(setting_labels([nomodel, make_result("fp32", lr=2)]).values()) == ["gpt-tiny lr=2", "lr=1"]
    assert list(setting_labels([make_result("fp32", seed=1, run_name="a", out_dir="b")]).values()) == ["gpt-tiny"]
    assert make_result("fp16-mixed", 3, lr=1).setting_key == (("lr", "1"), ("model", "'gpt-tiny'"))


def test_precision_seed_run_name_and_out_dir_do_not_make_a_setting() -> None:
    runs = [make_result("fp32", 0, run_name="a", out_dir="x"), make_result("bf16-mixed", 1, run_name="b", out_dir="y")]
    assert len(setting_labels(runs)) == 1
    assert {r.setting for r in run_table(runs)} == {"gpt-tiny"}


def test_several_settings_are_compared_separately() -> None:
    runs = [make_result(p, seed, lr=lr, tps=tps) for lr in (1e-3, 1e-2) for p, tps in (("fp32", 1000), ("bf16-mixed", 1500))
            for seed in (0, 1)]  # fmt: skip
    recs = recs_of(runs)
    assert [r.setting for r in recs] == ["gpt-tiny lr=0.001", "gpt-tiny lr=0.01"]
    assert all(r.precision == "bf16-mixed" for r in recs)
    assert [(r.setting, r.requested) for r in comparison_table(runs)] == [
        ("gpt-tiny lr=0.001", "fp32"),
        ("gpt-tiny lr=0.001", "bf16-mixed"),
        ("gpt-tiny lr=0.01", "fp32"),
        ("gpt-tiny lr=0.01", "bf16-mixed"),
    ]


def test_precision_falls_back_to_the_plans_request_and_names_to_blank() -> None:
    bare = RunResult(config={"model": "gpt-tiny", "seed": 0}, plan={"requested": "bf16", "effective": "bf16-mixed"})
    only_config = RunResult(
        config={"precision": "fp16", "model": "gpt-tiny", "seed": 0}, plan={"effective": "fp16-mixed"}
    )
    rows = run_table([bare, only_config])
    assert [r.requested for r in rows] == ["fp16-mixed", "bf16-mixed"]
    assert [r.run_names for r in rows] == [("",), ("",)]


def test_rows_are_ordered_by_setting_then_precision_order_then_name_then_seed() -> None:
    runs = [make_result("zz-custom", 0), make_result("bf16-mixed", 10), make_result("bf16-mixed", 2),
            make_result("fp16-mixed", 0), make_result("fp32", 0), make_result("aa-custom", 0)]  # fmt: skip
    assert [(r.requested, r.seeds) for r in run_table(runs)] == [
        ("fp32", (0,)), ("fp16-mixed", (0,)), ("bf16-mixed", (10,)), ("bf16-mixed", (2,)), ("aa-custom", (0,)),
        ("zz-custom", (0,)),
    ]  # fmt: skip
    assert [r.requested for r in comparison_table(runs)] == [
        "fp32",
        "fp16-mixed",
        "bf16-mixed",
        "aa-custom",
        "zz-custom",
    ]
    assert TB._order(RowKey("fp32"))[0] == 0 and TB._order(RowKey("nope"))[0] == len(TB.CANONICAL)
    assert make_result("16").requested == "fp16-mixed" and make_result("nope").requested == "nope"


def test_seeds_sort_as_text_within_a_precision() -> None:
    rows = run_table([make_result("bf16-mixed", 2), make_result("bf16-mixed", 10), make_result("bf16-mixed", 1)])
    assert [r.seeds for r in rows] == [(1,), (10,), (2,)]


# --- per-run and aggregated rows -----------------------------------------------------------------


def test_row_fields_of_a_single_run() -> None:
    (fp32, fp16, bf16) = run_table(THREE)
    assert (fp16.setting, fp16.requested, fp16.effective, fp16.status) == ("gpt-tiny", "fp16-mixed", "fp16-mixed", "ok")
    assert (fp16.runs, fp16.ok_runs, fp16.seeds, fp16.run_names) == (1, 1, (0,), ("fp16-mixed-s0",))
    assert fp16.items_per_s == Stat(2500.0) and fp16.speedup == Stat(2.5) and fp16.peak_memory_mb == Stat(120.0)
    assert fp16.memory_saved_pct == Stat(40.0) and fp16.final_loss == Stat(2.5) and fp16.eval_loss == Stat(2.01)
    assert fp16.loss_diff.mean == pytest.approx(0.01) and fp16.skipped_steps == Stat(3.0)
    assert fp16.final_loss_scale == Stat(32768.0) and fp16.min_loss_scale == Stat(1024.0)
    assert fp16.fallback_reason is None and fp16.error is None and fp16.throughput_unit == "tokens"
    assert fp32.is_baseline and not fp16.is_baseline and bf16.requested == "bf16-mixed"


def test_baseline_row_needs_fp32_requested_and_effective() -> None:
    rows = run_table([make_result(32, effective="fp32"), make_result("tf32", effective="fp32")])
    assert [(r.requested, r.is_baseline) for r in rows] == [("fp32", True), ("tf32", False)]
    empty = TB.Measurements(*(["s", RowKey("fp32"), "fp32", "ok", 0, 0, (), (), "tokens"] + [None] * 12))
    assert not empty.all_ok and empty.is_baseline


def test_seeds_aggregate_into_mean_and_spread() -> None:
    runs = [
        make_result("fp32", seed=0, tps=1000, mem=200, eval_loss=2.0),
        make_result("fp32", seed=1, tps=1200, mem=200, eval_loss=2.2),
        make_result("bf16-mixed", seed=0, tps=2000, mem=150, eval_loss=2.0),
        make_result("bf16-mixed", seed=1, tps=2400, mem=150, eval_loss=2.3),
    ]
    assert len(run_table(runs)) == 4
    fp32, bf16 = comparison_table(runs)
    assert (fp32.requested, bf16.requested) == ("fp32", "bf16-mixed")
    assert bf16.runs == 2 and bf16.seeds == (0, 1) and bf16.status == "ok"
    assert bf16.items_per_s.mean == pytest.approx(2200) and bf16.items_per_s.std == pytest.approx(282.84, rel=1e-3)
    assert bf16.speedup.mean == pytest.approx(2.0) and bf16.speedup.std == pytest.approx(0.0)  # same-seed ratios
    assert bf16.memory_saved_pct.mean == pytest.approx(25.0)
    assert bf16.loss_diff.mean == pytest.approx(0.05)  # (0.0 + 0.1) / 2
    assert fp32.speedup.mean == pytest.approx(1.0) and fp32.loss_diff.mean == pytest.approx(0.0)
    text = format_table(comparison_table(runs), "text")
    assert "2,200 ± 283 tokens" in text and "2 seeds (0, 1)" in text


def test_seed_rows_mix_effective_precisions_reasons_and_errors() -> None:
    runs = [
        make_result("fp32", 0),
        make_result("fp16-mixed", 0, effective="bf16-mixed", reason="no fast fp16"),
        make_result("fp16-mixed", 1, status="diverged", error="\n  loss became nan\nat step 3", reason="slow"),
        make_result("fp16-mixed", 2, status="failed", error="second error"),
        make_result("fp16-mixed", 3, status="ok"),
    ]
    fp16 = comparison_table(runs)[1]
    assert fp16.effective == "bf16-mixed, fp16-mixed" and fp16.fallback_reason == "no fast fp16; slow"
    assert fp16.status == "ok×2, diverged×1, failed×1" and fp16.error == "loss became nan"
    assert (fp16.runs, fp16.ok_runs, fp16.seeds) == (4, 2, (0, 1, 2, 3)) and not fp16.all_ok
    assert fp16.run_names == ("fp16-mixed-s0", "fp16-mixed-s1", "fp16-mixed-s2", "fp16-mixed-s3")
    assert cells(fp16)["run"] == "4 seeds (0, 1, 2, 3)" and cells(fp16)["fallback / error"] == "loss became nan"
    assert TB.status_of([make_result("fp32", status="oom"), make_result("fp32", status="failed")]) == "failed×1, oom×1"
    c = build_report(runs).groups[1]  # the verdict table names them the same way
    assert (c.effective, c.fallback_reason) == ("bf16-mixed, fp16-mixed", "no fast fp16; slow")
    assert TB.status_of([make_result("fp32", status="oom")] * 2) == "oom"


def test_a_seed_that_diverges_counts_in_the_row_and_disqualifies_the_precision() -> None:
    runs = [
        make_result("fp32", seed=0),
        make_result("fp32", seed=1),
        make_result("fp16-mixed", seed=0, tps=3000, **FP16_SCALED),
        make_result(
            "fp16-mixed",
            seed=1,
            status="diverged",
            error="loss became nan at step 3",
            tps=None,
            eval_loss=None,
            skipped=4,
            final_scale=2.0**-30,
            min_scale=2.0**-30,
        ),
    ]
    fp16 = comparison_table(runs)[1]
    assert fp16.status == "ok×1, diverged×1" and fp16.ok_runs == 1 and not fp16.all_ok
    assert fp16.min_loss_scale.n == 2 and fp16.min_loss_scale.std > 1e4  # the diverged seed's collapsed scale counts
    assert fp16.items_per_s == Stat(3000.0) and fp16.skipped_steps == Stat(2.5, pytest.approx(2.1213203), 2)
    rec = recommend(runs)
    assert rec.stay_in_fp32 and "loss became nan" in reason(rec)


def test_baseline_is_the_same_seed_else_every_ok_fp32_seed() -> None:
    runs = [
        make_result("fp32", 0, tps=1000, mem=100, eval_loss=2.0),
        make_result("fp32", 1, tps=2000, mem=300, eval_loss=3.0),
        make_result("fp32", 2, status="failed", tps=1.0, mem=1.0, eval_loss=1.0),  # never a baseline
        make_result(
            "fp32", 3, effective="bf16-mixed", tps=1.0, mem=1.0, eval_loss=1.0
        ),  # fp32 that did not run as fp32
        make_result("bf16-mixed", 1, tps=3000, mem=150, eval_loss=3.3),
        make_result("bf16-mixed", 7, tps=3000, mem=100, eval_loss=2.0),  # no fp32 seed 7: the mean of seeds 0 and 1
        make_result("bf16-mixed", None, tps=1500, mem=0.0, eval_loss=None),  # no seed at all
    ]
    rows = {(r.requested, r.seeds): r for r in run_table(runs)}
    same = rows[("bf16-mixed", (1,))]
    assert (
        same.speedup == Stat(1.5) and same.memory_saved_pct == Stat(50.0) and same.loss_diff.mean == pytest.approx(0.3)
    )
    pooled = rows[("bf16-mixed", (7,))]
    assert pooled.speedup == Stat(2.0) and pooled.memory_saved_pct == Stat(50.0) and pooled.loss_diff == Stat(-0.5)
    noseed = rows[("bf16-mixed", ())]
    assert noseed.speedup == Stat(1.0) and noseed.memory_saved_pct == Stat(100.0) and noseed.loss_diff is None
    assert noseed.run_names == ("bf16-mixed-sNone",)


def test_no_usable_baseline_leaves_ratios_empty() -> None:
    rows = run_table(
        [make_result("fp32", tps=0.0, mem=0.0, eval_loss=None), make_result("bf16-mixed", tps=None, mem=None)]
    )
    bf16 = rows[1]
    assert bf16.speedup is None and bf16.memory_saved_pct is None and bf16.loss_diff is None
    shown = cells(bf16)
    assert [shown[k] for k in ("throughput/s", "speedup vs fp32", "peak MB", "memory saved", "Δ eval vs fp32")] == [
        "—"
    ] * 5
    assert (shown["effective"], shown["fallback / error"]) == ("bf16-mixed", "")
    assert cells(TB.Measurements(*(["s", RowKey("x"), None, "ok", 1, 1, (), ("r",), "t"] + [None] * 12)))["effective"] == "?"
    assert TB._ratio(2.0, 0.0) is None and TB._ratio(None, 2.0) is None and TB._ratio(3.0, 2.0) == 1.5


# --- statistics: t quantiles and intervals -------------------------------------------------------


def comparison(results: list[RunResult], precision: str, tolerance: float = DEFAULT_TOLERANCE) -> R.Group:
    comparisons, _ = build_groups(results, tolerance)
    return next(c for c in comparisons if c.requested == precision)


def test_runs_slower_than_one_item_per_second_still_get_a_speed_up_verdict() -> None:
    c = comparison(
        [*seeds("fp32", [0.25, 0.3], what="tps"), *seeds("bf16-mixed", [0.5, 0.6], what="tps")], "bf16-mixed"
    )
    assert c.point_speedup == pytest.approx(2.0) and c.speedup.mean == pytest.approx(2.0)
    zero = comparison(
        [*seeds("fp32", [0.0, 0.0], what="tps"), *seeds("bf16-mixed", [9.0, 9.0], what="tps")], "bf16-mixed"
    )
    assert (zero.speedup, zero.point_speedup, zero.speed_verdict) == (None, None, "—")  # nothing to divide by


# --- quality verdicts against fp32 ----------------------------------------------------------------

FP32 = seeds("fp32", [2.00, 2.02, 1.98])  # mean 2.0: the tolerance is ±0.04


def test_an_interval_straddling_the_tolerance_is_inconclusive() -> None:
    c = comparison([*FP32, *seeds("bf16-mixed", [2.01, 2.05, 1.99])], "bf16-mixed")
    assert c.loss_diff.method == "paired" and c.loss_diff.low < 0.04 < c.loss_diff.high  # [-0.012, +0.045]
    assert c.tolerance_abs == pytest.approx(0.04) and c.verdict == "inconclusive — run more seeds"
    assert not c.quality_ok


def test_a_clearly_worse_precision_is_worse_by_its_mean_difference() -> None:
    c = comparison([*FP32, *seeds("fp16-mixed", [2.20, 2.24, 2.19])], "fp16-mixed")
    assert c.loss_diff.low > 0.04 and c.verdict == "worse by +0.2100 (+10.5%)"


def test_matches_and_better_need_the_whole_interval_inside_or_below_the_band() -> None:
    assert comparison([*FP32, *seeds("bf16-mixed", [2.001, 2.019, 1.98])], "bf16-mixed").verdict == "matches fp32"
    better = comparison([*FP32, *seeds("bf16-mixed", [1.80, 1.81, 1.76])], "bf16-mixed")
    assert better.verdict == "better" and better.quality_ok
    # a wide interval that covers the band is inconclusive, even with its mean at zero
    assert comparison([*FP32, *seeds("bf16-mixed", [2.1, 1.92, 1.98])], "bf16-mixed").verdict == R.INCONCLUSIVE


def test_the_band_edges_are_inside_and_the_tolerance_is_relative_to_fp32s_size() -> None:
    base, edge = seeds("fp32", [2.0, 2.0]), seeds("bf16-mixed", [2.0625, 2.0625])  # a zero-width interval
    assert comparison([*base, *edge], "bf16-mixed", 0.03125).verdict == "matches fp32"  # +0.0625 == +tolerance
    assert comparison([*base, *edge], "bf16-mixed", 0.0312).verdict == "worse by +0.0625 (+3.1%)"
    low = seeds("bf16-mixed", [1.9375, 1.9375])
    assert comparison([*base, *low], "bf16-mixed", 0.03125).verdict == "matches fp32"
    assert comparison([*base, *low], "bf16-mixed", 0.0312).verdict == "better"
    negative = [*seeds("fp32", [-2.0, -2.0]), *seeds("bf16-mixed", [-1.9, -1.9])]  # a higher loss is worse
    assert comparison(negative, "bf16-mixed").verdict == "worse by +0.1000 (+5.0%)"
    zero = [*seeds("fp32", [0.0, 0.0]), *seeds("bf16-mixed", [0.5, 0.5])]  # no percentage of a zero loss
    assert comparison(zero, "bf16-mixed", 10).verdict == "worse by +0.5000"
    assert (
        comparison([*seeds("fp32", [0.0, 0.0]), *seeds("bf16-mixed", [0.0, 0.0])], "bf16-mixed", 0).verdict == R.MATCHES
    )


@pytest.mark.parametrize(
    ("low", "high", "verdict"),
    [
        (0.04, 0.10, R.INCONCLUSIVE),  # touches +tolerance: not wholly above it
        (0.0401, 0.0999, "worse by +0.0700 (+3.5%)"),
        (-0.10, -0.04, R.NOT_WORSE),  # touches -tolerance: not wholly below it, but certainly not worse
        (-0.10, -0.0401, R.BETTER),
        (-0.06, 0.0, R.NOT_WORSE),  # straddles the lower edge: non-inferior, eligible (it used to be inconclusive)
        (-0.02, 0.05, R.INCONCLUSIVE),  # reaches above +tolerance without lying above it
        (-0.04, 0.04, R.MATCHES),
    ],
)
def test_worse_and_better_need_the_whole_interval_beyond_the_band(low: float, high: float, verdict: str) -> None:
    interval = S.Interval((low + high) / 2, low, high, 3, "paired")
    assert R._quality_verdict(interval, interval.mean, 0.04, 2.0) == verdict


def test_one_seed_has_no_noise_estimate_and_is_not_judged() -> None:
    runs = [make_result("fp32", eval_loss=2.0), make_result("bf16-mixed", eval_loss=2.5)]
    report = build_report(runs)
    c = report.groups[1]
    assert c.loss_diff is None and c.point_diff == pytest.approx(0.5) and c.verdict == R.INCONCLUSIVE
    assert not c.eligible and c.seeds_used == 1
    assert T.format_floor(report.noise[0]) == "fp32 best eval loss 2.0000: ok, one seed — no noise estimate"
    assert report.noise[0].half_width is None and report.noise[0].seeds_needed is None
    table = format_verdicts(report.groups, "text")
    assert "+25.00% (one seed)" in table and "inconclusive" in table
    # one seed of the precision against three of fp32 is no better: nothing to pair, nothing for Welch
    assert comparison([*FP32, make_result("bf16-mixed", 0, eval_loss=2.5)], "bf16-mixed").verdict == R.INCONCLUSIVE
    assert "One seed gives no noise estimate: it is shown, never judged" in D.rules_markdown(report.tolerance)


def test_without_an_eval_loss_there_is_nothing_to_judge() -> None:
    report = build_report([*seeds("fp32", [2.0, 2.1]), make_result("bf16-mixed", eval_loss=None)])
    assert report.groups[1].verdict == "no fp32 baseline" and report.groups[1].point_diff is None
    assert reason(report.recommendations[0]) == "stay in fp32: bf16-mixed no eval loss to compare with fp32"
    missing = build_report([make_result("bf16-mixed")]).noise[0]
    assert T.format_floor(missing) == "no fp32 baseline (missing)" and missing.tolerance_abs is None
    failed = build_report([make_result("fp32", status="oom"), make_result("fp32", 1, status="failed")]).noise[0]
    assert T.format_floor(failed) == "no fp32 baseline (failed×1, oom×1)"


def test_any_failed_seed_makes_the_verdict_diverged_failed() -> None:
    runs = [*FP32, *seeds("fp16-mixed", [2.0, 2.0]), make_result("fp16-mixed", 2, status="diverged", error="nan\nx")]
    c = comparison(runs, "fp16-mixed")
    assert c.verdict == "diverged/failed" and c.status == "ok×2, diverged×1" and c.error == "nan"
    assert c.best_eval_loss.n == 2  # the diverged seed's loss is no measurement


def test_the_noise_floor_is_fp32s_spread_and_interval() -> None:
    report = build_report([*FP32, *seeds("bf16-mixed", [2.0, 2.0, 2.0])])
    (floor,) = report.noise
    assert floor.best_eval_loss == Stat(pytest.approx(2.0), pytest.approx(0.02), 3)
    assert floor.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3))
    assert floor.tolerance_abs == pytest.approx(0.04)
    # a difference of two runs varies by sqrt(2) x 0.02: n seeds give a 95% interval 2 t(n-1) 0.0283/sqrt(n) wide
    widths = {n: 2 * scipy_t.ppf(0.975, n - 1) * 0.02 * math.sqrt(2) / math.sqrt(n) for n in range(2, 12)}
    assert floor.seeds_needed == min(n for n, w in widths.items() if w <= 0.04)
    assert T.format_floor(floor) == (
        "fp32 best eval loss 2.0000, std 0.0200 over 3 seeds (95% CI ±0.0497); tolerance ±0.0400; "
        f"{floor.seeds_needed} seeds give a difference interval narrower than the tolerance"
    )
    assert report.groups[0].is_baseline and report.groups[0].loss_diff is None


def test_best_eval_loss_is_the_curves_minimum_else_the_recorded_best_else_the_final_eval() -> None:
    curve = make_result("fp32", evals=eval_curve(3.0, 1.5, 1.7), eval_loss=1.7, metrics={"best_eval_loss": 9.0})
    assert curve.best_eval_loss == 1.5  # the curve wins over a stored figure
    assert make_result("fp32", eval_loss=2.2, steps=40, metrics={"best_eval_loss": 2.1}).best_eval_loss == 2.1
    assert make_result("fp32", eval_loss=2.2).best_eval_loss == 2.2
    assert make_result("fp32", eval_loss=None).best_eval_loss is None
    assert make_result("fp32", evals=eval_curve(None, math.nan), eval_loss=2.2).best_eval_loss == 2.2


# --- speed verdicts -----------------------------------------------------------------------------


def test_faster_needs_the_whole_interval_above_the_margin() -> None:
    base = seeds("fp32", [1000.0] * 3, what="tps")
    fast = comparison([*base, *seeds("bf16-mixed", [2000.0, 2100.0, 1900.0], what="tps")], "bf16-mixed")
    assert fast.speed_verdict == "faster" and fast.speedup.low > 1.05 and fast.speed_reason == ""
    at_margin = comparison([*base, *seeds("bf16-mixed", [1050.0] * 3, what="tps")], "bf16-mixed")
    assert at_margin.speedup.low == pytest.approx(1.05) and at_margin.speed_verdict == "no measurable gain"  # above, not at
    slight = comparison([*base, *seeds("bf16-mixed", [1000.0, 1200.0, 1100.0], what="tps")], "bf16-mixed")
    assert slight.speed_verdict == "undecided" and slight.speedup.mean == pytest.approx((1.2 * 1.1) ** (1 / 3))
    assert slight.speed_reason == "the interval straddles an edge: run more seeds" and slight.speed_source == "training runs"
    assert T._speed_verdict_cell(slight) == "undecided (runs)"
    one = comparison([make_result("fp32"), make_result("bf16-mixed", tps=3000.0)], "bf16-mixed")
    assert (one.speedup, one.speed_verdict) == (None, "undecided") and one.point_speedup == pytest.approx(3.0)
    assert one.speed_reason == "one seed: no interval" and T._speed_cell(one) == "3.00x (one seed)"
    none = comparison([make_result("fp32"), make_result("bf16-mixed", tps=None)], "bf16-mixed")
    assert (none.speed_verdict, none.speed_reason, T._speed_cell(none)) == ("—", "no throughput to compare", "—")


def test_timings_in_parallel_or_with_a_wide_spread_are_unreliable_where_the_setting_was_not_timed() -> None:
    parallel = make_result("fp32", 0, plan={"concurrent_runs": 2})
    runs = [
        parallel,
        *seeds("fp32", [1000.0] * 3, what="tps")[1:],
        *seeds("bf16-mixed", [2000.0, 2100.0, 1900.0], what="tps"),
    ]
    c = comparison(runs, "bf16-mixed")
    assert c.speed_verdict == "unreliable" and c.speed_reason == "timed while 2 runs trained at once on one machine"
    assert c.speed_source == "training runs" and T._speed_verdict_cell(c) == "unreliable (runs)"
    runs[4] = make_result("bf16-mixed", 1, tps=2100.0, metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 20.0})
    assert comparison(runs, "bf16-mixed").speed_reason == (
        "step times spread 2.0x from p10 to p90 (limit 1.5x) (+1 more)"  # the first cause, and how many more
    )
    timed = [make_result(r.config["precision"], r.config["seed"], tps=r.metrics.items_per_s, plan=r.plan,
                         evals=eval_curve(3.0, 2.0, 2.0)) for r in runs]  # fmt: skip
    # the time to quality is training-run wall time too: where a run's timing was disturbed, the caveats say so
    assert "a run's was disturbed: timed while 2 runs trained at once" in D.caveats_markdown(build_report(timed))


def test_the_baseline_says_its_own_timing_is_unreliable_only_where_its_runs_give_the_speed() -> None:
    busy = make_result(
        "fp32", plan={"concurrent_runs": 2}, metrics={"step_time_ms_p10": 0.4, "step_time_ms_p90": 0.8}
    )  # sub-millisecond steps are timed like any other
    fp32, bf16 = build_report([busy, make_result("bf16-mixed", tps=3000.0)]).groups
    assert (fp32.speed_verdict, fp32.point_speedup, T._speed_cell(fp32)) == ("baseline", 1.0, "1.00x")
    assert T._speed_verdict_cell(fp32) == "baseline (timing unreliable)"
    assert fp32.speed_reason == "timed while 2 runs trained at once on one machine"
    assert bf16.speed_verdict == "unreliable" and bf16.speed_reason == "timed while 2 runs trained at once on one machine (+1 more)"


def test_an_unreliable_speed_figure_never_decides_the_recommendation() -> None:
    runs = [
        *seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0, plan={"concurrent_runs": 2}),
        *seeds("bf16-mixed", [2.0, 2.0, 2.0], tps=3000.0, plan={"concurrent_runs": 2}),
    ]
    report = build_report(runs)
    (rec,) = report.recommendations
    assert rec.stay_in_fp32 and report.groups[1].verdict == "matches fp32"
    assert reason(rec) == (
        "stay in fp32: bf16-mixed matches fp32 on quality; its speed figure is unreliable "
        "(timed while 2 runs trained at once on one machine)"
    )
    assert answer(report).startswith("Stay in fp32 — no other precision was shown to be as good and measurably faster")


# --- time to quality -----------------------------------------------------------------------------


def ttq_runs() -> list[RunResult]:
    fp32 = [make_result("fp32", s, evals=eval_curve(3.0, 2.5, 2.0)) for s in range(3)]  # best 2.0: target 2.04
    bf16 = [make_result("bf16-mixed", s, evals=eval_curve(3.0, 2.03, 2.0, step_s=0.05)) for s in range(3)]
    fp16 = [make_result("fp16-mixed", s, evals=eval_curve(3.0, 2.6, 2.3)) for s in range(3)]
    tf32 = [make_result("tf32", 0, evals=eval_curve(2.5, 2.04, 2.0))]
    tf32 += [make_result("tf32", s, evals=eval_curve(2.5, 2.2, 2.1)) for s in (1, 2)]
    return fp32 + bf16 + fp16 + tf32


def test_time_to_quality_from_eval_curves_paired_by_seed_and_censored() -> None:
    report = build_report(ttq_runs())
    ttq = {c.requested: c.ttq for c in report.groups}
    group = {c.requested: c for c in report.groups}
    assert ttq["fp32"].target == pytest.approx(2.04)  # each seed's fp32 best eval loss (2.0) + the 2% tolerance
    assert (ttq["fp32"].time_s, ttq["fp32"].steps) == (Stat(3.0, 0.0, 3), Stat(30.0, 0.0, 3))
    bf16 = ttq["bf16-mixed"]
    assert (bf16.time_s.mean, bf16.steps.mean, bf16.censored) == (1.0, 20.0, 0)
    assert bf16.speedup.mean == pytest.approx(3.0) and bf16.speedup.method == "log"  # fp32's 3 s over bf16's 1 s
    never = ttq["fp16-mixed"]  # never reached: each seed censored at its whole run, 3 s, so at most 3 s / 3 s
    assert (never.reached, never.runs, never.horizon, never.censored) == (0, 3, 30, 3)
    assert T.format_ttq(never) == "never reached in 30 steps"
    assert T._ttq_cell(group["fp16-mixed"]) == "never (3 seeds, 30 steps)"
    part = ttq["tf32"]  # seed 0 at 2.04 itself (counts as reached) after 2 s; seeds 1 and 2 censored at 3 s
    assert (part.reached, part.runs, part.censored) == (1, 3, 2)
    assert part.point_speedup == pytest.approx((1.5 * 1.0 * 1.0) ** (1 / 3))  # 3/2, 3/3, 3/3: a geometric mean
    assert T._ttq_cell(group["tf32"]).startswith("at most ") and T._ttq_cell(group["tf32"]).endswith("(2 censored)")
    assert T.format_ttq(part) == "2 s, 20 steps (1 of 3 seeds; the rest never in 30 steps)"
    assert T.format_ttq(bf16) == "1 ± 0 s, 20 ± 0 steps"
    cells_ = format_verdicts(report.groups, "text")
    assert "never (3 seeds, 30 steps)" in cells_ and "3.00x [3.00x, 3.00x]" in cells_


def test_time_to_quality_edge_cases() -> None:
    # tolerance 0: the target is fp32's best eval loss itself
    assert build_report(ttq_runs(), 0).groups[0].ttq.target == 2.0
    # each seed against its own fp32 seed: a worse fp32 seed sets a laxer target for its pair, not for the others
    spread = [make_result("fp32", 0, evals=eval_curve(3.0, 1.8)), make_result("fp32", 1, evals=eval_curve(3.0, 2.2)),
              make_result("bf16-mixed", 0, evals=eval_curve(3.0, 1.8))]  # fmt: skip
    fp32, bf16 = build_report(spread).groups
    assert (fp32.ttq.reached, fp32.ttq.runs) == (2, 2)
    assert (bf16.ttq.speedup, bf16.ttq.point_speedup) == (None, 1.0)  # one pair: a point, no interval
    # a precision already at the target when the clock started has no finite speed-up
    instant = [*ttq_runs()[:3], make_result("bf16-mixed", 0, evals=eval_curve(2.0, step_s=0.0))]
    assert build_report(instant).groups[1].ttq.speedup is None
    long = R.TimeToQuality(2.0, 1, 1, Stat(3000.0), Stat(1500.0), 3000, None)
    assert T.format_ttq(long) == "1.5e+03 s, 3000 steps"


def test_results_without_eval_curves_count_the_final_eval_at_the_last_step() -> None:
    old = make_result("fp32", eval_loss=2.0, steps=40, metrics={"train_time_s": 5.0})
    assert old.eval_curve == [(40, 2.0, 5.0)]
    assert make_result("fp32", eval_loss=2.0, rows=history(5)).eval_curve == [(5, 2.0, None)]
    assert make_result("fp32", eval_loss=None).eval_curve == []
    assert make_result("fp32", evals=eval_curve(None), eval_loss=2.0, steps=40).eval_curve == []  # none finite
    assert old.first_reach(2.0) == (40, 5.0) and old.first_reach(1.99) is None
    report = build_report([make_result("fp32", 0, steps=40), make_result("bf16-mixed", 0, steps=40)])
    ttq = report.groups[1].ttq
    assert (ttq.reached, ttq.time_s, ttq.steps, ttq.speedup) == (1, None, Stat(40.0), None)  # untimed: no speed-up
    assert T.format_ttq(ttq) == "—, 40 steps"


# --- memory split -------------------------------------------------------------------------------



def test_memory_split_is_tensor_sizes_and_the_rest_of_the_peak() -> None:
    runs = [
        make_result("fp32", 0, mem=200.0, metrics={**SPLIT, "peak_memory_kind": "cuda_allocated"}),
        make_result("fp32", 1, mem=220.0, metrics={**SPLIT, "peak_memory_kind": "cuda_allocated"}),
        make_result("bf16-mixed", mem=150.0),  # no split recorded
    ]
    fp32, bf16 = build_report(runs).groups
    assert (fp32.memory.peak_mb, fp32.memory.rest_mb, fp32.memory.kind, T.memory_note([fp32])) == (
        210.0,
        170.0,
        "cuda_allocated",
        "",
    )
    assert bf16.memory.rest_mb is None and bf16.memory.kind is None
    text = format_memory([fp32, bf16], "text").splitlines()
    assert text[1].split() == ["fp32", "210.0", "—", "10.0", "10.0", "20.0", "170.0", "cuda_allocated"]
    assert text[2].split() == ["bf16-mixed", "150.0", "—", "—", "—", "—", "—", "?"]  # one seed: no ratio interval
    assert T.memory_note([fp32, bf16]) == ""


def test_on_a_cpu_the_report_says_the_peak_is_the_whole_process() -> None:
    cpu: dict[str, Any] = {"mem": 900.0, "metrics": {**SPLIT, "peak_memory_kind": "cpu_rss"}}
    report = build_report([make_result("fp32", **cpu)])
    note = "CPU: the peak is the whole process's resident set, so the rest is mostly the Python process"
    assert T.memory_note(report.groups[:1]) == note and T.memory_note(report.groups) == note
    assert D.memory_markdown(report).endswith(f"\n\n_{note}_")
    assert build_report([make_result("fp32", status="oom")]).groups[0].memory is None  # no ok run, no split
    failed_first = build_report([make_result("fp32", status="oom"), make_result("bf16-mixed", 0, **cpu)])
    assert T.memory_note(failed_first.groups) == note
    mixed = build_report([make_result("fp32", 0, **cpu), make_result("fp32", 1, metrics={"peak_memory_kind": "x"})])
    assert mixed.groups[0].memory.kind == "cpu_rss, x"  # seeds measured differently say so


# --- recommendations -----------------------------------------------------------------------------


def test_recommends_the_fastest_precision_that_matches_and_is_measurably_faster() -> None:
    runs = [
        *seeds("fp32", [2.0, 2.02, 1.98], tps=1000.0),
        *[
            make_result("bf16-mixed", s, eval_loss=v, tps=t)
            for s, (v, t) in enumerate([(2.0, 1800.0), (2.02, 1900.0), (1.98, 1700.0)])
        ],
        *[
            make_result("tf32", s, eval_loss=v, tps=t)
            for s, (v, t) in enumerate([(2.0, 1300.0), (2.02, 1400.0), (1.98, 1200.0)])
        ],
        *seeds("fp16-mixed", [2.2, 2.24, 2.19], tps=2500.0),  # faster still, but worse
    ]
    report = build_report(runs)
    (rec,) = report.recommendations
    assert (rec.precision, rec.requested, rec.stay_in_fp32) == ("bf16-mixed", "bf16-mixed", False)
    # three candidates: each deciding interval corrected for multiplicity (Holm), marked †
    assert reason(rec) == "matches fp32 (Δ +0.00% [+0.00%, +0.00%] †) and faster: 1.80x [1.47x, 2.19x] †"
    assert answer(report) == (
        "Use bf16-mixed: it matches fp32 (Δ +0.00% [+0.00%, +0.00%] †, 3 seeds) and is 1.80x as fast [1.47x, 2.19x]."
    )
    assert T.evidence(rec)[2] == (
        "fp16-mixed: 3 seeds, worse by 10.5% (Δ +10.50% [+9.26%, +11.74%] †), faster (runs) 2.50x [2.50x, 2.50x] †, "
        "same as fp32"
    )
    assert recommend(runs, tolerance=0.15).precision == "fp16-mixed"  # a looser tolerance admits fp16


def test_a_better_precision_counts_and_a_fallback_is_explained() -> None:
    runs = [
        *seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0),
        *[
            make_result("fp16-mixed", s, effective="bf16-mixed", reason="no fast fp16", eval_loss=1.8, tps=t)
            for s, t in enumerate([2000.0, 2100.0, 1900.0])
        ],
    ]
    report = build_report(runs)
    (rec,) = report.recommendations
    assert (rec.precision, rec.requested) == ("bf16-mixed", "fp16-mixed")
    assert reason(rec).startswith("is better than fp32 (Δ -10.00% [-10.00%, -10.00%]) and faster: 2.00x [1.76x, 2.26x]")
    assert reason(rec).endswith(" (ask for 'fp16-mixed'; it runs as bf16-mixed: no fast fp16)")
    assert report.groups[1].name == "fp16-mixed (ran as bf16-mixed)" and report.groups[1].verdict == "better"
    assert answer(report) == (
        "Use fp16-mixed: it is better than fp32 (Δ -10.00% [-10.00%, -10.00%], 3 seeds) and is 2.00x as fast "
        "[1.76x, 2.26x] (it runs as bf16-mixed here: no fast fp16)."
    )


def test_the_answer_quotes_the_time_to_quality_speed_up() -> None:
    runs = [make_result(r.config["precision"], r.config["seed"], evals=r.evals, eval_loss=2.0, tps=t)
            for r, t in zip(ttq_runs()[:6], [1000.0] * 3 + [2000.0, 2100.0, 1900.0])]  # fmt: skip
    report = build_report(runs)
    assert answer(report) == (
        "Use bf16-mixed: it matches fp32 (Δ +0.00% [+0.00%, +0.00%], 3 seeds) and is 2.00x as fast [1.76x, 2.26x],"
        " reaching fp32's quality 3.00x sooner."
    )
    assert reason(report.recommendations[0]).endswith("; reaches fp32's quality 3.00x sooner")


def test_each_reason_to_stay_in_fp32_is_spelled_out() -> None:
    runs = [
        *seeds("fp32", [2.0, 2.02, 1.98], tps=1000.0),
        *seeds("tf32", [2.0, 2.02, 1.98], tps=1010.0, effective="fp32"),
        make_result("fp16-mixed", status="diverged", error="loss became nan\nmore"),
        make_result("fp16-mixed", 1, status="oom"),
        *[
            make_result("bf16-mixed", s, eval_loss=v, tps=t)
            for s, (v, t) in enumerate([(2.0, 1000.0), (2.02, 1010.0), (1.98, 990.0)])
        ],
        *seeds("fp16-true", [2.01, 2.05, 1.99]),
        *seeds("bf16-true", [2.2, 2.24, 2.19]),
        *seeds("fp8-mixed", [2.0, 2.02, 1.98], tps=None),
    ]
    rec = recommend(runs)
    assert rec.stay_in_fp32 and rec.requested == "fp32"
    assert reason(rec) == "stay in fp32: " + "; ".join(  # noqa: FLY002
        [
            "tf32 (ran as fp32) runs as fp32 on this machine (no fallback reason recorded)",
            "fp16-mixed not safe: diverged×1, oom×1 (loss became nan)",
            # corrected for the 6 comparisons with fp32 (Holm), the interval no longer lies within ±5%
            (
                "bf16-mixed matches fp32 on quality; its speed was not decided (1.00x [0.94x, 1.06x] †): the interval "
                "straddles an edge: run more seeds"
            ),
            "fp16-true inconclusive on quality (Δ +0.83% [-1.72%, +3.38%] †, 3 seeds)",
            "bf16-true worse by 10.5% on quality (Δ +10.50% [+8.71%, +12.29%] †, 3 seeds)",
            # an older result's fp8-mixed is the recipe it ran: fp8-tensorwise
            "fp8-tensorwise matches fp32 on quality, but has no speed to compare with fp32",
        ]
    )


def test_no_measurable_gain_and_one_seed_are_reasons_to_stay() -> None:
    runs = [*seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0), *seeds("bf16-mixed", [1000.0, 1200.0, 1100.0], what="tps")]
    assert reason(recommend(runs)) == (
        "stay in fp32: bf16-mixed matches fp32 on quality; its speed was not decided (1.10x [0.87x, 1.38x]): "
        "the interval straddles an edge: run more seeds"
    )
    flat = [*seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0), *seeds("bf16-mixed", [1000.0, 1010.0, 990.0], what="tps")]
    assert reason(recommend(flat)) == (
        "stay in fp32: bf16-mixed matches fp32 on quality, but shows no measurable speed gain: 1.00x [0.98x, 1.03x]"
    )
    oom = recommend([make_result("fp32"), make_result("bf16-mixed", status="oom")])  # no error line recorded
    assert reason(oom) == "stay in fp32: bf16-mixed not safe: oom"
    one = recommend([make_result("fp32"), make_result("bf16-mixed", tps=3000.0)])
    assert reason(one) == "stay in fp32: bf16-mixed inconclusive on quality (Δ +0.00% (one seed), one seed: no noise estimate)"


def test_fp32_alone_missing_or_failed() -> None:
    alone = recommend(seeds("fp32", [2.0, 2.1]))
    assert reason(alone) == "stay in fp32: fp32 is the only precision in the sweep"
    assert T.evidence(alone) == ("fp32: 2 seeds, baseline, best eval loss 2.0500 ± 0.0707",)  # no curve: no time to quality
    missing = recommend([make_result("bf16-mixed")])
    assert (missing.precision, missing.requested, missing.tolerance) == (None, None, 0.02)
    assert reason(missing) == "no fp32 run in this setting to compare against: add fp32 to the sweep"
    failed = recommend(
        [make_result("fp32", status="failed", error="ValueError: boom\ntrace"), make_result("bf16-mixed")]
    )
    assert failed.precision is None and "add fp32" not in reason(failed)
    assert reason(failed) == (
        "fp32 failed (failed: ValueError: boom), so there is no baseline to compare against: fix the fp32 run first"
    )
    assert T.recommendation_markdown(failed).startswith("**Recommendation (gpt-tiny): none** — fp32 failed (failed")
    diverged = build_report([*seeds("fp32", [2.0, 2.0], status="diverged"), make_result("bf16-mixed")])
    assert reason(diverged.recommendations[0]).startswith("fp32 failed (diverged), so there is no baseline")
    assert answer(diverged) == f"No answer: {reason(diverged.recommendations[0])}."
    elsewhere = recommend([make_result("fp32", effective="bf16-mixed", reason="x"), make_result("bf16-mixed")])
    assert reason(elsewhere) == "fp32 ran as bf16-mixed (x), so there is no fp32 baseline"
    unexplained = recommend([make_result("fp32", effective="tf32"), make_result("bf16-mixed")])
    assert reason(unexplained) == "fp32 ran as tf32 (no fallback reason recorded), so there is no fp32 baseline"


def test_a_partly_failed_fp32_still_is_the_baseline_and_is_noted() -> None:
    runs = [*FP32, make_result("fp32", 3, status="diverged"), *seeds("bf16-mixed", [2.01, 2.05, 1.99])]
    report = build_report(runs)
    assert report.groups[0].verdict == "diverged/failed" and report.noise[0].best_eval_loss.n == 3
    assert reason(report.recommendations[0]) == (
        "stay in fp32: bf16-mixed inconclusive on quality (Δ +0.83% [-0.60%, +2.27%] †, 3 seeds); "
        "note: fp32 itself ok×3, diverged×1"
    )


def test_a_setting_without_baseline_does_not_hide_the_next_setting() -> None:
    runs = [make_result("bf16-mixed", lr=1), *seeds("fp32", [2.0, 2.0], lr=2, tps=1000.0),
            *seeds("bf16-mixed", [2000.0, 2000.0], what="tps", lr=2)]  # fmt: skip
    report = build_report(runs)
    assert [(r.setting, r.precision) for r in report.recommendations] == [
        ("gpt-tiny lr=1", None),
        ("gpt-tiny lr=2", "bf16-mixed"),
    ]
    assert answer(report) == (
        "gpt-tiny lr=1: No answer: no fp32 run in this setting to compare against: add fp32 to the sweep.\n\n"
        "gpt-tiny lr=2: Use bf16-mixed: it matches fp32 (Δ +0.00% [+0.00%, +0.00%], 2 seeds) and is 2.00x as fast "
        "[2.00x, 2.00x]."
    )


def test_the_answer_names_each_setting_that_stays_in_fp32() -> None:
    report = build_report([make_result("fp32", lr=1), make_result("bf16-mixed", lr=1), make_result("fp32", lr=2)])
    assert answer(report) == (
        "gpt-tiny lr=1: Stay in fp32 — no other precision was shown to be as good and measurably faster:\n"
        "- bf16-mixed inconclusive on quality (Δ +0.00% (one seed), one seed: no noise estimate).\n\n"
        "gpt-tiny lr=2: Stay in fp32: it is the only precision in the sweep."
    )


def test_nameless_recommendation_markdown() -> None:
    nameless = Recommendation("", None, None, 0.005)
    assert T.recommendation_markdown(nameless) == (
        "**Recommendation: none** — no fp32 run in this setting to compare against: add fp32 to the sweep\n\n"
        "_Tolerance: best eval loss within ±0.5% of fp32's (95% interval). Evidence:_\n"
    )
    assert not nameless.stay_in_fp32 and Recommendation("s", "fp32", "tf32", 0.0).stay_in_fp32


def test_recommendations_take_comparisons_and_noise_floors() -> None:
    comparisons, floors = build_groups(THREE)
    recs = recommendations(comparisons, floors, DEFAULT_TOLERANCE)
    assert recs == list(build_report(THREE).recommendations) and recommendations([], [], DEFAULT_TOLERANCE) == []
    assert [r.setting for r in recommendations(comparisons, [], DEFAULT_TOLERANCE)] == ["gpt-tiny"]  # no floor: no baseline
    assert recommendations(comparisons, [], DEFAULT_TOLERANCE)[0].precision is None


def test_recommend_needs_exactly_one_setting_and_points_to_build_report() -> None:
    with pytest.raises(ValueError) as info:
        recommend([])
    assert str(info.value) == (
        "recommend() needs results of exactly one setting; got 0: none (no results); use build_report()"
    )
    two = [make_result("fp32", lr=1), make_result("fp32", lr=2)]
    with pytest.raises(ValueError) as info:
        recommend(two)
    assert str(info.value) == (
        "recommend() needs results of exactly one setting; got 2: 'gpt-tiny lr=1', 'gpt-tiny lr=2'; use build_report()"
    )
    assert [r.setting for r in build_report(two).recommendations] == ["gpt-tiny lr=1", "gpt-tiny lr=2"]


# --- tolerance -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, -1, math.nan, math.inf, -math.inf, True, False, "0.02", None], ids=repr)
def test_check_tolerance_quotes_a_bad_value(bad: Any) -> None:
    with pytest.raises(ValueError) as info:
        check_tolerance(bad)
    assert str(info.value) == f"tolerance={bad!r} must be a finite number >= 0 (relative, e.g. 0.02 for 2%)"


def test_check_tolerance_returns_a_float() -> None:
    for good, value in ((0, 0.0), (2, 2.0), (0.02, 0.02), (1e9, 1e9)):
        got = check_tolerance(good)
        assert got == value and type(got) is float


@pytest.mark.parametrize(
    "call",
    [
        lambda tol: build_report([], tol),
        lambda tol: recommend([make_result("fp32")], tol),
    ],
    ids=["build_report", "recommend"],
)
def test_every_entry_point_checks_the_tolerance(call: Any) -> None:
    with pytest.raises(ValueError, match=r"^tolerance=-0\.5 must be a finite number >= 0"):
        call(-0.5)
    with pytest.raises(ValueError, match=r"^tolerance=nan must be"):
        call(math.nan)


# --- SweepReport and summary ---------------------------------------------------------------------

# Three seeds of four precisions, as a GPU sweep records them: eval curves, the memory split, timings.


def test_build_report_fields_equal_the_separate_functions() -> None:
    runs = [*THREE, make_result("fp32", 1, tps=1100), make_result("bf16-mixed", lr=1), make_result("fp32", lr=1)]
    report = build_report(runs, 0.05)
    assert isinstance(report, SweepReport)
    assert report.results == tuple(runs)
    assert report.runs == tuple(run_table(runs)) and len(report.runs) == 6
    assert report.table == tuple(comparison_table(runs)) and len(report.table) == 5
    comparisons, floors = build_groups(runs, 0.05)
    assert report.groups == tuple(comparisons) and report.noise == tuple(floors) and len(floors) == 2
    assert [(c.setting, c.requested) for c in report.groups] == [(r.setting, r.requested) for r in report.table]
    assert report.recommendations == tuple(recommendations(comparisons, floors, 0.05))
    assert report.tolerance == 0.05 and all(r.tolerance == 0.05 for r in report.recommendations)
    assert build_report(runs).tolerance == DEFAULT_TOLERANCE == 0.02


def test_build_report_computes_everything_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for name in ("run_table", "recommendations", "build_groups"):
        real = getattr(R, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(R, name, counted)
    report = build_report(SWEEP)
    assert calls == {"run_table": 1, "recommendations": 1, "build_groups": 1}  # one aggregation
    summary_markdown(report)
    T.recommendations_markdown(report)
    answer(report)
    assert sum(calls.values()) == 3  # the markdown is made from the stored groups, nothing is recomputed


def test_the_report_of_no_results_is_an_empty_table() -> None:
    report = build_report([])
    assert (report.results, report.runs, report.table, report.recommendations) == ((), (), (), ())
    assert (report.groups, report.noise, answer(report)) == ((), (), "")
    assert T.recommendations_markdown(report) == ""
    summary = summary_markdown(report)
    assert "**Answer:**" not in summary and "## Recommendation" not in summary
    assert f"## Every measurement (seeds aggregated)\n\n{format_table([])}\n" in summary


def test_a_report_of_saved_files_equals_the_report_of_the_results(tmp_path: Path) -> None:
    runs = [
        *SWEEP,
        make_result("fp16-mixed", 3, status="diverged", error="nan\nmore", final_loss=math.nan, min_scale=2.0**-30),
        make_result("fp32", 4, rows=history(5), evals=eval_curve(3.0, math.nan)),
    ]
    for r in runs:
        r.save(tmp_path / "results" / f"{r.config['run_name']}.json")
    from_files, in_memory = build_report(load_sweep(tmp_path)), build_report(runs)
    assert from_files.table == in_memory.table and from_files.runs == in_memory.runs
    assert from_files.groups == in_memory.groups and from_files.noise == in_memory.noise
    assert from_files.recommendations == in_memory.recommendations
    assert summary_markdown(from_files) == summary_markdown(in_memory)


# --- why a precision fails or doesn't pay -----------------------------------------------------------

SLOW_CPU_PROFILE = {
    "step": 1, "wall_ms": 100.0, "device_type": "cpu",
    "busy_ms": {"matmul": 30.0, "elementwise": 40.0, "norm": 5.0, "optimizer": 5.0, "data_movement": 5.0},
    "gemms": [[512, 64, 65, "c10::BFloat16"]], "facts": {"device_type": "cpu", "device_name": "AVX2", "cpu_isa": ["avx2"]},
}  # fmt: skip
OVERFLOW = {"every": 1, "modules": ["fc"], "samples": [],
            "first_overflow": [{"step": 2, "module": "fc", "phase": "forward", "loss_scale": 1024.0}]}  # fmt: skip


def test_a_precision_that_does_not_pay_gets_ranked_causes_from_its_profile() -> None:
    fp32 = [
        make_result("fp32", s, tps=1000.0, eval_loss=2.0, profile={**SLOW_CPU_PROFILE, "gemms": []}) for s in (0, 1)
    ]
    bf16 = [make_result("bf16-mixed", s, tps=200.0, eval_loss=2.0, profile=SLOW_CPU_PROFILE) for s in (0, 1)]
    report = build_report([*fp32, *bf16])
    (why,) = report.why
    assert (why.precision, why.overflows) == ("bf16-mixed", ())
    assert why.causes[0] == "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"
    assert "70% of the step is outside matmuls: the model is too small to gain" in why.causes
    assert "## Why a precision fails or doesn't pay" in summary_markdown(report)
    assert why_markdown(report.why).splitlines()[:2] == ["**bf16-mixed**", f"- {why.causes[0]}"]
    plain = build_report([make_result("fp32"), make_result("bf16-mixed", tps=200.0)])
    assert plain.why == () and "## Why" not in summary_markdown(plain)  # nothing profiled: nothing claimed


def test_a_precision_that_skipped_steps_names_the_first_layer_to_overflow_and_the_way_out() -> None:
    fp16 = make_result("fp16-mixed", 0, skipped=3, headroom=OVERFLOW, eval_loss=2.0, tps=3000.0)
    healthy = make_result("fp16-mixed", 1, headroom={**OVERFLOW, "first_overflow": []}, eval_loss=2.0, tps=3000.0)
    report = build_report([make_result("fp32", 0), make_result("fp32", 1), fp16, healthy])
    (why,) = report.why
    assert why.overflows == (
        (
            "seed 0: `fc` overflowed fp16 first (forward, step 2): train in bf16-mixed (same exponent range as fp32, no "
            "loss scaling needed); or keep `fc` in fp32: run it inside `torch.autocast(device_type, enabled=False)` with "
            "its input cast to float32"
        ),
    )


def cuda_profile(data_movement_ms: float, **facts: Any) -> dict[str, Any]:
    """A GPU step of 100 ms, 60 in matmuls: only its data movement (dtype casts) varies."""
    busy = {"matmul": 60.0, "elementwise": 10.0, "data_movement": data_movement_ms}
    return {"step": 1, "wall_ms": 100.0, "device_type": "cuda", "busy_ms": busy, "gemms": [],
            **({"facts": {"device_type": "cuda", **facts}} if facts else {})}  # fmt: skip


def test_each_setting_is_diagnosed_from_its_own_runs_and_its_own_fp32_profile() -> None:
    a, b = {"lr": 0.01}, {"lr": 0.1}
    report = build_report([
        make_result("fp32", profile=cuda_profile(5.0, compute_capability=[8, 0]), **a),
        make_result("fp16-mixed", skipped=3, headroom=OVERFLOW, profile=cuda_profile(25.0, compute_capability=[8, 0]),
                    plan={"device_type": "cuda"}, **a),
        make_result("fp32", profile=cuda_profile(10.0), **b),
        make_result("fp16-mixed", profile=cuda_profile(25.0), **b),  # an older profile without machine facts
    ])  # fmt: skip
    first, second = report.why
    assert (first.setting, first.precision, second.setting, second.precision) == (
        "gpt-tiny lr=0.01", "fp16-mixed", "gpt-tiny lr=0.1", "fp16-mixed",
    )  # fmt: skip
    # the casts are measured against the same setting's fp32 step (5 ms there, 10 ms here)
    assert first.causes == ("dtype casts add 20% of the step (autocast copies)",)
    assert second.causes == ("dtype casts add 15% of the step (autocast copies)",)
    assert len(first.overflows) == 1 and first.overflows[0].startswith("seed 0: `fc` overflowed fp16 first")
    assert second.overflows == ()  # the other setting's overflow is not this one's
    assert why_markdown(report.why) == (
        f"**fp16-mixed** (gpt-tiny lr=0.01)\n- {first.causes[0]}\n- {first.overflows[0]}\n\n"
        f"**fp16-mixed** (gpt-tiny lr=0.1)\n- {second.causes[0]}"
    )
    summary = summary_markdown(report)
    assert f"\n\n## Why a precision fails or doesn't pay\n\n{why_markdown(report.why)}\n\n## " in summary


def test_a_fallback_is_diagnosed_as_the_precision_that_ran() -> None:
    cpu = {**SLOW_CPU_PROFILE, "gemms": []}
    fell_back = make_result("fp16-mixed", effective="fp32", reason="no fp16 on this CPU", profile=cpu)
    (why,) = build_report([make_result("fp32", profile=cpu), fell_back]).why
    assert why.causes == ("70% of the step is outside matmuls: the model is too small to gain",)  # not "no fp16"


@pytest.mark.parametrize(
    ("device", "capability", "bf16_suggested"),
    [
        ("cuda", [7, 5], False),  # a T4: no bf16, keep the layer in fp32 instead
        ("cuda", [8, 0], True),  # an A100, exactly the first with bf16
        ("cuda", [9, 0], True),
        ("cuda", None, True),  # capability not recorded: assumed recent
        ("cpu", None, True),
    ],
)
def test_the_way_out_of_an_overflow_suggests_bf16_only_where_the_device_has_it(
    device: str, capability: list[int] | None, bf16_suggested: bool
) -> None:
    facts = {"device_type": device, **({"compute_capability": capability} if capability else {})}
    fp16 = make_result(
        "fp16-mixed", skipped=2, headroom=OVERFLOW, plan={"device_type": device},
        profile={**SLOW_CPU_PROFILE, "device_type": device, "facts": facts},
    )  # fmt: skip
    (why,) = build_report([make_result("fp32"), fp16]).why
    (overflow,) = why.overflows
    assert overflow.startswith("seed 0: `fc` overflowed fp16 first (forward, step 2): ")
    assert ("train in bf16-mixed" in overflow) is bf16_suggested
    assert "keep `fc` in fp32" in overflow


def test_an_overflow_is_reported_for_a_diverged_run_but_not_for_a_run_that_skipped_nothing() -> None:
    diverged = make_result("fp16-mixed", 0, status="diverged", error="nan", headroom=OVERFLOW, eval_loss=None)
    recovered = make_result("fp16-mixed", 1, headroom=OVERFLOW)  # an overflow the scaler never had to skip for
    report = build_report([make_result("fp32", 0), make_result("fp32", 1), diverged, recovered])
    (why,) = report.why
    assert why.causes == () and [o.split(":")[0] for o in why.overflows] == ["seed 0"]


# --- runs over several processes: one row per precision and reduce dtype ------------------------------


def test_fsdp_rows_name_the_reduce_dtype_and_are_measured_against_fsdp_fp32() -> None:
    fsdp = {"parallelism": "fsdp", "nproc": 2}
    results = [
        make_result("fp32", tps=1000.0, plan={"reduce_dtype": "fp32"}, **fsdp, reduce_dtype="fp32"),
        make_result("bf16-mixed", tps=1500.0, plan={"reduce_dtype": "fp32"}, **fsdp, reduce_dtype="fp32"),
        make_result("bf16-mixed", tps=2000.0, plan={"reduce_dtype": "bf16"}, **fsdp, reduce_dtype="bf16"),
        make_result("fp32", tps=500.0),  # one process: a setting of its own
    ]
    rows = comparison_table(results)
    assert [(r.setting, r.requested) for r in rows] == [
        ("gpt-tiny nproc=2 parallelism='fsdp'", "fsdp fp32"),
        ("gpt-tiny nproc=2 parallelism='fsdp'", "fsdp bf16-mixed (reduce bf16)"),
        ("gpt-tiny nproc=2 parallelism='fsdp'", "fsdp bf16-mixed (reduce fp32)"),
        ("gpt-tiny nproc=None parallelism=None", "fp32"),
    ]
    assert [r.speedup.mean for r in rows] == [1.0, 2.0, 1.5, 1.0]  # against fsdp fp32, not the single process
    assert rows[0].is_baseline and not rows[1].is_baseline and rows[1].key.requested == "bf16-mixed"


def test_fsdp_rows_name_the_reduce_dtype_that_ran_else_the_configs() -> None:
    """The plan's reduce dtype is what ran (fp16 that fell back to bf16 reduced in bf16); a run whose notebook died
    has a plan of its precision alone, as the sweep writes it, so its config's reduce dtype puts it in its row."""
    fsdp = {"parallelism": "fsdp", "nproc": 2}

    def plan(precision: str, reduce: str, parallelism: str = "fsdp") -> dict[str, Any]:
        return resolve_precision(precision, Capabilities(), parallelism=parallelism, reduce_dtype=reduce).to_dict()

    results = [
        make_result("fp32", 0, plan=plan("fp32", "fp32"), **fsdp, reduce_dtype="fp32"),
        make_result("fp16-mixed", 0, plan=plan("fp16-mixed", "fp16"), **fsdp, reduce_dtype="fp16"),
        make_result("bf16-mixed", 0, plan=plan("bf16-mixed", "bf16"), **fsdp, reduce_dtype="bf16"),
        make_result("bf16-mixed", 1, status="failed", error="kernel died", plan=plan("bf16-mixed", "fp32", "none"),
                    **fsdp, reduce_dtype="bf16"),
    ]  # fmt: skip
    assert results[1].plan.effective == "bf16-mixed" and results[3].plan.reduce_dtype is None
    rows = comparison_table(results)
    assert [(r.requested, r.seeds, r.status) for r in rows] == [
        ("fsdp fp32", (0,), "ok"),
        ("fsdp fp16-mixed (reduce bf16)", (0,), "ok"),
        ("fsdp bf16-mixed (reduce bf16)", (0, 1), "ok×1, failed×1"),
    ]


# --- speed from the setting's interleaved timing ---------------------------------------------------------


def timing_of(config: dict[str, Any], ratios: list[float], base_ms: float = 10.0, **record: Any) -> RunResult:
    """A timing result of fp32 and bf16-mixed on `config`: one round per ratio (fp32's time over bf16's)."""
    blocks = [b for r, ratio in enumerate(ratios) for b in (TimingBlock(r, "fp32", 5, base_ms, 1.1),
                                                             TimingBlock(r, "bf16-mixed", 5, base_ms / ratio, 1.1))]  # fmt: skip
    timing = TimingRecord(("fp32", "bf16-mixed"), {"fp32": "fp32", "bf16-mixed": "bf16-mixed"}, tuple(blocks), 5,
                          20.0, 3.0, "decided", 0.05, 3.0, **record)  # fmt: skip
    return RunResult(config={**config, "run_name": "speed"}, plan={"requested": "fp32", "effective": "fp32"}, timing=timing)


def test_a_settings_interleaved_timing_decides_its_speed_whatever_its_training_runs_said() -> None:
    busy = {"concurrent_runs": 2}  # the training runs were timed two at a time: their throughput decides nothing
    runs = [*seeds("fp32", [2.0, 2.02, 1.98], tps=1000.0, plan=busy), *seeds("bf16-mixed", [2.0, 2.02, 1.98], tps=900.0, plan=busy)]
    ratios = [1.30, 1.28, 1.33, 1.31, 1.29]
    report = build_report([*runs, timing_of(runs[0].config, ratios)])
    fp32, bf16 = report.groups
    assert len(report.timings) == 1 and len(report.results) == 6  # the timing is no training run
    assert bf16.speed_source == "interleaved timing" and bf16.speed_verdict == "faster"
    assert bf16.speedup.mean == pytest.approx(math.exp(statistics.fmean(map(math.log, ratios))))  # geometric mean
    assert fp32.speed_reason == ""  # fp32's own busy runs matter only where the setting was not timed
    assert report.recommendations[0].precision == "bf16-mixed" and T._speed_verdict_cell(bf16) == "faster (timed)"
    assert "5 rounds of 5-step blocks" in D.timing_markdown(report)
    failed = build_report([*runs, replace(timing_of(runs[0].config, []), status="failed", error="no kernel")])
    assert failed.groups[1].speed_source == "training runs" and failed.groups[1].speed_verdict == "unreliable"
    assert "not timed (no kernel)" in D.timing_markdown(failed)


def test_a_timing_that_ran_out_of_budget_leaves_the_speed_undecided_and_says_what_to_do() -> None:
    runs = [*seeds("fp32", [2.0, 2.02, 1.98], tps=1000.0), *seeds("bf16-mixed", [2.0, 2.02, 1.98], tps=1000.0)]
    wobbly = timing_of(runs[0].config, [1.2, 0.9, 1.1, 0.95, 1.15])
    wobbly = replace(wobbly, timing=replace(wobbly.timing, stopped="budget", elapsed_s=20.4))
    report = build_report([*runs, wobbly])
    bf16 = report.groups[1]
    assert bf16.speed_verdict == "undecided" and bf16.speed_reason == (
        "undecided after 20 s of timing (budget 20 s): raise --speed-budget"
    )
    assert report.recommendations[0].stay_in_fp32
    assert "its speed was not decided" in answer(report) and "raise --speed-budget" in answer(report)


# --- optimizers as rows, emulated fp8, fp8 layer plans, the tracked memory split and energy ---------------


def optimizer_sweep(**fp32_kw: Any) -> list[RunResult]:
    """fp32 and bf16-mixed, each with adamw (20 MB of optimizer state) and adamw-8bit (5 MB), three seeds."""
    losses = [2.0, 2.02, 1.98]
    eight_bit = {"optimizer": "adamw-8bit", "metrics": {**SPLIT, "optimizer_memory_mb": 5.0}}
    return [
        *seeds("fp32", losses, tps=1000.0, metrics=SPLIT, **fp32_kw),
        *seeds("fp32", [v + 0.001 for v in losses], tps=990.0, **eight_bit),
        *seeds("bf16-mixed", losses, tps=1000.0, metrics=SPLIT),
        *seeds("bf16-mixed", losses, tps=1000.0, **eight_bit),
    ]


def test_each_optimizer_is_a_row_of_one_setting_judged_against_fp32_with_adamw() -> None:
    report = build_report(optimizer_sweep())
    assert [g.name for g in report.groups] == ["fp32", "fp32 adamw-8bit", "bf16-mixed", "bf16-mixed adamw-8bit"]
    assert len({g.setting for g in report.groups}) == 1 and len(report.noise) == 1
    base, fp32_8bit, bf16, bf16_8bit = report.groups
    assert base.is_baseline and not fp32_8bit.is_baseline
    assert fp32_8bit.key == RowKey("fp32", optimizer="adamw-8bit")
    assert fp32_8bit.verdict == R.MATCHES and fp32_8bit.compared == 3  # Holm over the three rows against fp32
    assert fp32_8bit.point_diff == pytest.approx(0.001)  # paired by seed with fp32 adamw
    assert (fp32_8bit.optimizer_saved_mb, bf16_8bit.optimizer_saved_mb, bf16.optimizer_saved_mb) == (15.0, 15.0, None)
    assert fp32_8bit.speed_source == bf16_8bit.speed_source == "training runs"  # no interleaved timing here
    memory = format_memory(report.groups, "markdown")
    assert "| optimizer state vs fp32 |" in memory.splitlines()[0]
    assert "| saves 15.00 MB (75%) |" in memory.splitlines()[3]  # fp32 adamw-8bit
    assert "fp32 adamw-8bit matches fp32 on quality" in answer(report)


def test_without_adamw_in_a_setting_its_first_optimizer_is_the_baseline() -> None:
    only_8bit = [r for r in optimizer_sweep() if r.optimizer == "adamw-8bit"]
    report = build_report(only_8bit)
    base, bf16 = report.groups
    assert base.name == "fp32 adamw-8bit" and base.is_baseline and bf16.verdict == R.MATCHES
    assert report.recommendations[0].baseline is base and bf16.optimizer_saved_mb is None
    assert "optimizer state vs fp32" not in format_memory(report.groups)  # no row of another optimizer


def test_results_from_before_the_optimizer_choice_are_adamw_rows() -> None:
    old = make_result("fp32")
    assert "optimizer" not in old.config and old.optimizer == "adamw" and old.row == RowKey("fp32")
    assert make_result("fp32", optimizer="AdamW8bit").row.label == "fp32 adamw-8bit"


def test_the_interleaved_timing_decides_the_speed_of_its_optimizers_rows_only() -> None:
    runs = optimizer_sweep()
    report = build_report([*runs, timing_of(runs[0].config, [1.30, 1.28, 1.33, 1.31, 1.29])])
    by_name = {g.name: g for g in report.groups}
    assert by_name["bf16-mixed"].speed_source == "interleaved timing" and by_name["bf16-mixed"].speed_verdict == "faster"
    assert by_name["bf16-mixed adamw-8bit"].speed_source == "training runs"
    assert report.recommendations[0].requested == "bf16-mixed"


def emulated(precision: str, losses: list[float], tps: float) -> list[RunResult]:
    return seeds(precision, losses, tps=tps, emulate_fp8=True, plan={"emulated": True, "fp8_layers": "all"})


def test_emulated_fp8_gets_a_quality_verdict_and_never_a_speed_one() -> None:
    losses = [2.0, 2.02, 1.98]
    runs = [*seeds("fp32", losses, tps=1000.0, emulate_fp8=True), *emulated("fp8-rowwise", losses, tps=5000.0)]
    fp32, fp8 = build_report(runs).groups
    assert fp8.name == "fp8-rowwise (emulated)" and fp8.emulated and not fp32.emulated
    assert fp8.verdict == R.MATCHES and fp8.eligible
    assert (fp8.speed_verdict, fp8.speedup, fp8.point_speedup) == ("emulated: no speed verdict", None, None)
    assert fp8.ttq is None and T._ttq_cell(fp8) == "—"  # time to quality is a speed, too
    report = build_report(runs)
    assert report.recommendations[0].stay_in_fp32  # five times the throughput, but emulated: never recommended
    assert T._speed_verdict_cell(fp8) == "emulated: no speed verdict" and T._speed_cell(fp8) == "—"
    assert "its speed needs fp8 hardware to measure" in answer(report)
    assert "emulated fp8 (no fp8 GEMMs on this device): a quality verdict only" in D.caveats_markdown(report)


def test_an_older_fp8_mixed_result_is_the_default_recipe_it_ran() -> None:
    old = make_result("fp8-mixed", effective="fp8-mixed")
    assert (old.requested, old.effective, old.label) == ("fp8-tensorwise", "fp8-tensorwise", "fp8-tensorwise")


def test_a_memtracker_split_adds_activations_and_temporaries_and_the_tensors_at_peak() -> None:
    from amp_lib.memtrack import MemorySplit

    split = MemorySplit("MemTracker", "cpu", peak_mb=30.0, parameters_mb=10.0, buffers_mb=0.0, gradients_mb=2.0,
                        optimizer_state_mb=12.0, activations_mb=4.0, temporaries_mb=1.5, other_mb=0.5)  # fmt: skip
    cpu = {"mem": 900.0, "metrics": {"param_memory_mb": 10.0, "grad_memory_mb": 2.0, "optimizer_memory_mb": 12.0,
                                     "peak_memory_kind": "cpu_rss"}}  # fmt: skip
    runs = [replace(make_result("fp32", s, **cpu), memory=split) for s in (0, 1)]
    (fp32,) = build_report(runs).groups
    m = fp32.memory
    assert (m.tracked, m.tensor_peak_mb, m.activations_mb, m.temporaries_mb, m.source) == (True, 30.0, 4.0, 2.0, "MemTracker")
    assert m.rest_mb == pytest.approx(900.0 - 10 - 2 - 12 - 4 - 2)  # the process beyond its tensors
    header, row = format_memory([fp32], "text").splitlines()
    assert header.startswith("precision") and "tensors at peak" in header and "activations" in header
    assert "rest (activations" not in header and row.split()[:4] == ["fp32", "900.0", "—", "30.0"]
    assert row.endswith("cpu_rss, MemTracker")  # measured as: the peak's kind, and where the split came from
    note = T.memory_note([fp32])
    assert note.startswith("CPU: the peak is the whole process's resident set; the tensors at peak are what MemTracker")
    counted = replace(split, source="tensor count (torchao's AdamW8bit runs its step through torch.compile)", peak_mb=None)
    (fallback,) = build_report([replace(make_result("fp32", **cpu), memory=counted)]).groups
    assert not fallback.memory.tracked and "split by tensor count (torchao's AdamW8bit" in T.memory_note([fallback])
    assert format_memory([fallback], "text").endswith("cpu_rss, tensor count")
