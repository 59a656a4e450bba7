"""`amp_lib.sweep.publish.write_report`: summary.md written from the SweepReport it is given, then
compare.ipynb executed into report.ipynb and exported to report.html, a failed one included.

No kernel starts here (the kernel "no-such-kernel" fails papermill at once); a real report notebook
is executed, and its figures and HTML checked, by the end-to-end sweep in test_sweep_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from factories import make_result

from amp_lib.details import summary_markdown
from amp_lib.render import answer
from amp_lib.report import build_report
from amp_lib.results import load_sweep
from amp_lib.sweep.execute import Settings
from amp_lib.sweep.publish import mark_stale, notes_markdown, unmarked, write_report

TWO_SEEDS = [make_result(p, s, tps=t, eval_loss=2.0 + 0.01 * s) for p, t in (("fp32", 1000.0), ("bf16-mixed", 1500.0))
             for s in (0, 1)]  # fmt: skip


def test_write_report_writes_the_given_report_then_exports_even_a_failed_notebook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # On disk: an fp32 run alone. Given: a report of fp32 and a faster bf16 run (two seeds), at a 25% tolerance.
    make_result("fp32").save(tmp_path / "sw" / "results" / "fp32-s0.json")
    report = build_report(TWO_SEEDS, 0.25)
    assert summary_markdown(report) != summary_markdown(build_report(load_sweep(tmp_path / "sw"), 0.25))
    monkeypatch.chdir(tmp_path)  # a relative folder: the notebook must still be given absolute paths
    settings = Settings(kernel="no-such-kernel")
    with pytest.raises(RuntimeError) as info:
        write_report(Path("sw"), report, settings)
    out = (tmp_path / "sw").resolve()
    notebook = out / "report.ipynb"
    assert str(info.value) == f"report notebook failed ({notebook}): NoSuchKernel: No such kernel named no-such-kernel"
    assert info.value.__cause__ is not None
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary == summary_markdown(report)  # the report it was given, not one recomputed from disk
    assert summary.startswith("# AMP Workbook sweep summary") and "±25% of fp32's" in summary
    assert f"## Answer\n\n{answer(report)}\n" in summary and answer(report).startswith("Use bf16-mixed")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.ipynb", "results", "summary.md"]
    meta = json.loads(notebook.read_text())["metadata"]["papermill"]
    assert meta["input_path"] == str(Path(settings.notebooks) / "compare.ipynb")
    assert meta["output_path"] == str(notebook)
    assert meta["parameters"] == {"sweep_dir": str(out), "tolerance": 0.25, "figures_dir": str(out / "figures")}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html and "Which precision should this model train in?" in html  # compare.ipynb's export...
    assert "report_view" not in html and "from amp_lib import notebook" not in html  # ...a report: code hidden
    assert 'class="jp-InputPrompt' not in html  # ...and no empty prompt column indenting its text
    assert "Not in this report" not in html  # nothing left out, nothing said
    assert "Executing" not in capsys.readouterr().err  # no papermill progress bar among the sweep's own output


def test_a_report_notebook_that_never_ran_leaves_the_summary_and_no_html(tmp_path: Path) -> None:
    """No compare.ipynb where the settings point: papermill fails before writing report.ipynb."""
    report = build_report([make_result("fp32")], 0.02)
    with pytest.raises(RuntimeError) as info:
        write_report(tmp_path, report, Settings(notebooks=str(tmp_path / "missing")))
    assert str(info.value).startswith(f"report notebook failed ({tmp_path / 'report.ipynb'}): FileNotFoundError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == summary_markdown(report)


# --- what the report leaves out, and a report that could not be rebuilt ---


def test_left_out_files_are_listed_in_summary_md_and_report_html(tmp_path: Path) -> None:
    report = build_report(TWO_SEEDS, 0.25)
    notes = ["not read: bad.json: not valid JSON", "left out: old.json: from an earlier grid <lr=0.003>"]
    with pytest.raises(RuntimeError):
        write_report(tmp_path, report, Settings(kernel="no-such-kernel"), notes=notes)
    assert (tmp_path / "summary.md").read_text() == summary_markdown(report) + (
        "\n## Not in this report\n\n- not read: bad.json: not valid JSON\n"
        "- left out: old.json: from an earlier grid <lr=0.003>\n"
    )
    html = (tmp_path / "report.html").read_text()
    assert html.index('<div id="amp-not-in-report"') < html.index("Which precision should this model train in?")
    assert (
        "<h2>Not in this report</h2><ul><li>not read: bad.json: not valid JSON</li>"
        "<li>left out: old.json: from an earlier grid &lt;lr=0.003&gt;</li></ul>"  # one item per note, escaped
    ) in html
    assert notes_markdown([]) == ""


def test_stale_report_files_are_marked_once_and_unmarked_text_is_the_old_one(tmp_path: Path) -> None:
    assert mark_stale(tmp_path, "nothing there") == []  # marks only files that exist
    (tmp_path / "summary.md").write_text("# old summary\n")
    (tmp_path / "report.html").write_text('<html><body class="x"><p>old</p></body></html>')
    assert mark_stale(tmp_path, "first reason") == [tmp_path / "summary.md", tmp_path / "report.html"]
    mark_stale(tmp_path, "second <reason>")  # marked again: one banner, the latest reason
    summary = (tmp_path / "summary.md").read_text()
    assert summary == (
        "> **STALE:** second <reason>; this summary is older than the results. Run the sweep again to rebuild it."
        "\n\n# old summary\n"
    )
    html = (tmp_path / "report.html").read_text()
    assert html.count("STALE") == 1 and "second &lt;reason&gt;" in html and "first reason" not in html
    assert html.startswith('<html><body class="x"><div id="amp-stale"') and html.endswith("<p>old</p></body></html>")
    assert unmarked(tmp_path / "summary.md") == "# old summary\n"
    assert unmarked(tmp_path / "report.html") == '<html><body class="x"><p>old</p></body></html>'
    (tmp_path / "fragment").mkdir()  # a report.html with no <body> tag: the banner goes at its very start
    (tmp_path / "fragment" / "report.html").write_text("<p>old</p>")
    mark_stale(tmp_path / "fragment", "third")
    assert (tmp_path / "fragment" / "report.html").read_text().startswith('<div id="amp-stale"')
    assert unmarked(tmp_path / "fragment" / "report.html") == "<p>old</p>"


def test_an_old_report_html_the_notebook_could_not_replace_is_marked_stale(tmp_path: Path) -> None:
    """Last week's report.ipynb is still there: it is not what this run wrote, so not re-exported as new."""
    (tmp_path / "report.html").write_text("<html><body><p>last week's report</p></body></html>")
    nbformat.write(
        nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("last week")]), tmp_path / "report.ipynb"
    )
    old_notebook = (tmp_path / "report.ipynb").read_bytes()
    report, notes = build_report(TWO_SEEDS, 0.25), ["not read: bad.json: not valid JSON"]
    with pytest.raises(RuntimeError, match="FileNotFoundError"):
        write_report(tmp_path, report, Settings(notebooks=str(tmp_path / "missing")), notes=notes)
    html = (tmp_path / "report.html").read_text()
    assert "last week's report" in html and "<b>STALE:</b> the report notebook could not run (FileNotFoundError" in html
    marked = nbformat.read(tmp_path / "report.ipynb", as_version=4)  # the old notebook, marked too
    assert marked.cells[0].source.startswith("**STALE:** the report notebook could not run (FileNotFoundError")
    assert nbformat.reads(unmarked(tmp_path / "report.ipynb"), as_version=4) == nbformat.reads(
        old_notebook.decode(), as_version=4)
    summary = (tmp_path / "summary.md").read_text()
    assert summary == summary_markdown(report) + notes_markdown(notes)  # the summary itself is fresh, notes too
    assert "\n- not read: bad.json: not valid JSON\n" in summary
