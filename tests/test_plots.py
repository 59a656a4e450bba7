"""The figures of one run and of a sweep report: what each panel draws, that a reader can see every series it
lists (`figure_problems`, applied to every figure plots.py makes), and the PNGs they are saved as."""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from factories import eval_curve, history, make_result
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import Collection
from matplotlib.colors import to_hex, to_rgb, to_rgba
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.path import Path as MplPath
from matplotlib.transforms import Bbox

from amp_lib.explore import VIEWS, Bar, Explorer, FigureData, Line, Selection
from amp_lib.figstyle import DPI
from amp_lib.memtrack import MemorySplit as MemtrackSplit
from amp_lib.plots import (
    eval_curves_figure,
    explore_figure,
    figure_png,
    headroom_figure,
    loss_figure,
    loss_scale_figure,
    memory_split_figure,
    report_figures,
    run_figure,
    save_figure,
    save_report_figures,
    throughput_memory_figure,
    time_to_quality_figure,
)
from amp_lib.render import memory_text
from amp_lib.report import build_report
from amp_lib.results import RunResult
from amp_lib.speed import UNDECIDED, UNRELIABLE

PNG = b"\x89PNG\r\n\x1a\n"
FP16 = {"skipped": 1, "final_scale": 32768.0, "min_scale": 32768.0, "rows": history(5, scaled=True, skip_at=2)}
MIN_WIDTH_PX = 900
MIN_LEGEND_PX = 10.0


# --- the readability check -------------------------------------------------------------------------


def _solid(line: Line2D) -> bool:
    return line.get_linestyle() == "-"


def _has_marker(line: Line2D) -> bool:
    return line.get_marker() not in (None, "", " ", "None", "none")


def _drawn(line: Line2D) -> bool:
    return line.get_visible() and (line.get_linestyle() not in ("None", "", " ") or _has_marker(line))


def _pixels(line: Line2D) -> np.ndarray:
    xy = np.asarray(line.get_xydata(), dtype=float).reshape(-1, 2)
    return line.get_transform().transform(xy[np.isfinite(xy).all(axis=1)])


def _covers(upper: Line2D, lower: Line2D) -> bool:
    """Whether `upper`, drawn above `lower`, hides it: the same points to a pixel, the same draw style, an opaque line
    at least as wide that is solid or of `lower`'s own colour (dashes of one colour over a line of that colour
    leave nothing to tell them apart), and every marker of `lower` under one of `upper`'s."""
    a, b = _pixels(upper), _pixels(lower)
    if a.shape != b.shape or not len(a) or np.abs(a - b).max() > 1.0 or upper.get_drawstyle() != lower.get_drawstyle():
        return False
    same_colour = to_rgba(upper.get_color()) == to_rgba(lower.get_color())
    if _drawn_line(lower) and not (_solid(upper) or (same_colour and _drawn_line(upper))):
        return False
    if upper.get_alpha() not in (None, 1.0) or upper.get_linewidth() < lower.get_linewidth():
        return False
    if _has_marker(lower):
        same = upper.get_marker() == lower.get_marker() and str(upper.get_markevery()) == str(lower.get_markevery())
        return same and upper.get_markersize() >= lower.get_markersize()
    return True


def _drawn_line(line: Line2D) -> bool:
    return line.get_linestyle() not in ("None", "", " ")


def _line_problem(ax: Any, line: Line2D, label: str) -> str | None:
    if not _drawn(line):
        return f"{label!r}: its line is not drawn"
    frame = ax.get_window_extent()
    inside = [p for p in _pixels(line) if frame.x0 - 1 <= p[0] <= frame.x1 + 1 and frame.y0 - 1 <= p[1] <= frame.y1 + 1]
    if not inside:
        return f"{label!r}: no point of it inside the axes"
    lines = ax.get_lines()
    below = lines.index(line)
    for other in lines:
        above = other.get_zorder() > line.get_zorder() or (
            other.get_zorder() == line.get_zorder() and lines.index(other) > below
        )
        if other is not line and other.get_visible() and above and _covers(other, line):
            return f"{label!r}: hidden under {other.get_label()!r}, drawn above it on the same points"
    return None


def _bars_problem(bars: BarContainer, label: str, renderer: Any) -> str | None:
    sizes = [p.get_window_extent(renderer) for p in bars.patches if p.get_visible()]
    if not any(s.width >= 1 and s.height >= 1 for s in sizes):
        tallest = max((s.height for s in sizes), default=0.0)
        return f"{label!r}: its bars are too small to see ({tallest:.2f} px at most)"
    return None


def _errorbar_segments(ax: Any, dpi: float) -> list[np.ndarray]:
    """Every error bar line of `ax` in pixels: the bars and their caps (a cap as its width of line)."""
    segments = []
    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer):
            continue
        _, caps, bars = container.lines
        for collection in bars:
            transform = collection.get_transform()
            segments += [transform.transform(np.asarray(s)) for s in collection.get_segments()]
        for cap in caps:
            half = cap.get_markersize() * dpi / 72 / 2
            for x, y in _pixels(cap):
                segments.append(np.array([[x - half, y], [x + half, y]]))
    return segments


