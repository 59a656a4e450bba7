"""The report's exact output on hand-made results: every column, label, verdict and evidence line.

Pure Python (no files, no torch runs): these pin the report's text down so that a changed format,
threshold or ordering shows up as a failing test (they were written against mutation testing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from amp_lib import report as R
from amp_lib.report import (
    Recommendation,
    Stat,
    comparison_table,
    format_table,
    recommend,
    recommendations,
    run_table,
    setting_labels,
    summary_markdown,
)
from amp_lib.results import Metrics, RunResult


def mk(
    precision: Any,
    seed: int | None = 0,
    *,
    status: str = "ok",
    effective: str | None = None,
    tps: float | None = 1000.0,
    mem: float | None = 100.0,
    eval_loss: float | None = 2.0,
    final_loss: float | None = 2.5,
    skipped: int = 0,
    final_scale: float | None = None,
    min_scale: float | None = None,
    error: str | None = None,
    reason: str | None = None,
    unit: str = "tokens",
    **config: Any,
) -> RunResult:
    cfg = {"precision": precision, "model": "gpt-tiny", "run_name": f"{precision}-s{seed}", "out_dir": "x", **config}
    if seed is not None:
        cfg["seed"] = seed
    return RunResult(
        config=cfg,
        plan={"requested": str(precision), "effective": effective or str(precision), "fallback_reason": reason},
        metrics=Metrics(
            tokens_per_s=tps,
            throughput_unit=unit,
            peak_memory_mb=mem,
            final_train_loss=final_loss,
            eval_loss=eval_loss,
            skipped_steps=skipped,
            final_loss_scale=final_scale,
            min_loss_scale=min_scale,
        ),
        status=status,
        error=error,
    )


THREE = [
    mk("fp32", tps=1000, mem=200, eval_loss=2.0),
    mk("fp16-mixed", tps=2500, mem=120, eval_loss=2.01, skipped=3, final_scale=32768.0, min_scale=1024.0),
    mk("bf16", effective="bf16-mixed", tps=2000, mem=110, eval_loss=1.99),
]
HEADER = (
    "| requested | effective | status | run | throughput/s | speedup vs fp32 | peak MB | memory saved | final loss"
    " | eval loss | Δ eval vs fp32 | skipped steps | final scale | min scale | fallback / error |"
)
MD_ROWS = [
    "| fp32 | fp32 | ok | fp32-s0 | 1,000 tokens | 1.00x | 200.0 | 0.0% | 2.5000 | 2.0000 | +0.0000 | 0 | — | — |  |",
    (
        "| fp16-mixed | fp16-mixed | ok | fp16-mixed-s0 | 2,500 tokens | 2.50x | 120.0 | 40.0% | 2.5000 | 2.0100"
        " | +0.0100 | 3 | 3.28e+04 | 1.02e+03 |  |"
    ),
    (
        "| bf16-mixed | bf16-mixed | ok | bf16-s0 | 2,000 tokens | 2.00x | 110.0 | 45.0% | 2.5000 | 1.9900 | -0.0100"
        " | 0 | — | — |  |"
    ),
]
REC = (
    "**Recommendation (gpt-tiny): fp16-mixed** — the fastest precision whose eval loss stays within 2% of fp32's (or below it):"
    " 2.50x fp32 throughput, eval loss 2.0100 vs 2.0000\n\n_Tolerance: eval loss at most 2% above fp32's. Evidence:_\n\n"
    "- fp32, ok, 1.00x fp32 throughput, 0.0% memory saved, eval loss 2.0000\n"
    "- fp16-mixed, ok, 2.50x fp32 throughput, 40.0% memory saved, eval loss 2.0100, Δ vs fp32 +0.0100, 3 skipped steps\n"
    "- bf16-mixed, ok, 2.00x fp32 throughput, 45.0% memory saved, eval loss 1.9900, Δ vs fp32 -0.0100"
)


def cells(row: R.Row) -> dict[str, str]:
    return {name: get(row) for name, get in R.COLUMNS}


# -- Stat ----------------------------------------------------------------------------------------


def test_stat_drops_missing_and_non_finite_values() -> None:
    assert Stat.of([]) is None
    assert Stat.of([None, math.inf, -math.inf, math.nan]) is None
    assert Stat.of([3]) == Stat(3.0, None, 1) and type(Stat.of([3]).mean) is float
    assert Stat.of([1, None, 2, math.inf, 6]) == Stat(3.0, pytest.approx(2.6457513), 3)
    assert Stat(1.0).std is None and Stat(1.0).n == 1


def test_stat_format_keeps_the_sign_on_the_mean_only() -> None:
    assert Stat(0.05, 0.0707, 2).format("+.4f") == "+0.0500 ± 0.0707"
    assert Stat(-0.5).format("+.2f", "x") == "-0.50x"
    assert Stat(1234.5, 10.0, 2).format(",.0f", " tokens") == "1,234 ± 10 tokens"
    assert Stat(2.0).format() == "2"


# -- table ---------------------------------------------------------------------------------------


def test_every_column_of_three_precisions_in_markdown_text_and_html() -> None:
    rows = comparison_table(THREE)
    assert format_table(rows) == "\n".join([HEADER, "|" + "---|" * 15, *MD_ROWS])
    text = format_table(rows, "text").splitlines()
    assert text[0].startswith("requested   effective   status  run            throughput/s  speedup vs fp32  peak MB")
    assert text[2] == (
        "fp16-mixed  fp16-mixed  ok      fp16-mixed-s0  2,500 tokens  2.50x            120.0    40.0%         2.5000"
        "      2.0100     +0.0100         3              3.28e+04     1.02e+03"
    )  # columns padded to the widest cell, two spaces apart, no trailing blanks
    assert text[1].endswith("—            —") and len(text) == 4
    html = format_table(rows, "html")
    assert html.startswith('<table class="amp-comparison"><thead><tr><th>requested</th><th>effective</th>')
    assert "<tr><td>fp32</td><td>fp32</td><td>ok</td><td>fp32-s0</td><td>1,000 tokens</td><td>1.00x</td>" in html
    assert html.endswith("<td>—</td><td>—</td><td></td></tr></tbody></table>")
    assert "<td></td></tr><tr><td>fp16-mixed</td>" in html and html.count("</tr><tr>") == 2


def test_markdown_and_html_escape_cell_text() -> None:
    runs = [mk("fp32"), mk("fp16-mixed", status="failed", error="a|b <c>\nsecond line")]
    rows = run_table(runs)
    md = format_table(rows)
    assert md.splitlines()[-1].endswith("| a\\|b <c> |")
    assert "<td>a|b &lt;c&gt;</td>" in format_table(rows, "html")


def test_row_fields_of_a_single_run() -> None:
    (fp32, fp16, bf16) = run_table(THREE)
    assert (fp16.setting, fp16.requested, fp16.effective, fp16.status) == ("gpt-tiny", "fp16-mixed", "fp16-mixed", "ok")
    assert (fp16.runs, fp16.ok_runs, fp16.seeds, fp16.run_names) == (1, 1, (0,), ("fp16-mixed-s0",))
    assert fp16.tokens_per_s == Stat(2500.0) and fp16.speedup == Stat(2.5) and fp16.peak_memory_mb == Stat(120.0)
    assert fp16.memory_saved_pct == Stat(40.0) and fp16.final_loss == Stat(2.5) and fp16.eval_loss == Stat(2.01)
    assert fp16.loss_diff.mean == pytest.approx(0.01) and fp16.skipped_steps == Stat(3.0)
    assert fp16.final_loss_scale == Stat(32768.0) and fp16.min_loss_scale == Stat(1024.0)
    assert fp16.fallback_reason is None and fp16.error is None and fp16.throughput_unit == "tokens"
    assert fp32.is_baseline and not fp16.is_baseline and bf16.requested == "bf16-mixed"


def test_baseline_row_needs_fp32_requested_and_effective() -> None:
    rows = run_table([mk(32, effective="fp32"), mk("tf32", effective="fp32")])
    assert [(r.requested, r.is_baseline) for r in rows] == [("fp32", True), ("tf32", False)]
    empty = R.Row(*(["s", "fp32", "fp32", "ok", 0, 0, (), (), "tokens"] + [None] * 12))
    assert not empty.all_ok and empty.is_baseline


def test_seed_rows_mix_effective_precisions_reasons_and_errors() -> None:
    runs = [
        mk("fp32", 0),
        mk("fp16-mixed", 0, effective="bf16-mixed", reason="no fast fp16"),
        mk("fp16-mixed", 1, status="diverged", error="\n  loss became nan\nat step 3", reason="slow"),
        mk("fp16-mixed", 2, status="failed", error="second error"),
        mk("fp16-mixed", 3, status="ok"),
    ]
    fp16 = comparison_table(runs)[1]
    assert fp16.effective == "bf16-mixed, fp16-mixed" and fp16.fallback_reason == "no fast fp16; slow"
    assert fp16.status == "ok×2, diverged×1, failed×1" and fp16.error == "loss became nan"
    assert (fp16.runs, fp16.ok_runs, fp16.seeds) == (4, 2, (0, 1, 2, 3)) and not fp16.all_ok
    assert fp16.run_names == ("fp16-mixed-s0", "fp16-mixed-s1", "fp16-mixed-s2", "fp16-mixed-s3")
    assert cells(fp16)["run"] == "4 seeds (0, 1, 2, 3)" and cells(fp16)["fallback / error"] == "loss became nan"
    assert R._status([mk("fp32", status="oom"), mk("fp32", status="failed")]) == "failed×1, oom×1"
    assert R._status([mk("fp32", status="oom")] * 2) == "oom"


def test_baseline_is_the_same_seed_else_every_ok_fp32_seed() -> None:
    runs = [
        mk("fp32", 0, tps=1000, mem=100, eval_loss=2.0),
        mk("fp32", 1, tps=2000, mem=300, eval_loss=3.0),
        mk("fp32", 2, status="failed", tps=1.0, mem=1.0, eval_loss=1.0),  # never a baseline
        mk("fp32", 3, effective="bf16-mixed", tps=1.0, mem=1.0, eval_loss=1.0),  # fp32 that did not run as fp32
        mk("bf16-mixed", 1, tps=3000, mem=150, eval_loss=3.3),
        mk("bf16-mixed", 7, tps=3000, mem=100, eval_loss=2.0),  # no fp32 seed 7: the mean of seeds 0 and 1
        mk("bf16-mixed", None, tps=1500, mem=0.0, eval_loss=None),  # no seed at all
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
    rows = run_table([mk("fp32", tps=0.0, mem=0.0, eval_loss=None), mk("bf16-mixed", tps=None, mem=None)])
    bf16 = rows[1]
    assert bf16.speedup is None and bf16.memory_saved_pct is None and bf16.loss_diff is None
    shown = cells(bf16)
    assert [shown[k] for k in ("throughput/s", "speedup vs fp32", "peak MB", "memory saved", "Δ eval vs fp32")] == [
        "—"
    ] * 5
    assert (shown["effective"], shown["fallback / error"]) == ("bf16-mixed", "")
    assert cells(R.Row(*(["s", "x", None, "ok", 1, 1, (), ("r",), "t"] + [None] * 12)))["effective"] == "?"
    assert R._ratio(2.0, 0.0) is None and R._ratio(None, 2.0) is None and R._ratio(3.0, 2.0) == 1.5


def test_rows_are_ordered_by_setting_then_precision_order_then_name_then_seed() -> None:
    runs = [mk("zz-custom", 0), mk("bf16-mixed", 10), mk("bf16-mixed", 2), mk("fp16-mixed", 0), mk("fp32", 0),
            mk("aa-custom", 0)]  # fmt: skip
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


def test_setting_labels_name_the_model_and_the_varying_values() -> None:
    runs = [mk("fp32", lr=0.001, steps=5, device="cpu"), mk("fp32", lr=0.01, steps=5, device="cpu"),
            mk("fp32", lr=0.01, steps=9, device="cpu"), mk("fp32", lr=0.01, steps=9, device="cpu", model="mlp")]  # fmt: skip
    labels = sorted(setting_labels(runs).values())
    assert labels == ["gpt-tiny lr=0.001 steps=5", "gpt-tiny lr=0.01 steps=5", "gpt-tiny lr=0.01 steps=9",
                      "mlp lr=0.01 steps=9"]  # fmt: skip
    nomodel = RunResult(config={"precision": "fp32", "lr": 1}, plan={"effective": "fp32"})
    assert sorted(setting_labels([nomodel, mk("fp32", lr=2)]).values()) == ["gpt-tiny lr=2", "lr=1"]
    assert list(setting_labels([mk("fp32", seed=1, run_name="a", out_dir="b")]).values()) == ["gpt-tiny"]
    assert R._setting_key(mk("fp16-mixed", 3, lr=1)) == (("lr", "1"), ("model", "'gpt-tiny'"))


def test_first_line_skips_blank_text() -> None:
    assert R._first_line(None) is None and R._first_line("") is None and R._first_line(" \n ") is None
    assert R._first_line("\n  first  \nsecond") == "first  "


# -- recommendation ------------------------------------------------------------------------------


def test_recommendation_markdown_and_summary_exactly() -> None:
    (rec,) = recommendations(THREE)
    assert rec.to_markdown() == REC
    assert (rec.precision, rec.requested, rec.tolerance, rec.stay_in_fp32) == ("fp16-mixed", "fp16-mixed", 0.02, False)
    table = "\n".join([HEADER, "|" + "---|" * 15, *MD_ROWS])
    assert summary_markdown(THREE) == f"# AMP Workbook sweep summary\n\n{table}\n\n{REC}\n"
    nameless = Recommendation("", None, None, 0.005, "why", ())
    assert (
        nameless.to_markdown()
        == "**Recommendation: none** — why\n\n_Tolerance: eval loss at most 0.5% above fp32's. Evidence:_\n"
    )


def test_fastest_qualifying_precision_wins_and_fallbacks_are_explained() -> None:
    runs = [mk("fp32"), mk("fp16-mixed", effective="bf16-mixed", tps=3000, reason="no fast fp16 here"),
            mk("bf16-true", tps=2000), mk("tf32", tps=4000, eval_loss=2.0401)]  # fmt: skip
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


def test_each_verdict_is_spelled_out_when_staying_in_fp32() -> None:
    runs = [
        mk("fp32"),
        mk("tf32", effective="fp32"),
        mk("fp16-mixed", status="diverged", error="loss became nan\nmore"),
        mk("bf16-mixed", tps=1000.0),
        mk("fp16-true", eval_loss=2.1),
        mk("bf16-true", eval_loss=None),
        mk("fp8-mixed", tps=None),
        mk("fp16", status="oom", effective="fp16-mixed"),
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
    oom = recommend([mk("fp32"), mk("bf16-mixed", status="oom")])
    assert oom.reason == "stay in fp32: bf16-mixed is not safe: oom"


def test_tolerance_edges() -> None:
    runs = [mk("fp32", eval_loss=2.0), mk("bf16-mixed", tps=1500, eval_loss=2.0625)]
    assert recommend(runs, tolerance=0.03125).precision == "bf16-mixed"  # exactly at the tolerance is within
    assert recommend(runs, tolerance=0.0312).precision == "fp32"
    below = [mk("fp32", eval_loss=2.0), mk("bf16-mixed", tps=1500, eval_loss=1.9375)]
    assert recommend(below, 0.0312).precision == "bf16-mixed"  # one-sided: a lower loss is never held against it
    assert recommend(below, 0).precision == "bf16-mixed"
    assert recommend(runs, tolerance=0).reason.endswith("(+3.12%) is worse than the 0% tolerance")
    zero = [mk("fp32", eval_loss=0.0), mk("bf16-mixed", tps=1500, eval_loss=0.0)]
    assert recommend(zero, tolerance=0).precision == "bf16-mixed"  # the same zero loss is within any tolerance
    off_zero = [mk("fp32", eval_loss=0.0), mk("bf16-mixed", tps=1500, eval_loss=0.5)]
    rec = recommend(off_zero, tolerance=10)  # any change from a zero loss is infinitely far in relative terms
    assert rec.stay_in_fp32 and rec.reason.endswith(
        "bf16-mixed: eval loss 0.5000 vs fp32 0.0000 (+0.5000 absolute) is worse than the 1000% tolerance"
    )
    with pytest.raises(ValueError) as info:
        recommendations(runs, tolerance=math.inf)
    assert str(info.value) == "tolerance=inf must be a finite number >= 0 (relative, e.g. 0.02 for 2%)"
    with pytest.raises(ValueError, match="tolerance=nan"):
        recommendations(runs, tolerance=math.nan)
    assert recommendations(runs, tolerance=0)[0].tolerance == 0


def test_just_faster_qualifies() -> None:
    assert recommend([mk("fp32", tps=1000), mk("bf16-mixed", tps=1001)]).precision == "bf16-mixed"


def test_fp32_alone_or_no_baseline() -> None:
    alone = recommend([mk("fp32"), mk("fp32", 1)])
    assert alone.reason == "stay in fp32: fp32 is the only precision in the sweep"
    assert alone.evidence == (
        "fp32, ok, 1.00 ± 0.00x fp32 throughput, 0.0 ± 0.0% memory saved, eval loss 2.0000 ± 0.0000, 2 seeds",
    )
    none = recommend([mk("bf16-mixed"), mk("fp32", effective="bf16-mixed")])
    assert (none.precision, none.requested, none.tolerance) == (None, None, 0.02)
    assert none.reason == "no successful fp32 run to compare against: add fp32 to the sweep"
    assert none.evidence == ("fp32 → bf16-mixed, ok, eval loss 2.0000", "bf16-mixed, ok, eval loss 2.0000")


def test_evidence_leaves_out_what_is_missing_or_zero() -> None:
    (fp32, fp16) = run_table([mk("fp32", tps=None, mem=None, eval_loss=None), mk("fp16-mixed", skipped=0)])
    assert R._evidence(fp32) == "fp32, ok"
    assert R._evidence(fp16) == "fp16-mixed, ok, eval loss 2.0000"


def test_recommend_needs_exactly_one_setting() -> None:
    with pytest.raises(ValueError) as info:
        recommend([])
    assert str(info.value) == (
        "recommend() needs results of exactly one setting; got 0: none (no results); use recommendations()"
    )
    assert recommendations([]) == []
    two = [mk("fp32", lr=1), mk("fp32", lr=2)]
    assert [r.setting for r in recommendations(two)] == ["gpt-tiny lr=1", "gpt-tiny lr=2"]
    with pytest.raises(ValueError, match=r"got 2: 'gpt-tiny lr=1', 'gpt-tiny lr=2'; use"):
        recommend(two)


def test_table_with_several_settings_shows_the_setting_column() -> None:
    rows = comparison_table([mk("fp32", lr=1), mk("fp32", lr=2, unit="samples", tps=5.0)])
    text = format_table(rows, "text").splitlines()
    assert text[0].startswith("setting        requested")
    assert text[2].startswith("gpt-tiny lr=2  fp32") and "5 samples" in text[2]


def test_stat_default_format_is_four_significant_digits_lowercase() -> None:
    assert Stat(12345678.0).format() == "1.235e+07"
    assert Stat(12345678.0, 0.5, 2).format(suffix=" s") == "1.235e+07 ± 0.5 s"


def test_load_sweep_prefers_the_results_folder_and_names_a_missing_one(tmp_path: Path) -> None:
    mk("fp32").save(tmp_path / "sweep" / "results" / "a.json")
    mk("bf16-mixed").save(tmp_path / "sweep" / "elsewhere" / "b.json")  # not a result of this sweep's layout
    assert [r.config["precision"] for r in R.load_sweep(tmp_path / "sweep")] == ["fp32"]
    assert [r.config["precision"] for r in R.load_sweep(str(tmp_path / "sweep" / "elsewhere"))] == ["bf16-mixed"]
    with pytest.raises(ValueError) as info:
        R.load_sweep(tmp_path / "missing")
    assert str(info.value) == f"sweep_dir {str(tmp_path / 'missing')!r} is not a folder"


def test_precision_falls_back_to_the_plans_request_and_names_to_blank() -> None:
    bare = RunResult(config={"model": "gpt-tiny", "seed": 0}, plan={"requested": "bf16", "effective": "bf16-mixed"})
    only_config = RunResult(
        config={"precision": "fp16", "model": "gpt-tiny", "seed": 0}, plan={"effective": "fp16-mixed"}
    )
    rows = run_table([bare, only_config])
    assert [r.requested for r in rows] == ["fp16-mixed", "bf16-mixed"]
    assert [r.run_names for r in rows] == [("",), ("",)]


def test_seeds_sort_as_text_within_a_precision() -> None:
    rows = run_table([mk("bf16-mixed", 2), mk("bf16-mixed", 10), mk("bf16-mixed", 1)])
    assert [r.seeds for r in rows] == [(1,), (10,), (2,)]


def test_markdown_cells_stay_on_one_line() -> None:
    rows = run_table([mk("fp32", run_name="two\nlines")])
    assert format_table(rows).splitlines()[-1].startswith("| fp32 | fp32 | ok | two lines |")


def test_a_setting_without_baseline_does_not_hide_the_next_setting() -> None:
    recs = recommendations([mk("bf16-mixed", lr=1), mk("fp32", lr=2), mk("bf16-mixed", lr=2, tps=2000.0)])
    assert [(r.setting, r.precision) for r in recs] == [("gpt-tiny lr=1", None), ("gpt-tiny lr=2", "bf16-mixed")]
    assert recs[0].to_markdown().startswith("**Recommendation (gpt-tiny lr=1): none**")


def test_many_skipped_steps_use_a_lowercase_exponent() -> None:
    (row,) = run_table([mk("fp16-mixed", skipped=1500)])
    assert R._evidence(row).endswith("1.5e+03 skipped steps")
