"""The report on hand-made results: setting labels, per-run and aggregated rows, Stat, the table's
formats, the verdicts behind a recommendation, and the SweepReport that computes them all once.

Pure Python (no torch runs). The exact text of whole tables and of summary.md lives in tests/golden/
(`make goldens` rewrites it); shorter pins stay inline. Written against mutation testing: a changed
format, threshold or ordering shows up as a failing test."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from factories import history, make_result

from amp_lib import report as R
from amp_lib.report import (
    DEFAULT_TOLERANCE,
    Recommendation,
    Stat,
    SweepReport,
    build_report,
    check_tolerance,
    comparison_table,
    format_table,
    recommend,
    recommendations,
    run_table,
    setting_labels,
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
    return recommendations(comparison_table(results), tolerance)


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
    runs = [make_result(p, lr=lr, tps=tps) for lr in (1e-3, 1e-2) for p, tps in (("fp32", 1000), ("bf16-mixed", 1500))]
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


# --- verdicts and recommendations ----------------------------------------------------------------


def test_recommends_the_fastest_precision_within_tolerance() -> None:
    runs = [
        make_result("fp32", tps=1000, mem=200, eval_loss=2.00),
        make_result("bf16-mixed", tps=1800, mem=120, eval_loss=2.02),  # +1%: within 2%
        make_result("fp16-mixed", tps=2000, mem=110, eval_loss=2.20),  # faster but +10%
    ]
    rec = recommend(runs, tolerance=0.02)
    assert (rec.precision, rec.requested, rec.stay_in_fp32) == ("bf16-mixed", "bf16-mixed", False)
    assert "2%" in rec.reason and "1.80x" in rec.reason
    assert any(line.startswith("fp16-mixed") and "Δ vs fp32 +0.2000" in line for line in rec.evidence)
    assert recommend(runs, tolerance=0.15).precision == "fp16-mixed"  # a looser tolerance admits fp16
    assert "**Recommendation" in rec.to_markdown() and "- fp32" in rec.to_markdown()


def test_fastest_qualifying_precision_wins_and_fallbacks_are_explained() -> None:
    runs = [make_result("fp32"), make_result("fp16-mixed", effective="bf16-mixed", tps=3000, reason="no fast fp16 here"),
            make_result("bf16-true", tps=2000), make_result("tf32", tps=4000, eval_loss=2.0401)]  # fmt: skip
    rec = recommend(runs, tolerance=0.02)
    assert (rec.precision, rec.requested) == ("bf16-mixed", "fp16-mixed")
    assert rec.reason == (
        "the fastest precision whose eval loss stays within 2% of fp32's (or below it): 3.00x fp32 throughput, eval loss 2.0000 vs"
        " 2.0000 (request 'fp16-mixed'; it runs as bf16-mixed: no fast fp16 here)"
    )
    assert (
        rec.evidence[2]
        == "fp16-mixed → bf16-mixed, ok, 3.00x fp32 throughput, 0.0% memory saved, eval loss 2.0000, Δ vs fp32 +0.0000"
    )
    assert recommend(runs, tolerance=0.0201).precision == "tf32"  # 2.005% is inside 2.01%


def test_just_faster_qualifies() -> None:
    assert recommend([make_result("fp32", tps=1000), make_result("bf16-mixed", tps=1001)]).precision == "bf16-mixed"


def test_each_verdict_is_spelled_out_when_staying_in_fp32() -> None:
    runs = [
        make_result("fp32"),
        make_result("tf32", effective="fp32"),
        make_result("fp16-mixed", status="diverged", error="loss became nan\nmore"),
        make_result("bf16-mixed", tps=1000.0),
        make_result("fp16-true", eval_loss=2.1),
        make_result("bf16-true", eval_loss=None),
        make_result("fp8-mixed", tps=None),
        make_result("fp16", status="oom", effective="fp16-mixed"),
    ]
    rec = recommend(runs)
    assert rec.precision == "fp32" and rec.requested == "fp32" and rec.stay_in_fp32
    assert rec.reason == "stay in fp32: " + "; ".join(  # noqa: FLY002
        [
            "tf32 (ran as fp32) runs as fp32 on this machine (no fallback reason recorded)",
            "fp16-mixed is not safe: diverged×1, oom×1: loss became nan",
            "bf16-mixed is not faster than fp32 here (1.00x fp32 throughput)",
            "fp16-true: eval loss 2.1000 vs fp32 2.0000 (+5.00%) is worse than the 2% tolerance",
            "bf16-true has no eval loss to compare with fp32",
            "fp8-mixed has no throughput to compare with fp32",
        ]
    )
    assert rec.evidence[2] == (
        "fp16-mixed, diverged×1, oom×1, 1.00 ± 0.00x fp32 throughput, 0.0 ± 0.0% memory saved,"
        " eval loss 2.0000 ± 0.0000, Δ vs fp32 +0.0000 ± 0.0000, 2 seeds"
    )
    oom = recommend([make_result("fp32"), make_result("bf16-mixed", status="oom")])
    assert oom.reason == "stay in fp32: bf16-mixed is not safe: oom"
    diverged = recommend(
        [make_result("fp32"), make_result("fp16-mixed", status="diverged", error="scale collapsed\nx")]
    )
    assert diverged.reason == "stay in fp32: fp16-mixed is not safe: diverged: scale collapsed"


def test_a_fallback_to_fp32_quotes_its_reason() -> None:
    runs = [
        make_result("fp32", tps=1000),
        make_result("tf32", effective="fp32", tps=1010, reason="tf32 needs an Ampere or newer GPU"),
    ]
    assert recommend(runs).reason == (
        "stay in fp32: tf32 (ran as fp32) runs as fp32 on this machine (tf32 needs an Ampere or newer GPU)"
    )


def test_tolerance_edges() -> None:
    runs = [make_result("fp32", eval_loss=2.0), make_result("bf16-mixed", tps=1500, eval_loss=2.0625)]
    assert recommend(runs, tolerance=0.03125).precision == "bf16-mixed"  # exactly at the tolerance is within
    assert recommend(runs, tolerance=0.0312).precision == "fp32"
    below = [make_result("fp32", eval_loss=2.0), make_result("bf16-mixed", tps=1500, eval_loss=1.9375)]
    assert recommend(below, 0.0312).precision == "bf16-mixed"  # one-sided: a lower loss is never held against it
    assert recommend(below, 0).precision == "bf16-mixed"
    assert recommend(runs, tolerance=0).reason.endswith("(+3.12%) is worse than the 0% tolerance")
    zero = [make_result("fp32", eval_loss=0.0), make_result("bf16-mixed", tps=1500, eval_loss=0.0)]
    assert recommend(zero, tolerance=0).precision == "bf16-mixed"  # the same zero loss is within any tolerance
    off_zero = [make_result("fp32", eval_loss=0.0), make_result("bf16-mixed", tps=1500, eval_loss=0.5)]
    rec = recommend(off_zero, tolerance=10)  # any change from a zero loss is infinitely far in relative terms
    assert rec.stay_in_fp32 and rec.reason.endswith(
        "bf16-mixed: eval loss 0.5000 vs fp32 0.0000 (+0.5000 absolute) is worse than the 1000% tolerance"
    )
    assert recs_of(runs, tolerance=0)[0].tolerance == 0


def test_negative_losses_are_compared_by_their_size() -> None:
    # a higher loss is worse whatever its sign, and its change is quoted with a + (it was "-5.00%")
    worse = [make_result("fp32", eval_loss=-2.0), make_result("bf16-mixed", tps=2000, eval_loss=-1.9)]
    rec = recommend(worse)
    assert rec.reason == (
        "stay in fp32: bf16-mixed: eval loss -1.9000 vs fp32 -2.0000 (+5.00%) is worse than the 2% tolerance"
    )
    better = [make_result("fp32", eval_loss=-2.0), make_result("bf16-mixed", tps=2000, eval_loss=-2.1)]
    assert recommend(better, tolerance=0).precision == "bf16-mixed"


def test_fp32_alone_or_no_baseline() -> None:
    alone = recommend([make_result("fp32"), make_result("fp32", 1)])
    assert alone.reason == "stay in fp32: fp32 is the only precision in the sweep"
    assert alone.evidence == (
        "fp32, ok, 1.00 ± 0.00x fp32 throughput, 0.0 ± 0.0% memory saved, eval loss 2.0000 ± 0.0000, 2 seeds",
    )
    none = recommend([make_result("bf16-mixed"), make_result("fp32", effective="bf16-mixed")])
    assert (none.precision, none.requested, none.tolerance) == (None, None, 0.02)
    assert none.reason == "no successful fp32 run to compare against: add fp32 to the sweep"
    assert none.evidence == ("fp32 → bf16-mixed, ok, eval loss 2.0000", "bf16-mixed, ok, eval loss 2.0000")
    failed = recommend([make_result("fp32", status="failed", error="ValueError: boom"), make_result("bf16-mixed")])
    assert failed.precision is None and failed.reason.startswith("no successful fp32 run")
    assert failed.to_markdown().startswith("**Recommendation (gpt-tiny): none** — no successful fp32 run")


def test_a_setting_without_baseline_does_not_hide_the_next_setting() -> None:
    recs = recs_of(
        [make_result("bf16-mixed", lr=1), make_result("fp32", lr=2), make_result("bf16-mixed", lr=2, tps=2000.0)]
    )
    assert [(r.setting, r.precision) for r in recs] == [("gpt-tiny lr=1", None), ("gpt-tiny lr=2", "bf16-mixed")]
    assert recs[0].to_markdown().startswith("**Recommendation (gpt-tiny lr=1): none**")


def test_evidence_leaves_out_what_is_missing_or_zero() -> None:
    (fp32, fp16) = run_table(
        [make_result("fp32", tps=None, mem=None, eval_loss=None), make_result("fp16-mixed", skipped=0)]
    )
    assert R._evidence(fp32) == "fp32, ok"
    assert R._evidence(fp16) == "fp16-mixed, ok, eval loss 2.0000"


def test_many_skipped_steps_use_a_lowercase_exponent() -> None:
    (row,) = run_table([make_result("fp16-mixed", skipped=1500)])
    assert R._evidence(row).endswith("1.5e+03 skipped steps")


def test_nameless_recommendation_markdown() -> None:
    nameless = Recommendation("", None, None, 0.005, "why", ())
    assert (
        nameless.to_markdown()
        == "**Recommendation: none** — why\n\n_Tolerance: eval loss at most 0.5% above fp32's. Evidence:_\n"
    )
    assert not nameless.stay_in_fp32 and Recommendation("s", "fp32", "tf32", 0.0, "", ()).stay_in_fp32


def test_recommendations_take_comparison_table_rows() -> None:
    table = comparison_table(THREE)
    (rec,) = recommendations(table)
    assert (rec.precision, rec.requested, rec.tolerance, rec.stay_in_fp32) == ("fp16-mixed", "fp16-mixed", 0.02, False)
    assert recommendations(tuple(table), 0.02) == [rec] and recommendations([]) == []


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
        lambda tol: recommendations([], tol),
        lambda tol: recommend([make_result("fp32")], tol),
    ],
    ids=["build_report", "recommendations", "recommend"],
)
def test_every_entry_point_checks_the_tolerance(call: Any) -> None:
    with pytest.raises(ValueError, match=r"^tolerance=-0\.5 must be a finite number >= 0"):
        call(-0.5)
    with pytest.raises(ValueError, match=r"^tolerance=nan must be"):
        call(math.nan)


# --- SweepReport and summary ---------------------------------------------------------------------


def test_build_report_fields_equal_the_separate_functions() -> None:
    runs = [*THREE, make_result("fp32", 1, tps=1100), make_result("bf16-mixed", lr=1), make_result("fp32", lr=1)]
    report = build_report(runs, 0.05)
    assert isinstance(report, SweepReport)
    assert report.results == tuple(runs)
    assert report.runs == tuple(run_table(runs)) and len(report.runs) == 6
    assert report.table == tuple(comparison_table(runs)) and len(report.table) == 5
    assert report.recommendations == tuple(recommendations(comparison_table(runs), 0.05))
    assert report.tolerance == 0.05 and all(r.tolerance == 0.05 for r in report.recommendations)
    assert build_report(runs).tolerance == DEFAULT_TOLERANCE == 0.02


def test_build_report_computes_the_table_runs_and_recommendations_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: Counter[str] = Counter()
    for name in ("comparison_table", "run_table", "recommendations"):
        real = getattr(R, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(R, name, counted)
    report = build_report(THREE)
    assert calls == {"comparison_table": 1, "run_table": 1, "recommendations": 1}
    report.summary_markdown()
    report.recommendation_markdown()
    assert sum(calls.values()) == 3  # the markdown is made from the stored rows, nothing is recomputed


def test_golden_summary_of_three_precisions(golden) -> None:
    report = build_report(THREE)
    summary = report.summary_markdown()
    golden("summary_three.md", summary)
    (rec,) = report.recommendations
    assert summary == f"# AMP Workbook sweep summary\n\n{format_table(report.table)}\n\n{rec.to_markdown()}\n"
    assert report.recommendation_markdown() == rec.to_markdown()


def test_golden_summary_of_two_settings(golden) -> None:
    runs = [
        make_result("fp32", lr=0.01),
        make_result("bf16", effective="bf16-mixed", tps=1800, mem=80, eval_loss=2.01, lr=0.01),
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
    assert summary.endswith(f"\n\n{first.to_markdown()}\n\n{second.to_markdown()}\n")
    assert (first.setting, first.precision, second.setting, second.precision) == (
        "gpt-tiny lr=0.01", "bf16-mixed", "gpt-tiny lr=0.1", None,
    )  # fmt: skip


def test_the_report_of_no_results_is_an_empty_table() -> None:
    report = build_report([])
    assert (report.results, report.runs, report.table, report.recommendations) == ((), (), (), ())
    assert report.recommendation_markdown() == ""
    assert report.summary_markdown() == f"# AMP Workbook sweep summary\n\n{format_table([])}\n"


def test_a_report_of_saved_files_equals_the_report_of_the_results(tmp_path: Path) -> None:
    runs = [
        make_result("fp32", 0, rows=history(5)),
        make_result("fp32", 1, tps=1100, rows=history(5)),
        make_result("fp16-mixed", 0, tps=2000, **FP16_SCALED),
        make_result("fp16-mixed", 1, status="diverged", error="nan\nmore", final_loss=math.nan, min_scale=2.0**-30),
    ]
    for r in runs:
        r.save(tmp_path / "results" / f"{r.config['run_name']}.json")
    from_files, in_memory = build_report(load_sweep(tmp_path)), build_report(runs)
    assert from_files.table == in_memory.table and from_files.runs == in_memory.runs
    assert from_files.recommendations == in_memory.recommendations
    assert from_files.summary_markdown() == in_memory.summary_markdown()