def figure_problems(fig: Figure, dpi: float = DPI) -> list[str]:
    """What keeps a reader of `fig` (saved at `dpi`) from seeing it: a figure under 900 px wide, legend text
    under 10 px, a legend entry without a visible series (not drawn, outside the axes, bars under a pixel, or
    hidden under another series drawn above it on the same points), a text crossed by an error bar, texts or x tick
    labels on top of each other."""
    problems = []
    width = fig.get_figwidth() * dpi
    if width < MIN_WIDTH_PX:
        problems.append(f"the figure is {width:.0f} px wide (at least {MIN_WIDTH_PX})")
    fig.set_dpi(dpi)
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            handles, labels = ax.get_legend_handles_labels()
            shown = [t.get_text() for t in legend.get_texts()]
            if shown != labels:
                problems.append(f"the legend lists {shown}, the axes' labelled series are {labels}")
            for text in legend.get_texts():
                if text.get_fontsize() * dpi / 72 < MIN_LEGEND_PX:
                    problems.append(f"legend text {text.get_text()!r} is {text.get_fontsize() * dpi / 72:.1f} px")
            for handle, label in zip(handles, labels):
                problem: str | None = None
                if isinstance(handle, Line2D):
                    problem = _line_problem(ax, handle, label)
                elif isinstance(handle, BarContainer):
                    problem = _bars_problem(handle, label, renderer)
                elif isinstance(handle, (Collection, Artist)) and not handle.get_visible():
                    problem = f"{label!r} is not visible"
                if problem:
                    problems.append(problem)
        for kind, labels in (("tick labels", ax.get_xticklabels()), ("labels", ax.texts)):
            shown = [t for t in labels if t.get_visible() and t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in shown]
            for i, (a, box_a) in enumerate(zip(shown, boxes)):
                for b, box_b in zip(shown[i + 1 :], boxes[i + 1 :]):
                    if box_a.overlaps(box_b):
                        problems.append(f"the {kind} {a.get_text()!r} and {b.get_text()!r} overlap")
        segments = _errorbar_segments(ax, dpi)
        for text in ax.texts:
            if not text.get_visible() or not text.get_text():
                continue
            box = text.get_window_extent(renderer)
            if any(MplPath(s).intersects_bbox(Bbox(box.get_points()), filled=False) for s in segments):
                problems.append(f"the label {text.get_text()!r} is crossed by an error bar")
    return problems


def assert_readable(fig: Figure) -> None:
    assert figure_problems(fig) == []


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _figure(width: float = 10.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, 4), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def test_the_check_finds_a_series_hidden_under_another_on_the_same_points() -> None:
    fig, ax = _figure()
    ax.plot([0, 1, 2], [3.0, 2.0, 1.5], "-", color="tab:green", linewidth=2, label="bf16-mixed")
    ax.plot([0, 1, 2], [3.0, 2.0 + 1e-6, 1.5], "-", color="tab:blue", linewidth=2, label="fp32")  # on top, solid
    ax.legend(fontsize=9)
    assert figure_problems(fig) == ["'bf16-mixed': hidden under 'fp32', drawn above it on the same points"]
    ax.lines[1].set_linestyle("--")  # dashed: the line under it shows between the dashes
    assert figure_problems(fig) == []
    ax.lines[1].set_color("tab:green")  # ...unless it is of the same colour: then nothing tells the two apart
    assert figure_problems(fig) == ["'bf16-mixed': hidden under 'fp32', drawn above it on the same points"]
    ax.lines[1].set_color("tab:blue")
    ax.lines[1].set_linestyle("-")
    ax.lines[0].set_zorder(3)  # the same lines, the green one now on top
    assert figure_problems(fig) == ["'fp32': hidden under 'bf16-mixed', drawn above it on the same points"]
    ax.lines[1].set_marker("o")  # the hidden line's markers are not under the other's: they show
    assert figure_problems(fig) == []


def test_the_check_finds_a_label_crossed_by_an_error_bar_or_by_another_label() -> None:
    fig, ax = _figure()
    ax.bar([0, 1], [2.0, 3.0])
    ax.errorbar([0, 1], [2.0, 3.0], yerr=[1.0, 0.1], fmt="none", capsize=4)
    ax.text(0, 2.0, "0.68x fp32", ha="center", va="bottom")  # at the bar's top, where its error bar goes on
    ax.annotate("fine", (1, 3.1), xytext=(0, 5), textcoords="offset points", ha="center", va="bottom")
    ax.set_ylim(0, 4)
    assert figure_problems(fig) == ["the label '0.68x fp32' is crossed by an error bar"]
    ax.text(0.5, 0.5, "uses 2.4% more", transform=ax.transAxes)
    ax.text(0.52, 0.5, "saves 10%", transform=ax.transAxes)  # two labels on one place
    assert figure_problems(fig) == [
        "the labels 'uses 2.4% more' and 'saves 10%' overlap",
        "the label '0.68x fp32' is crossed by an error bar",
    ]


def test_the_check_finds_bars_too_small_to_see_small_figures_small_legend_text_and_crowded_ticks() -> None:
    fig, ax = _figure(width=6.0)
    ax.bar([0, 1], [0.46, 0.46], label="parameters")
    ax.bar([0, 1], [462.0, 420.0], bottom=[0.46, 0.46], label="rest")
    ax.plot([], [], label="nothing")
    ax.legend(fontsize="small")
    ax.set_xticks([0, 0.1], ["fp16-mixed s0 [diverged]", "fp16-mixed s1"])  # labels wider than their distance
    assert figure_problems(fig, dpi=72) == [
        "the figure is 432 px wide (at least 900)",
        "legend text 'nothing' is 8.3 px",
        "legend text 'parameters' is 8.3 px",
        "legend text 'rest' is 8.3 px",
        "'nothing': no point of it inside the axes",
        "'parameters': its bars are too small to see (0.21 px at most)",
        "the tick labels 'fp16-mixed s0 [diverged]' and 'fp16-mixed s1' overlap",
    ]


# --- every figure plots.py makes ---------------------------------------------------------------------


