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
from factories import eval_curve, history, make_result

from amp_lib import report as R
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.report import (
    DEFAULT_TOLERANCE,
    Recommendation,
    Stat,
    SweepReport,
    base_precision,
    build_report,
    check_tolerance,
    comparison_table,
    format_memory,
    format_table,
    format_verdicts,
    recommend,
    recommendations,
    run_table,
    setting_labels,
    why_markdown,
)
from amp_lib.results import RunResult, load_sweep

THREE = [
    make_result("fp32", tps=1000, mem=200, eval_loss=2.0),
    make_result("fp16-mixed", tps=2500, mem=120, eval_loss=2.01, skipped=3, final_scale=32768.0, min_scale=1024.0),
    make_result("bf16", effective="bf16-mixed", tps=2000, mem=110, eval_loss=1.99),
]
# An fp16-mixed run as train() records it: one skipped step halved the scale from 2**16.
FP16_SCALED = {"skipped": 1, "final_scale": 32768.0, "min_scale": 32768.0, "rows": history(5, scaled=True, skip_at=2)}


def cells(row: R.Row) -> dict[str, str]:
    return {name: get(row) for name, get in R.COLUMNS}


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
    assert R._setting_key(make_result("fp16-mixed", 3, lr=1)) == (("lr", "1"), ("model", "'gpt-tiny'"))


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
    assert R._order("fp32") == 0 and R._order("nope") == len(R.CANONICAL)
    assert R._canonical("16") == "fp16-mixed" and R._canonical("nope") == "nope"


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
    empty = R.Row(*(["s", "fp32", "fp32", "ok", 0, 0, (), (), "tokens"] + [None] * 12))
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
    assert R._status([make_result("fp32", status="oom"), make_result("fp32", status="failed")]) == "failed×1, oom×1"
    c = build_report(runs).comparisons[1]  # the verdict table names them the same way
    assert (c.effective, c.fallback_reason) == ("bf16-mixed, fp16-mixed", "no fast fp16; slow")
    assert R._status([make_result("fp32", status="oom")] * 2) == "oom"


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
    assert rec.stay_in_fp32 and "loss became nan" in rec.reason


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
    assert cells(R.Row(*(["s", "x", None, "ok", 1, 1, (), ("r",), "t"] + [None] * 12)))["effective"] == "?"
    assert R._ratio(2.0, 0.0) is None and R._ratio(None, 2.0) is None and R._ratio(3.0, 2.0) == 1.5


# --- Stat ----------------------------------------------------------------------------------------


def test_stat_drops_missing_and_non_finite_values() -> None:
    assert Stat.of([]) is None
    assert Stat.of([None, math.inf, -math.inf, math.nan]) is None
    assert Stat.of([3]) == Stat(3.0, None, 1) and type(Stat.of([3]).mean) is float
    assert Stat.of([1, None, 2, math.inf, 6]) == Stat(3.0, pytest.approx(2.6457513), 3)
    assert Stat.of([True, 4.0]) == Stat(4.0)  # a bool is not a measurement
    assert Stat(1.0).std is None and Stat(1.0).n == 1


def test_stat_format_keeps_the_sign_on_the_mean_only() -> None:
    assert Stat(0.05, 0.0707, 2).format("+.4f") == "+0.0500 ± 0.0707"
    assert Stat(-0.5).format("+.2f", "x") == "-0.50x"
    assert Stat(1234.5, 10.0, 2).format(",.0f", " tokens") == "1,234 ± 10 tokens"
    assert Stat.of([2.0]).format(".2f", "x") == "2.00x"
    assert Stat.of([1.0, 3.0]).format(".3g") == "2 ± 1.41"


def test_stat_default_format_is_four_significant_digits_lowercase() -> None:
    assert Stat(2.0).format() == "2"
    assert Stat(12345678.0).format() == "1.235e+07"
    assert Stat(12345678.0, 0.5, 2).format(suffix=" s") == "1.235e+07 ± 0.5 s"


# --- formatting ----------------------------------------------------------------------------------


def test_golden_comparison_table_of_three_precisions(golden) -> None:
    rows = comparison_table(THREE)
    md = format_table(rows)
    assert md == format_table(rows, "markdown")  # markdown is the default
    golden("comparison_three.md", md)
    text = format_table(rows, "text")
    golden("comparison_three.txt", text)
    # columns padded to the widest cell, two spaces apart, no trailing blanks
    assert all(line == line.rstrip() for line in text.splitlines()) and len(text.splitlines()) == 4
    html = format_table(rows, "html")
    golden("comparison_three.html", html)
    assert html.count("</tr><tr>") == 2 and "\n" not in html


def test_table_shows_failed_runs_and_every_column() -> None:
    runs = [
        make_result("fp32"),
        make_result("fp16-mixed", tps=900, **FP16_SCALED),
        make_result("bf16-true", status="oom", error="out of memory: CUDA\nmore", tps=None, eval_loss=None),
    ]
    rows = run_table(runs)
    assert [(r.requested, r.status) for r in rows] == [("fp32", "ok"), ("fp16-mixed", "ok"), ("bf16-true", "oom")]
    md = format_table(rows, "markdown")
    header = md.splitlines()[0]
    assert header == "| " + " | ".join(name for name, _ in R.COLUMNS[1:]) + " |"  # one setting: no setting column
    assert md.splitlines()[1] == "|" + "---|" * (len(R.COLUMNS) - 1)
    assert "| oom |" in md and "out of memory: CUDA |" in md and "more" not in md
    assert "| 1 | 3.28e+04 | 3.28e+04 |" in md  # fp16 skipped steps and loss scales
    html = format_table(rows, "html")
    assert html.startswith("<table") and "<td>oom</td>" in html
    with pytest.raises(ValueError, match=r"^invalid fmt 'csv'; valid: markdown, html, text$"):
        format_table(rows, "csv")


def test_markdown_and_html_escape_cell_text() -> None:
    runs = [make_result("fp32"), make_result("fp16-mixed", status="failed", error="a|b <c>\nsecond line")]
    rows = run_table(runs)
    md = format_table(rows)
    assert md.splitlines()[-1].endswith("| a\\|b <c> |")
    assert "<td>a|b &lt;c&gt;</td>" in format_table(rows, "html")
    assert "a|b <c>" in format_table(rows, "text")  # plain text is shown as it is


