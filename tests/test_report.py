"""The comparison table, seed aggregation and recommendation, on hand-made result files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from amp_lib import report
from amp_lib import results as results_module
from amp_lib.plots import REPORT_FIGURES, run_figure, save_report_figures
from amp_lib.report import (
    Stat,
    comparison_table,
    format_table,
    load_sweep,
    recommend,
    recommendations,
    run_table,
    summary_markdown,
)
from amp_lib.results import HistoryRow, Metrics, RunResult

SCALER = {"fp16-mixed"}


def make(
    precision: str,
    *,
    effective: str | None = None,
    status: str = "ok",
    seed: int = 0,
    tps: float | None = 1000.0,
    mem: float | None = 100.0,
    eval_loss: float | None = 2.0,
    error: str | None = None,
    reason: str | None = None,
    **config: Any,
) -> RunResult:
    effective = effective or precision
    scaled = effective in SCALER
    history = tuple(
        HistoryRow(
            step=i,
            loss=3.0 - 0.1 * i,
            loss_scale=(2.0**16 / (2 if i >= 2 else 1)) if scaled else None,
            grad_norm=1.0,
            step_time_ms=10.0,
            skipped=scaled and i == 2,
            skipped_steps=int(scaled and i >= 2),
        )
        for i in range(5)
    )
    ok = status == "ok"
    return RunResult(
        config={
            "precision": precision,
            "model": "gpt-tiny",
            "steps": 5,
            "seed": seed,
            "run_name": f"{precision}-s{seed}",
            "out_dir": "x",
            **config,
        },
        plan={"requested": precision, "effective": effective, "fallback_reason": reason, "device_type": "cpu"},
        metrics=Metrics(
            tokens_per_s=tps if ok else None,
            peak_memory_mb=mem,
            final_train_loss=2.6,
            eval_loss=eval_loss if ok else None,
            skipped_steps=history[-1].skipped_steps,
            final_loss_scale=history[-1].loss_scale,
            min_loss_scale=2.0**-30 if status == "diverged" and scaled else history[-1].loss_scale,
        ),
        history=history,
        status=status,
        error=error,
    )


def saved(tmp_path: Path, runs: list[RunResult]) -> list[RunResult]:
    """Round-trip through JSON files, as the report notebook reads them."""
    for r in runs:
        r.save(tmp_path / "results" / f"{r.config['run_name']}-{r.config.get('lr', '')}.json")
    return load_sweep(tmp_path)


def test_recommends_fastest_precision_within_tolerance(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [
            make("fp32", tps=1000, mem=200, eval_loss=2.00),
            make("bf16-mixed", tps=1800, mem=120, eval_loss=2.02),  # +1%: within 2%
            make("fp16-mixed", tps=2000, mem=110, eval_loss=2.20),  # faster but +10%
        ],
    )
    rec = recommend(runs, tolerance=0.02)
    assert (rec.precision, rec.requested, rec.stay_in_fp32) == ("bf16-mixed", "bf16-mixed", False)
    assert "2%" in rec.reason and "1.80x" in rec.reason
    assert any(line.startswith("fp16-mixed") and "Δ vs fp32 +0.2000" in line for line in rec.evidence)
    assert recommend(runs, tolerance=0.15).precision == "fp16-mixed"  # a looser tolerance admits fp16
    assert "**Recommendation" in rec.to_markdown() and "- fp32" in rec.to_markdown()


def test_stays_in_fp32_when_half_precision_diverges(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [
            make("fp32"),
            make(
                "fp16-mixed",
                status="diverged",
                tps=3000,
                error="loss scale collapsed to 9.3e-10 at step 4: fp16 overflows",
            ),
        ],
    )
    rec = recommend(runs)
    assert rec.precision == "fp32" and rec.stay_in_fp32
    assert rec.reason.startswith("stay in fp32") and "diverged" in rec.reason and "loss scale collapsed" in rec.reason


def test_stays_in_fp32_when_nothing_is_faster_or_a_request_fell_back_to_fp32(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [
            make("fp32", tps=1000),
            make("bf16-mixed", tps=600),
            make("tf32", effective="fp32", tps=1010, reason="tf32 needs an Ampere or newer GPU"),
        ],
    )
    rec = recommend(runs)
    assert rec.stay_in_fp32
    assert "not faster than fp32 here (0.60x" in rec.reason
    assert "tf32 (ran as fp32) runs as fp32 on this machine (tf32 needs an Ampere" in rec.reason


def test_recommends_effective_precision_of_a_fallback(tmp_path: Path) -> None:
    runs = saved(tmp_path, [make("fp32"), make("fp16-mixed", effective="bf16-mixed", tps=1500, reason="no fast fp16")])
    rec = recommend(runs)
    assert (rec.precision, rec.requested) == ("bf16-mixed", "fp16-mixed")
    assert "no fast fp16" in rec.reason


def test_no_fp32_baseline_means_no_recommendation(tmp_path: Path) -> None:
    runs = saved(tmp_path, [make("fp32", status="failed", error="ValueError: boom"), make("bf16-mixed")])
    rec = recommend(runs)
    assert rec.precision is None and "no successful fp32 run" in rec.reason
    assert "none" in rec.to_markdown()


def test_seeds_aggregate_into_mean_and_spread(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [
            make("fp32", seed=0, tps=1000, mem=200, eval_loss=2.0),
            make("fp32", seed=1, tps=1200, mem=200, eval_loss=2.2),
            make("bf16-mixed", seed=0, tps=2000, mem=150, eval_loss=2.0),
            make("bf16-mixed", seed=1, tps=2400, mem=150, eval_loss=2.3),
        ],
    )
    assert len(run_table(runs)) == 4
    fp32, bf16 = comparison_table(runs)
    assert (fp32.requested, bf16.requested) == ("fp32", "bf16-mixed")
    assert bf16.runs == 2 and bf16.seeds == (0, 1) and bf16.status == "ok"
    assert bf16.tokens_per_s.mean == pytest.approx(2200) and bf16.tokens_per_s.std == pytest.approx(282.84, rel=1e-3)
    assert bf16.speedup.mean == pytest.approx(2.0) and bf16.speedup.std == pytest.approx(0.0)  # same-seed ratios
    assert bf16.memory_saved_pct.mean == pytest.approx(25.0)
    assert bf16.loss_diff.mean == pytest.approx(0.05)  # (0.0 + 0.1) / 2
    assert fp32.speedup.mean == pytest.approx(1.0) and fp32.loss_diff.mean == pytest.approx(0.0)
    text = format_table(comparison_table(runs), "text")
    assert "2,200 ± 283 tokens" in text and "2 seeds (0, 1)" in text


def test_a_seed_that_diverges_disqualifies_the_precision(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [
            make("fp32", seed=0),
            make("fp32", seed=1),
            make("fp16-mixed", seed=0, tps=3000),
            make("fp16-mixed", seed=1, status="diverged", error="loss became nan at step 3"),
        ],
    )
    fp16 = comparison_table(runs)[1]
    assert fp16.status == "ok×1, diverged×1" and fp16.ok_runs == 1 and not fp16.all_ok
    assert fp16.min_loss_scale.n == 2 and fp16.min_loss_scale.std > 1e4  # the diverged seed's collapsed scale counts
    rec = recommend(runs)
    assert rec.stay_in_fp32 and "loss became nan" in rec.reason


def test_settings_are_compared_separately(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [make(p, lr=lr, tps=tps) for lr in (1e-3, 1e-2) for p, tps in (("fp32", 1000), ("bf16-mixed", 1500))],
    )
    recs = recommendations(runs)
    assert sorted(r.setting for r in recs) == ["gpt-tiny lr=0.001", "gpt-tiny lr=0.01"]
    assert all(r.precision == "bf16-mixed" for r in recs)
    with pytest.raises(ValueError, match=r"exactly one setting; got 2: 'gpt-tiny lr=0\.001'"):
        recommend(runs)
    assert "setting" in format_table(comparison_table(runs), "markdown")


def test_table_shows_failed_runs_and_every_column(tmp_path: Path) -> None:
    runs = saved(
        tmp_path,
        [make("fp32"), make("fp16-mixed", tps=900), make("bf16-true", status="oom", error="out of memory: CUDA\nmore")],
    )
    rows = run_table(runs)
    assert [(r.requested, r.status) for r in rows] == [("fp32", "ok"), ("fp16-mixed", "ok"), ("bf16-true", "oom")]
    md = format_table(rows, "markdown")
    for column in (
        "requested",
        "effective",
        "status",
        "speedup vs fp32",
        "memory saved",
        "eval loss",
        "Δ eval vs fp32",
        "skipped steps",
        "final scale",
        "min scale",
        "fallback / error",
    ):
        assert column in md
    assert "| oom |" in md and "out of memory: CUDA" in md and "more" not in md
    assert "| 1 |" in md and "3.28e+04" in md  # fp16 skipped steps and loss scale
    html = format_table(rows, "html")
    assert html.startswith("<table") and "<td>oom</td>" in html
    with pytest.raises(ValueError, match=r"invalid fmt 'csv'; valid: markdown, html, text"):
        format_table(rows, "csv")
    summary = summary_markdown(runs)
    assert summary.startswith("# AMP Workbook sweep summary") and "| oom |" in summary and "**Recommendation" in summary


def test_tolerance_must_be_a_non_negative_number() -> None:
    with pytest.raises(ValueError, match=r"tolerance=-0\.1 must be"):
        recommendations([make("fp32")], tolerance=-0.1)


def test_load_sweep_reads_results_subfolder_or_flat_folder(tmp_path: Path) -> None:
    make("fp32").save(tmp_path / "flat" / "a.json")
    assert [r.config["precision"] for r in load_sweep(tmp_path / "flat")] == ["fp32"]
    make("bf16-mixed").save(tmp_path / "sweep" / "results" / "b.json")
    (tmp_path / "sweep" / "runs").mkdir()
    assert [r.config["precision"] for r in load_sweep(tmp_path / "sweep")] == ["bf16-mixed"]
    with pytest.raises(ValueError, match="is not a folder"):
        load_sweep(tmp_path / "missing")


def test_results_module_reexports_the_report() -> None:
    for name in ("comparison_table", "recommend", "recommendations", "format_table", "load_sweep", "summary_markdown"):
        assert getattr(results_module, name) is getattr(report, name)


def test_stat_formats_mean_and_spread() -> None:
    assert Stat.of([None, float("nan")]) is None
    assert Stat.of([2.0]).format(".2f", "x") == "2.00x"
    assert Stat.of([1.0, 3.0]).format(".3g") == "2 ± 1.41"


def test_report_figures_are_written_as_png(tmp_path: Path) -> None:
    runs = [make("fp32"), make("fp16-mixed"), make("bf16-mixed", status="failed", error="boom")]
    paths = save_report_figures(runs, tmp_path / "figures")
    assert set(paths) == set(REPORT_FIGURES)
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(run_figure(runs[1]).axes) == 2  # loss + loss-scale trace for fp16
    assert len(run_figure(runs[0]).axes) == 1
    scale_ax = save_report_figures([make("fp32")], tmp_path / "none")  # no scaler anywhere: still a figure
    assert scale_ax["loss_scale"].exists()