def ttq_report():
    runs = [make_result("fp32", s, evals=eval_curve(3.0, 2.5, 2.0 + 0.01 * s)) for s in range(2)]
    runs += [make_result("bf16-mixed", s, evals=eval_curve(3.0, 2.0, 2.0, step_s=0.05)) for s in range(2)]
    runs += [make_result("fp16-mixed", 0, evals=eval_curve(3.0, 2.9, 2.8))]
    runs += [make_result("fp16-mixed", 1, status="diverged", evals=eval_curve(3.0, None))]
    runs += [make_result("tf32", s, evals=eval_curve(3.0, 2.0 if s == 0 else 2.6, 2.9)) for s in range(2)]
    return build_report(runs)


SPLIT = {"param_memory_mb": 0.46, "grad_memory_mb": 0.46, "optimizer_memory_mb": 0.92, "peak_memory_kind": "cpu_rss"}


def cpu_sweep() -> list[RunResult]:
    """fp32, bf16-mixed (on fp32's very curves) and fp16-mixed (from 2**20, skipping), two seeds each, timed while
    two runs shared the machine (unreliable), on a CPU: a 420-460 MB resident set around 2 MB of tensors."""
    out = []
    for seed in (0, 1):
        common = {"metrics": SPLIT, "plan": {"concurrent_runs": 2}}
        curve = eval_curve(3.0 - seed / 10, 2.5, 2.2, every=4)
        rows = history(12, loss0=3.2 + seed / 10)
        out += [
            make_result("fp32", seed, rows=rows, evals=curve, tps=1000 + 900 * seed, mem=420.0, **common),
            make_result("bf16-mixed", seed, rows=rows, evals=curve, tps=800 + 600 * seed, mem=430.0, **common),
        ]
        scaled = tuple(replace(r, loss_scale=2.0**19 if i == 0 else 2.0**18, skipped=i == 0)
                       for i, r in enumerate(history(12, scaled=True, loss0=3.3)))  # fmt: skip
        out.append(make_result("fp16-mixed", seed, rows=scaled, evals=eval_curve(3.1, 2.6, 2.3, every=4),
                               tps=1500.0 + 50 * seed, mem=462.0, skipped=1, **common))  # fmt: skip
    return out


def explorer_figure(selection: Callable[[Selection], Selection]) -> Callable[[], Figure]:
    def draw() -> Figure:
        ex = Explorer.of(cpu_sweep())
        return explore_figure(ex.figure_data(selection(ex.default_selection())))

    return draw


HEADROOM = {
    "modules": ["a", "b"],
    "samples": [
        {"step": 0, "activation": {"a": {"max_abs": 8.0, "nonfinite": 0.0}}, "gradient": {}},
        {"step": 5, "activation": {"b": {"max_abs": 0.0, "nonfinite": 1.0}}, "gradient": {}},
    ],
    "first_overflow": [{"step": 5, "module": "b", "phase": "forward", "loss_scale": 8.0}],
}

# The report's figures by name (as `report_figures` draws them), each from a report.
REPORT_FIGURES: dict[str, Callable[[Any], Figure]] = {
    "eval_curves": eval_curves_figure,
    "time_to_quality": time_to_quality_figure,
    "memory_split": memory_split_figure,
    "throughput_memory": lambda report: throughput_memory_figure(report.groups),
    "loss": lambda report: loss_figure(report.results),
    "loss_scale": lambda report: loss_scale_figure(report.results),
}
REPORTS: dict[str, Callable[[], Any]] = {
    "cpu": lambda: build_report(cpu_sweep()),
    "ttq": ttq_report,
    "one seed": lambda: build_report(cpu_sweep()[:3]),
    "two settings": lambda: build_report(
        [replace(r, config={**r.config, "lr": lr}) for r in cpu_sweep() for lr in (1e-3, 3e-4)]
    ),
}
FAILED = {"status": "diverged", "rows": history(4, scaled=True, skip_at=1)}


def every_figure() -> dict[str, Callable[[], Figure]]:
    """Each figure plots.py makes, over data that has made them hard to read: seeds that share curves, a
    baseline on another's points, unreliable timing, a CPU's resident set, skips from 2**20, failures, nothing."""
    return {
        **{
            f"{report} report {name}": (lambda draw=draw, report=report: draw(REPORTS[report]()))
            for report in REPORTS
            for name, draw in REPORT_FIGURES.items()
        },
        "run fp16": lambda: run_figure(make_result("fp16-mixed", **FP16, evals=eval_curve(2.8, every=3)), steps=5),
        "run diverged": lambda: run_figure(make_result("fp16-mixed", 1, **FAILED)),
        "run training": lambda: run_figure(make_result("fp16-mixed", 1, **FAILED), steps=8, state="training"),
        "run oom": lambda: run_figure(make_result("bf16-true", status="oom")),
        "loss of nothing": lambda: loss_figure([]),
        "scale of fp32": lambda: loss_scale_figure([make_result("fp32", rows=history(3))]),
        "throughput of nothing": lambda: throughput_memory_figure([]),
        "headroom": lambda: headroom_figure(HEADROOM),
        **{f"explore {view}": explorer_figure(lambda s, view=view: replace(s, view=view)) for view in VIEWS},
        "explore nothing selected": explorer_figure(lambda s: replace(s, precisions=())),
        "explore fp32 loss scale": explorer_figure(lambda s: replace(s, precisions=("fp32",), view="loss scale")),
    }


@pytest.mark.parametrize("name", list(every_figure()))
def test_every_figure_is_wide_with_readable_legends_every_series_visible_and_no_label_crossed(name: str) -> None:
    assert figure_problems(every_figure()[name]()) == []


def test_the_figures_checked_are_the_figures_the_report_draws() -> None:
    assert list(report_figures(REPORTS["cpu"]())) == list(REPORT_FIGURES)