def test_markdown_cells_stay_on_one_line() -> None:
    rows = run_table([make_result("fp32", run_name="two\nlines")])
    assert format_table(rows).splitlines()[-1].startswith("| fp32 | fp32 | ok | two lines |")


def test_table_with_several_settings_shows_the_setting_column() -> None:
    rows = comparison_table([make_result("fp32", lr=1), make_result("fp32", lr=2, unit="samples", tps=5.0)])
    text = format_table(rows, "text").splitlines()
    assert text[0].startswith("setting        requested")
    assert text[2].startswith("gpt-tiny lr=2  fp32") and "5 samples" in text[2]
    assert format_table(rows).startswith("| setting | requested |")
    assert "<th>setting</th>" in format_table(rows, "html")


def test_an_empty_table_is_its_header() -> None:
    header = " | ".join(name for name, _ in R.COLUMNS[1:])
    assert format_table([]) == f"| {header} |\n|" + "---|" * 15
    assert format_table([], "text").startswith("requested  effective  status  run")
    assert format_table([], "html").endswith("</tr></thead><tbody></tbody></table>")


# --- statistics: t quantiles and intervals -------------------------------------------------------


def seeds(precision: str, values: list[float], *, what: str = "eval_loss", **kw: Any) -> list[RunResult]:
    """One result per seed 0, 1, 2...: `values` are the eval losses (or, with what="tps", throughputs)."""
    return [make_result(precision, seed, **{what: value}, **kw) for seed, value in enumerate(values)]


def comparison(results: list[RunResult], precision: str, tolerance: float = DEFAULT_TOLERANCE) -> R.Comparison:
    comparisons, _ = R.compare(results, tolerance)
    return next(c for c in comparisons if c.requested == precision)


def test_t_quantiles_come_from_the_table_rounding_df_down() -> None:
    assert R.t_quantile(1) == 12.706 and R.t_quantile(2) == 4.303 and R.t_quantile(30) == 2.042
    assert R.t_quantile(2.9) == 4.303  # a Welch df between rows takes the lower row: a wider interval
    assert R.t_quantile(35) == 2.042 and R.t_quantile(60) == 2.000 and R.t_quantile(1e6) == 1.980
    assert R.t_quantile(math.inf) == 1.960
    with pytest.raises(ValueError, match=r"^degrees of freedom must be >= 1, got 0\.5$"):
        R.t_quantile(0.5)


def test_difference_interval_pairs_by_seed_else_welch_else_none() -> None:
    paired = R.difference_interval([(0, 2.01), (1, 2.05), (2, 1.99)], [(0, 2.00), (1, 2.02), (2, 1.98)])
    half = 4.303 * statistics.stdev([0.01, 0.03, 0.01]) / math.sqrt(3)
    mean = 0.05 / 3
    assert paired == R.Interval(
        pytest.approx(mean), pytest.approx(mean - half), pytest.approx(mean + half), 3, "paired"
    )
    assert paired.half_width == pytest.approx(half)
    # no seed in common: Welch, with Welch-Satterthwaite df 1.47 rounded down to 1
    welch = R.difference_interval([(5, 2.1), (6, 2.14)], [(0, 2.0), (1, 2.02)])
    assert (welch.method, welch.n) == ("Welch", 2) and welch.mean == pytest.approx(0.11)
    assert welch.half_width == pytest.approx(12.706 * math.sqrt(0.0008 / 2 + 0.0002 / 2))
    # unequal groups: df = (sa + sb)^2 / (sa^2 / (na - 1) + sb^2 / (nb - 1)), s = variance / n: 5.06 here, so t(5)
    xs, ys = [2.0, 2.1, 2.2, 2.3, 2.4, 2.5], [2.0, 2.01, 2.02]
    sa, sb = statistics.variance(xs) / 6, statistics.variance(ys) / 3
    df = (sa + sb) ** 2 / (sa**2 / 5 + sb**2 / 2)
    assert 5 < df < 6
    unequal = R.difference_interval(list(enumerate(xs, 10)), list(enumerate(ys)))
    assert unequal.half_width == pytest.approx(2.571 * math.sqrt(sa + sb)) and unequal.n == 3
    # one value on a side: no noise estimate, so no interval; a seed that ran twice, or None, never pairs
    assert R.difference_interval([(0, 2.0)], [(0, 2.0), (1, 2.1)]) is None
    assert R.difference_interval([(0, 2.0), (1, math.nan)], [(0, 2.0), (1, 2.1)]) is None
    dup = R.difference_interval([(0, 2.0), (0, 2.2), (None, 2.1)], [(0, 2.0), (None, 2.0)])
    assert dup is not None and dup.method == "Welch"  # 3 vs 2 values, nothing paired


def test_ratio_interval_pairs_ratios_else_combines_relative_spreads() -> None:
    paired = R.ratio_interval([(0, 2000.0), (1, 2100.0), (2, 1900.0)], [(0, 1000.0)] * 1 + [(1, 1000.0), (2, 1000.0)])
    assert paired.method == "paired" and paired.mean == pytest.approx(2.0)
    assert paired.half_width == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    welch = R.ratio_interval([(5, 2000.0), (6, 2000.0)], [(0, 1000.0), (1, 1000.0)])
    assert (welch.mean, welch.low, welch.high, welch.method) == (2.0, 2.0, 2.0, "Welch")  # no spread at all
    spread = R.ratio_interval([(5, 1800.0), (6, 2200.0)], [(0, 1000.0), (1, 1000.0)])
    assert spread.mean == pytest.approx(2.0) and spread.half_width == pytest.approx(
        2.0 * 12.706 * math.sqrt(0.08 / 4 / 2)
    )
    assert R.ratio_interval([(0, 2000.0)], [(0, 1000.0), (1, 1000.0)]) is None
    assert R.ratio_interval([(0, 2000.0), (1, 0.0)], [(0, 1000.0), (1, 1000.0)]) is None  # a zero throughput is no rate
    assert R.ratio_interval([(0, 2000.0), (1, 2000.0)], [(0, 1000.0), (1, 0.0)]) is None  # on either side


