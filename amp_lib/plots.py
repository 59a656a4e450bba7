"""Matplotlib figures for one run and for a sweep report, always saved as PNG too.

Figures are built on `matplotlib.figure.Figure` (Agg canvas), never through pyplot, so they hold no
global state, need no display and are freed when dropped; notebooks show the saved PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from amp_lib.report import Row, SweepReport
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


def run_figure(result: RunResult) -> Figure:
    """One run: its loss curve and, when it used a loss scaler, the scale trace with skipped steps."""
    panels = 2 if _uses_scaler(result) else 1
    fig, axes = _figure(1, panels, (6.0 * panels, 4.0))
    _plot_loss(axes[0], [result])
    if panels == 2:
        _plot_scale(axes[1], [result])
    plan = result.plan
    fig.suptitle(
        f"{result.config.get('run_name') or ''}: {plan.get('requested')} → {plan.get('effective')} [{result.status}]"
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
    """Throughput and peak memory per row, with the spread over seeds as error bars."""
    fig, (left, right) = _figure(1, 2, (11.0, 4.0))
    labels = [f"{r.requested}\n{r.setting}" if len({x.setting for x in rows}) > 1 else r.requested for r in rows]
    colors = [_COLORS.get(str(r.effective), "tab:gray") for r in rows]
    unit = rows[0].throughput_unit if rows else "tokens"
    for ax, attr, title in (
        (left, "items_per_s", f"throughput ({unit}/s)"),
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


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=100)
    return target


def save_report_figures(report: SweepReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the report's figures as `<out_dir>/<name>.png`; returns name -> path."""
    out = Path(out_dir)
    figures = {
        "loss": loss_figure(report.results),
        "throughput_memory": throughput_memory_figure(report.table),
        "loss_scale": loss_scale_figure(report.results),
    }
    return {name: save_figure(fig, out / f"{name}.png") for name, fig in figures.items()}