def test_every_precision_name_has_a_colour_and_a_marker_of_its_own() -> None:
    from amp_lib.precision import CANONICAL

    fig = loss_figure([make_result(p, effective=p, rows=history()) for p in CANONICAL])
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == sorted(CANONICAL)
    assert len({to_hex(line.get_color()) for line in lines.values()}) == len(CANONICAL)
    assert len({line.get_marker() for line in lines.values()}) == len(CANONICAL)
    assert "#7f7f7f" not in {to_hex(line.get_color()) for line in lines.values()}  # gray: a name without a colour


# --- one run -------------------------------------------------------------------------------------


def test_run_figure_has_a_loss_panel_and_a_scale_panel_only_with_a_scaler() -> None:
    fp16 = run_figure(make_result("fp16-mixed", **FP16))
    loss_ax, scale_ax = fp16.axes
    assert isinstance(fp16, Figure) and isinstance(fp16.canvas, FigureCanvasAgg)  # no pyplot, no display
    assert fp16.get_suptitle() == "fp16-mixed-s0: fp16-mixed → fp16-mixed [ok]"
    assert (loss_ax.get_title(), scale_ax.get_title()) == ("loss vs step", "loss scale vs step (x = skipped step)")
    assert scale_ax.get_yscale() == "log" and legend(scale_ax) == ["loss scale", "skipped step"]
    assert fp16.get_figwidth() * DPI >= 1200  # two panels, each wider than the old whole figure
    fp32 = run_figure(make_result("fp32", rows=history(5)))
    (only,) = fp32.axes
    assert only.get_title() == "loss vs step" and (only.get_xlabel(), only.get_ylabel()) == ("step", "loss")
    assert list(only.lines[0].get_ydata()) == [r.loss for r in history(5)] and legend(only) == ["train loss"]


def test_run_figure_of_a_fallback_and_of_a_run_without_a_name() -> None:
    fell_back = make_result("fp16-mixed", effective="bf16-mixed", rows=history(3), reason="no fast fp16")
    assert run_figure(fell_back).get_suptitle() == "fp16-mixed-s0: fp16-mixed → bf16-mixed [ok]"
    nameless = make_result("fp32", status="failed", error="boom", run_name=None)
    assert run_figure(nameless).get_suptitle() == "fp32 → fp32 [failed]"  # no dangling ": " without a name


def test_a_run_that_failed_before_its_first_step_says_so_on_a_blank_panel() -> None:
    fig = run_figure(make_result("bf16-true", status="oom", error="out of memory"))
    (ax,) = fig.axes
    assert texts(ax) == ["no loss recorded: the run ended (oom) before its first logged step"]
    assert not ax.axison and fig.get_suptitle().endswith("[oom]")  # no empty 0–1 axes; the title names the run


def test_run_figure_draws_evals_as_dots_and_can_fix_the_axis_and_name_the_state() -> None:
    result = make_result("fp32", rows=history(5), evals=eval_curve(2.9, None, 2.7, every=2))  # a NaN eval: diverged
    (ax,) = run_figure(result, steps=10, state="training").axes
    train_line, evals = ax.lines
    assert (evals.get_marker(), list(evals.get_xdata()), list(evals.get_ydata())) == ("o", [2, 6], [2.9, 2.7])
    assert legend(ax) == ["train loss", "eval loss"] and train_line.get_linestyle() == "-"  # still training
    assert ax.get_xlim() == pytest.approx((-0.15, 10.15))  # the whole run, a dot on its last step not cut in half
    assert run_figure(result, steps=10, state="training").get_suptitle() == "fp32-s0: fp32 → fp32 [training]"
    (ended,) = run_figure(result).axes
    assert ended.get_xlim() != pytest.approx((-0.15, 10.15)) and run_figure(result).get_suptitle().endswith(
        "[diverged]"
    )
    dotted, cross, _ = ended.lines
    assert dotted.get_linestyle() == ":" and cross.get_marker() == "x" and legend(ended)[1] == "stopped: diverged"


def test_a_snapshot_without_a_final_eval_is_drawn_as_training_not_as_diverged() -> None:
    snapshot = RunResult(config={"steps": 8}, plan={"requested": "fp32", "effective": "fp32"}, history=history(3))
    assert snapshot.status == "diverged"  # how a result without an eval loss reads: not how a live frame looks
    (ax,) = run_figure(snapshot, steps=8, state="training").axes
    assert legend(ax) == ["train loss"] and [line.get_linestyle() for line in ax.lines] == ["-"]


# --- loss and loss-scale figures -----------------------------------------------------------------


def test_the_loss_figure_draws_each_precisions_mean_over_thin_seed_lines_with_fp32_on_top() -> None:
    fp32 = [make_result("fp32", s, rows=history(4, loss0=3.0 + s)) for s in (0, 1)]
    bf16 = make_result("bf16-mixed", 0, rows=history(4, loss0=3.5))  # on fp32's mean: 3.5, 3.4, ...
    diverged = make_result("fp16-mixed", 1, status="diverged", rows=history(3, scaled=True, loss0=4.0))
    (ax,) = loss_figure([bf16, diverged, *fp32]).axes
    assert legend(ax) == ["fp32: mean of 2 seeds", "bf16-mixed", "fp16-mixed s1 [diverged]"]  # means, then failures
    thin0, thin1, mean, bf16_line, dotted, cross = ax.lines
    assert [thin0.get_linewidth(), thin1.get_linewidth()] == [0.9, 0.9] and thin0.get_alpha() < 1
    assert list(mean.get_ydata()) == pytest.approx([3.5, 3.4, 3.3, 3.2]) == list(bf16_line.get_ydata())
    assert mean.get_linestyle() == "--" and mean.get_zorder() > bf16_line.get_zorder()  # fp32 dashed, on top
    assert (mean.get_color(), bf16_line.get_color()) == ("tab:blue", "tab:green")
    assert mean.get_marker() != bf16_line.get_marker() and mean.get_markerfacecolor() == "none"
    assert (dotted.get_linestyle(), dotted.get_color()) == (":", "tab:red")
    assert (cross.get_marker(), list(cross.get_xdata()), list(cross.get_ydata())) == ("x", [2], [3.8])
    assert ax.get_title() == "train loss vs step (thin: each seed)"
    assert figure_problems(ax.figure) == []  # bf16 on fp32's mean still shows