def test_runs_slower_than_one_item_per_second_still_get_a_speed_up() -> None:
    slow = R.ratio_interval([(0, 0.5), (1, 0.6)], [(0, 0.25), (1, 0.3)])  # a big model: samples per second < 1
    assert slow.method == "paired" and slow.mean == pytest.approx(2.0)
    c = comparison(
        [*seeds("fp32", [0.25, 0.3], what="tps"), *seeds("bf16-mixed", [0.5, 0.6], what="tps")], "bf16-mixed"
    )
    assert c.point_speedup == pytest.approx(2.0) and c.speedup.mean == pytest.approx(2.0)
    zero = comparison(
        [*seeds("fp32", [0.0, 0.0], what="tps"), *seeds("bf16-mixed", [9.0, 9.0], what="tps")], "bf16-mixed"
    )
    assert (zero.speedup, zero.point_speedup, zero.speed_verdict) == (None, None, "—")  # nothing to divide by


def test_interval_format_puts_the_suffix_on_every_number() -> None:
    assert R.Interval(1.5, 1.25, 1.75, 3, "paired").format(".2f", "x") == "1.50x [1.25x, 1.75x]"
    assert R.Interval(0.01, -0.02, 0.04, 3, "paired").format() == "+0.0100 [-0.0200, +0.0400]"


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
        (-0.10, -0.04, R.INCONCLUSIVE),  # touches -tolerance: not wholly below it
        (-0.10, -0.0401, R.BETTER),
        (-0.06, 0.0, R.INCONCLUSIVE),  # straddles the lower edge
        (-0.04, 0.04, R.MATCHES),
    ],
)
def test_worse_and_better_need_the_whole_interval_beyond_the_band(low: float, high: float, verdict: str) -> None:
    interval = R.Interval((low + high) / 2, low, high, 3, "paired")
    assert R._quality_verdict(interval, interval.mean, 0.04, 2.0) == verdict


def test_one_seed_has_no_noise_estimate_and_is_not_judged() -> None:
    runs = [make_result("fp32", eval_loss=2.0), make_result("bf16-mixed", eval_loss=2.5)]
    report = build_report(runs)
    c = report.comparisons[1]
    assert c.loss_diff is None and c.point_diff == pytest.approx(0.5) and c.verdict == R.INCONCLUSIVE
    assert report.noise[0].format() == "fp32 best eval loss 2.0000: no noise estimate (one seed)"
    assert report.noise[0].half_width is None
    table = format_verdicts(report.comparisons, report.noise, "text")
    assert "+0.5000 (one seed)" in table and "no noise estimate (one seed)" in table
    # one seed of the precision against three of fp32 is no better: nothing to pair, nothing for Welch
    assert comparison([*FP32, make_result("bf16-mixed", 0, eval_loss=2.5)], "bf16-mixed").verdict == R.INCONCLUSIVE
    assert "With one seed on either side there is no noise estimate" in report.rules_markdown()


def test_without_an_eval_loss_there_is_nothing_to_judge() -> None:
    report = build_report([*seeds("fp32", [2.0, 2.1]), make_result("bf16-mixed", eval_loss=None)])
    assert report.comparisons[1].verdict == "no fp32 baseline" and report.comparisons[1].point_diff is None
    assert report.recommendations[0].reason == "stay in fp32: bf16-mixed has no eval loss to compare with fp32"
    missing = build_report([make_result("bf16-mixed")]).noise[0]
    assert missing.format() == "no fp32 baseline (missing)" and missing.tolerance_abs is None
    failed = build_report([make_result("fp32", status="oom"), make_result("fp32", 1, status="failed")]).noise[0]
    assert failed.format() == "no fp32 baseline (failed×1, oom×1)"


def test_any_failed_seed_makes_the_verdict_diverged_failed() -> None:
    runs = [*FP32, *seeds("fp16-mixed", [2.0, 2.0]), make_result("fp16-mixed", 2, status="diverged", error="nan\nx")]
    c = comparison(runs, "fp16-mixed")
    assert c.verdict == "diverged/failed" and c.status == "ok×2, diverged×1" and c.error == "nan"
    assert c.best_eval_loss.n == 2  # the diverged seed's loss is no measurement


def test_the_noise_floor_is_fp32s_spread_and_interval() -> None:
    report = build_report([*FP32, *seeds("bf16-mixed", [2.0, 2.0, 2.0])])
    (floor,) = report.noise
    assert floor.best_eval_loss == Stat(pytest.approx(2.0), pytest.approx(0.02), 3)
    assert floor.half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert floor.tolerance_abs == pytest.approx(0.04)
    assert floor.format() == "fp32 best eval loss 2.0000, std 0.0200 over 3 seeds (95% CI ±0.0497)"
    assert R._noise_cell(report.comparisons[1], {floor.setting: floor}) == "std 0.0200, CI ±0.0497"
    assert report.comparisons[0].is_baseline and report.comparisons[0].loss_diff is None


def test_best_eval_loss_is_the_curves_minimum_else_the_recorded_best_else_the_final_eval() -> None:
    curve = make_result("fp32", evals=eval_curve(3.0, 1.5, 1.7), eval_loss=1.7, metrics={"best_eval_loss": 9.0})
    assert R.best_eval_loss(curve) == 1.5  # the curve wins over a stored figure
    assert R.best_eval_loss(make_result("fp32", eval_loss=2.2, steps=40, metrics={"best_eval_loss": 2.1})) == 2.1
    assert R.best_eval_loss(make_result("fp32", eval_loss=2.2)) == 2.2
    assert R.best_eval_loss(make_result("fp32", eval_loss=None)) is None
    assert R.best_eval_loss(make_result("fp32", evals=eval_curve(None, math.nan), eval_loss=2.2)) == 2.2


# --- speed verdicts -----------------------------------------------------------------------------


