"""What the notebooks call: parameter validation, progress, views, the report; and the notebooks' shape."""

from __future__ import annotations

import ast
import io
import math
import tempfile
from pathlib import Path

import nbformat
import pytest

from amp_lib import workbook
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import RunResult
from amp_lib.train import RunConfig, train

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _parameters_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


def _namespace(source: str) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(compile(source, "<parameters>", "exec"), {"Optional": object, "Union": object}, namespace)  # noqa: S102
    return namespace


def test_train_notebook_parameters_cover_every_runconfig_field_with_valid_defaults() -> None:
    source = _parameters_cell("train.ipynb")
    names = [node.target.id for node in ast.parse(source).body if isinstance(node, ast.AnnAssign)]
    assert names == workbook.parameter_names()  # every RunConfig field plus wandb_mode/project/group, in order
    assert all("#" in line for line in source.splitlines())  # trailing comments feed papermill --help-notebook
    run = workbook.run_notebook_parameters(_namespace(source), before=set())
    assert run.config.steps <= 30 and run.config.model == "gpt-tiny"  # seconds on a 2-core CPU
    assert run.wandb_project == "amp-workbook" and run.wandb_mode is None


def test_notebooks_are_stored_without_outputs_on_the_project_kernel() -> None:
    for name in ("train.ipynb", "compare.ipynb"):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert nb.metadata.kernelspec.name == "amp-workbook"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: {cell.source[:40]!r} has outputs"
        assert "assert" in nb.cells[-1].source  # each notebook ends by checking its own results


def test_misspelt_parameter_is_named_with_the_valid_names() -> None:
    namespace = {"steps": 5, "stepz": 3, "workbook": workbook, "_hidden": 1}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'stepz'; valid names: precision, model, steps"):
        workbook.run_notebook_parameters(namespace, before={"workbook"})
    with pytest.raises(ValueError, match=r"wandb_group=3 has type int"):
        workbook.run_notebook_parameters({"wandb_group": 3}, before=set())
    with pytest.raises(ValueError, match=r"invalid precision 'fp33'"):
        workbook.run_notebook_parameters({"precision": "fp33"}, before=set())


def test_progress_bar_follows_a_real_fp16_run_and_the_figure_shows_the_scale(tmp_config_dir: Path) -> None:
    config = RunConfig(
        precision="fp16-mixed", allow_slow=True, device="cpu", steps=8, warmup_steps=2, batch_size=4, seq_len=32,
        log_every=2, out_dir=str(tmp_config_dir), run_name="fp16-demo",
    )  # fmt: skip
    stream = io.StringIO()
    bar = workbook.ProgressBar(file=stream)
    result = train(config, observers=[bar])
    assert result.ok and bar.bar.n == config.steps
    assert "fp16-demo [fp16-mixed]" in stream.getvalue() and "scale=" in stream.getvalue()
    path = workbook.save_run_figure(result, config)
    assert path == tmp_config_dir / "fp16-demo.png" and path.stat().st_size > 0
    text = workbook.result_markdown(result)
    assert "**Status:** ok" in text and "loss scale: final" in text and "tokens/s" in text
    assert RunResult.load(config.result_path).metrics.eval_loss == pytest.approx(result.metrics.eval_loss)


@pytest.fixture
def tmp_config_dir(tmp_path: Path) -> Path:
    return tmp_path / "results"


def test_plan_and_failure_views_say_why() -> None:
    plan = resolve_precision("fp16-mixed", Capabilities())
    text = workbook.plan_markdown(plan)
    assert (
        "requested `fp16-mixed` → effective **`bf16-mixed`**" in text
        and "**Fallback:** this CPU has no fast fp16" in text
    )
    failed = RunResult(config={}, plan={}, status="failed", error="ValueError: seq_len=512 exceeds\ntraceback")
    assert workbook.result_markdown(failed) == "**Status:** failed — ValueError: seq_len=512 exceeds"
    assert workbook.markdown("x").data == "x"


def test_build_report_runs_a_demo_when_given_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's temp folder goes under tmp_path
    rep = workbook.build_report(tolerance=0.05, figures_dir=str(tmp_path / "figs"))  # sweep_dir left out
    # The demo lands in a fresh, recognisable temp folder, one named JSON per precision under results/.
    assert rep.sweep_dir.parent == tmp_path and rep.sweep_dir.name.startswith("amp-demo-")
    names = sorted(p.name for p in (rep.sweep_dir / "results").glob("*.json"))
    assert names == sorted(f"demo-{p}.json" for p in workbook.DEMO_PRECISIONS)
    for result in rep.results:  # each run uses the tiny demo settings, not RunConfig's defaults
        assert {k: result.config[k] for k in workbook.DEMO_CONFIG} == workbook.DEMO_CONFIG
        assert result.config["run_name"] == f"demo-{result.config['precision']}"
    assert len(rep.results) == len(rep.runs) == len(workbook.DEMO_PRECISIONS)
    assert [r.requested for r in rep.table] == list(workbook.DEMO_PRECISIONS)
    assert all(r.status == "ok" and math.isfinite(r.eval_loss.mean) for r in rep.table)
    assert sorted(p.name for p in rep.figures.values()) == ["loss.png", "loss_scale.png", "throughput_memory.png"]
    assert all(p.parent == tmp_path / "figs" for p in rep.figures.values())
    assert rep.recommendation_markdown().startswith("**Recommendation") and "5%" in rep.recommendation_markdown()
    assert "<table" in workbook.table_html(rep.table).data
    workbook.show_images(list(rep.figures.values()))  # outside a kernel this prints the objects: must not raise


def test_build_report_on_an_empty_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        workbook.build_report(str(tmp_path))
    assert str(info.value) == f"no result JSON files in {str(tmp_path)!r} (nor in its results/ folder)"