def test_the_loss_figure_has_a_panel_per_setting_and_leaves_out_steps_without_a_loss() -> None:
    rows = history(4)
    rows = (rows[0], replace(rows[1], loss=None), *rows[2:])
    top, bottom = loss_figure([make_result("custom", rows=rows, lr=1), make_result("fp32", rows=history(3), lr=2)]).axes
    (line,) = top.lines
    assert list(line.get_xdata()) == [0, 2, 3] and line.get_color() == "tab:gray"  # an unknown precision: grey
    assert (top.get_title(), bottom.get_title()) == (
        "train loss vs step — gpt-tiny lr=1",
        "train loss vs step — gpt-tiny lr=2",
    )


def test_the_loss_figure_of_no_runs_says_so_without_empty_axes() -> None:
    (ax,) = loss_figure([]).axes
    assert texts(ax) == ["no loss recorded: no runs"] and ax.get_legend() is None and not ax.axison


def test_the_loss_scale_is_the_scale_each_step_ran_with_and_a_skip_is_crossed_there() -> None:
    fp16 = make_result("fp16-mixed", **FP16)  # rows hold the scale after each step: 2**16, 2**16, 2**15 (skipped)...
    (ax,) = loss_scale_figure([make_result("fp32", rows=history(5)), fp16]).axes
    trace, skipped = ax.lines  # the fp32 run has no scale to draw
    assert (
        list(trace.get_ydata()) == [65536.0, 65536.0, 65536.0, 32768.0, 32768.0]
        and trace.get_drawstyle() == "steps-post"
    )
    assert (skipped.get_marker(), list(skipped.get_xdata()), list(skipped.get_ydata())) == ("x", [2], [65536.0])
    assert legend(ax) == ["fp16-mixed s0", "skipped step"]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss scale the step ran with" and texts(ax) == []


def test_a_run_that_starts_at_2_to_the_20_and_skips_at_once_shows_its_skip_at_2_to_the_20() -> None:
    rows = tuple(replace(r, loss_scale=2.0**19, skipped=r.step == 0) for r in history(3, scaled=True))
    (ax,) = loss_scale_figure([make_result("fp16-mixed", rows=rows)]).axes
    trace, skipped = ax.lines
    assert list(skipped.get_ydata()) == [2.0**20] and list(trace.get_ydata()) == [2.0**20, 2.0**19, 2.0**19]


def test_the_seeds_of_a_precision_differ_by_line_style_and_skips_have_one_legend_entry() -> None:
    runs = [make_result("fp16-mixed", s, **FP16) for s in (0, 1)]  # the same trace twice
    (ax,) = loss_scale_figure(runs).axes
    s0, s1, skipped = ax.lines
    assert (s0.get_linestyle(), s1.get_linestyle()) == ("-", "--")
    assert to_rgba(s0.get_color()) == to_rgba("tab:red") and sum(s1.get_color()) < sum(s0.get_color())  # darker
    assert legend(ax) == ["fp16-mixed s0", "fp16-mixed s1", "skipped step"] and list(skipped.get_xdata()) == [2, 2]
    assert figure_problems(ax.figure) == []


def test_the_loss_scale_figure_without_a_scaler_says_so_without_empty_axes() -> None:
    (ax,) = loss_scale_figure([make_result("fp32", rows=history(5))]).axes
    assert texts(ax) == ["no run used a loss scaler (only fp16-mixed does): no loss scale to show"]
    assert len(ax.lines) == 0 and ax.get_yscale() == "linear" and ax.get_legend() is None and not ax.axison


# --- throughput and memory -----------------------------------------------------------------------


def annotations(ax) -> list[tuple[str, tuple[float, float]]]:
    return [(t.get_text(), tuple(t.xy)) for t in ax.texts]


def test_throughput_and_memory_bars_are_labelled_above_their_error_bars_with_speed_up_verdict_and_saving() -> None:
    runs = [
        make_result("fp32", 0, tps=1000, mem=200),
        make_result("fp32", 1, tps=1200, mem=200),
        make_result("bf16-mixed", 0, tps=2000, mem=200),
        make_result("bf16-mixed", 1, tps=2000, mem=210),
        make_result("fp16-mixed", status="oom", tps=None, mem=None),
    ]
    groups = build_report(runs).groups
    left, right = throughput_memory_figure(groups).axes
    assert (left.get_title(), right.get_title()) == ("throughput (tokens/s), ± std over seeds", "peak memory (MB)")
    assert [p.get_height() for p in left.patches] == [1100.0, 0.0, 2000.0]  # fp32, fp16 (none), bf16
    # bf16's two seeds against fp32's two: too few for the interval to decide; its bar is pale, hatched, named
    assert groups[2].speed_verdict == UNDECIDED
    assert [p.get_facecolor() for p in left.patches] == [
        to_rgba("tab:blue"),
        to_rgba("tab:red"),
        to_rgba("tab:green", 0.35),
    ]
    assert [p.get_hatch() for p in left.patches] == [None, None, "//"]
    assert [t.get_text() for t in left.get_xticklabels()] == ["fp32", "fp16-mixed", "bf16-mixed"]
    std = 141.4213562373095
    assert annotations(left) == [("baseline", (0, 1100.0 + std)), ("oom", (1, 0.0)),
                                 (f"{2000 / 1095.445:.2f}x fp32\nundecided", (2, 2000.0))]  # fmt: skip
    assert [t.get_color() for t in left.texts] == ["black", "black", "#b00020"]
    (errorbars,) = left.containers[-1:]
    _, (low, high), _ = errorbars.lines  # caps at mean ± std: only fp32's seeds spread
    assert list(low.get_ydata()) == [1100.0 - std] and list(high.get_ydata()) == [1100.0 + std]
    assert [t for t, _ in annotations(right)] == ["baseline", "oom", "uses 2.5% more"]  # 0% and -5% of 200 MB
    assert figure_problems(left.figure) == []