def test_faster_needs_the_whole_interval_above_the_margin() -> None:
    base = seeds("fp32", [1000.0] * 3, what="tps")
    fast = comparison([*base, *seeds("bf16-mixed", [2000.0, 2100.0, 1900.0], what="tps")], "bf16-mixed")
    assert fast.speed_verdict == "faster" and fast.speedup.low > 1.05 and fast.speed_reason == ""
    at_margin = comparison([*base, *seeds("bf16-mixed", [1050.0] * 3, what="tps")], "bf16-mixed")
    assert at_margin.speedup.low == 1.05 and at_margin.speed_verdict == "no measurable gain"  # above, not at
    slight = comparison([*base, *seeds("bf16-mixed", [1000.0, 1200.0, 1100.0], what="tps")], "bf16-mixed")
    assert slight.speed_verdict == "no measurable gain" and slight.speedup.mean == pytest.approx(1.1)
    assert slight.speed_reason == "interval reaches below 1.05x"
    assert R._speed_verdict_cell(slight) == "no measurable gain"
    one = comparison([make_result("fp32"), make_result("bf16-mixed", tps=3000.0)], "bf16-mixed")
    assert (one.speedup, one.point_speedup, one.speed_verdict) == (None, 3.0, "no measurable gain")
    assert R._speed_verdict_cell(one) == "no measurable gain (one seed: no interval)"
    assert R._speed_cell(one) == "3.00x (one seed)"
    none = comparison([make_result("fp32"), make_result("bf16-mixed", tps=None)], "bf16-mixed")
    assert (none.speed_verdict, none.speed_reason, R._speed_cell(none)) == ("—", "no throughput to compare", "—")


def test_timings_in_parallel_or_with_a_wide_spread_are_unreliable() -> None:
    parallel = make_result("fp32", 0, plan={"concurrent_runs": 2})
    assert R.timing_problems(parallel) == ["timed while 2 runs trained at once on one machine"]
    wide = make_result("bf16-mixed", 1, metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 20.0})
    assert R.timing_problems(wide) == ["step times spread 2.0x from p10 to p90 (limit 1.5x)"]
    edge = make_result(
        "fp32", metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 15.0}, plan={"concurrent_runs": 1}
    )
    assert R.timing_problems(edge) == []  # exactly at the limit, and one run at a time, is fine
    assert R.timing_problems(make_result("fp32", plan={"concurrent_runs": True})) == []
    runs = [
        parallel,
        *seeds("fp32", [1000.0] * 3, what="tps")[1:],
        *seeds("bf16-mixed", [2000.0, 2100.0, 1900.0], what="tps"),
    ]
    c = comparison(runs, "bf16-mixed")
    assert c.speed_verdict == "unreliable" and c.speed_reason == "timed while 2 runs trained at once on one machine"
    runs[4] = make_result("bf16-mixed", 1, tps=2100.0, metrics={"step_time_ms_p10": 10.0, "step_time_ms_p90": 20.0})
    assert R._ttq_speedup_cell(c) == "—"  # no eval curves: no time to quality to mark
    timed = [make_result(r.config["precision"], r.config["seed"], tps=r.metrics.items_per_s, plan=r.plan,
                         evals=eval_curve(3.0, 2.0, 2.0)) for r in runs]  # fmt: skip
    timed_report = build_report(timed)
    # the time-to-quality speed-up is wall time too: fp32's and bf16's carry the mark
    assert [R._ttq_speedup_cell(x) for x in timed_report.comparisons] == ["1.00x (timing unreliable)"] * 2
    assert comparison(runs, "bf16-mixed").speed_reason == (
        "bf16-mixed seed 1: step times spread 2.0x from p10 to p90 (limit 1.5x); "
        "timed while 2 runs trained at once on one machine"
    )


def test_the_verdict_table_says_whose_timing_is_unreliable() -> None:
    busy = make_result(
        "fp32", plan={"concurrent_runs": 2}, metrics={"step_time_ms_p10": 0.4, "step_time_ms_p90": 0.8}
    )  # sub-millisecond steps are timed like any other
    fp32, bf16 = build_report([busy, make_result("bf16-mixed", tps=3000.0)]).comparisons
    assert (fp32.speed_verdict, fp32.point_speedup, R._speed_cell(fp32)) == ("baseline", 1.0, "1.00x")
    assert R._speed_verdict_cell(fp32) == (
        "timing unreliable: timed while 2 runs trained at once on one machine; "
        "step times spread 2.0x from p10 to p90 (limit 1.5x)"
    )
    assert R._speed_verdict_cell(bf16) == (
        "unreliable: timed while 2 runs trained at once on one machine; "
        "fp32 seed 0: step times spread 2.0x from p10 to p90 (limit 1.5x)"
    )


def test_timings_that_drift_between_the_halves_of_a_run_are_unreliable() -> None:
    from factories import history

    def timed(*ms: float) -> RunResult:
        rows = tuple(replace(r, step_time_ms=t) for r, t in zip(history(len(ms)), ms))
        return make_result("fp32", rows=rows)

    assert R.step_time_drift(timed(10.0, 10.0, 14.0, 14.0)) == pytest.approx(1.4)
    assert R.timing_problems(timed(10.0, 10.0, 14.0, 14.0)) == [
        "step times drifted 1.40x from the first to the second half of the timed steps"
    ]
    assert R.timing_problems(timed(14.0, 14.0, 10.0, 10.0)) == [  # a machine that got quieter drifted too
        "step times drifted 0.71x from the first to the second half of the timed steps"
    ]
    assert R.timing_problems(timed(10.0, 10.0, 12.5, 12.5)) == []  # exactly at the limit
    assert R.step_time_drift(timed(10.0, 10.0, 30.0)) is None  # too few timed steps to split
    warm = replace(
        timed(10.0, 10.0, 10.0, 10.0),
        history=(replace(history(1)[0], step_time_ms=None), *timed(10.0, 10.0, 10.0, 10.0).history),
    )
    assert R.step_time_drift(warm) == 1.0  # untimed warm-up steps are left out
    assert R.step_time_drift(timed(0.0, 0.0, 10.0, 10.0, 10.0, 10.0)) == 1.0  # and so are steps timed as zero
    assert R.step_time_drift(timed(0.4, 0.4, 0.8, 0.8)) == 2.0  # sub-millisecond steps count
    assert R.step_time_drift(timed(10.0, 10.0, 10.0, 10.0, 20.0, 30.0)) == 2.0  # median of each half: 20 / 10


