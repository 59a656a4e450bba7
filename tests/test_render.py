"""`amp_lib.render`: the report in words — tables as markdown, HTML and plain text, cells, the answer and
the recommendation (the numbers are `amp_lib.report`'s, checked in test_report.py)."""

from __future__ import annotations

import pytest
from factories import FP16_SCALED, SWEEP, THREE, make_result

from amp_lib import render as T
from amp_lib.config import RECIPES
from amp_lib.details import memory_markdown, verdict_markdown
from amp_lib.render import format_memory, format_table, format_verdicts
from amp_lib.report import build_report, comparison_table, run_table

# --- formatting ----------------------------------------------------------------------------------


def test_golden_comparison_table_of_three_precisions(golden) -> None:
    rows = comparison_table(THREE)
    md = format_table(rows)
    assert md == format_table(rows, "markdown")  # markdown is the default
    golden("comparison_three.md", md)
    text = format_table(rows, "text")
    golden("comparison_three.txt", text)
    # columns padded to the widest cell, two spaces apart, no trailing blanks
    assert all(line == line.rstrip() for line in text.splitlines()) and len(text.splitlines()) == 4
    html = format_table(rows, "html")
    golden("comparison_three.html", html)
    assert html.count("</tr><tr>") == 2 and "\n" not in html


def test_table_shows_failed_runs_and_every_column() -> None:
    runs = [
        make_result("fp32"),
        make_result("fp16-mixed", tps=900, **FP16_SCALED),
        make_result("bf16-true", status="oom", error="out of memory: CUDA\nmore", tps=None, eval_loss=None),
    ]
    rows = run_table(runs)
    assert [(r.requested, r.status) for r in rows] == [("fp32", "ok"), ("fp16-mixed", "ok"), ("bf16-true", "oom")]
    md = format_table(rows, "markdown")
    header = md.splitlines()[0]
    assert header == "| " + " | ".join(name for name, _ in T.COLUMNS[1:]) + " |"  # one setting: no setting column
    assert md.splitlines()[1] == "|" + "---|" * (len(T.COLUMNS) - 1)
    assert "| oom |" in md and "out of memory: CUDA |" in md and "more" not in md
    assert "| 1 | 3.28e+04 | 3.28e+04 |" in md  # fp16 skipped steps and loss scales
    html = format_table(rows, "html")
    assert html.startswith("<table") and '<td style="white-space:nowrap">oom</td>' in html
    with pytest.raises(ValueError, match=r"^invalid fmt 'csv'; valid: markdown, html, text$"):
        format_table(rows, "csv")


def test_markdown_and_html_escape_cell_text() -> None:
    runs = [make_result("fp32"), make_result("fp16-mixed", status="failed", error="a|b <c>\nsecond line")]
    rows = run_table(runs)
    md = format_table(rows)
    assert md.splitlines()[-1].endswith("| a\\|b <c> |")
    assert '<td style="white-space:nowrap">a|b &lt;c&gt;</td>' in format_table(rows, "html")
    assert "a|b <c>" in format_table(rows, "text")  # plain text is shown as it is


def test_short_html_cells_never_wrap_and_long_ones_may() -> None:
    """A precision name or a verdict stays on one line in a narrow notebook; a long reason wraps."""
    long = "x" * 31
    runs = [make_result("fp32"), make_result("fp16-mixed", status="failed", error=long)]
    html = format_table(run_table(runs), "html")
    assert '<td style="white-space:nowrap">fp16-mixed</td>' in html and f"<td>{long}</td>" in html
    assert f'<td style="white-space:nowrap">{long[:30]}</td>' not in html


def test_markdown_cells_stay_on_one_line() -> None:
    rows = run_table([make_result("fp32", run_name="two\nlines")])
    assert format_table(rows).splitlines()[-1].startswith("| fp32 | fp32 | ok | two lines |")


def test_table_with_several_settings_shows_the_setting_column() -> None:
    rows = comparison_table([make_result("fp32", lr=1), make_result("fp32", lr=2, unit="samples", tps=5.0)])
    text = format_table(rows, "text").splitlines()
    assert text[0].startswith("setting        requested")
    assert text[2].startswith("gpt-tiny lr=2  fp32") and "5 samples" in text[2]
    assert format_table(rows).startswith("| setting | requested |")
    assert "<th>setting</th>" in format_table(rows, "html")


def test_an_empty_table_is_its_header() -> None:
    header = " | ".join(name for name, _ in T.COLUMNS[1:])
    assert format_table([]) == f"| {header} |\n|" + "---|" * 15
    assert format_table([], "text").startswith("requested  effective  status  run")
    assert format_table([], "html").endswith("</tr></thead><tbody></tbody></table>")


# --- goldens: the tables -------------------------------------------------------------------------


def test_golden_verdict_and_memory_tables_of_a_three_seed_sweep(golden) -> None:
    report = build_report(SWEEP)
    verdicts = {c.requested: c.verdict for c in report.groups}
    assert verdicts == {"fp32": "baseline", "tf32": "inconclusive — run more seeds", "fp16-mixed": "worse by +0.2100 (+10.5%)",
                        "bf16-mixed": "matches fp32"}  # fmt: skip
    assert report.recommendations[0].precision == "bf16-mixed"
    golden("verdicts_three_seeds.md", verdict_markdown(report) + "\n\n" + memory_markdown(report) + "\n")
    html = format_verdicts(report.groups, "html")
    assert html.startswith('<table class="amp-verdicts">') and html.count("</tr><tr>") == 3
    assert format_memory(report.groups, "html").startswith('<table class="amp-memory">')
    assert format_verdicts(report.groups) == verdict_markdown(report)  # markdown by default
    assert format_memory(report.groups) == format_memory(report.groups, "markdown")
    with pytest.raises(ValueError, match=r"^invalid fmt 'csv'"):
        format_verdicts(report.groups, "csv")
    cells = [get(g) for g in report.groups for _, get in T.VERDICT_COLUMNS]
    assert max(map(len, cells)) <= T.CELL_LIMIT  # one short line per cell: the details come later


# --- the context ---------------------------------------------------------------------------------


def test_the_training_line_names_the_recipe_its_changes_and_the_other_values_each_once() -> None:
    recipe = {k: v for k, v in RECIPES["shakespeare-char-tiny"].items() if k != "model"}
    as_made = [make_result(p, s, **recipe, grad_accum=1) for p in ("fp32", "bf16-mixed") for s in (0, 1)]
    (training,) = [v for k, v in T.context(build_report(as_made)) if k == "Training"]
    assert training == "recipe shakespeare-char-tiny; steps=60, batch_size=8, seq_len=64, grad_accum=1"
    shorter = {**recipe, "steps": 40, "lr_decay_steps": 40}
    changed = [make_result(p, s, **shorter, grad_accum=1) for p in ("fp32", "bf16-mixed") for s in (0, 1)]
    (training,) = [v for k, v in T.context(build_report(changed)) if k == "Training"]
    assert (
        training
        == "recipe shakespeare-char-tiny with lr_decay_steps=40, steps=40; batch_size=8, seq_len=64, grad_accum=1"
    )
    no_recipe = [make_result(p, s, steps=7) for p in ("fp32", "bf16-mixed") for s in (0, 1)]
    (training,) = [v for k, v in T.context(build_report(no_recipe)) if k == "Training"]
    assert training.startswith("steps=7") and "recipe" not in training
