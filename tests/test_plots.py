"""The figures of one run and of a sweep report: what each panel draws, and the PNGs they are saved as."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from factories import history, make_result
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from amp_lib.plots import (
    loss_figure,
    loss_scale_figure,
    run_figure,
    save_figure,
    save_report_figures,
    throughput_memory_figure,
)
from amp_lib.report import build_report, comparison_table

PNG = b"\x89PNG\r\n\x1a\n"
FP16 = {"skipped": 1, "final_scale": 32768.0, "min_scale": 32768.0, "rows": history(5, scaled=True, skip_at=2)}


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# --- one run -------------------------------------------------------------------------------------


def test_run_figure_has_a_loss_panel_and_a_scale_panel_only_with_a_scaler() -> None:
    fp16 = run_figure(make_result("fp16-mixed", **FP16))
    loss_ax, scale_ax = fp16.axes
    assert isinstance(fp16, Figure) and isinstance(fp16.canvas, FigureCanvasAgg)  # no pyplot, no display
    assert fp16.get_suptitle() == "fp16-mixed-s0: fp16-mixed → fp16-mixed [ok]"
    assert (loss_ax.get_title(), scale_ax.get_title()) == ("loss vs step", "loss scale vs step (x = skipped step)")
    assert scale_ax.get_yscale() == "log"
    fp32 = run_figure(make_result("fp32", rows=history(5)))
    (only,) = fp32.axes
    assert only.get_title() == "loss vs step" and (only.get_xlabel(), only.get_ylabel()) == ("step", "train loss")
    assert list(only.lines[0].get_ydata()) == [r.loss for r in history(5)]


def test_run_figure_of_a_fallback_and_of_a_run_without_a_name() -> None:
    fell_back = make_result("fp16-mixed", effective="bf16-mixed", rows=history(3), reason="no fast fp16")
    assert run_figure(fell_back).get_suptitle() == "fp16-mixed-s0: fp16-mixed → bf16-mixed [ok]"
    nameless = make_result("fp32", status="failed", error="boom", run_name=None)
    assert run_figure(nameless).get_suptitle() == ": fp32 → fp32 [failed]"


def test_a_run_that_failed_before_its_first_step_says_no_loss_was_recorded() -> None:
    (ax,) = run_figure(make_result("bf16-true", status="oom", error="out of memory")).axes
    assert texts(ax) == ["no loss recorded"]
    assert legend(ax) == ["bf16-true-s0 [oom]"]  # still named, so the reader sees which run it was


# --- loss and loss-scale figures -----------------------------------------------------------------


def test_loss_figure_draws_one_line_per_run_dashed_and_crossed_when_not_ok() -> None:
    ok = make_result("fp32", rows=history(5))
    diverged = make_result("fp16-mixed", 1, status="diverged", rows=history(4, scaled=True, loss0=4.0))
    (ax,) = loss_figure([ok, diverged]).axes
    solid, dashed, cross = ax.lines
    assert (solid.get_linestyle(), solid.get_color()) == ("-", "tab:blue")
    assert (dashed.get_linestyle(), dashed.get_color()) == ("--", "tab:red")
    assert list(dashed.get_xdata()) == [0, 1, 2, 3]
    assert (cross.get_marker(), list(cross.get_xdata()), list(cross.get_ydata())) == (
        "x",
        [3],
        [diverged.history[-1].loss],
    )
    assert legend(ax) == ["fp32-s0", "fp16-mixed-s1 [diverged]"]
    assert texts(ax) == []


def test_loss_figure_skips_steps_without_a_loss_and_colours_unknown_precisions_grey() -> None:
    rows = history(4)
    rows = (rows[0], replace(rows[1], loss=None), *rows[2:])
    (ax,) = loss_figure([make_result("custom", rows=rows)]).axes
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0, 2, 3] and line.get_color() == "tab:gray"


def test_loss_figure_of_no_runs_says_no_loss_was_recorded() -> None:
    (ax,) = loss_figure([]).axes
    assert texts(ax) == ["no loss recorded"] and ax.get_legend() is None


def test_loss_scale_figure_draws_scaled_runs_and_marks_skipped_steps() -> None:
    fp16 = make_result("fp16-mixed", **FP16)
    (ax,) = loss_scale_figure([make_result("fp32", rows=history(5)), fp16]).axes
    trace, skipped = ax.lines  # the fp32 run has no scale to draw
    assert list(trace.get_ydata()) == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]
    assert (skipped.get_marker(), list(skipped.get_xdata()), list(skipped.get_ydata())) == ("x", [2], [32768.0])
    assert legend(ax) == ["fp16-mixed-s0", "skipped (fp16-mixed-s0)"]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss scale" and texts(ax) == []


def test_loss_scale_figure_without_a_scaler_says_so() -> None:
    (ax,) = loss_scale_figure([make_result("fp32", rows=history(5))]).axes
    assert texts(ax) == ["no run used a loss scaler (only fp16-mixed does)"]
    assert len(ax.lines) == 0 and ax.get_yscale() == "linear" and ax.get_legend() is None


# --- throughput and memory -----------------------------------------------------------------------


def test_throughput_memory_figure_shows_means_spreads_and_missing_values() -> None:
    runs = [
        make_result("fp32", 0, tps=1000, mem=200),
        make_result("fp32", 1, tps=1200, mem=200),
        make_result("bf16-mixed", tps=2000, mem=150),
        make_result("fp16-mixed", status="oom", tps=None, mem=None),
    ]
    left, right = throughput_memory_figure(comparison_table(runs)).axes
    assert (left.get_title(), right.get_title()) == ("throughput (tokens/s)", "peak memory (MB)")
    assert [p.get_height() for p in left.patches] == [1100.0, 0.0, 2000.0]  # fp32, fp16 (none), bf16
    assert [p.get_height() for p in right.patches] == [200.0, 0.0, 150.0]
    assert [p.get_facecolor() for p in left.patches] == [to_rgba(c) for c in ("tab:blue", "tab:red", "tab:green")]
    assert [t.get_text() for t in left.get_xticklabels()] == ["fp32", "fp16-mixed", "bf16-mixed"]
    assert texts(left) == ["oom"] and texts(right) == ["oom"]  # a bar with no value names the status
    errorbars, _ = left.containers
    low, high = errorbars.lines[1]  # caps at mean ± std: fp32's two seeds spread, the others none
    assert list(low.get_ydata()) == [1100.0 - 141.4213562373095, 0.0, 2000.0]
    assert list(high.get_ydata()) == [1100.0 + 141.4213562373095, 0.0, 2000.0]


def test_throughput_memory_figure_labels_settings_and_units() -> None:
    rows = comparison_table([make_result("fp32", lr=1, unit="samples"), make_result("fp32", lr=2, unit="samples")])
    left, _ = throughput_memory_figure(rows).axes
    assert left.get_title() == "throughput (samples/s)"
    assert [t.get_text() for t in left.get_xticklabels()] == ["fp32\ngpt-tiny lr=1", "fp32\ngpt-tiny lr=2"]
    empty_left, _ = throughput_memory_figure([]).axes
    assert empty_left.get_title() == "throughput (tokens/s)" and len(empty_left.patches) == 0


# --- saving --------------------------------------------------------------------------------------


def test_save_figure_writes_a_png_creating_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "fig.png"
    no_scaler = loss_scale_figure([make_result("fp32", rows=history(5))])  # only a message: still a figure
    assert save_figure(no_scaler, str(target)) == target  # a str path in, the Path out
    assert target.read_bytes()[:8] == PNG


@pytest.mark.slow  # renders three PNGs: about a second of CPU on its own, more on a busy 2-core machine
def test_save_report_figures_writes_the_three_figures_of_a_report(tmp_path: Path) -> None:
    runs = [
        make_result("fp32", rows=history(5)),
        make_result("fp16-mixed", **FP16),
        make_result("bf16-mixed", status="failed", error="boom"),
    ]
    paths = save_report_figures(build_report(runs), tmp_path / "figures")
    assert list(paths) == ["loss", "throughput_memory", "loss_scale"]
    for name, path in paths.items():
        assert path == tmp_path / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "loss.png",
        "loss_scale.png",
        "throughput_memory.png",
    ]