def test_an_unreliable_speed_figure_never_decides_the_recommendation() -> None:
    runs = [
        *seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0, plan={"concurrent_runs": 2}),
        *seeds("bf16-mixed", [2.0, 2.0, 2.0], tps=3000.0, plan={"concurrent_runs": 2}),
    ]
    report = build_report(runs)
    (rec,) = report.recommendations
    assert rec.stay_in_fp32 and report.comparisons[1].verdict == "matches fp32"
    assert rec.reason == (
        "stay in fp32: bf16-mixed matches fp32, but its speed figure is unreliable "
        "(timed while 2 runs trained at once on one machine)"
    )
    assert report.answer().startswith("Stay in fp32: no other precision was shown")


# --- time to quality -----------------------------------------------------------------------------


def ttq_runs() -> list[RunResult]:
    fp32 = [make_result("fp32", s, evals=eval_curve(3.0, 2.5, 2.0)) for s in range(3)]  # best 2.0: target 2.04
    bf16 = [make_result("bf16-mixed", s, evals=eval_curve(3.0, 2.03, 2.0, step_s=0.05)) for s in range(3)]
    fp16 = [make_result("fp16-mixed", s, evals=eval_curve(3.0, 2.6, 2.3)) for s in range(3)]
    tf32 = [make_result("tf32", 0, evals=eval_curve(2.5, 2.04, 2.0))]
    tf32 += [make_result("tf32", s, evals=eval_curve(2.5, 2.2, 2.1)) for s in (1, 2)]
    return fp32 + bf16 + fp16 + tf32


def test_time_to_quality_from_eval_curves_including_never_reached() -> None:
    report = build_report(ttq_runs())
    ttq = {c.requested: c.ttq for c in report.comparisons}
    assert ttq["fp32"].target == pytest.approx(2.04)  # fp32's mean best eval loss + the 2% tolerance
    assert (ttq["fp32"].time_s, ttq["fp32"].steps, ttq["fp32"].speedup) == (Stat(3.0, 0.0, 3), Stat(30.0, 0.0, 3), 1.0)
    assert (ttq["bf16-mixed"].time_s.mean, ttq["bf16-mixed"].steps.mean) == (1.0, 20.0)
    assert ttq["bf16-mixed"].speedup == pytest.approx(3.0)  # fp32's 3 s to the target over bf16's 1 s
    never = ttq["fp16-mixed"]
    assert (never.reached, never.runs, never.horizon, never.speedup) == (0, 3, 30, None)
    assert never.format() == "never reached in 30 steps"
    part = ttq["tf32"]  # 2.04 itself counts as reached
    assert (part.reached, part.runs, part.speedup) == (1, 3, None)
    assert part.format() == "2 s, 20 steps (1 of 3 seeds; the rest never in 30 steps)"
    assert ttq["bf16-mixed"].format() == "1 ± 0 s, 20 ± 0 steps"
    cells_ = format_verdicts(report.comparisons, report.noise, "text")
    assert "never reached in 30 steps" in cells_ and "3.00x" in cells_
    assert R._ttq_speedup_cell(report.comparisons[2]) == "—"


def test_time_to_quality_edge_cases() -> None:
    # tolerance 0: the target is fp32's best eval loss itself
    assert build_report(ttq_runs(), 0).comparisons[0].ttq.target == 2.0
    # an fp32 seed that never reaches fp32's mean quality leaves no reference time: no speed-up anywhere
    spread = [make_result("fp32", 0, evals=eval_curve(3.0, 1.8)), make_result("fp32", 1, evals=eval_curve(3.0, 2.2)),
              make_result("bf16-mixed", 0, evals=eval_curve(3.0, 1.8))]  # fmt: skip
    fp32, bf16 = build_report(spread).comparisons
    assert (fp32.ttq.reached, fp32.ttq.runs, fp32.ttq.speedup, bf16.ttq.speedup) == (1, 2, None, None)
    # a precision already at the target when the clock started has no finite speed-up
    instant = [*ttq_runs()[:3], make_result("bf16-mixed", 0, evals=eval_curve(2.0, step_s=0.0))]
    assert build_report(instant).comparisons[1].ttq.speedup is None
    long = R.TimeToQuality(2.0, 1, 1, Stat(3000.0), Stat(1500.0), 3000, None)
    assert long.format() == "1.5e+03 s, 3000 steps"


def test_results_without_eval_curves_count_the_final_eval_at_the_last_step() -> None:
    old = make_result("fp32", eval_loss=2.0, steps=40, metrics={"train_time_s": 5.0})
    assert R.eval_curve(old) == [(40, 2.0, 5.0)]
    assert R.eval_curve(make_result("fp32", eval_loss=2.0, rows=history(5))) == [(5, 2.0, None)]
    assert R.eval_curve(make_result("fp32", eval_loss=None)) == []
    assert R.eval_curve(make_result("fp32", evals=eval_curve(None), eval_loss=2.0, steps=40)) == []  # none finite
    assert R.first_reach(old, 2.0) == (40, 5.0) and R.first_reach(old, 1.99) is None
    report = build_report([make_result("fp32", 0, steps=40), make_result("bf16-mixed", 0, steps=40)])
    ttq = report.comparisons[1].ttq
    assert (ttq.reached, ttq.time_s, ttq.steps, ttq.speedup) == (1, None, Stat(40.0), None)  # untimed: no speed-up
    assert ttq.format() == "—, 40 steps"


# --- memory split -------------------------------------------------------------------------------

SPLIT = {"param_memory_mb": 10.0, "grad_memory_mb": 10.0, "optimizer_memory_mb": 20.0}


def test_memory_split_is_tensor_sizes_and_the_rest_of_the_peak() -> None:
    runs = [
        make_result("fp32", 0, mem=200.0, metrics={**SPLIT, "peak_memory_kind": "cuda_allocated"}),
        make_result("fp32", 1, mem=220.0, metrics={**SPLIT, "peak_memory_kind": "cuda_allocated"}),
        make_result("bf16-mixed", mem=150.0),  # no split recorded
    ]
    fp32, bf16 = build_report(runs).comparisons
    assert (fp32.memory.peak_mb, fp32.memory.rest_mb, fp32.memory.kind, fp32.memory.note) == (
        210.0,
        170.0,
        "cuda_allocated",
        "",
    )
    assert bf16.memory.rest_mb is None and bf16.memory.kind is None
    text = format_memory([fp32, bf16], "text").splitlines()
    assert text[1].split() == ["fp32", "210.0", "10.0", "10.0", "20.0", "170.0", "cuda_allocated"]
    assert text[2].split() == ["bf16-mixed", "150.0", "—", "—", "—", "—", "?"]
    assert R.memory_note([fp32, bf16]) == ""


