"""amp_lib.figstyle: the canvas and house style every figure shares, read off real matplotlib artists: a colour and
a marker per precision, seeds apart, fp32 on top, bars with their spread and labels above it, panels that fit."""

from __future__ import annotations

import itertools

from matplotlib.colors import to_hex, to_rgba

from amp_lib.figstyle import (
    DPI,
    LEGEND_PT,
    NOTE_PT,
    UNSURE_RED,
    bar_ticks,
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
from amp_lib.precision import CANONICAL

GRAY = "#7f7f7f"  # matplotlib's tab:gray: a name without a colour of its own

# --- colours, markers and line styles -----------------------------------------------------------------


def test_every_precision_name_has_a_colour_and_a_marker_of_its_own_and_an_unknown_one_is_gray() -> None:
    styles = {p: line_style(p, i, len(CANONICAL), 40) for i, p in enumerate(CANONICAL)}
    colors = {to_hex(s["color"]) for s in styles.values()}
    assert len(colors) == len(CANONICAL) and GRAY not in colors
    assert len({s["marker"] for s in styles.values()}) == len(CANONICAL)
    assert to_hex(precision_color("fp64-mixed")) == GRAY and to_hex(precision_color(None)) == GRAY


def test_the_seeds_of_a_precision_get_four_shades_the_first_its_own_colour() -> None:
    shades = [seed_color("bf16-mixed", i) for i in range(4)]
    assert to_hex(shades[0]) == to_hex(precision_color("bf16-mixed"))
    assert len({to_hex(s) for s in shades}) == 4
    assert seed_color("bf16-mixed", 4) == shades[0]  # a fifth seed starts over
    base, darker, lighter, darkest = (sum(s) for s in shades)
    assert darkest < darker < base < lighter  # toward black, toward white, further toward black


def test_fp32_is_narrower_dashed_hollow_and_on_top_and_two_series_mark_different_points() -> None:
    fp32, bf16 = line_style("fp32", 0, 2, 40), line_style("bf16-mixed", 1, 2, 40)
    assert fp32["linewidth"] < bf16["linewidth"] and fp32["zorder"] > bf16["zorder"]
    assert fp32["markerfacecolor"] == "none" and isinstance(fp32["linestyle"], tuple)  # dashed
    assert "linestyle" not in bf16  # solid, matplotlib's default
    assert (fp32["markevery"], bf16["markevery"]) == ((0, 5), (2, 5))  # every 5th of 40 points, offset by half
    assert line_style("fp64-mixed", 0, 1, 40)["marker"] == "*"  # a name without a marker of its own
    assert line_style("fp32", 0, 1, 3)["markevery"] == (0, 1)  # few points: every one marked


# --- the canvas ------------------------------------------------------------------------------------


def test_a_new_figure_has_its_panels_at_dpi_and_leaves_pyplot_alone() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig, axes = new_figure(2, 3, (12.0, 5.0))
    assert len(axes) == 6 and fig.dpi == DPI
    assert tuple(fig.get_size_inches() * DPI) == (1200.0, 500.0)
    assert fig.get_layout_engine() is not None and plt.get_fignums() == before
    assert type(fig.canvas).__name__ == "FigureCanvasAgg"  # drawn off screen, no display


def test_an_empty_panel_says_why_and_a_legend_appears_only_with_labelled_series() -> None:
    fig, (empty, lines) = new_figure(1, 2)
    say(empty, "no loss recorded")
    (note,) = empty.texts
    assert not empty.axison and note.get_text() == "no loss recorded" and note.get_wrap()
    assert note.get_position() == (0.5, 0.5) and note.get_transform() == empty.transAxes  # the panel's centre
    assert (note.get_ha(), note.get_va(), note.get_fontsize()) == ("center", "center", NOTE_PT)
    legend(lines)
    assert lines.get_legend() is None
    lines.plot([0, 1], [1, 0], label="fp32")
    legend(lines)
    fig.canvas.draw()
    assert lines.get_window_extent().contains(*lines.get_legend().get_window_extent().p0)  # inside the panel
    legend(lines, outside=True)
    fig.canvas.draw()
    assert lines.get_legend().get_texts()[0].get_fontsize() == LEGEND_PT
    anchor, panel = lines.get_legend().get_bbox_to_anchor(), lines.get_window_extent()
    assert (anchor.x0, anchor.y0) == (panel.x1, panel.y1)  # its top left at the panel's top right


# --- bars ------------------------------------------------------------------------------------------


def test_bars_carry_a_spread_where_there_is_one_and_unsure_bars_are_pale_and_hatched() -> None:
    _fig, (ax,) = new_figure()
    tops = bars_with_spread(
        ax, [2.0, None, 3.0], [0.5, None, None], ["tab:orange", "tab:red", "tab:green"], [False, False, True]
    )
    assert tops == [2.5, 0.0, 3.0]
    orange, missing, green = ax.patches
    assert orange.get_height() == 2.0 and missing.get_height() == 0.0
    assert to_hex(orange.get_facecolor()) == to_hex("tab:orange") and to_hex(green.get_edgecolor()) == to_hex("tab:green")
    assert not orange.get_hatch() and green.get_hatch() == "//" and green.get_linewidth() > orange.get_linewidth()
    assert to_rgba(green.get_facecolor())[3] < 0.5 < to_rgba(orange.get_facecolor())[3]
    (errorbar,) = ax.containers[3:]  # three bar containers, then one error bar: only the bar with a spread
    caps, (whisker,) = errorbar.lines[1], errorbar.lines[2]
    assert errorbar.lines[0] is None and len(caps) == 2  # no marker at the mean; capped at both ends
    assert list(whisker.get_segments()[0][:, 1]) == [1.5, 2.5] and to_hex(whisker.get_color()[0]) == "#000000"
    assert whisker.get_zorder() > orange.get_zorder()  # drawn over the bar
    _fig, (plain,) = new_figure()
    bars_with_spread(plain, [1.0, 2.0], [None, None], ["tab:orange", "tab:red"])  # nothing unsure, no spread
    assert not any(bar.get_hatch() for bar in plain.patches) and len(plain.containers) == 2


def test_labels_sit_above_each_error_bar_with_room_kept_under_the_frame() -> None:
    fig, (ax,) = new_figure()
    ax.bar([0, 1, 2], [2.5, 3.0, 3.0])
    labels_above(ax, [2.5, 3.0, 3.0], ["0.55x\nslower\n[0.49x, 0.65x]", "", "1.02x"], [UNSURE_RED])
    red, black = ax.texts  # an empty text draws nothing
    assert red.get_text() == "0.55x\nslower\n[0.49x, 0.65x]" and red.xy == (0, 2.5) and black.xy == (2, 3.0)
    assert (red.get_color(), red.get_fontweight()) == (UNSURE_RED, "bold")
    assert (black.get_color(), black.get_fontweight()) == ("black", "normal")
    assert {(t.get_ha(), t.get_va(), t.get_fontsize()) for t in ax.texts} == {("center", "bottom", LEGEND_PT)}
    assert ax.get_ylim()[0] == 0
    fig.canvas.draw()
    frame, renderer = ax.get_window_extent(), fig.canvas.get_renderer()
    for text, bar in zip(ax.texts, [ax.patches[0], ax.patches[2]]):
        box = text.get_window_extent(renderer)
        assert bar.get_window_extent().y1 + 3 < box.y0 and box.y1 <= frame.y1  # above its bar, under the frame
    _fig, (flat,) = new_figure()
    labels_above(flat, [0.0], ["no runs"])  # nothing tall: the axis is left as it is
    assert flat.get_ylim() == (0.0, 1.0)


def test_two_panels_of_bars_sit_side_by_side_unless_their_labels_make_that_too_wide() -> None:
    fig, axes = two_bar_panels(["fp32", "bf16-mixed"])
    assert len(axes) == 2 and axes[0].get_position().y0 == axes[1].get_position().y0  # one row
    assert tuple(fig.get_size_inches()) == (12.0, 4.8)
    for count, long in ((4, "fp16-mixed\nreduce bf16 s0"), (8, "fp8-rowwise-gw-hp\nfsdp reduce bf16 s0")):
        labels = [long] * count
        fig, (first, second) = two_bar_panels(labels)
        for ax in (first, second):
            ax.bar(range(count), [1.0] * count)
            bar_ticks(ax, labels)
        fig.canvas.draw()
        assert [t.get_text() for t in second.get_xticklabels()] == labels
        assert second.get_xticklabels()[0].get_fontsize() == LEGEND_PT
        boxes = [t.get_window_extent() for ax in (first, second) for t in ax.get_xticklabels()]
        assert not any(a.overlaps(b) for a, b in itertools.pairwise(boxes) if a.y0 == b.y0)  # tick labels side by side
        width, height = fig.get_size_inches()
        assert all(b.x0 >= 0 and b.x1 <= width * DPI for b in boxes)
        if count == 4:  # four long labels: still side by side, wider than the least width
            assert first.get_position().y0 == second.get_position().y0 and width > 12.0
    assert first.get_position().y0 > second.get_position().y0 and height == 9.6  # eight long labels: stacked
