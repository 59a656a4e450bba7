"""A sweep's report files: summary.md from the report computed in Python, then compare.ipynb executed
into report.ipynb (its figures in figures/*.png) and exported to report.html."""

from __future__ import annotations

from pathlib import Path

import papermill as pm
from nbconvert import HTMLExporter

from amp_lib.report import SweepReport
from amp_lib.results import write_text_atomic
from amp_lib.sweep.execute import Settings, error_text


def write_report(out: Path, report: SweepReport, settings: Settings) -> dict[str, Path]:
    """Write `<out>/summary.md`, `report.ipynb`, `report.html` and `figures/`; returns name -> path.

    The notebook is executed even though `report` is already computed: it is the document a user opens,
    and its HTML export (a failed one included, to show where it failed) is report.html.
    """
    out = out.resolve()  # the notebook runs with cwd=out: relative paths would point elsewhere
    files = {"summary": out / "summary.md", "notebook": out / "report.ipynb", "html": out / "report.html"}
    write_text_atomic(files["summary"], report.summary_markdown())
    error: Exception | None = None
    try:
        pm.execute_notebook(
            str(Path(settings.notebooks) / "compare.ipynb"),
            str(files["notebook"]),
            parameters={"sweep_dir": str(out), "tolerance": report.tolerance, "figures_dir": str(out / "figures")},
            kernel_name=settings.kernel,
            cwd=str(out),
            execution_timeout=settings.timeout,
            progress_bar=False,
        )
    except Exception as exc:  # noqa: BLE001 - any notebook failure: still export what ran, then raise
        error = exc
    if files["notebook"].exists():
        body, _ = HTMLExporter().from_filename(str(files["notebook"]))
        write_text_atomic(files["html"], body)
    if error is not None:
        raise RuntimeError(f"report notebook failed ({files['notebook']}): {error_text(error)}") from error
    files.update({f"figure:{p.stem}": p for p in sorted((out / "figures").glob("*.png"))})
    return files