def test_on_a_cpu_the_report_says_the_peak_is_the_whole_process() -> None:
    cpu: dict[str, Any] = {"mem": 900.0, "metrics": {**SPLIT, "peak_memory_kind": "cpu_rss"}}
    report = build_report([make_result("fp32", **cpu)])
    note = "CPU: the peak is the whole process's resident set, so the rest is mostly the Python process"
    assert report.comparisons[0].memory.note == note and R.memory_note(report.comparisons) == note
    assert report.memory_markdown().endswith(f"\n\n_{note}_")
    assert build_report([make_result("fp32", status="oom")]).comparisons[0].memory is None  # no ok run, no split
    failed_first = build_report([make_result("fp32", status="oom"), make_result("bf16-mixed", 0, **cpu)])
    assert R.memory_note(failed_first.comparisons) == note
    mixed = build_report([make_result("fp32", 0, **cpu), make_result("fp32", 1, metrics={"peak_memory_kind": "x"})])
    assert mixed.comparisons[0].memory.kind == "cpu_rss, x"  # seeds measured differently say so


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
    assert rec.reason == (
        "matches fp32 in best eval loss (Δ +0.0000 [+0.0000, +0.0000]) and faster: 1.80x [1.55x, 2.05x] fp32 throughput"
    )
    assert report.answer() == (
        "Train in bf16-mixed: it matches fp32's best eval loss and is 1.80x as fast (95% CI 1.55–2.05x)."
    )
    assert rec.evidence[2].startswith(
        "fp16-mixed, ok, quality worse by +0.2100 (+10.5%) (Δ +0.2100 [+0.1852, +0.2348])"
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
    assert rec.reason.startswith("better in best eval loss (Δ -0.2000 [-0.2000, -0.2000]) and faster: 2.00x")
    assert rec.reason.endswith(" (request 'fp16-mixed'; it runs as bf16-mixed: no fast fp16)")
    assert report.comparisons[1].name == "fp16-mixed (ran as bf16-mixed)" and report.comparisons[1].verdict == "better"
    assert report.answer().startswith("Train in fp16-mixed: it reaches a better best eval loss than fp32 and is 2.00x")


def test_the_answer_quotes_the_time_to_quality_speed_up() -> None:
    runs = [make_result(r.config["precision"], r.config["seed"], evals=r.evals, eval_loss=2.0, tps=t)
            for r, t in zip(ttq_runs()[:6], [1000.0] * 3 + [2000.0, 2100.0, 1900.0])]  # fmt: skip
    report = build_report(runs)
    assert report.answer() == (
        "Train in bf16-mixed: it matches fp32's best eval loss and is 2.00x as fast (95% CI 1.75–2.25x),"
        " reaching fp32's quality 3.00x sooner."
    )
    assert report.recommendations[0].reason.endswith("; reaches fp32's quality 3.00x sooner")


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
    assert rec.reason == "stay in fp32: " + "; ".join(  # noqa: FLY002
        [
            "tf32 (ran as fp32) runs as fp32 on this machine (no fallback reason recorded)",
            "fp16-mixed is not safe: diverged×1, oom×1: loss became nan",
            "bf16-mixed matches fp32, but shows no measurable gain in speed (1.00x [0.98x, 1.02x])",
            (
                "fp16-true: quality inconclusive — run more seeds (Δ best eval loss +0.0167 [-0.0120, +0.0454];"
                " its interval is wider than the tolerance or straddles its edge)"
            ),
            "bf16-true is worse by +0.2100 (+10.5%) in best eval loss (Δ +0.2100 [+0.1852, +0.2348], tolerance ±0.0400)",
            "fp8-mixed matches fp32, but has no throughput to compare with fp32",
        ]
    )


def test_no_measurable_gain_and_one_seed_are_reasons_to_stay() -> None:
    runs = [*seeds("fp32", [2.0, 2.0, 2.0], tps=1000.0), *seeds("bf16-mixed", [1000.0, 1200.0, 1100.0], what="tps")]
    assert recommend(runs).reason == (
        "stay in fp32: bf16-mixed matches fp32, but shows no measurable gain in speed (1.10x [0.85x, 1.35x])"
    )
    oom = recommend([make_result("fp32"), make_result("bf16-mixed", status="oom")])  # no error line recorded
    assert oom.reason == "stay in fp32: bf16-mixed is not safe: oom"
    one = recommend([make_result("fp32"), make_result("bf16-mixed", tps=3000.0)])
    assert one.reason == (
        "stay in fp32: bf16-mixed: quality inconclusive — run more seeds (Δ best eval loss +0.0000 (one seed);"
        " no noise estimate (one seed))"
    )


def test_fp32_alone_missing_or_failed() -> None:
    alone = recommend(seeds("fp32", [2.0, 2.1]))
    assert alone.reason == "stay in fp32: fp32 is the only precision in the sweep"
    assert alone.evidence == ("fp32, ok, best eval loss 2.0500 ± 0.0707",)  # no steps nor curve: no time to quality
    missing = recommend([make_result("bf16-mixed")])
    assert (missing.precision, missing.requested, missing.tolerance) == (None, None, 0.02)
    assert missing.reason == "no fp32 run in this setting to compare against: add fp32 to the sweep"
    failed = recommend(
        [make_result("fp32", status="failed", error="ValueError: boom\ntrace"), make_result("bf16-mixed")]
    )
    assert failed.precision is None and "add fp32" not in failed.reason
    assert failed.reason == (
        "fp32 failed (failed: ValueError: boom), so there is no baseline to compare against: fix the fp32 run first"
    )
    assert failed.to_markdown().startswith("**Recommendation (gpt-tiny): none** — fp32 failed (failed")
    diverged = build_report([*seeds("fp32", [2.0, 2.0], status="diverged"), make_result("bf16-mixed")])
    assert diverged.recommendations[0].reason.startswith("fp32 failed (diverged), so there is no baseline")
    assert diverged.answer() == f"No answer: {diverged.recommendations[0].reason}."
    elsewhere = recommend([make_result("fp32", effective="bf16-mixed", reason="x"), make_result("bf16-mixed")])
    assert elsewhere.reason == "fp32 ran as bf16-mixed (x), so there is no fp32 baseline"
    unexplained = recommend([make_result("fp32", effective="tf32"), make_result("bf16-mixed")])
    assert unexplained.reason == "fp32 ran as tf32 (no fallback reason recorded), so there is no fp32 baseline"


def test_a_partly_failed_fp32_still_is_the_baseline_and_is_noted() -> None:
    runs = [*FP32, make_result("fp32", 3, status="diverged"), *seeds("bf16-mixed", [2.01, 2.05, 1.99])]
    report = build_report(runs)
    assert report.comparisons[0].verdict == "diverged/failed" and report.noise[0].best_eval_loss.n == 3
    assert report.recommendations[0].reason == (
        "stay in fp32: bf16-mixed: quality inconclusive — run more seeds (Δ best eval loss +0.0167 [-0.0120, +0.0454];"
        " its interval is wider than the tolerance or straddles its edge); note: fp32 itself ok×3, diverged×1"
    )


def test_a_setting_without_baseline_does_not_hide_the_next_setting() -> None:
    runs = [make_result("bf16-mixed", lr=1), *seeds("fp32", [2.0, 2.0], lr=2, tps=1000.0),
            *seeds("bf16-mixed", [2000.0, 2000.0], what="tps", lr=2)]  # fmt: skip
    report = build_report(runs)
    assert [(r.setting, r.precision) for r in report.recommendations] == [
        ("gpt-tiny lr=1", None),
        ("gpt-tiny lr=2", "bf16-mixed"),
    ]
    assert report.answer() == (
        "For gpt-tiny lr=1, there is no answer: no fp32 run in this setting to compare against: add fp32 to the sweep."
        " For gpt-tiny lr=2, train in bf16-mixed: it matches fp32's best eval loss and is 2.00x as fast (95% CI 2.00–2.00x)."
    )


def test_the_answer_names_each_setting_that_stays_in_fp32() -> None:
    report = build_report([make_result("fp32", lr=1), make_result("bf16-mixed", lr=1), make_result("fp32", lr=2)])
    assert report.answer() == (
        "For gpt-tiny lr=1, stay in fp32: no other precision was shown to match fp32's best eval loss and be measurably"
        " faster (bf16-mixed: inconclusive — run more seeds). For gpt-tiny lr=2, stay in fp32: no other precision was"
        " shown to match fp32's best eval loss and be measurably faster."
    )


def test_nameless_recommendation_markdown() -> None:
    nameless = Recommendation("", None, None, 0.005, "why", ())
    assert nameless.to_markdown() == (
        "**Recommendation: none** — why\n\n_Tolerance: best eval loss within ±0.5% of fp32's (95% interval). Evidence:_\n"
    )
    assert not nameless.stay_in_fp32 and Recommendation("s", "fp32", "tf32", 0.0, "", ()).stay_in_fp32


def test_recommendations_take_comparisons_and_noise_floors() -> None:
    comparisons, floors = R.compare(THREE)
    recs = recommendations(comparisons, floors)
    assert recs == list(build_report(THREE).recommendations) and recommendations([], []) == []
    assert [r.setting for r in recommendations(comparisons, [])] == ["gpt-tiny"]  # no floor: no baseline
    assert recommendations(comparisons, [])[0].precision is None


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
        lambda tol: recommendations([], [], tol),
        lambda tol: R.compare([], tol),
        lambda tol: recommend([make_result("fp32")], tol),
    ],
    ids=["build_report", "recommendations", "compare", "recommend"],
)
def test_every_entry_point_checks_the_tolerance(call: Any) -> None:
    with pytest.raises(ValueError, match=r"^tolerance=-0\.5 must be a finite number >= 0"):
        call(-0.5)
    with pytest.raises(ValueError, match=r"^tolerance=nan must be"):
        call(math.nan)


