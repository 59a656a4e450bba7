"""A sweep's report files: summary.md from the report computed in Python, then compare.ipynb executed
into report.ipynb (its figures in figures/*.png) and exported to report.html (code cells hidden).

Stale until proven fresh: a sweep marks the report files it finds STALE (a banner at the top of
summary.md and report.html, a first cell in report.ipynb) when it starts, and only a rebuilt report
replaces them, so a sweep that dies in any way (Ctrl-C, SIGTERM, SIGKILL, a full disk) leaves the mark.
Every file is written whole (a temp file renamed into place); the notebook runs in a hidden file."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import nbformat
import papermill as pm
from nbconvert import HTMLExporter

from amp_lib.details import summary_markdown
from amp_lib.report import SweepReport
from amp_lib.results import write_text_atomic
from amp_lib.sweep.execute import KERNEL_ARGUMENTS, Settings, error_text, publish_notebook

STALE_MD = "> **STALE:**"
STALE_HTML_ID = "amp-stale"
STALE_CELL_ID = "amp-stale"
NOTES_HTML_ID = "amp-not-in-report"
_STALE_HTML = re.compile(rf'<div id="{STALE_HTML_ID}".*?</div>\n?', re.DOTALL)


def notes_markdown(notes: Sequence[str]) -> str:
    """The section of summary.md naming every result file the report does not include, and why."""
    if not notes:
        return ""
    return "\n## Not in this report\n\n" + "".join(f"- {note}\n" for note in notes)


def _inject(body: str, block: str) -> str:
    """`block` right after the HTML's <body> tag (or at its start)."""
    match = re.search(r"<body[^>]*>", body)
    at = match.end() if match else 0
    return body[:at] + block + body[at:]


def _notes_html(notes: Sequence[str]) -> str:
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f'<div id="{NOTES_HTML_ID}" style="margin:1em"><h2>Not in this report</h2><ul>{items}</ul></div>\n'


def _read_notebook(path: Path) -> nbformat.NotebookNode | None:
    try:
        return nbformat.read(str(path), as_version=4)
    except Exception:  # noqa: BLE001 - half a notebook (a full disk): nothing to mark, it is rebuilt whole
        return None


def _without_banner(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb.cells = [c for c in nb.cells if c.get("id") != STALE_CELL_ID]
    return nb


def unmarked(path: Path) -> str:
    """A report file's text without its STALE banner."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        lines = text.split("\n")
        return "\n".join(lines[2:]) if lines and lines[0].startswith(STALE_MD) else text
    if path.suffix == ".ipynb":
        nb = _read_notebook(path)
        return text if nb is None else nbformat.writes(_without_banner(nb))
    return _STALE_HTML.sub("", text)


def _stale_notebook(path: Path, reason: str) -> str | None:
    nb = _read_notebook(path)
    if nb is None:
        return None
    cell = nbformat.v4.new_markdown_cell(
        f"**STALE:** {reason}; this report is older than the results. Run the sweep again to rebuild it."
    )
    cell["id"] = STALE_CELL_ID
    nb = _without_banner(nb)
    nb.cells.insert(0, cell)
    return nbformat.writes(nb)


def mark_stale(out: Path, reason: str) -> list[Path]:
    """Put a STALE banner (with `reason`) at the top of the summary.md, report.html and report.ipynb that
    exist in `out`; returns the files marked."""
    marked = []
    summary, report, notebook = out / "summary.md", out / "report.html", out / "report.ipynb"
    if summary.is_file():
        write_text_atomic(summary, f"{STALE_MD} {reason}; this summary is older than the results. "
                          f"Run the sweep again to rebuild it.\n\n{unmarked(summary)}")  # fmt: skip
        marked.append(summary)
    if report.is_file():
        banner = (
            f'<div id="{STALE_HTML_ID}" style="background:#fdd;border:2px solid #c00;padding:1em;margin:1em">'
            f"<b>STALE:</b> {html.escape(reason)}; this report is older than the results. "
            "Run the sweep again to rebuild it.</div>\n"
        )
        write_text_atomic(report, _inject(unmarked(report), banner))
        marked.append(report)
    if notebook.is_file() and (text := _stale_notebook(notebook, reason)) is not None:
        write_text_atomic(notebook, text)
        marked.append(notebook)
    return marked


def unmark(out: Path) -> None:
    """Take the STALE banners off `out`'s report files again (the sweep changed nothing they show)."""
    for path in (out / "summary.md", out / "report.html", out / "report.ipynb"):
        if path.is_file() and path.read_text(encoding="utf-8") != (clean := unmarked(path)):
            write_text_atomic(path, clean)


def write_report(out: Path, report: SweepReport, settings: Settings, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write `<out>/summary.md`, `report.ipynb`, `report.html` and `figures/`; returns name -> path.

    `notes` name the result files the report leaves out (unreadable, foreign, from an earlier grid): both
    summary.md and report.html list them. The notebook is executed even though `report` is already
    computed: it is the document a user opens, and its HTML export, code hidden, is report.html. A notebook
    that failed is still moved into place and exported, to show where it failed, and both carry a STALE
    banner; a report.html that could not be re-exported at all is marked STALE.
    """
    out = out.resolve()  # the notebook runs with cwd=out: relative paths would point elsewhere
    files = {"summary": out / "summary.md", "notebook": out / "report.ipynb", "html": out / "report.html"}
    summary_text = summary_markdown(report) + notes_markdown(notes)
    write_text_atomic(files["summary"], summary_text)
    partial = out / ".report.partial.ipynb"
    partial.unlink(missing_ok=True)
    error: Exception | None = None
    try:
        pm.execute_notebook(
            str(Path(settings.notebooks) / "compare.ipynb"),
            str(partial),
            parameters={"sweep_dir": str(out), "tolerance": report.tolerance, "figures_dir": str(out / "figures")},
            kernel_name=settings.kernel,
            cwd=str(out),
            execution_timeout=settings.timeout,
            progress_bar=False,
            extra_arguments=KERNEL_ARGUMENTS,
        )
    except Exception as exc:  # noqa: BLE001 - any notebook failure: still export what ran, then raise
        error = exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if partial.exists():  # a failed papermill may have written the notebook up to the failing cell: show that one
        publish_notebook(partial, files["notebook"])
        body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True).from_filename(
            str(files["notebook"])
        )
        write_text_atomic(files["html"], _inject(body, _notes_html(notes)) if notes else body)
    if error is not None:
        if files["html"].exists() or files["notebook"].exists():
            mark_stale(out, f"the report notebook could not run ({error_text(error)})")
            write_text_atomic(files["summary"], summary_text)  # the summary itself is fresh
        raise RuntimeError(f"report notebook failed ({files['notebook']}): {error_text(error)}") from error
    files.update({f"figure:{p.stem}": p for p in sorted((out / "figures").glob("*.png"))})
    return files


def remove_partial(out: Path) -> None:
    """What a killed sweep's report notebook left behind (hidden, never shown as a report)."""
    for path in (out / ".report.partial.ipynb", *(out / "runs").glob(".*.partial.ipynb")):
        if path.is_file():
            os.unlink(path)