def test_unreliable_timing_is_hatched_and_named_on_the_throughput_and_time_to_quality_bars() -> None:
    report = build_report(cpu_sweep())
    left, _ = throughput_memory_figure(report.groups).axes
    _, fp16, bf16 = report.groups
    assert fp16.speed_verdict == bf16.speed_verdict == UNRELIABLE  # timed while two runs shared the machine
    assert [p.get_hatch() for p in left.patches] == ["//", "//", "//"]
    words = [t.get_text() for t in left.texts]
    assert words[0] == "baseline\ntiming unreliable" and words[1].endswith("\nunreliable")
    assert [t.get_color() for t in left.texts] == ["#b00020"] * 3
    (ttq,) = time_to_quality_figure(report).axes
    assert [t.get_text() for t in ttq.texts] == ["baseline\ntiming unreliable", "never reached\nin 12 steps",
                                                 "speed-up 1.00x\ntiming unreliable"]  # fmt: skip
    assert [p.get_hatch() for p in ttq.patches] == ["//", None, "//"]  # no time, nothing to doubt


def test_memory_against_fp32_is_said_in_words_never_as_a_negative_saving() -> None:
    words = [memory_text(r) for r in (0.88, 1.024, 1.0001, None)]
    assert words == ["uses 12.0% less", "uses 2.4% more", "same as fp32", ""]


def test_throughput_memory_figure_labels_settings_and_units() -> None:
    groups = build_report([make_result("fp32", lr=1, unit="samples"), make_result("fp32", lr=2, unit="samples")]).groups
    left, _ = throughput_memory_figure(groups).axes
    assert left.get_title() == "throughput (samples/s), ± std over seeds"
    assert [t.get_text() for t in left.get_xticklabels()] == ["fp32\ngpt-tiny lr=1", "fp32\ngpt-tiny lr=2"]
    empty_left, empty_right = throughput_memory_figure([]).axes
    assert len(empty_left.patches) == 0 and texts(empty_left) == ["no throughput recorded: no runs"]
    assert texts(empty_right) == ["no memory recorded: no runs"]


def test_throughput_title_does_not_take_its_unit_from_the_first_row_when_units_mix() -> None:
    groups = build_report([make_result("fp32", lr=1, unit="tokens"), make_result("fp32", lr=2, unit="samples")]).groups
    left, right = throughput_memory_figure(groups).axes
    assert left.get_title() == "throughput (mixed units: samples/s and tokens/s)"
    assert [t.get_text() for t in left.get_xticklabels()] == [
        "fp32\ngpt-tiny lr=1\n(tokens/s)",
        "fp32\ngpt-tiny lr=2\n(samples/s)",
    ]
    assert [t.get_text() for t in right.get_xticklabels()] == [t.get_text() for t in left.get_xticklabels()]


# --- eval curves, time to quality, memory split ----------------------------------------------------


def test_eval_curves_draw_the_seed_mean_over_thin_seed_lines_and_the_quality_target() -> None:
    report = ttq_report()
    full, zoom = eval_curves_figure(report).axes
    assert full.get_title() == "eval loss vs step (thin: each seed)" and zoom.get_title() == "second half, zoomed"
    assert legend(full) == ["fp32: mean of 2 seeds", "tf32: mean of 2 seeds", "fp16-mixed", "bf16-mixed: mean of 2 seeds",
                            "quality target 2.0451 (fp32's best + tolerance)"]  # fmt: skip
    thin0, thin1, fp32_mean = full.lines[:3]
    assert list(fp32_mean.get_xdata()) == [10, 20, 30] and list(fp32_mean.get_ydata()) == pytest.approx(
        [3.0, 2.5, 2.005]
    )
    assert list(thin1.get_ydata()) == [3.0, 2.5, 2.01] and thin0.get_alpha() < 1 and thin1.get_label().startswith("_")
    assert full.lines[-1].get_ydata()[0] == pytest.approx(2.0451) and full.lines[-1].get_linestyle() == ":"
    assert list(zoom.lines[2].get_xdata()) == [20, 30]  # the second half: from step 15 on
    empty_full, empty_zoom = eval_curves_figure(build_report([make_result("fp32", eval_loss=None)])).axes
    assert texts(empty_full) == texts(empty_zoom) == ["no eval recorded: no run got to its first eval"]
    assert not empty_full.axison


def test_eval_curves_have_a_row_per_setting() -> None:
    runs = [make_result("fp32", 0, lr=lr, evals=eval_curve(2.0)) for lr in (1, 2)]
    axes = eval_curves_figure(build_report(runs)).axes
    assert [ax.get_title() for ax in axes] == [
        "eval loss vs step — gpt-tiny lr=1", "second half, zoomed — gpt-tiny lr=1",
        "eval loss vs step — gpt-tiny lr=2", "second half, zoomed — gpt-tiny lr=2",
    ]  # fmt: skip


