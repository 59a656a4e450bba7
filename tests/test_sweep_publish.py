"""`amp_lib.sweep.publish.write_report`: summary.md written from the SweepReport it is given, then
compare.ipynb executed into report.ipynb and exported to report.html, a failed one included.

No kernel starts here (the kernel "no-such-kernel" fails papermill at once); a real report notebook
is executed, and its figures and HTML checked, by the end-to-end sweep in test_sweep_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import make_result

from amp_lib.report import build_report
from amp_lib.results import load_sweep
from amp_lib.sweep.execute import Settings
from amp_lib.sweep.publish import write_report


def test_write_report_writes_the_given_report_then_exports_even_a_failed_notebook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On disk: an fp32 run alone. Given: a report of fp32 and a faster bf16 run, at a 25% tolerance.
    make_result("fp32").save(tmp_path / "sw" / "results" / "fp32-s0.json")
    report = build_report([make_result("fp32"), make_result("bf16-mixed", tps=1500.0, eval_loss=2.1)], 0.25)
    assert report.summary_markdown() != build_report(load_sweep(tmp_path / "sw"), 0.25).summary_markdown()
    monkeypatch.chdir(tmp_path)  # a relative folder: the notebook must still be given absolute paths
    settings = Settings(kernel="no-such-kernel")
    with pytest.raises(RuntimeError) as info:
        write_report(Path("sw"), report, settings)
    out = (tmp_path / "sw").resolve()
    notebook = out / "report.ipynb"
    assert str(info.value) == f"report notebook failed ({notebook}): NoSuchKernel: No such kernel named no-such-kernel"
    assert info.value.__cause__ is not None
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary == report.summary_markdown()  # the report it was given, not one recomputed from disk
    assert summary.startswith("# AMP Workbook sweep summary") and "within 25% of fp32's" in summary
    assert "**Recommendation (gpt-tiny): bf16-mixed**" in summary
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.ipynb", "results", "summary.md"]
    meta = json.loads(notebook.read_text())["metadata"]["papermill"]
    assert meta["input_path"] == str(Path(settings.notebooks) / "compare.ipynb")
    assert meta["output_path"] == str(notebook)
    assert meta["parameters"] == {"sweep_dir": str(out), "tolerance": 0.25, "figures_dir": str(out / "figures")}
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html and "report_view" in html  # the export of compare.ipynb, its code unexecuted
    assert "Which precision should this model train in?" in html


def test_a_report_notebook_that_never_ran_leaves_the_summary_and_no_html(tmp_path: Path) -> None:
    """No compare.ipynb where the settings point: papermill fails before writing report.ipynb."""
    report = build_report([make_result("fp32")], 0.02)
    with pytest.raises(RuntimeError) as info:
        write_report(tmp_path, report, Settings(notebooks=str(tmp_path / "missing")))
    assert str(info.value).startswith(f"report notebook failed ({tmp_path / 'report.ipynb'}): FileNotFoundError")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]
    assert (tmp_path / "summary.md").read_text(encoding="utf-8") == report.summary_markdown()
