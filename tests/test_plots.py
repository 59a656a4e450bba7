"""The figures of one run and of a sweep report: what each panel draws, and the PNGs they are saved as."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from factories import eval_curve, history, make_result
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from amp_lib.explore import Bar, FigureData, Line
from amp_lib.plots import (
    eval_curves_figure,
    explore_figure,
    figure_png,
    loss_figure,
    loss_scale_figure,
    memory_split_figure,
    run_figure,
    save_figure,
    save_report_figures,
    throughput_memory_figure,
    time_to_quality_figure,
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
    assert run_figure(nameless).get_suptitle() == "fp32 → fp32 [failed]"  # no dangling ": " without a name


def test_a_run_that_failed_before_its_first_step_says_no_loss_was_recorded() -> None:
    (ax,) = run_figure(make_result("bf16-true", status="oom", error="out of memory")).axes
    assert texts(ax) == ["no loss recorded"]
    assert legend(ax) == ["bf16-true-s0 [oom]"]  # still named, so the reader sees which run it was


def test_run_figure_draws_evals_as_dots_and_can_fix_the_axis_and_name_the_state() -> None:
    result = make_result("fp32", rows=history(5), evals=eval_curve(2.9, None, 2.7, every=2))
    (ax,) = run_figure(result, steps=10, state="training").axes
    _, evals = ax.lines
    assert (evals.get_marker(), list(evals.get_xdata()), list(evals.get_ydata())) == ("o", [2, 6], [2.9, 2.7])
    assert legend(ax) == ["fp32-s0", "eval loss"] and ax.get_ylabel() == "loss (line: train, dots: eval)"
    assert ax.get_xlim() == (0.0, 10.0)
    assert run_figure(result, steps=10, state="training").get_suptitle() == "fp32-s0: fp32 → fp32 [training]"
    (auto,) = run_figure(result).axes
    assert auto.get_xlim() != (0.0, 10.0) and run_figure(result).get_suptitle().endswith("[ok]")


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


def test_throughput_title_does_not_take_its_unit_from_the_first_row_when_units_mix() -> None:
    rows = comparison_table([make_result("fp32", lr=1, unit="tokens"), make_result("fp32", lr=2, unit="samples")])
    left, right = throughput_memory_figure(rows).axes
    assert left.get_title() == "throughput (mixed units: samples/s and tokens/s)"
    assert [t.get_text() for t in left.get_xticklabels()] == [
        "fp32\ngpt-tiny lr=1\n(tokens/s)",
        "fp32\ngpt-tiny lr=2\n(samples/s)",
    ]
    assert [t.get_text() for t in right.get_xticklabels()] == [t.get_text() for t in left.get_xticklabels()]


# --- eval curves, time to quality, memory split ----------------------------------------------------


def ttq_report():
    runs = [make_result("fp32", s, evals=eval_curve(3.0, 2.5, 2.0 + 0.01 * s)) for s in range(2)]
    runs += [make_result("bf16-mixed", s, evals=eval_curve(3.0, 2.0, 2.0, step_s=0.05)) for s in range(2)]
    runs += [make_result("fp16-mixed", 0, evals=eval_curve(3.0, 2.9, 2.8))]
    runs += [make_result("fp16-mixed", 1, status="diverged", evals=eval_curve(3.0, None))]
    runs += [make_result("tf32", s, evals=eval_curve(3.0, 2.0 if s == 0 else 2.6, 2.9)) for s in range(2)]
    return build_report(runs)


def test_eval_curves_draw_the_seed_mean_a_band_and_the_quality_target() -> None:
    report = ttq_report()
    full, zoom = eval_curves_figure(report).axes
    assert full.get_title() == "eval loss vs step (band: min–max over seeds)"
    assert zoom.get_title() == "second half, zoomed"
    assert legend(full) == ["fp32 (2 seeds)", "tf32 (2 seeds)", "fp16-mixed (1 seed)", "bf16-mixed (2 seeds)",
                            "fp32's quality target 2.0451"]  # fmt: skip
    fp32_line = full.lines[0]
    assert list(fp32_line.get_xdata()) == [10, 20, 30] and list(fp32_line.get_ydata()) == pytest.approx(
        [3.0, 2.5, 2.005]
    )
    assert len(full.collections) == 3  # a band for each precision with two seeds; fp16's diverged seed is left out
    band = full.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == 2.0 and max(band) == 3.0
    assert full.lines[-1].get_ydata()[0] == pytest.approx(2.0451)  # fp32 mean best 2.005 + 2%
    assert list(zoom.lines[0].get_xdata()) == [20, 30]  # the second half: from step 15 on
    empty_full, empty_zoom = eval_curves_figure(build_report([make_result("fp32", eval_loss=None)])).axes
    assert texts(empty_full) == texts(empty_zoom) == ["no eval recorded"]


def test_eval_curves_have_a_row_per_setting() -> None:
    runs = [make_result("fp32", 0, lr=lr, evals=eval_curve(2.0)) for lr in (1, 2)]
    axes = eval_curves_figure(build_report(runs)).axes
    assert [ax.get_title() for ax in axes] == [
        "eval loss vs step — gpt-tiny lr=1 (band: min–max over seeds)", "second half, zoomed — gpt-tiny lr=1",
        "eval loss vs step — gpt-tiny lr=2 (band: min–max over seeds)", "second half, zoomed — gpt-tiny lr=2",
    ]  # fmt: skip


def test_the_zoomed_panel_leaves_out_a_precision_that_stopped_in_the_first_half() -> None:
    runs = [make_result("fp32", evals=eval_curve(3.0, 2.5, 2.2, 2.0)), make_result("bf16-mixed", evals=eval_curve(3.0))]
    full, zoom = eval_curves_figure(build_report(runs)).axes
    assert legend(full)[:2] == ["fp32 (1 seed)", "bf16-mixed (1 seed)"]
    assert legend(zoom)[:1] == ["fp32 (1 seed)"] and len(zoom.lines) == 2  # fp32 and the target line
    assert list(zoom.lines[0].get_xdata()) == [20, 30, 40]


def test_time_to_quality_bars_say_never_reached_and_partly_reached() -> None:
    (ax,) = time_to_quality_figure(ttq_report()).axes
    assert ax.get_title() == "time to fp32's quality (its mean best eval loss + tolerance)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "tf32", "fp16-mixed", "bf16-mixed"]
    assert [p.get_height() for p in ax.patches] == [pytest.approx(3.0), pytest.approx(2.0), 0.0, pytest.approx(1.0)]
    assert texts(ax) == ["1 of 2 seeds", "never reached\nin 30 steps", "3.00x fp32"]
    (empty,) = time_to_quality_figure(build_report([make_result("fp32", eval_loss=None)])).axes
    assert texts(empty) == ["no eval recorded"] and len(empty.patches) == 0


def test_memory_split_stacks_the_parts_and_hatches_a_peak_without_a_split() -> None:
    split = {"param_memory_mb": 10.0, "grad_memory_mb": 10.0, "optimizer_memory_mb": 20.0}
    runs = [make_result("fp32", mem=100.0, metrics={**split, "peak_memory_kind": "cpu_rss"}),
            make_result("bf16-mixed", mem=70.0), make_result("fp16-mixed", status="oom", mem=None)]  # fmt: skip
    (ax,) = memory_split_figure(build_report(runs)).axes
    assert ax.get_title() == "peak memory split\n(CPU: the peak is the whole process's resident set)"
    assert legend(ax) == ["parameters", "gradients", "optimizer", "rest", "peak (no split recorded)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "bf16-mixed"]  # the oom run has no peak
    heights = [(p.get_y(), p.get_height()) for p in ax.patches]
    assert heights[0::2][:4] == [(0.0, 10.0), (10.0, 10.0), (20.0, 20.0), (40.0, 60.0)]  # fp32: stacked to its peak
    assert heights[-1] == (0.0, 70.0) and ax.patches[-1].get_hatch() == "//"
    (gpu,) = memory_split_figure(
        build_report([make_result("fp32", metrics={**split, "peak_memory_kind": "cuda_allocated"})])
    ).axes
    assert gpu.get_title() == "peak memory split"
    (empty,) = memory_split_figure(build_report([make_result("fp32", mem=None)])).axes
    assert texts(empty) == ["no memory recorded"]


# --- the explorer's view ------------------------------------------------------------------------


def test_explore_figure_colours_lines_by_precision_styles_them_by_seed_and_crosses_marks() -> None:
    data = FigureData(
        "loss scale",
        "loss scale (x = skipped step)",
        lines=(
            Line("fp32 s0", "fp32", 0, (0, 1), (1.0, 2.0)),
            Line("fp16-mixed s1", "fp16-mixed", 1, (0, 1), (4.0, 2.0), marks=((1, 2.0),)),
            Line("bf16-mixed s0 [diverged]", "bf16-mixed", 0, (0,), (3.0,), ok=False),
        ),
        log_y=True,
    )
    (ax,) = explore_figure(data).axes
    fp32, fp16, cross, bf16 = ax.lines
    assert (fp32.get_color(), fp32.get_linestyle()) == ("tab:blue", "-") and fp32.get_linewidth() > fp16.get_linewidth()
    assert (fp16.get_color(), fp16.get_linestyle()) == ("tab:red", "--")  # the second seed
    assert (cross.get_marker(), list(cross.get_xdata())) == ("x", [1])
    assert bf16.get_linestyle() == "--"  # not ok
    assert ax.get_yscale() == "log" and ax.get_title() == "loss scale" and ax.get_xlabel() == "step"
    assert legend(ax) == ["fp32 s0", "fp16-mixed s1", "bf16-mixed s0 [diverged]"] and texts(ax) == []


def test_explore_figure_stacks_memory_parts_and_shows_an_unsplit_peak_whole() -> None:
    parts = (("parameters", 10.0), ("gradients", 10.0), ("optimizer", 20.0), ("rest", 50.0))
    data = FigureData(
        "memory",
        "peak memory (MB)",
        bars=(Bar("fp16 s0", "fp16-mixed", 0, 90.0, parts), Bar("fp32 s0", "fp32", 0, 100.0)),
    )
    (ax,) = explore_figure(data).axes
    heights = [p.get_height() for p in ax.patches]
    assert heights == [10.0, 0.0, 10.0, 0.0, 20.0, 0.0, 50.0, 0.0, 100.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp16 s0", "fp32 s0"]
    assert legend(ax) == ["parameters", "gradients", "optimizer", "rest", "peak (no split)"]


def test_explore_figure_of_nothing_says_why_and_figure_png_is_a_png() -> None:
    fig = explore_figure(FigureData("eval loss", "eval loss", note="no eval recorded"))
    assert texts(fig.axes[0]) == ["no eval recorded"] and fig.axes[0].get_legend() is None
    assert figure_png(fig).startswith(PNG)


# --- saving --------------------------------------------------------------------------------------


def test_save_figure_writes_a_png_creating_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "fig.png"
    no_scaler = loss_scale_figure([make_result("fp32", rows=history(5))])  # only a message: still a figure
    assert save_figure(no_scaler, str(target)) == target  # a str path in, the Path out
    assert target.read_bytes()[:8] == PNG


@pytest.mark.slow  # renders five or six PNGs: a few seconds on a busy 2-core machine
def test_save_report_figures_writes_the_report_figures_and_the_scale_only_with_a_scaler(tmp_path: Path) -> None:
    runs = [
        make_result("fp32", rows=history(5)),
        make_result("fp16-mixed", **FP16),
        make_result("bf16-mixed", status="failed", error="boom"),
    ]
    paths = save_report_figures(build_report(runs), tmp_path / "figures")
    names = ["eval_curves", "time_to_quality", "memory_split", "throughput_memory", "loss", "loss_scale"]
    assert list(paths) == names
    for name, path in paths.items():
        assert path == tmp_path / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(f"{n}.png" for n in names)
    unscaled = save_report_figures(build_report(runs[:1] + runs[2:]), tmp_path / "unscaled")
    assert list(unscaled) == names[:-1]  # no run used a scaler: no figure that only says so
    assert not (tmp_path / "unscaled" / "loss_scale.png").exists()


# --- the headroom heatmap ----------------------------------------------------------------------------


def test_the_headroom_heatmap_has_a_row_per_layer_a_column_per_sampled_step_and_marks_the_overflow() -> None:
    from amp_lib.plots import headroom_figure

    stats = {"max_abs": 65504 / 2**3, "underflow_subnormal": 0.0, "underflow_normal": 0.0, "nonfinite": 0.0}
    bad = {**stats, "max_abs": 0.0, "nonfinite": 1.0}
    headroom = {
        "modules": ["a", "b"],
        "samples": [
            {"step": 0, "activation": {"a": stats, "b": stats}, "gradient": {"a": stats, "b": stats}},
            {"step": 5, "activation": {"a": stats, "b": bad}, "gradient": {"a": stats}},
        ],
        "first_overflow": [{"step": 5, "module": "b", "phase": "forward", "loss_scale": 8.0}],
    }
    fig = headroom_figure(headroom)
    act, grad = fig.axes[:2]  # two heatmaps (their colour bars come after)
    assert len(fig.axes) == 4
    grid = act.images[0].get_array()
    assert grid.shape == (2, 2) and grid[0, 0] == pytest.approx(3.0) and grid[1, 1] == -4.0  # overflowed: the floor
    assert [t.get_text() for t in act.get_yticklabels()] == ["a", "b"]
    assert [t.get_text() for t in act.get_xticklabels()] == ["0", "5"]
    (marker,) = act.lines
    assert (list(marker.get_xdata()), list(marker.get_ydata())) == ([1], [1])  # step 5, module b
    assert not grad.lines and bool(grad.images[0].get_array().mask[1, 1])  # no gradient sample: left blank