# --- SweepReport and summary ---------------------------------------------------------------------

# Three seeds of four precisions, as a GPU sweep records them: eval curves, the memory split, timings.
SWEEP = [
    make_result(
        precision, seed, tps=tps * (1 + 0.01 * (seed * (i + 1) % 4)), mem=peak, eval_loss=curve[-1], evals=eval_curve(*curve, step_s=step_s),
        metrics={**SPLIT, "peak_memory_kind": "cuda_allocated", "train_time_s": 3 * 10 * step_s},
        plan={"concurrent_runs": 1, "threads": 16},
    )
    for i, (precision, tps, peak, step_s, curves) in enumerate((
        ("fp32", 1000.0, 400.0, 0.1, [(3.0, 2.3, 2.0), (3.0, 2.35, 2.02), (3.0, 2.3, 1.98)]),
        ("tf32", 1500.0, 400.0, 0.07, [(3.0, 2.3, 2.01), (3.0, 2.3, 2.0), (3.0, 2.4, 2.05)]),
        ("fp16-mixed", 2600.0, 250.0, 0.04, [(3.0, 2.6, 2.2), (3.0, 2.6, 2.24), (3.0, 2.7, 2.19)]),
        ("bf16-mixed", 2400.0, 240.0, 0.04, [(3.0, 2.03, 2.0), (3.0, 2.02, 2.02), (3.0, 2.035, 1.985)]),
    ))
    for seed, curve in enumerate(curves)
]  # fmt: skip


def test_build_report_fields_equal_the_separate_functions() -> None:
    runs = [*THREE, make_result("fp32", 1, tps=1100), make_result("bf16-mixed", lr=1), make_result("fp32", lr=1)]
    report = build_report(runs, 0.05)
    assert isinstance(report, SweepReport)
    assert report.results == tuple(runs)
    assert report.runs == tuple(run_table(runs)) and len(report.runs) == 6
    assert report.table == tuple(comparison_table(runs)) and len(report.table) == 5
    comparisons, floors = R.compare(runs, 0.05)
    assert report.comparisons == tuple(comparisons) and report.noise == tuple(floors) and len(floors) == 2
    assert [(c.setting, c.requested) for c in report.comparisons] == [(r.setting, r.requested) for r in report.table]
    assert report.recommendations == tuple(recommendations(comparisons, floors, 0.05))
    assert report.tolerance == 0.05 and all(r.tolerance == 0.05 for r in report.recommendations)
    assert build_report(runs).tolerance == DEFAULT_TOLERANCE == 0.02