def test_the_zoomed_panel_leaves_out_a_precision_that_stopped_in_the_first_half() -> None:
    runs = [make_result("fp32", evals=eval_curve(3.0, 2.5, 2.2, 2.0)), make_result("bf16-mixed", evals=eval_curve(3.0))]
    full, zoom = eval_curves_figure(build_report(runs)).axes
    assert legend(full)[:2] == ["fp32", "bf16-mixed"]
    assert legend(zoom)[:1] == ["fp32"] and len(zoom.lines) == 2  # fp32 and the target line
    assert list(zoom.lines[0].get_xdata()) == [20, 30, 40]


def test_time_to_quality_bars_are_labelled_above_their_error_bars() -> None:
    (ax,) = time_to_quality_figure(ttq_report()).axes
    assert ax.get_title() == "time to fp32's quality (its mean best eval loss + tolerance)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "tf32", "fp16-mixed", "bf16-mixed"]
    assert [p.get_height() for p in ax.patches] == [pytest.approx(3.0), pytest.approx(2.0), 0.0, pytest.approx(1.0)]
    assert [t.get_text() for t in ax.texts] == ["baseline", "1 of 2 seeds\nreached it", "never reached\nin 30 steps",
                                                "speed-up 3.00x"]  # fmt: skip
    assert [t.xy for t in ax.texts][-1] == (3, pytest.approx(1.0))  # no spread: on the bar; with one, above it
    assert figure_problems(ax.figure) == []
    (empty,) = time_to_quality_figure(build_report([make_result("fp32", eval_loss=None)])).axes
    assert texts(empty) == ["no eval recorded: no time to quality to show"] and len(empty.patches) == 0


def test_the_memory_split_draws_the_tensors_and_the_peak_on_panels_of_their_own() -> None:
    runs = [make_result("fp32", mem=420.0, metrics=SPLIT), make_result("bf16-mixed", mem=430.0),
            make_result("fp16-mixed", status="oom", mem=None)]  # fmt: skip
    tensors, peak = memory_split_figure(build_report(runs)).axes
    assert tensors.get_title() == "tensor memory (MB), by what holds it"
    assert peak.get_title() == "peak memory (MB): the whole process's resident set (CPU)"
    assert legend(tensors) == ["parameters", "gradients", "optimizer"]
    assert [t.get_text() for t in tensors.get_xticklabels()] == ["fp32", "bf16-mixed"]  # the oom run has no peak
    assert [(p.get_y(), p.get_height()) for p in tensors.patches][0::2] == [(0.0, 0.46), (0.46, 0.46), (0.92, 0.92)]
    assert texts(tensors) == ["no split\nrecorded"]  # bf16's run recorded no split
    assert [p.get_height() for p in peak.patches] == [420.0, 430.0] and texts(peak) == ["baseline", "uses 2.4% more"]
    assert figure_problems(tensors.figure) == []  # 0.46 MB of parameters next to a 420 MB resident set: visible
    gpu = [make_result("fp32", metrics={**SPLIT, "peak_memory_kind": "cuda_allocated"})]
    assert memory_split_figure(build_report(gpu)).axes[1].get_title() == "peak memory (MB): allocated by PyTorch (GPU)"
    empty, _ = memory_split_figure(build_report([make_result("fp32", mem=None)])).axes
    assert texts(empty) == ["no memory recorded"]


def tracked(precision: str, seed: int = 0, **parts: float) -> RunResult:
    """A CPU run whose step MemTracker measured: at its peak 0.0005 MB of gradients (freed before the forward)."""
    held = {"parameters_mb": 0.46, "gradients_mb": 0.0005, "optimizer_state_mb": 0.92, "activations_mb": 0.76,
            "temporaries_mb": 0.16, **parts}  # fmt: skip
    split = MemtrackSplit("MemTracker", "cpu", sum(held.values()), **held)
    metrics = {
        "param_memory_mb": 0.46,
        "grad_memory_mb": 0.0005,
        "optimizer_memory_mb": 0.92,
        "peak_memory_kind": "cpu_rss",
    }
    return replace(make_result(precision, seed, mem=435.0, metrics=metrics), memory=split)


def test_what_held_the_peak_is_stacked_and_a_part_too_small_to_draw_is_named_not_listed() -> None:
    tensors, _ = memory_split_figure(build_report([tracked("fp32"), tracked("bf16-mixed", activations_mb=0.38)])).axes
    assert legend(tensors) == ["parameters", "optimizer", "activations", "temporaries"]
    assert tensors.get_xlabel() == "too small to draw: gradients (0.0005 MB at most)"
    activations = [p.get_height() for p in tensors.patches][4:6]
    assert activations == pytest.approx([0.76, 0.38])
    assert figure_problems(tensors.figure) == []
    ex = Explorer.of([tracked("fp32")])
    (bar,) = ex.figure_data(replace(ex.default_selection(), view="memory")).bars
    assert [name for name, _ in bar.parts] == ["parameters", "gradients", "optimizer", "activations", "temporaries",
                                               "rest"]  # fmt: skip
    assert dict(bar.parts)["rest"] == pytest.approx(435.0 - 2.3005)  # on a CPU: the rest of the process
    tensors, _ = explore_figure(ex.figure_data(replace(ex.default_selection(), view="memory"))).axes
    assert tensors.get_xlabel().startswith("too small to draw: gradients")


# --- the explorer's view ------------------------------------------------------------------------


