"""Matplotlib figures for one run, for a sweep report and for an explorer view, always saved as PNG too.

Figures are built on `matplotlib.figure.Figure` (Agg canvas, `figstyle.new_figure`), never through pyplot, so
they hold no global state, need no display and are freed when dropped; notebooks show the saved PNG.

Every figure is at least 900 px wide at `DPI` with legend text of 10 px or more, and every series it lists
can be seen (the house style is `figstyle`'s): several seeds are thin lines under their mean, tensor memory has
an axis of its own beside a peak that dwarfs it, and labels sit above the error bars, never across them.
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
from matplotlib.figure import Figure

from amp_lib.explore import FigureData, scales_in_use
from amp_lib.figstyle import (
    DPI,
    LEGEND_PT,
    SEED_STYLES,
    UNSURE_RED,
    bar_ticks,
    bars_width,
    bars_with_spread,
    labels_above,
    legend,
    line_style,
    new_figure,
    precision_color,
    say,
    seed_color,
    two_bar_panels,
)
from amp_lib.headroom import headroom_doublings
from amp_lib.render import memory_text
from amp_lib.report import Group, SweepReport
from amp_lib.results import RunResult
from amp_lib.speed import UNDECIDED, UNRELIABLE
from amp_lib.table import results_by_precision

_UNSURE = (UNRELIABLE, UNDECIDED)  # speed verdicts that decide nothing: marked on the chart

def _seed_label(result: RunResult) -> str:
    return result.label + ("" if result.seed is None else f" s{result.seed}")


# -- curves over seeds -----------------------------------------------------------------------------


def _curves(ax: Axes, groups: Sequence[tuple[str, str, list[dict[int, float]]]], first_step: int = 0) -> bool:
    """Per (label, precision, one curve per seed): the seeds as thin lines and their mean as the series."""
    drawn = [(label, precision, [{s: v for s, v in c.items() if s >= first_step} for c in curves])
             for label, precision, curves in groups]  # fmt: skip
    drawn = [(label, precision, [c for c in curves if c]) for label, precision, curves in drawn]
    drawn = [d for d in drawn if d[2]]
    for index, (label, precision, curves) in enumerate(drawn):
        color = precision_color(precision)
        if len(curves) > 1:
            for curve in curves:
                steps = sorted(curve)
                ax.plot(steps, [curve[s] for s in steps], "-", color=color, linewidth=0.9, alpha=0.4, zorder=1.5)
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [sum(c[s] for c in curves) / len(curves) for s in steps]
        name = f"{label}: mean of {len(curves)} seeds" if len(curves) > 1 else label
        ax.plot(steps, mean, label=name, **line_style(precision, index, len(drawn), len(steps)))
    return bool(drawn)


def _settings(results: Sequence[RunResult]) -> dict[str, list[tuple[str, str, list[RunResult]]]]:
    """Per setting, per row in report order: (label, effective precision, results)."""
    out: dict[str, list[tuple[str, str, list[RunResult]]]] = {}
    for (setting, key), group in results_by_precision(results).items():
        label = group[0].label if len({r.label for r in group}) == 1 else key.label
        out.setdefault(setting, []).append((label, str(group[0].effective or key.requested), list(group)))
    return out


def loss_figure(results: Sequence[RunResult]) -> Figure:
    """Train loss vs step, one panel per setting: per precision the mean over its ok seeds (each seed a thin
    line beneath); a run that did not finish ok dotted, crossed where it stopped and named with its status."""
    settings = _settings(results)
    fig, axes = new_figure(max(1, len(settings)), 1, (10.0, 4.5 * max(1, len(settings))))
    for ax, (setting, rows) in zip(axes, settings.items()):
        groups = []
        for label, precision, group in rows:
            curves = [{h.step: h.loss for h in r.history if h.loss is not None} for r in group if r.ok]
            groups.append((label, precision, [c for c in curves if c]))
        drawn = _curves(ax, groups)
        for label, precision, group in rows:
            for r in (r for r in group if not r.ok):
                steps = [h.step for h in r.history if h.loss is not None]
                losses = [h.loss for h in r.history if h.loss is not None]
                if steps:
                    ax.plot(steps, losses, ":", color=precision_color(precision), linewidth=1.6,
                            label=f"{_seed_label(r)} [{r.status}]")  # fmt: skip
                    ax.plot(steps[-1], losses[-1], "x", color="black", markersize=9, markeredgewidth=2, zorder=4)
                    drawn = True
        several = any(len(g[2]) > 1 for g in groups)
        where = f" — {setting}" if len(settings) > 1 else ""
        ax.set_title(f"train loss vs step{where}" + (" (thin: each seed)" if several else ""))
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        if drawn:
            legend(ax)
        else:
            say(ax, "no loss recorded: no run got to its first logged step")
    if not settings:
        say(axes[0], "no loss recorded: no runs")
    return fig


def eval_curves_figure(report: SweepReport) -> Figure:
    """Eval loss vs step per precision: the mean over its ok seeds (each seed a thin line beneath) and the
    time-to-quality target (fp32's mean best eval loss + tolerance) dotted. One row per setting: the whole
    run, and its second half zoomed in (where the precisions' differences show)."""
    settings = list(dict.fromkeys(g.setting for g in report.groups)) or [""]
    fig, axes = new_figure(len(settings), 2, (13.0, 4.5 * len(settings)))
    for row, setting in enumerate(settings):
        groups = []
        for g in (g for g in report.groups if g.setting == setting):
            curves = [{s: loss for s, loss, _ in r.eval_curve} for r in g.results if r.ok]
            label = g.name
            groups.append((label, str(g.effective or g.key.requested), [c for c in curves if c]))
        last = max((s for _, _, curves in groups for c in curves for s in c), default=0)
        target = next((g.ttq.target for g in report.groups if g.setting == setting and g.ttq), None)
        several = any(len(c) > 1 for _, _, c in groups)
        where = f" — {setting}" if len(settings) > 1 else ""
        for ax, first, title in (
            (axes[2 * row], 0, f"eval loss vs step{where}" + (" (thin: each seed)" if several else "")),
            (axes[2 * row + 1], last // 2, f"second half, zoomed{where}"),
        ):
            ax.set_xlabel("step")
            ax.set_ylabel("eval loss")
            ax.set_title(title)
            if not _curves(ax, groups, first):
                say(ax, "no eval recorded: no run got to its first eval")
                continue
            if target is not None:
                ax.axhline(target, linestyle=":", color="black", linewidth=1.4, zorder=1.8,
                           label=f"quality target {target:.4f} (fp32's best + tolerance)")  # fmt: skip
            legend(ax)
    return fig


def _group_labels(groups: Sequence[Group]) -> list[str]:
    several = len({g.setting for g in groups}) > 1
    return [f"{g.requested}\n{g.setting}" if several else g.requested for g in groups]


def _timing_unreliable(g: Group) -> bool:
    return g.speed_verdict == UNRELIABLE or (g.is_baseline and bool(g.speed_reason))


def _unsure(g: Group) -> bool:
    """The throughput decides nothing: its verdict is unreliable or undecided (or the baseline's own timing
    was unreliable)."""
    return g.measurements.items_per_s is not None and (g.speed_verdict in _UNSURE or _timing_unreliable(g))


def _memory_label(g: Group) -> str:
    if g.is_baseline:
        return "baseline"
    if g.memory_ratio is not None:
        return memory_text(g.memory_ratio.mean)
    saved = g.measurements.memory_saved_pct
    return memory_text(None if saved is None else 1 - saved.mean / 100)


def _memory_title(kinds: set[str]) -> str:
    if kinds == {"cpu_rss"}:
        return "peak memory (MB): the whole process's resident set (CPU)"
    if kinds == {"cuda_allocated"}:
        return "peak memory (MB): allocated by PyTorch (GPU)"
    return "peak memory (MB)"


def throughput_memory_figure(groups: Sequence[Group]) -> Figure:
    """Per precision: throughput (mean ± std over seeds, labelled with its speed-up and speed verdict; a
    verdict that is unreliable or undecided hatched and named in red) and peak memory (labelled with what
    it saves against fp32, in words). When the rows mix units (tokens/s and samples/s), the title says so."""
    labels = _group_labels(groups)
    units = sorted({g.measurements.throughput_unit for g in groups})
    if len(units) > 1:
        labels = [f"{label}\n({g.measurements.throughput_unit}/s)" for label, g in zip(labels, groups)]
    fig, (left, right) = two_bar_panels(labels, 13.0)
    if len(units) > 1:
        left.set_title(f"throughput (mixed units: {' and '.join(f'{u}/s' for u in units)})")
    else:
        left.set_title(f"throughput ({units[0] if units else 'tokens'}/s), ± std over seeds")
    colors = [precision_color(g.effective) for g in groups]
    speed = [g.measurements.items_per_s for g in groups]
    unsure = [_unsure(g) for g in groups]
    tops = bars_with_spread(left, [s.mean if s else None for s in speed], [s.std if s else None for s in speed],
                             colors, unsure)  # fmt: skip
    words = []
    for g, pale in zip(groups, unsure):
        if g.measurements.items_per_s is None:
            words.append(g.status)
        elif g.is_baseline:
            words.append("baseline" + ("\ntiming unreliable" if pale else ""))
        else:
            ratio = f"{g.point_speedup:.2f}x fp32" if g.point_speedup is not None else "no fp32 to compare"
            words.append(f"{ratio}\n{g.speed_verdict}")
    labels_above(left, tops, words, [UNSURE_RED if pale else "black" for pale in unsure])
    memory = [g.measurements.peak_memory_mb for g in groups]
    tops = bars_with_spread(right, [m.mean if m else None for m in memory], [m.std if m else None for m in memory],
                             colors)  # fmt: skip
    labels_above(right, tops, [g.status if m is None else _memory_label(g) for g, m in zip(groups, memory)])
    right.set_title(_memory_title({g.memory.kind for g in groups if g.memory and g.memory.kind}))
    for ax in (left, right):
        bar_ticks(ax, labels)
    if not groups:
        say(left, "no throughput recorded: no runs")
        say(right, "no memory recorded: no runs")
    return fig


def time_to_quality_figure(report: SweepReport) -> Figure:
    """Per precision: the training time to first reach fp32's quality (its mean best eval loss plus the tolerance),
    mean over seeds with the spread as an error bar, labelled with the speed-up; "never reached" where no seed
    got there; hatched where the timing was unreliable."""
    groups = [g for g in report.groups if g.ttq is not None]
    fig, (ax,) = new_figure(1, 1, (bars_width(_group_labels(groups)), 4.8))
    times = [g.ttq.time_s if g.ttq else None for g in groups]
    # wall time: unreliable where the timing was (an undecided speed-up leaves it as it is)
    unsure = [_timing_unreliable(g) and t is not None for g, t in zip(groups, times)]
    tops = bars_with_spread(ax, [t.mean if t else None for t in times], [t.std if t else None for t in times],
                             [precision_color(g.effective) for g in groups], unsure)  # fmt: skip
    words = []
    for g, pale in zip(groups, unsure):
        assert g.ttq is not None
        if g.ttq.reached == 0:
            text = f"never reached\nin {g.ttq.horizon} steps"
        elif g.ttq.reached < g.ttq.runs:
            text = f"{g.ttq.reached} of {g.ttq.runs} seeds\nreached it"
        elif g.ttq.point_speedup is not None and not g.is_baseline:
            text = f"speed-up {g.ttq.point_speedup:.2f}x"
        else:
            text = "baseline" if g.is_baseline else ""
        words.append(text + ("\ntiming unreliable" if pale else ""))
    labels_above(ax, tops, words, [UNSURE_RED if pale else "black" for pale in unsure])
    bar_ticks(ax, _group_labels(groups))
    ax.set_ylabel("training seconds (evals excluded)")
    ax.set_title("time to fp32's quality (its mean best eval loss + tolerance)")
    if not groups:
        say(ax, "no eval recorded: no time to quality to show")
    return fig


MEMORY_PARTS = (("params_mb", "parameters"), ("grads_mb", "gradients"), ("optimizer_mb", "optimizer"),
                ("activations_mb", "activations"), ("temporaries_mb", "temporaries"))  # fmt: skip
_PART_COLORS = {"parameters": "tab:blue", "gradients": "tab:orange", "optimizer": "tab:green",
                "activations": "tab:purple", "temporaries": "tab:brown"}  # fmt: skip
_TOO_SMALL = 0.005  # a part under this share of the tallest stack would be under a pixel: named, not drawn


def _tensor_panel(ax: Axes, parts: Sequence[dict[str, float] | None]) -> None:
    """Per bar what held its tensor memory, stacked (parameters, gradients, optimizer state, and where MemTracker
    measured a step activations and temporaries), on an axis of its own so it shows beside a peak that dwarfs
    it; a part too small to see is named under the axis; "no split recorded" where a bar has no parts (None)."""
    top = max((sum(split.values()) for split in parts if split), default=0.0)
    largest = {name: max((split.get(name) or 0.0 for split in parts if split), default=0.0) for _, name in MEMORY_PARTS}
    drawn = [name for name, most in largest.items() if most > 0 and most >= _TOO_SMALL * top]
    tiny = [f"{name} ({most:.2g} MB at most)" for name, most in largest.items() if 0 < most < _TOO_SMALL * top]
    bottoms = [0.0] * len(parts)
    for name in drawn:
        heights = [split.get(name) or 0.0 if split else 0.0 for split in parts]
        ax.bar(range(len(parts)), heights, bottom=bottoms, color=_PART_COLORS[name], label=name)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    if drawn:
        ax.set_ylim(0, max(bottoms) * 1.35)  # room for the legend above the bars
    else:
        ax.set_yticks([])
    if tiny:
        ax.set_xlabel("too small to draw: " + ", ".join(tiny))
    for i, split in enumerate(parts):
        if not split:
            ax.annotate("no split\nrecorded", (i, 0), xytext=(0, 5), textcoords="offset points", ha="center",
                        va="bottom", fontsize=LEGEND_PT)  # fmt: skip
    ax.set_title("tensor memory (MB), by what holds it")
    ax.set_ylabel("MB")
    legend(ax)


def memory_split_figure(report: SweepReport) -> Figure:
    """Per precision, two panels on their own scales: the tensors' memory (parameters, gradients and optimizer
    state, stacked) and the peak (on a CPU the whole process's resident set, which dwarfs the tensors),
    labelled with what it uses against fp32, in words."""
    groups = [g for g in report.groups if g.memory is not None and g.memory.peak_mb is not None]
    fig, (tensors, peak) = two_bar_panels(_group_labels(groups))
    _tensor_panel(tensors, [{name: getattr(g.memory, attr) or 0.0 for attr, name in MEMORY_PARTS}
                            if g.memory is not None and g.memory.rest_mb is not None else None for g in groups])  # fmt: skip
    heights = [g.memory.peak_mb if g.memory else None for g in groups]
    tops = bars_with_spread(peak, heights, [None] * len(groups), [precision_color(g.effective) for g in groups])
    labels_above(peak, tops, [_memory_label(g) for g in groups])
    peak.set_title(_memory_title({g.memory.kind for g in groups if g.memory and g.memory.kind}))
    peak.set_ylabel("MB")
    for ax in (tensors, peak):
        bar_ticks(ax, _group_labels(groups))
    if not groups:
        say(tensors, "no memory recorded")
        say(peak, "no memory recorded")
    return fig


# -- the loss scale --------------------------------------------------------------------------------


def _plot_scale(ax: Axes, runs: Sequence[tuple[str, str, RunResult]]) -> bool:
    """Each run's loss scale, as the scale each step ran with (a step line), x at each skipped step, at the
    scale it skipped with. `runs`: (label, precision, result); a precision's seeds differ by line style and shade."""
    seen: dict[str, int] = {}
    skips = []
    for label, precision, result in runs:
        trace = scales_in_use(result.history)
        if not trace:
            continue
        index = seen[precision] = seen.get(precision, -1) + 1
        ax.plot([s for s, _, _ in trace], [v for _, v, _ in trace], color=seed_color(precision, index), label=label,
                linestyle=SEED_STYLES[index % len(SEED_STYLES)], linewidth=1.8, drawstyle="steps-post")  # fmt: skip
        skips += [(s, v) for s, v, skipped in trace if skipped]
    if skips:
        ax.plot([s for s, _ in skips], [v for _, v in skips], "x", color="black", markersize=8, markeredgewidth=1.8,
                zorder=4, label="skipped step")  # fmt: skip
    drawn = bool(seen)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale the step ran with")
    ax.set_title("loss scale vs step (x = skipped step)")
    if drawn:
        ax.set_yscale("log", base=2)
        legend(ax)
    return drawn


def loss_scale_figure(results: Sequence[RunResult]) -> Figure:
    """Loss scale vs step for the runs that used a scaler, skipped steps marked with x."""
    fig, (ax,) = new_figure()
    settings = _settings(results)
    runs = [(_seed_label(r) + (f" — {setting}" if len(settings) > 1 else ""), precision, r)
            for setting, rows in settings.items() for _, precision, group in rows for r in group]  # fmt: skip
    if not _plot_scale(ax, runs):
        say(ax, "no run used a loss scaler (only fp16-mixed does): no loss scale to show")
    return fig


def _uses_scaler(result: RunResult) -> bool:
    return any(row.loss_scale is not None for row in result.history)


# -- one run -----------------------------------------------------------------------------------------


def run_figure(result: RunResult, *, steps: int | None = None, state: str | None = None) -> Figure:
    """One run: its train loss, its evals as dots and, when it used a loss scaler, the scale trace with skipped
    steps. `steps` fixes the x axis to the whole run, so a live figure does not rescale as rows arrive;
    `state` (a run still going, e.g. "training") replaces the status in the title."""
    panels = 2 if _uses_scaler(result) else 1
    fig, axes = new_figure(1, panels, (12.0 if panels == 2 else 9.6, 4.4))
    loss_ax = axes[0]
    precision = str(result.effective)
    finished_badly = state is None and not result.ok
    rows = [h for h in result.history if h.loss is not None]
    if rows:
        loss_ax.plot([h.step for h in rows], [h.loss for h in rows], ":" if finished_badly else "-",
                     color=precision_color(precision), linewidth=1.6, label="train loss")  # fmt: skip
        if finished_badly:
            loss_ax.plot(rows[-1].step, rows[-1].loss, "x", color="black", markersize=9, markeredgewidth=2,
                         label=f"stopped: {result.status}")  # fmt: skip
    evals = [e for e in result.evals if e.loss is not None]
    if evals:
        loss_ax.plot([e.step for e in evals], [e.loss for e in evals], linestyle="none", marker="o", markersize=8,
                     color="black", markerfacecolor=precision_color(precision), zorder=3, label="eval loss")  # fmt: skip
    loss_ax.set_title("loss vs step")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    if rows or evals:
        legend(loss_ax)
    elif state is None:
        say(loss_ax, f"no loss recorded: the run ended ({result.status}) before its first logged step")
    if panels == 2:
        _plot_scale(axes[1], [("loss scale", precision, result)])
    if steps:
        for ax in axes:
            ax.set_xlim(-0.015 * steps, 1.015 * steps)  # the whole run, and room for a dot on its last step
    name = result.run_name  # "" in a notebook run that left the default name
    fig.suptitle(
        (f"{name}: " if name else "") + f"{result.plan.requested} → {result.effective} [{state or result.status}]"
    )
    return fig


# -- the explorer's view ---------------------------------------------------------------------------


def explore_figure(data: FigureData) -> Figure:
    """The explorer's view: one line per run (colour and marker: precision, line style: seed; fp32 narrower with
    hollow markers, on top; x = a marked point such as a skipped step), or for memory a bar per run in two panels: its tensors, stacked,
    and its peak. With nothing to draw, the note in words on a blank figure."""
    if data.note:
        fig, (ax,) = new_figure(1, 1, (10.0, 2.4))
        ax.set_title(data.view)
        say(ax, data.note)
        return fig
    if data.bars:
        return _explore_bars(data)
    fig, (ax,) = new_figure(1, 1, (11.0, 4.8))
    seeds = list(dict.fromkeys(line.seed for line in data.lines))
    for index, line in enumerate(data.lines):
        style = line_style(line.precision, index, len(data.lines), len(line.x))
        seed = seeds.index(line.seed)  # a seed: its line style and shade (fp32: narrower, on top)
        style.update(linestyle=SEED_STYLES[seed % len(SEED_STYLES)], color=seed_color(line.precision, seed))
        if not line.ok:
            style.update(linestyle=":", linewidth=1.6)
        if data.log_y:
            style["drawstyle"] = "steps-post"
        ax.plot(line.x, line.y, label=line.label, **style)
        if line.marks:
            ax.plot([m[0] for m in line.marks], [m[1] for m in line.marks], "x", color="black", markersize=8,
                    markeredgewidth=1.8, zorder=4)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel(data.ylabel)
    ax.set_title(data.view + " (colour and marker: precision, line style and shade: seed; fp32 narrower, on top)")
    if data.log_y:
        ax.set_yscale("log", base=2)
    legend(ax, outside=True)
    return fig


def _explore_bars(data: FigureData) -> Figure:
    labels = [bar.label.replace(" ", "\n", 1) for bar in data.bars]  # "fp16-mixed\ns0": side by side
    fig, (tensors, peak) = two_bar_panels(labels)
    _tensor_panel(tensors, [{k: v for k, v in bar.parts if k != "rest"} or None for bar in data.bars])
    colors = [precision_color(bar.precision) for bar in data.bars]
    peak.bar(range(len(data.bars)), [bar.total for bar in data.bars], color=colors)
    peak.set_title(data.ylabel)
    peak.set_ylabel("MB")
    for ax in (tensors, peak):
        bar_ticks(ax, labels)
    return fig


# -- saving ------------------------------------------------------------------------------------------


def figure_png(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for a display that is updated in place)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=DPI)
    return target


def report_figures(report: SweepReport) -> dict[str, Figure]:
    """The report's figures by name. The loss-scale figure is drawn only when a run used a loss scaler
    (otherwise it would only say that none did)."""
    figures = {
        "eval_curves": eval_curves_figure(report),
        "time_to_quality": time_to_quality_figure(report),
        "memory_split": memory_split_figure(report),
        "throughput_memory": throughput_memory_figure(report.groups),
        "loss": loss_figure(report.results),
    }
    if any(_uses_scaler(r) for r in report.results):
        figures["loss_scale"] = loss_scale_figure(report.results)
    return figures


def save_report_figures(report: SweepReport, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the report's figures (`report_figures`) as `<out_dir>/<name>.png`; returns name -> path."""
    out = Path(out_dir)
    return {name: save_figure(fig, out / f"{name}.png") for name, fig in report_figures(report).items()}


def headroom_figure(headroom: dict[str, Any]) -> Figure:
    """The fp16 headroom map of one run: layers x sampled steps, in doublings to fp16's largest value, for
    activations and (scaled) gradients; an x marks each module that overflowed first on a skipped step."""
    names = list(headroom.get("modules", []))
    samples = list(headroom.get("samples", []))
    steps = [s["step"] for s in samples]
    fig, axes = new_figure(1, 2, (12.0, max(3.0, 0.25 * len(names) + 1.5)))
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
        ax.set_yticks(range(len(names)), names, fontsize="small")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize="small")
        ax.set_xlabel("sampled step")
        ax.set_title(f"fp16 headroom of {kind}s (doublings; < 0 overflows)")
        for event in headroom.get("first_overflow", []):
            if event["phase"] == ("forward" if kind == "activation" else "backward") and event["module"] in names:
                column = steps.index(event["step"]) if event["step"] in steps else None
                if column is not None:
                    ax.plot(column, names.index(event["module"]), "x", color="black", markersize=10, markeredgewidth=2)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
