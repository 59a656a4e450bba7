"""A sweep's report files: summary.md from the report computed in Python, then compare.ipynb executed
into report.ipynb (its figures in figures/*.png) and exported to report.html (code cells hidden).

A report file that could not be rebuilt is never left silently old: `mark_stale` puts a STALE banner
at its top, and the next rebuild replaces the whole file."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import papermill as pm
from nbconvert import HTMLExporter

from amp_lib.report import SweepReport
from amp_lib.results import write_text_atomic
from amp_lib.sweep.execute import KERNEL_ARGUMENTS, Settings, error_text

STALE_MD = "> **STALE:**"
STALE_HTML_ID = "amp-stale"
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


def unmarked(path: Path) -> str:
    """A report file's text without its STALE banner."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        lines = text.split("\n")
        return "\n".join(lines[2:]) if lines and lines[0].startswith(STALE_MD) else text
    return _STALE_HTML.sub("", text)


def mark_stale(out: Path, reason: str) -> list[Path]:
    """Put a STALE banner (with `reason`) at the top of the summary.md and report.html that exist in
    `out`; returns the files marked."""
    marked = []
    summary, report = out / "summary.md", out / "report.html"
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
    return marked


def write_report(out: Path, report: SweepReport, settings: Settings, notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write `<out>/summary.md`, `report.ipynb`, `report.html` and `figures/`; returns name -> path.

    `notes` name the result files the report leaves out (unreadable, foreign, from an earlier grid): both
    summary.md and report.html list them. The notebook is executed even though `report` is already
    computed: it is the document a user opens, and its HTML export, code hidden (a failed one included,
    to show where it failed), is report.html. A report.html that could not be re-exported is marked STALE.
    """
    out = out.resolve()  # the notebook runs with cwd=out: relative paths would point elsewhere
    files = {"summary": out / "summary.md", "notebook": out / "report.ipynb", "html": out / "report.html"}
    write_text_atomic(files["summary"], report.summary_markdown() + notes_markdown(notes))
    error: Exception | None = None
    before = files["notebook"].stat().st_mtime_ns if files["notebook"].exists() else None
    try:
        pm.execute_notebook(
            str(Path(settings.notebooks) / "compare.ipynb"),
            str(files["notebook"]),
            parameters={"sweep_dir": str(out), "tolerance": report.tolerance, "figures_dir": str(out / "figures")},
            kernel_name=settings.kernel,
            cwd=str(out),
            execution_timeout=settings.timeout,
            progress_bar=False,
            extra_arguments=KERNEL_ARGUMENTS,
        )
    except Exception as exc:  # noqa: BLE001 - any notebook failure: still export what ran, then raise
        error = exc
    # A failed papermill may still have written report.ipynb (up to the failing cell): export that one, never
    # one left from an earlier run. One that returned wrote it, however coarse the file system's clock.
    written = files["notebook"].exists() and files["notebook"].stat().st_mtime_ns != before
    if error is None or written:
        body, _ = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True).from_filename(
            str(files["notebook"])
        )
        write_text_atomic(files["html"], _inject(body, _notes_html(notes)) if notes else body)
    elif files["html"].exists():
        mark_stale(out, f"the report notebook could not run ({error_text(error)})")
        write_text_atomic(files["summary"], report.summary_markdown() + notes_markdown(notes))  # summary is fresh
    if error is not None:
        raise RuntimeError(f"report notebook failed ({files['notebook']}): {error_text(error)}") from error
    files.update({f"figure:{p.stem}": p for p in sorted((out / "figures").glob("*.png"))})
    return files
