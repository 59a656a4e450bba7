"""The figures' canvas and house style: every figure a `Figure` on an Agg canvas (no pyplot, no global state) at
`DPI`, legend text of `LEGEND_PT`, a colour and a marker per precision, seeds told apart by line style and shade,
fp32 drawn on top, narrower, with hollow markers; bars with their error bars and the labels above them, and two
panels of the same bars side by side or stacked when side by side would be too wide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb, to_rgba
from matplotlib.figure import Figure

from amp_lib.table import BASELINE

DPI = 100  # every PNG: a figure's inches times this is its size in pixels
LEGEND_PT = 10.0  # 13.9 px at DPI: still 10 px in a notebook that shows a figure at 72% of its size
NOTE_PT = 12.0
COLORS = {"fp32": "tab:blue", "tf32": "tab:cyan", "fp16-mixed": "tab:red", "bf16-mixed": "tab:green",
          "fp16-true": "tab:orange", "bf16-true": "tab:olive", "fp8-tensorwise": "tab:purple",
          "fp8-rowwise": "tab:pink", "fp8-rowwise-gw-hp": "tab:brown"}  # fmt: skip
MARKERS = {"fp32": "o", "tf32": "v", "fp16-mixed": "s", "bf16-mixed": "^", "fp16-true": "D", "bf16-true": "P",
           "fp8-tensorwise": "X", "fp8-rowwise": "p", "fp8-rowwise-gw-hp": "h"}  # fmt: skip
_BASELINE_DASHES = (0, (6, 3))
SEED_STYLES = ("-", "--", "-.", (0, (5, 1.5, 1, 1.5, 1, 1.5)))  # dotted (":") is a run that did not end ok
UNSURE_RED = "#b00020"


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (10.0, 4.5)) -> tuple[Figure, list[Axes]]:
    """A figure of `nrows` x `ncols` panels, `size` in inches, on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for line in axes for ax in line]


def precision_color(precision: str | None) -> str:
    return COLORS.get(str(precision), "tab:gray")


def seed_color(precision: str | None, index: int) -> tuple[float, float, float]:
    """The precision's colour for its `index`-th seed: itself, darker, lighter, darker still, so seeds that
    share a curve still show as two lines."""
    base = np.array(to_rgb(precision_color(precision)))
    toward, share = ((0.0, 0.0), (0.0, 0.4), (1.0, 0.45), (0.0, 0.65))[index % 4]
    return tuple(float(c) for c in base + (toward - base) * share)  # type: ignore[return-value]


def legend(ax: Axes, outside: bool = False) -> None:
    if ax.get_legend_handles_labels()[0]:
        where = {"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if outside else {}
        ax.legend(fontsize=LEGEND_PT, **where)


def say(ax: Axes, text: str) -> None:
    """An empty panel: the reason in words, and no empty axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=NOTE_PT, wrap=True)
    ax.set_axis_off()


def line_style(precision: str, index: int, count: int, points: int) -> dict[str, Any]:
    """A precision's mean line: its colour and marker (placed every few points, offset per series so two
    series on the same points both show); fp32 dashed, hollow-marked and on top."""
    every = max(1, points // 8)
    style: dict[str, Any] = {
        "color": precision_color(precision),
        "marker": MARKERS.get(precision, "*"),
        "markersize": 7.0,
        "linewidth": 2.6,
        "markevery": (index * every // max(count, 1) % every, every),
        "zorder": 2.5,
    }
    if precision == BASELINE:  # narrower than the others, so one that runs along it shows at its edges
        style.update(linestyle=_BASELINE_DASHES, linewidth=1.8, markerfacecolor="none", markeredgewidth=1.8, zorder=3)
    return style


# -- bars --------------------------------------------------------------------------------------------


def bars_with_spread(ax: Axes, means: Sequence[float | None], stds: Sequence[float | None], colors: Sequence[str],
                      unsure: Sequence[bool] = ()) -> list[float]:  # fmt: skip
    """Bars (none where the mean is None), error bars of one std where there is a spread, and hatched, pale
    bars where `unsure`; returns the top of each bar's error bar, where its label goes."""
    xs = range(len(means))
    heights = [m or 0.0 for m in means]
    for x, height, color, pale in zip(xs, heights, colors, [*unsure, *[False] * len(means)]):
        if pale:
            ax.bar(x, height, color=to_rgba(color, 0.35), edgecolor=color, hatch="//", linewidth=1.5)
        else:
            ax.bar(x, height, color=color)
    spread = [(x, h, s) for x, h, s in zip(xs, heights, stds) if s]
    if spread:
        ax.errorbar([x for x, _, _ in spread], [h for _, h, _ in spread], yerr=[s for _, _, s in spread],
                    fmt="none", ecolor="black", elinewidth=1.3, capsize=5, zorder=3)  # fmt: skip
    return [h + (s or 0.0) for h, s in zip(heights, stds)]


def labels_above(ax: Axes, tops: Sequence[float], texts: Sequence[str], colors: Sequence[str] = ()) -> None:
    """Each text just above its bar's error bar (never across it), with room kept for it under the frame."""
    colors = [*colors, *["black"] * len(texts)]
    for x, (top, text, color) in enumerate(zip(tops, texts, colors)):
        if text:
            ax.annotate(text, (x, top), xytext=(0, 5), textcoords="offset points", ha="center", va="bottom",
                        fontsize=LEGEND_PT, color=color, fontweight="bold" if color != "black" else "normal")  # fmt: skip
    lines = max((t.count("\n") + 1 for t in texts if t), default=0)
    if tops and max(tops) > 0:
        ax.set_ylim(0, max(tops) * (1.12 + 0.1 * lines))


def bars_width(labels: Sequence[str], least: float = 9.5) -> float:
    """A panel of bars wide enough, in inches, for each bar's tick label side by side (about 0.08 in a character
    of its longest line at LEGEND_PT), and at least `least`."""
    longest = max((len(line) for label in labels for line in label.split("\n")), default=0)
    return max(least, len(labels) * (0.08 * longest + 0.25) + 1.2)


def two_bar_panels(labels: Sequence[str], least: float = 12.0) -> tuple[Figure, list[Axes]]:
    """Two panels of the same bars: side by side, or one above the other when side by side would be too wide."""
    width = bars_width(labels, least / 2)
    if 2 * width <= 16.0:
        return new_figure(1, 2, (max(least, 2 * width), 4.8))
    return new_figure(2, 1, (max(least, width), 9.6))


def bar_ticks(ax: Axes, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)), labels, fontsize=LEGEND_PT)
