"""Matplotlib figures for one run and for a sweep report, always saved as PNG too.

Figures are built on `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so they hold no
global state, need no display and are freed when dropped; notebooks show the saved PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from amp_lib.explore import FigureData
from amp_lib.headroom import headroom_doublings
from amp_lib.report import BASELINE, Comparison, Row, SweepReport, eval_curve, results_by_precision
from amp_lib.results import RunResult

_COLORS = {
    "fp32": "tab:blue",
    "tf32": "tab:cyan",
    "fp16-mixed": "tab:red",
    "bf16-mixed": "tab:green",
    "fp16-true": "tab:orange",
    "bf16-true": "tab:olive",
    "fp8-mixed": "tab:purple",
}


def _figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (7.0, 4.0)) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for line in axes for ax in line]


def _label(result: RunResult) -> str:
    name = str(result.config.get("run_name") or result.plan.get("requested") or "run")
    return name if result.ok else f"{name} [{result.status}]"


def _color(result: RunResult) -> str:
    return _COLORS.get(str(result.plan.get("effective")), "tab:gray")


def _uses_scaler(result: RunResult) -> bool:
    return any(row.loss_scale is not None for row in result.history)


def _plot_loss(ax: Axes, results: Sequence[RunResult]) -> None:
    for result in results:
        steps = [r.step for r in result.history if r.loss is not None]
        losses = [r.loss for r in result.history if r.loss is not None]
        style = "-" if result.ok else "--"
        ax.plot(steps, losses, style, color=_color(result), label=_label(result))
        if not result.ok and steps:
            ax.plot(steps[-1], losses[-1], "x", color="black", markersize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("loss vs step")
    if ax.lines:
        ax.legend(fontsize="small")
    if not any(len(line.get_xdata()) for line in ax.lines):  # e.g. a run that failed before its first step
        ax.text(0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax.transAxes)


def _plot_scale(ax: Axes, results: Sequence[RunResult]) -> None:
    scaled = [r for r in results if _uses_scaler(r)]
    for result in scaled:
        rows = [r for r in result.history if r.loss_scale is not None]
        ax.plot([r.step for r in rows], [r.loss_scale for r in rows], "-", color=_color(result), label=_label(result))
        skipped = [r for r in rows if r.skipped]
        if skipped:
            ax.plot(
                [r.step for r in skipped],
                [r.loss_scale for r in skipped],
                "x",
                color="black",
                label=f"skipped ({_label(result)})",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.set_title("loss scale vs step (x = skipped step)")
    if scaled:
        ax.set_yscale("log", base=2)
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5,
            0.5,
            "no run used a loss scaler (only fp16-mixed does)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )


def run_figure(result: RunResult, *, steps: int | None = None, state: str | None = None) -> Figure:
    """One run: its loss curve (evals as dots) and, when it used a loss scaler, the scale trace with skipped
    steps. `steps` fixes the x axis to the whole run, so a live figure does not rescale as rows arrive;
    `state` replaces the status in the title (a run still training has none yet)."""
    panels = 2 if _uses_scaler(result) else 1
    fig, axes = _figure(1, panels, (6.0 * panels, 4.0))
    _plot_loss(axes[0], [result])
    evals = [e for e in result.evals if e.loss is not None]
    if evals:
        axes[0].plot([e.step for e in evals], [e.loss for e in evals], "o:", color=_color(result), label="eval loss")
        axes[0].set_ylabel("loss (line: train, dots: eval)")
        axes[0].legend(fontsize="small")
    if panels == 2:
        _plot_scale(axes[1], [result])
    if steps:
        for ax in axes:
            ax.set_xlim(0, steps)
    plan = result.plan
    name = result.config.get("run_name")  # "" in a notebook run that left the default name
    fig.suptitle(
        (f"{name}: " if name else "") + f"{plan.get('requested')} → {plan.get('effective')} [{state or result.status}]"
    )
    return fig


def loss_figure(results: Sequence[RunResult]) -> Figure:
    """Loss vs step, one line per run, coloured by effective precision (dashed when not ok)."""
    fig, (ax,) = _figure()
    _plot_loss(ax, results)
    return fig


def loss_scale_figure(results: Sequence[RunResult]) -> Figure:
    """Loss scale vs step for the runs that used a scaler, skipped steps marked with x."""
    fig, (ax,) = _figure()
    _plot_scale(ax, results)
    return fig


def throughput_memory_figure(rows: Sequence[Row]) -> Figure:
    """Throughput and peak memory per row, with the spread over seeds as error bars. When the rows mix
    units (tokens/s and samples/s), the title says so and each bar's label names its unit."""
    fig, (left, right) = _figure(1, 2, (11.0, 4.0))
    labels = [f"{r.requested}\n{r.setting}" if len({x.setting for x in rows}) > 1 else r.requested for r in rows]
    units = sorted({r.throughput_unit for r in rows})
    if len(units) > 1:
        labels = [f"{label}\n({r.throughput_unit}/s)" for label, r in zip(labels, rows)]
        throughput_title = f"throughput (mixed units: {' and '.join(f'{u}/s' for u in units)})"
    else:
        throughput_title = f"throughput ({units[0] if units else 'tokens'}/s)"
    colors = [_COLORS.get(str(r.effective), "tab:gray") for r in rows]
    for ax, attr, title in (
        (left, "items_per_s", throughput_title),
        (right, "peak_memory_mb", "peak memory (MB)"),
    ):
        stats = [getattr(r, attr) for r in rows]
        values = [s.mean if s else 0.0 for s in stats]
        errors = [s.std or 0.0 if s else 0.0 for s in stats]
        ax.bar(range(len(rows)), values, yerr=errors, color=colors, capsize=4)
        ax.set_xticks(range(len(rows)), labels, fontsize="small")
        ax.set_title(title)
        for i, (row, stat) in enumerate(zip(rows, stats)):
            if stat is None:
                ax.text(i, 0, row.status, ha="center", va="bottom", rotation=90, fontsize="small")
    return fig