def test_build_report_computes_everything_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for name in ("comparison_table", "run_table", "recommendations", "compare"):
        real = getattr(R, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(R, name, counted)
    report = build_report(SWEEP)
    assert calls == {"comparison_table": 1, "run_table": 1, "recommendations": 1, "compare": 1}
    report.summary_markdown()
    report.recommendation_markdown()
    report.answer()
    assert sum(calls.values()) == 4  # the markdown is made from the stored rows, nothing is recomputed


def test_golden_verdict_and_memory_tables_of_a_three_seed_sweep(golden) -> None:
    report = build_report(SWEEP)
    verdicts = {c.requested: c.verdict for c in report.comparisons}
    assert verdicts == {"fp32": "baseline", "tf32": "inconclusive — run more seeds", "fp16-mixed": "worse by +0.2100 (+10.5%)",
                        "bf16-mixed": "matches fp32"}  # fmt: skip
    assert report.recommendations[0].precision == "bf16-mixed"
    golden("verdicts_three_seeds.md", report.verdict_markdown() + "\n\n" + report.memory_markdown() + "\n")
    html = format_verdicts(report.comparisons, report.noise, "html")
    assert html.startswith('<table class="amp-verdicts">') and html.count("</tr><tr>") == 3
    assert format_memory(report.comparisons, "html").startswith('<table class="amp-memory">')
    assert format_verdicts(report.comparisons, report.noise) == report.verdict_markdown()  # markdown by default
    assert format_memory(report.comparisons) == format_memory(report.comparisons, "markdown")
    with pytest.raises(ValueError, match=r"^invalid fmt 'csv'"):
        format_verdicts(report.comparisons, report.noise, "csv")


def test_golden_summary_of_a_three_seed_sweep(golden) -> None:
    report = build_report(SWEEP)
    summary = report.summary_markdown()
    golden("summary_three_seeds.md", summary)
    assert summary.startswith(
        f"# AMP Workbook sweep summary\n\n**Answer:** {report.answer()}\n\n## Verdicts against fp32\n"
    )
    for part in (report.verdict_markdown(), report.memory_markdown(), report.recommendation_markdown(),
                 format_table(report.table), report.rules_markdown()):  # fmt: skip
        assert part in summary


def test_golden_summary_of_three_precisions_one_seed_each(golden) -> None:
    report = build_report(THREE)
    summary = report.summary_markdown()
    golden("summary_three.md", summary)
    (rec,) = report.recommendations
    assert rec.stay_in_fp32 and report.recommendation_markdown() == rec.to_markdown()
    assert report.answer() == (
        "Stay in fp32: no other precision was shown to match fp32's best eval loss and be measurably faster"
        " (fp16-mixed, bf16-mixed: inconclusive — run more seeds)."
    )


def test_golden_summary_of_two_settings(golden) -> None:
    runs = [
        *seeds("fp32", [2.0, 2.01], lr=0.01),
        *[
            make_result("bf16", s, effective="bf16-mixed", tps=t, mem=80, eval_loss=v, lr=0.01)
            for s, (v, t) in enumerate([(2.0, 1800.0), (2.01, 1850.0)])
        ],
        make_result(
            "fp16-mixed", status="diverged", error="loss became nan at step 7\ntrace", tps=None, eval_loss=None, lr=0.01
        ),
        make_result("fp32", status="oom", error="CUDA out of memory", tps=None, eval_loss=None, lr=0.1),
        make_result("bf16-mixed", tps=1500, lr=0.1),
    ]
    report = build_report(runs)
    summary = report.summary_markdown()
    golden("summary_two_settings.md", summary)
    first, second = report.recommendations
    assert report.recommendation_markdown() == f"{first.to_markdown()}\n\n{second.to_markdown()}"
    assert (first.setting, first.precision, second.setting, second.precision) == (
        "gpt-tiny lr=0.01", "bf16-mixed", "gpt-tiny lr=0.1", None,
    )  # fmt: skip
    assert second.reason.startswith("fp32 failed (oom: CUDA out of memory)")


def test_the_report_of_no_results_is_an_empty_table() -> None:
    report = build_report([])
    assert (report.results, report.runs, report.table, report.recommendations) == ((), (), (), ())
    assert (report.comparisons, report.noise, report.answer()) == ((), (), "")
    assert report.recommendation_markdown() == ""
    summary = report.summary_markdown()
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
    assert from_files.comparisons == in_memory.comparisons and from_files.noise == in_memory.noise
    assert from_files.recommendations == in_memory.recommendations
    assert from_files.summary_markdown() == in_memory.summary_markdown()


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
    assert "## Why a precision fails or doesn't pay" in report.summary_markdown()
    assert why_markdown(report.why).splitlines()[:2] == ["**bf16-mixed**", f"- {why.causes[0]}"]
    plain = build_report([make_result("fp32"), make_result("bf16-mixed", tps=200.0)])
    assert plain.why == () and "## Why" not in plain.summary_markdown()  # nothing profiled: nothing claimed


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
    summary = report.summary_markdown()
    assert summary.startswith("# AMP Workbook sweep summary\n\n**Answer:**")
    assert (
        f"\n\n## Why a precision fails or doesn't pay\n\n{why_markdown(report.why)}\n\n## Recommendation\n" in summary
    )


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
    assert rows[0].is_baseline and not rows[1].is_baseline and base_precision(rows[1].requested) == "bf16-mixed"


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
    assert results[1].plan["effective"] == "bf16-mixed" and results[3].plan["reduce_dtype"] is None
    rows = comparison_table(results)
    assert [(r.requested, r.seeds, r.status) for r in rows] == [
        ("fsdp fp32", (0,), "ok"),
        ("fsdp fp16-mixed (reduce bf16)", (0,), "ok"),
        ("fsdp bf16-mixed (reduce bf16)", (0, 1), "ok×1, failed×1"),
    ]