def test_explore_figure_colours_and_marks_by_precision_styles_by_seed_and_draws_fp32_on_top() -> None:
    data = FigureData(
        "loss scale",
        "loss scale the step ran with (x = skipped)",
        lines=(
            Line("fp32 s0", "fp32", 0, (0, 1), (1.0, 2.0)),
            Line("fp16-mixed s1", "fp16-mixed", 1, (0, 1), (4.0, 2.0), marks=((1, 2.0),)),
            Line("bf16-mixed s0 [diverged]", "bf16-mixed", 0, (0,), (3.0,), ok=False),
        ),
        log_y=True,
    )
    fig = explore_figure(data)
    (ax,) = fig.axes
    fp32, fp16, cross, bf16 = ax.lines
    assert (to_rgba(fp32.get_color()), fp32.get_linestyle(), fp32.get_markerfacecolor()) == (
        to_rgba("tab:blue"),
        "-",
        "none",
    )
    assert fp32.get_zorder() > fp16.get_zorder() and fp32.get_linewidth() < fp16.get_linewidth()  # on top, narrower
    assert (fp16.get_linestyle(), fp16.get_marker()) == ("--", "s")  # the second seed: dashed, and a darker red
    assert fp16.get_color() == pytest.approx([c * 0.6 for c in to_rgb("tab:red")])
    assert (cross.get_marker(), list(cross.get_xdata())) == ("x", [1])
    assert bf16.get_linestyle() == ":"  # not ok
    assert ax.get_yscale() == "log" and ax.get_title().startswith("loss scale (") and ax.get_xlabel() == "step"
    assert legend(ax) == ["fp32 s0", "fp16-mixed s1", "bf16-mixed s0 [diverged]"] and texts(ax) == []
    assert fig.get_figwidth() * DPI >= 1000


def test_explore_figure_draws_memory_as_tensors_and_peak_on_panels_of_their_own() -> None:
    parts = (("parameters", 10.0), ("gradients", 10.0), ("optimizer", 20.0), ("rest", 50.0))
    data = FigureData(
        "memory",
        "peak memory (MB), CPU: whole process",
        bars=(Bar("fp16 s0", "fp16-mixed", 0, 90.0, parts), Bar("fp32 s0", "fp32", 0, 100.0)),
    )
    tensors, peak = explore_figure(data).axes
    assert [p.get_height() for p in tensors.patches] == [10.0, 0.0, 10.0, 0.0, 20.0, 0.0]
    assert [p.get_height() for p in peak.patches] == [90.0, 100.0] and peak.get_title() == data.ylabel
    assert [t.get_text() for t in peak.get_xticklabels()] == ["fp16\ns0", "fp32\ns0"]
    assert legend(tensors) == ["parameters", "gradients", "optimizer"] and texts(tensors) == ["no split\nrecorded"]


def test_explore_figure_of_nothing_says_why_on_blank_axes_and_figure_png_is_a_wide_png() -> None:
    fig = explore_figure(FigureData("loss scale", "loss scale", note="no fp16-mixed run in this selection"))
    (ax,) = fig.axes
    assert texts(ax) == ["no fp16-mixed run in this selection"] and ax.get_legend() is None and not ax.axison
    png = figure_png(fig)
    assert png.startswith(PNG) and png_width(png) >= MIN_WIDTH_PX


# --- saving --------------------------------------------------------------------------------------


def png_width(png: bytes) -> int:
    return struct.unpack(">I", png[16:20])[0]


def test_save_figure_writes_a_png_creating_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "fig.png"
    no_scaler = loss_scale_figure([make_result("fp32", rows=history(5))])  # only a message: still a figure
    assert save_figure(no_scaler, str(target)) == target  # a str path in, the Path out
    assert target.read_bytes()[:8] == PNG and png_width(target.read_bytes()) >= MIN_WIDTH_PX


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
        png = path.read_bytes()
        assert png[:8] == PNG and png_width(png) >= MIN_WIDTH_PX and len(png) < 250_000
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(f"{n}.png" for n in names)
    unscaled = save_report_figures(build_report(runs[:1] + runs[2:]), tmp_path / "unscaled")
    assert list(unscaled) == names[:-1]  # no run used a scaler: no figure that only says so
    assert not (tmp_path / "unscaled" / "loss_scale.png").exists()


@pytest.mark.slow  # trains six tiny runs (a few seconds)
def test_the_figures_of_a_small_real_sweep_show_every_series(tiny_config: Any, tmp_path: Path) -> None:
    """fp32, bf16-mixed (whose curves lie within a pixel of fp32's on this CPU) and fp16-mixed from a loss scale
    of 2**20, two seeds each: every figure passes the check; the PNGs are kept in $AMP_TEST_ARTEFACTS if set."""
    from amp_lib.train import train

    results = [
        train(
            tiny_config(
                precision=p, seed=s, run_name=f"{p}-s{s}", steps=16, eval_every=4, allow_slow=True, init_scale=2.0**20
            )
        )
        for p in ("fp32", "bf16-mixed", "fp16-mixed")
        for s in (0, 1)
    ]
    assert all(r.ok for r in results)
    report = build_report(results)
    figures = report_figures(report)
    assert list(figures) == [
        "eval_curves",
        "time_to_quality",
        "memory_split",
        "throughput_memory",
        "loss",
        "loss_scale",
    ]
    for name, fig in figures.items():
        assert figure_problems(fig) == [], name
    fp16 = next(r for r in results if r.effective == "fp16-mixed")
    (_, skipped) = figures["loss_scale"].axes[0].lines[-2:]
    assert fp16.history[0].skipped and skipped.get_ydata()[0] == 2.0**20  # where it started, not 2**19
    saved = save_report_figures(report, tmp_path / "figures")
    target = os.environ.get("AMP_TEST_ARTEFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name, path in saved.items():
            shutil.copy(path, Path(target) / f"real-sweep-{name}.png")


# --- the headroom heatmap ----------------------------------------------------------------------------


def test_the_headroom_heatmap_has_a_row_per_layer_a_column_per_sampled_step_and_marks_the_overflow() -> None:
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