def _comparison_labels(comparisons: Sequence[Comparison]) -> list[str]:
    several = len({c.setting for c in comparisons}) > 1
    return [f"{c.requested}\n{c.setting}" if several else c.requested for c in comparisons]


def _comparison_color(c: Comparison) -> str:
    return _COLORS.get(str(c.effective), "tab:gray")


def _draw_eval_curves(
    ax: Axes, curves_by: Sequence[tuple[Comparison, list[dict[int, float]]]], first_step: int
) -> bool:
    drawn = False
    for c, curves in curves_by:
        steps = sorted({s for curve in curves for s in curve if s >= first_step})
        if not steps:
            continue
        at = [[curve[s] for curve in curves if s in curve] for s in steps]
        label = f"{c.requested} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        ax.plot(steps, [sum(v) / len(v) for v in at], "-o", color=_comparison_color(c), label=label, markersize=3)
        if len(curves) > 1:
            ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=_comparison_color(c), alpha=0.2)
        drawn = True
    return drawn


def eval_curves_figure(report: SweepReport) -> Figure:
    """Eval loss vs step per precision: the mean over the ok seeds as a line, their min–max as a band, and
    the time-to-quality target (fp32's mean best eval loss + tolerance) dashed. One row per setting: the
    whole run, and its second half zoomed in (where the precisions' differences show)."""
    settings = list(dict.fromkeys(c.setting for c in report.comparisons)) or [""]
    groups = results_by_precision(report.results)
    fig, axes = _figure(len(settings), 2, (13.0, 4.5 * len(settings)))
    for row, setting in enumerate(settings):
        curves_by = []
        for c in (c for c in report.comparisons if c.setting == setting):
            curves = [
                {s: loss for s, loss, _ in eval_curve(r)} for r in groups.get((c.setting, c.requested), []) if r.ok
            ]
            curves = [curve for curve in curves if curve]
            if curves:
                curves_by.append((c, curves))
        last = max((s for _, curves in curves_by for curve in curves for s in curve), default=0)
        target = next((c.ttq.target for c in report.comparisons if c.setting == setting and c.ttq), None)
        where = f" — {setting}" if len(settings) > 1 else ""
        for ax, first, title in (
            (axes[2 * row], 0, f"eval loss vs step{where} (band: min–max over seeds)"),
            (axes[2 * row + 1], last // 2, f"second half, zoomed{where}"),
        ):
            drawn = _draw_eval_curves(ax, curves_by, first)
            if target is not None and drawn:
                ax.axhline(
                    target, linestyle="--", color="black", linewidth=1, label=f"fp32's quality target {target:.4f}"
                )
            ax.set_xlabel("step")
            ax.set_ylabel("eval loss")
            ax.set_title(title)
            if drawn:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no eval recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


def time_to_quality_figure(report: SweepReport) -> Figure:
    """Per precision: the training time to first reach fp32's quality (its mean best eval loss plus the tolerance),
    mean over seeds with the spread as an error bar; "never reached" where no seed got there."""
    comps = [c for c in report.comparisons if c.ttq is not None]
    fig, (ax,) = _figure(1, 1, (max(6.0, 1.6 * len(comps)), 4.0))
    values = [c.ttq.time_s.mean if c.ttq and c.ttq.time_s else 0.0 for c in comps]
    errors = [c.ttq.time_s.std or 0.0 if c.ttq and c.ttq.time_s else 0.0 for c in comps]
    ax.bar(range(len(comps)), values, yerr=errors, color=[_comparison_color(c) for c in comps], capsize=4)
    ax.set_xticks(range(len(comps)), _comparison_labels(comps), fontsize="small")
    ax.set_ylabel("training seconds (evals excluded)")
    ax.set_title("time to fp32's quality (its mean best eval loss + tolerance)")
    for i, c in enumerate(comps):
        assert c.ttq is not None
        if c.ttq.reached == 0:
            ax.text(i, 0, f"never reached\nin {c.ttq.horizon} steps", ha="center", va="bottom", fontsize="small")
        elif c.ttq.reached < c.ttq.runs:
            ax.text(i, values[i], f"{c.ttq.reached} of {c.ttq.runs} seeds", ha="center", va="bottom", fontsize="small")
        elif c.ttq.speedup is not None and not c.is_baseline:
            ax.text(i, values[i], f"{c.ttq.speedup:.2f}x fp32", ha="center", va="bottom", fontsize="small")
    if not comps:
        ax.text(0.5, 0.5, "no eval recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


MEMORY_PARTS = (
    ("params_mb", "parameters"),
    ("grads_mb", "gradients"),
    ("optimizer_mb", "optimizer"),
    ("rest_mb", "rest"),
)
_PART_COLORS = {"parameters": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:green", "rest": "tab:gray"}


def memory_split_figure(report: SweepReport) -> Figure:
    """Peak memory per precision as stacked bars: parameters, gradients, optimizer state and the rest
    (activations and workspace); a run without the split shows its peak as one hatched bar."""
    comps = [c for c in report.comparisons if c.memory is not None and c.memory.peak_mb is not None]
    fig, (ax,) = _figure(1, 1, (max(6.0, 1.6 * len(comps)), 4.0))
    bottoms = [0.0] * len(comps)
    for attr, name in MEMORY_PARTS:
        heights = [getattr(c.memory, attr) or 0.0 if c.memory and c.memory.rest_mb is not None else 0.0 for c in comps]
        ax.bar(range(len(comps)), heights, bottom=bottoms, color=_PART_COLORS[name], label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    unsplit = [i for i, c in enumerate(comps) if c.memory is not None and c.memory.rest_mb is None]
    if unsplit:
        ax.bar(unsplit, [comps[i].memory.peak_mb for i in unsplit], color="white", edgecolor="black", hatch="//",
               label="peak (no split recorded)")  # fmt: skip
    ax.set_xticks(range(len(comps)), _comparison_labels(comps), fontsize="small")
    ax.set_ylabel("MB")
    cpu = any(c.memory is not None and c.memory.kind == "cpu_rss" for c in comps)
    ax.set_title("peak memory split" + ("\n(CPU: the peak is the whole process's resident set)" if cpu else ""))
    if comps:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no memory recorded", ha="center", va="center", transform=ax.transAxes)
    return fig


_SEED_STYLES = ("-", "--", ":", "-.")


def explore_figure(data: FigureData) -> Figure:
    """The explorer's view: one line per run (colour: precision, line style: seed; x = a marked point such as
    a skipped step), or one bar per run stacked by memory part."""
    fig, (ax,) = _figure(1, 1, (9.0, 4.0))
    seeds = list(dict.fromkeys([line.seed for line in data.lines] + [bar.seed for bar in data.bars]))
    for line in data.lines:
        style = _SEED_STYLES[seeds.index(line.seed) % len(_SEED_STYLES)] if line.ok else "--"
        color = _COLORS.get(line.precision, "tab:gray")
        width = 2.6 if line.precision == BASELINE else 1.5  # wider, so a precision that tracks fp32 leaves it visible
        ax.plot(line.x, line.y, style, color=color, label=line.label, linewidth=width)
        if line.marks:
            ax.plot([m[0] for m in line.marks], [m[1] for m in line.marks], "x", color="black", markersize=8)
    if data.bars:
        at = range(len(data.bars))
        bottoms = [0.0] * len(data.bars)
        for name, color in _PART_COLORS.items():
            heights = [dict(bar.parts).get(name, 0.0) for bar in data.bars]
            if any(heights):
                ax.bar(at, heights, bottom=bottoms, color=color, label=name)
                bottoms = [b + h for b, h in zip(bottoms, heights)]
        unsplit = [i for i, bar in enumerate(data.bars) if not bar.parts]
        if unsplit:
            ax.bar(unsplit, [data.bars[i].total for i in unsplit],
                   color=[_COLORS.get(data.bars[i].precision, "tab:gray") for i in unsplit], label="peak (no split)")  # fmt: skip
        ax.set_xticks(list(at), [bar.label for bar in data.bars], fontsize="small")
    else:
        ax.set_xlabel("step")
    ax.set_ylabel(data.ylabel)
    ax.set_title(data.view)
    if data.log_y:
        ax.set_yscale("log", base=2)
    if data.note:
        ax.text(0.5, 0.5, data.note, ha="center", va="center", transform=ax.transAxes)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def figure_png(fig: Figure, dpi: int = 72) -> bytes:
    """The figure as PNG bytes (for a display that is updated in place)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    return target


def save_report_figures(report: SweepReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the report's figures as `<out_dir>/<name>.png`; returns name -> path. The loss-scale figure
    is drawn only when a run used a loss scaler (otherwise it would only say that none did)."""
    out = Path(out_dir)
    figures = {
        "eval_curves": eval_curves_figure(report),
        "time_to_quality": time_to_quality_figure(report),
        "memory_split": memory_split_figure(report),
        "throughput_memory": throughput_memory_figure(report.table),
        "loss": loss_figure(report.results),
    }
    if any(_uses_scaler(r) for r in report.results):
        figures["loss_scale"] = loss_scale_figure(report.results)
    return {name: save_figure(fig, out / f"{name}.png") for name, fig in figures.items()}


def headroom_figure(headroom: dict[str, Any]) -> Figure:
    """The fp16 headroom map of one run: layers x sampled steps, in doublings to fp16's largest value, for
    activations and (scaled) gradients; an x marks each module that overflowed first on a skipped step."""
    names = list(headroom.get("modules", []))
    samples = list(headroom.get("samples", []))
    steps = [s["step"] for s in samples]
    fig, axes = _figure(1, 2, (12.0, max(3.0, 0.25 * len(names) + 1.5)))
    for ax, kind, key in ((axes[0], "activation", "max_abs"), (axes[1], "gradient", "max_abs_scaled")):
        grid = np.full((len(names), len(samples)), np.nan)
        for j, sample in enumerate(samples):
            for i, name in enumerate(names):
                stats = sample[kind].get(name)
                value = headroom_doublings(stats.get(key, stats["max_abs"])) if stats else None
                if stats and stats["nonfinite"]:
                    grid[i, j] = -4.0  # overflowed: the bottom of the colour scale
                elif value is not None and math.isfinite(value):
                    grid[i, j] = value
        image = ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=-4, vmax=16, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize="x-small")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize="x-small")
        ax.set_xlabel("sampled step")
        ax.set_title(f"fp16 headroom of {kind}s (doublings; < 0 overflows)")
        for event in headroom.get("first_overflow", []):
            if event["phase"] == ("forward" if kind == "activation" else "backward") and event["module"] in names:
                column = steps.index(event["step"]) if event["step"] in steps else None
                if column is not None:
                    ax.plot(column, names.index(event["module"]), "x", color="black", markersize=10, markeredgewidth=2)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
