"""amp_lib.notebook, what the notebooks call: parameter validation, the progress bar, the markdown views,
the report view of a sweep folder; and the shape of notebooks/*.ipynb (nbval runs them in `make test`)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import math
import tempfile
import types
from pathlib import Path
from typing import Any

import nbformat
import pytest
from factories import history, make_result

from amp_lib import explore, notebook
from amp_lib.config import RunConfig, TrackingConfig, parameter_names
from amp_lib.precision import Capabilities, probe, resolve_precision
from amp_lib.render import recommendation_markdown
from amp_lib.report import SweepReport, build_report
from amp_lib.results import RunResult
from amp_lib.train import train

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIGURES = ["eval_curves", "loss", "memory_split", "throughput_memory", "time_to_quality"]  # no scaler: no loss_scale


def parameters_cell(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    return cell.source


def run_cell(source: str) -> dict[str, object]:
    namespace: dict[str, object] = {}
    exec(compile(source, "<parameters>", "exec"), {"Optional": object, "Union": object}, namespace)  # noqa: S102
    return {k: v for k, v in namespace.items() if not k.startswith("__")}  # the names the cell defines


# --- the notebooks' shape -----------------------------------------------------------------------


def test_train_notebook_parameters_are_every_parameter_in_order_with_valid_defaults() -> None:
    source = parameters_cell("train.ipynb")
    names = [node.target.id for node in ast.parse(source).body if isinstance(node, ast.AnnAssign)]
    assert names == parameter_names() == [*RunConfig.field_names(), "wandb_mode", "wandb_project", "wandb_group"]
    assert all("#" in line for line in source.splitlines())  # trailing comments feed papermill --help-notebook
    run = notebook.run_notebook_parameters(run_cell(source), before=set())
    assert run.config.steps <= 30 and run.config.model == "gpt-tiny"  # seconds on a 2-core CPU
    assert run.tracking == TrackingConfig() == TrackingConfig(None, "amp-workbook", None)


def test_compare_notebook_parameters_are_report_views_arguments() -> None:
    namespace = run_cell(parameters_cell("compare.ipynb"))
    assert namespace == {"sweep_dir": "", "tolerance": 0.02, "figures_dir": ""}
    assert list(namespace) == list(inspect.signature(notebook.report_view).parameters)


def test_notebooks_are_stored_without_outputs_on_the_project_kernel() -> None:
    for name in ("train.ipynb", "compare.ipynb", "explore.ipynb"):
        stored = json.loads((NOTEBOOKS / name).read_text())  # as on disk: reading would add missing ids
        missing = [c["source"][:1] for c in stored["cells"] if "id" not in c]
        assert missing == [], f"{name}: cells without an id (nbformat 4.5 needs them; papermill warns)"
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert nb.metadata.kernelspec.name == "amp-workbook"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: {cell.source[:40]!r} has outputs"
        last = nb.cells[-1].source  # each notebook ends by checking its own results
        assert "assert" in last or "notebook.check_" in last, f"{name}: {last[:60]!r}"


def test_explore_notebook_parameters_are_the_explorers_arguments() -> None:
    namespace = run_cell(parameters_cell("explore.ipynb"))
    assert namespace == {"sweep_dir": "", "tolerance": 0.02}
    assert list(namespace) == list(inspect.signature(notebook.explorer).parameters)


def test_train_notebook_shows_the_live_figure_while_training() -> None:
    nb = nbformat.read(NOTEBOOKS / "train.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "= train(" in c.source]
    assert "LiveFigure()" in cell.source and "ProgressBar()" in cell.source


# --- parameters -> NotebookRun ------------------------------------------------------------------


def test_notebook_parameters_become_a_config_a_plan_and_tracking_settings() -> None:
    namespace = {
        "precision": "bf16",
        "steps": 6,
        "timing_warmup_steps": 1,
        "device": "cpu",
        "wandb_mode": "disabled",
        "wandb_group": "g",
        "notebook": notebook,  # a module imported before the parameters cell
        "np": types.ModuleType("np"),  # a module imported by the parameters cell itself: not a parameter
        "_private": 1,
        "earlier": 2,
    }
    run = notebook.run_notebook_parameters(namespace, before={"notebook", "earlier"})
    assert run.config == RunConfig(precision="bf16", steps=6, timing_warmup_steps=1, device="cpu")
    assert (run.plan.requested, run.plan.effective) == ("bf16-mixed", "bf16-mixed")  # the config's canonical name
    assert run.tracking == TrackingConfig(wandb_mode="disabled", wandb_project="amp-workbook", wandb_group="g")
    assert notebook.NotebookRun(config=run.config, plan=run.plan).tracking == TrackingConfig()
    only_project = notebook.run_notebook_parameters({"wandb_project": "p", "device": "cpu"}, before=())
    assert only_project.tracking == TrackingConfig(wandb_project="p") and only_project.config == RunConfig(device="cpu")


def test_allow_slow_reaches_the_precision_plan() -> None:
    namespace = {"precision": "fp16-mixed", "device": "cpu", "allow_slow": True}
    assert notebook.run_notebook_parameters(namespace, before=()).plan.effective == "fp16-mixed"
    namespace["allow_slow"] = False  # without fast fp16 (this machine's flags decide) the plan falls back to bf16
    expected = "fp16-mixed" if probe("cpu").fp16_fast else "bf16-mixed"
    assert notebook.run_notebook_parameters(namespace, before=()).plan.effective == expected


def test_parallelism_and_reduce_dtype_reach_the_precision_plan() -> None:
    import torch

    namespace = {"precision": "bf16", "device": "cpu", "parallelism": "fsdp", "reduce_dtype": "bf16"}
    plan = notebook.run_notebook_parameters(namespace, before=()).plan
    assert (plan.parallelism, plan.reduce_dtype) == ("fsdp", torch.bfloat16)
    assert "over fsdp, gradients reduced in bfloat16" in notebook.plan_markdown(plan)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_on_a_machine_without_one_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        notebook.run_notebook_parameters({"device": "cuda"}, before=())


def test_unknown_parameters_are_named_with_the_valid_names() -> None:
    valid = ", ".join(parameter_names())
    with pytest.raises(ValueError) as info:
        notebook.run_notebook_parameters({"zeta": 1, "alpha": 2, "steps": 3}, before=())
    assert str(info.value) == f"unknown parameter(s) 'alpha', 'zeta'; valid names: {valid}"
    namespace = {"steps": 5, "stepz": 3, "notebook": notebook, "_hidden": 1}
    with pytest.raises(ValueError) as info:
        notebook.run_notebook_parameters(namespace, before={"notebook"})  # a typo papermill only warns about
    assert str(info.value) == f"unknown parameter(s) 'stepz'; valid names: {valid}"
    assert valid.startswith("precision, model, steps")


def test_mistyped_and_invalid_parameters_are_named_exactly() -> None:
    with pytest.raises(ValueError) as info:
        notebook.run_notebook_parameters({"wandb_project": 3.5}, before=())
    assert str(info.value) == "wandb_project=3.5 has type float; expected str"
    with pytest.raises(ValueError) as info:
        notebook.run_notebook_parameters({"wandb_group": 3}, before=set())
    assert str(info.value) == "wandb_group=3 has type int; expected str | None"
    with pytest.raises(ValueError, match=r"invalid precision 'fp33'"):
        notebook.run_notebook_parameters({"precision": "fp33"}, before=set())


# --- progress -----------------------------------------------------------------------------------


def test_progress_bar_counts_rows_and_shows_loss_scale_and_status() -> None:
    config = RunConfig(run_name="demo", steps=6, timing_warmup_steps=1, device="cpu")
    plan = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)
    # the second row: loss 1.23456, a backed-off scale 32768 and one skipped step so far
    rows = history(3, scaled=True, skip_at=1, loss0=1.33456)
    stream = io.StringIO()
    bar = notebook.ProgressBar(file=stream, mininterval=0)
    bar.on_log(rows[:1], 1)  # before on_start: nothing to update, no error
    assert bar.bar is None and bar.tqdm_kwargs == {"file": stream, "mininterval": 0}
    bar.on_start(config, plan)
    assert (bar.bar.total, bar.bar.desc, bar.bar.unit, bar.bar.n) == (6, "demo [fp16-mixed]", "step", 0)
    bar.on_log([], 128)
    assert bar.bar.n == 0
    bar.on_log(rows[:2], 128)
    assert bar.bar.n == 2 and bar.bar.postfix == "loss=1.2346, scale=32768, skipped=1"
    bar.on_log([dataclasses.replace(rows[2], loss=None, loss_scale=None)], 128)
    assert bar.bar.n == 3 and bar.bar.postfix == "loss=nan"
    bar.on_end(make_result(status="diverged"))
    assert bar.bar.postfix == "status=diverged" and bar.bar.disable  # closed
    assert "demo [fp16-mixed]" in stream.getvalue()
    notebook.ProgressBar().on_end(make_result())  # never started: nothing to close


def test_progress_bar_redraws_once_per_log_not_once_more_for_the_postfix() -> None:
    # set_postfix(refresh=False): the postfix shows on the redraw update() makes anyway; a second
    # redraw per log call would double the notebook's output traffic.
    stream = io.StringIO()
    bar = notebook.ProgressBar(file=stream, mininterval=0, miniters=1)
    config = RunConfig(run_name="demo", steps=6, timing_warmup_steps=1, device="cpu")
    bar.on_start(config, resolve_precision("fp32", Capabilities()))
    for row in history(3, loss0=1.0):
        before = stream.getvalue().count("\r")
        bar.on_log([dataclasses.replace(row, loss=1.0)], 1)
        assert stream.getvalue().count("\r") == before + 1
    # tqdm pads a line shorter than the one before (a shorter rate) with spaces, to overwrite it.
    assert stream.getvalue().rsplit("\r", 1)[-1].rstrip(" ").endswith("loss=1.0000]")


@pytest.mark.slow
def test_progress_bar_follows_a_real_fp16_run_and_the_figure_shows_the_scale(tiny_config: Any, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "results", precision="fp16-mixed", allow_slow=True, run_name="fp16-demo")
    stream = io.StringIO()
    bar = notebook.ProgressBar(file=stream)
    result = train(config, observers=[bar])
    assert result.ok and bar.bar.n == config.steps
    assert "fp16-demo [fp16-mixed]" in stream.getvalue() and "scale=" in stream.getvalue()
    path = notebook.save_run_figure(result, config)
    assert path == tmp_path / "results" / f"fp16-demo-{config.identity}.png" and path.stat().st_size > 0
    text = notebook.result_markdown(result)
    assert "**Status:** ok" in text and "loss scale: final" in text and "tokens/s" in text
    assert RunResult.load(config.result_path).metrics.eval_loss == pytest.approx(result.metrics.eval_loss)


def test_figure_goes_beside_the_result_json(tmp_path: Path) -> None:
    config = RunConfig(out_dir=str(tmp_path / "r"), run_name="x")
    assert notebook.figure_path(config) == tmp_path / "r" / f"x-{config.identity}.png" == config.result_path.with_suffix(".png")
    assert notebook.figure_path(RunConfig(out_dir="o")) == Path("o") / f"gpt-tiny-fp32-s0-{RunConfig().identity}.png"


# --- markdown and HTML views --------------------------------------------------------------------


def test_plan_markdown_exactly() -> None:
    plan = resolve_precision("fp16-mixed", Capabilities())
    assert plan.fallback_reason and plan.fallback_reason.startswith("this CPU has no fast fp16")
    assert notebook.plan_markdown(plan) == (
        "**Precision plan:** requested `fp16-mixed` → effective **`bf16-mixed`** on cpu (cpu); autocast bfloat16,"
        f" parameters float32, loss scaler off\n\n**Fallback:** {plan.fallback_reason}"
    )
    fp16 = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)
    assert notebook.plan_markdown(fp16).endswith("autocast float16, parameters float32, loss scaler on")
    assert notebook.plan_markdown(resolve_precision("fp32", Capabilities())) == (
        "**Precision plan:** requested `fp32` → effective **`fp32`** on cpu (cpu); autocast off, parameters float32,"
        " loss scaler off"
    )


def test_result_markdown_exactly() -> None:
    result = make_result(
        tps=12345.6, unit="samples", mem=1234.56, final_loss=2.5, eval_loss=2.25, skipped=3,
        final_scale=2048.0, min_scale=512.0, metrics={"step_time_ms_median": 3.14159, "peak_memory_kind": "cpu_rss"},
    )  # fmt: skip
    assert notebook.result_markdown(result) == "\n".join(  # noqa: FLY002
        [
            "**Status:** ok",
            "- throughput: 12,346 samples/s (median step 3.14 ms)",
            "- peak memory: 1,234.6 MB (cpu_rss)",
            "- final train loss: 2.5000",
            "- eval loss: 2.2500",
            "- loss scale: final 2048, min 512; skipped steps: 3",
        ]
    )


def test_result_markdown_of_a_failed_run_shows_the_first_line_of_its_error() -> None:
    nothing = {"tps": None, "mem": None, "final_loss": None, "eval_loss": None}
    failed = make_result(status="failed", error="ValueError: seq_len=512 exceeds\ntraceback", **nothing)
    assert notebook.result_markdown(failed) == "**Status:** failed — ValueError: seq_len=512 exceeds"
    only_eval = make_result(status="oom", error="OOM\nmore", **{**nothing, "eval_loss": 0.0})
    assert notebook.result_markdown(only_eval) == "**Status:** oom — OOM\n- eval loss: 0.0000"


def test_display_objects_wrap_the_text() -> None:
    assert notebook.markdown("x").data == "x"
    rows = build_report([make_result("fp32"), make_result("bf16-mixed")]).table
    html = notebook.table_html(rows).data
    assert html.startswith("<table") and "bf16-mixed" in html
    report = build_report([make_result("fp32", metrics={"peak_memory_kind": "cpu_rss"}), make_result("bf16-mixed")])
    verdicts = notebook.verdicts_html(report).data
    assert verdicts.startswith('<table class="amp-verdicts">')
    assert '<td style="white-space:nowrap">inconclusive</td><td style="white-space:nowrap">+0.00% (one seed)</td>' in verdicts  # one seed: shown, never judged
    memory = notebook.memory_html(report).data
    assert memory.startswith('<table class="amp-memory">')
    assert memory.endswith(
        "<p><em>CPU: the peak is the whole process&#x27;s resident set, so the rest is mostly the Python process</em></p>"
    )
    no_note = notebook.memory_html(build_report([make_result("fp32")])).data  # no CPU peak, no note
    assert no_note.startswith('<table class="amp-memory">') and no_note.endswith("</table>")


# --- the report view of a sweep folder ----------------------------------------------------------


def save_result(folder: Path, precision: str, tps: float, seed: int = 0) -> None:
    make_result(precision, seed, tps=tps, final_loss=None).save(folder / "results" / f"{precision}-s{seed}.json")


@pytest.mark.slow
def test_report_view_of_a_folder_tabulates_recommends_and_draws(tmp_path: Path) -> None:
    for seed, (fp32, bf16) in enumerate([(1000.0, 1500.0), (1010.0, 1530.0)]):  # two seeds: a noise estimate
        save_result(tmp_path, "fp32", fp32, seed)
        save_result(tmp_path, "bf16-mixed", bf16, seed)
    view = notebook.report_view(str(tmp_path), tolerance=0.1)
    rep = view.report
    assert view.sweep_dir == tmp_path and rep.tolerance == 0.1
    assert [r.config["precision"] for r in rep.results] == ["bf16-mixed"] * 2 + ["fp32"] * 2  # sorted by path
    assert [r.requested for r in rep.runs] == ["fp32", "fp32", "bf16-mixed", "bf16-mixed"]
    assert [r.requested for r in rep.table] == [c.requested for c in rep.groups] == ["fp32", "bf16-mixed"]
    assert [r.precision for r in rep.recommendations] == ["bf16-mixed"]
    assert rep.recommendations[0].tolerance == 0.1
    assert notebook.recommendation_text(rep) == recommendation_markdown(rep.recommendations[0])
    assert sorted(view.figures) == FIGURES
    assert all(
        p.parent == tmp_path / "figures" and p.name == f"{k}.png" and p.exists() for k, p in view.figures.items()
    )
    notebook.show_images(list(view.figures.values()))  # outside a kernel this prints the objects: must not raise
    # several settings: compare.ipynb's recommendation cell shows each, a blank line apart
    two = notebook.ReportView(tmp_path, SweepReport((), (), (), rep.recommendations * 2, 0.1))
    one = notebook.recommendation_text(rep)
    assert notebook.recommendation_text(two.report) == one + "\n\n" + one
    assert two.figures == {}


@pytest.mark.slow
def test_report_view_draws_into_the_figures_dir_it_is_given(tmp_path: Path) -> None:
    save_result(tmp_path / "sweep", "fp32", 1000.0)
    view = notebook.report_view(str(tmp_path / "sweep"), figures_dir=str(tmp_path / "figs"))
    assert sorted(view.figures) == FIGURES and all(p.parent == tmp_path / "figs" for p in view.figures.values())
    assert not (tmp_path / "sweep" / "figures").exists()


@pytest.mark.slow
def test_report_view_runs_a_demo_when_given_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the demo's temp folder goes under tmp_path
    view = notebook.report_view(tolerance=0.05, figures_dir=str(tmp_path / "figs"))  # sweep_dir left out
    rep = view.report
    # The demo lands in a fresh, recognisable temp folder, one named JSON per precision under results/.
    assert view.sweep_dir.parent == tmp_path and view.sweep_dir.name.startswith("amp-demo-")
    names = sorted(p.name for p in (view.sweep_dir / "results").glob("*.json"))
    assert names == sorted(f"{r.config['run_name']}-{r.identity}.json" for r in rep.results)
    assert sorted(r.config["run_name"] for r in rep.results) == sorted(f"demo-{p}" for p in notebook.DEMO_PRECISIONS)
    for result in rep.results:  # each run uses the tiny demo settings, not RunConfig's defaults
        assert {k: result.config[k] for k in notebook.DEMO_CONFIG} == notebook.DEMO_CONFIG
        assert result.config["run_name"] == f"demo-{result.config['precision']}"
    assert len(rep.results) == len(rep.runs) == len(notebook.DEMO_PRECISIONS)
    assert [r.requested for r in rep.table] == list(notebook.DEMO_PRECISIONS)
    assert all(r.status == "ok" and math.isfinite(r.eval_loss.mean) for r in rep.table)
    assert sorted(p.name for p in view.figures.values()) == [f"{name}.png" for name in FIGURES]
    assert all(p.parent == tmp_path / "figs" for p in view.figures.values())
    assert rep.tolerance == 0.05
    text = notebook.recommendation_text(rep)
    assert text.startswith("**Recommendation") and "5%" in text
    assert "<table" in notebook.table_html(rep.table).data


def test_report_view_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        notebook.report_view(str(tmp_path))
    assert str(info.value) == f"no result JSON files in {str(tmp_path)!r} (nor in its results/ folder)"


# --- the explorer ------------------------------------------------------------------------------


def explorer_of_two_seeds() -> notebook.Explorer:
    from factories import eval_curve

    from amp_lib.explore import Explorer

    results = [
        make_result(p, seed, rows=history(4, scaled=p == "fp16-mixed"), evals=eval_curve(2.0 + seed / 10), mem=100.0)
        for p in ("fp32", "fp16-mixed")
        for seed in (0, 1)
    ]
    results.append(make_result("bf16-mixed", 0, rows=history(3), batch_size=99))  # a second setting
    return Explorer.of(results)


def test_explore_view_shows_the_figure_a_caption_and_the_verdicts_of_the_selection() -> None:
    ex = explorer_of_two_seeds()
    selection = ex.default_selection("gpt-tiny batch_size=None")
    view = notebook.explore_view(ex, selection)
    assert (view.runs, view.caption) == (4, "train loss · gpt-tiny batch_size=None · 4 runs selected")
    html = view._repr_mimebundle_()["text/html"]
    assert html.startswith('<div class="amp-explore"><div class="amp-explore-caption">train loss · ')
    assert '<img alt="train loss" src="data:image/png;base64,iVBORw0KGgo' in html
    assert view._repr_mimebundle_()["text/plain"] == view.caption  # a plain-text front end shows the caption
    assert "amp-verdicts" in view.tables_html and "fp16-mixed" in view.tables_html
    assert "amp-memory" not in view.tables_html
    memory = notebook.explore_view(ex, dataclasses.replace(selection, view="memory"))  # verdicts, then the split
    assert memory.tables_html.startswith('<table class="amp-verdicts">') and memory.tables_html.endswith("</table>")
    assert '</table><table class="amp-memory">' in memory.tables_html  # no CPU peak here: no note
    cpu = [make_result(p, metrics={"peak_memory_kind": "cpu_rss"}) for p in ("fp32", "bf16-mixed")]
    cpu_explorer = notebook.Explorer.of(cpu)
    on_cpu = notebook.explore_view(cpu_explorer, dataclasses.replace(cpu_explorer.default_selection(), view="memory"))
    assert on_cpu.tables_html.startswith('<table class="amp-verdicts">') and '<table class="amp-memory">' in (
        on_cpu.tables_html
    )
    assert on_cpu.tables_html.endswith(
        "</table><p><em>CPU: the peak is the whole process&#x27;s resident set, so the rest is mostly the Python"
        " process</em></p>"
    )
    nothing = notebook.explore_view(ex, dataclasses.replace(selection, precisions=()))
    assert nothing.runs == 0 and nothing.tables_html.startswith("<p><em>Select at least one precision")
    shown = nothing._repr_mimebundle_()["text/html"]
    assert nothing.note == explore.NOTHING_SELECTED and 'class="amp-explore-note"' in shown and "<img" not in shown


def test_the_explorer_panel_redraws_on_each_change_and_refills_the_choices_of_a_new_setting() -> None:
    ex = explorer_of_two_seeds()
    shown: list[Any] = []
    panel = notebook.ExplorerPanel(ex, show=shown.append)
    assert panel.setting.options == ex.settings and panel.view.options == notebook.VIEWS
    assert panel.selection() == ex.default_selection() and shown == []  # drawn when displayed
    panel.setting.value = "gpt-tiny batch_size=None"
    assert [v.selection for v in shown] == [ex.default_selection("gpt-tiny batch_size=None")]  # one redraw
    assert panel.precisions.options == ("fp32", "fp16-mixed") and panel.seeds.value == (0, 1)
    panel.view.value = "loss scale"
    panel.seeds.value = (1,)
    panel.precisions.value = ("fp16-mixed",)
    assert [(v.selection.view, v.selection.seeds, v.selection.precisions, v.runs) for v in shown[1:]] == [
        ("loss scale", (0, 1), ("fp32", "fp16-mixed"), 4),
        ("loss scale", (1,), ("fp32", "fp16-mixed"), 2),
        ("loss scale", (1,), ("fp16-mixed",), 1),
    ]
    assert panel.refresh().selection == shown[-1].selection


def test_the_explorer_panel_labels_its_controls_and_draws_its_view_as_soon_as_it_is_shown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ex = explorer_of_two_seeds()
    panel = notebook.ExplorerPanel(ex)  # the default sink: a display handle (outside a kernel, printed)
    setting, pickers, view = panel.controls.children
    assert (setting, view) == (panel.setting, panel.view) and pickers.children == (panel.precisions, panel.seeds)
    labels = [c.description for c in (panel.setting, panel.precisions, panel.seeds, panel.view)]
    assert labels == ["setting", "precisions", "seeds", "view"]
    assert (panel.precisions.rows, panel.seeds.rows) == (4, 4)
    drawn = panel.refresh()  # before any change: the default selection's view, shown
    assert drawn is not None and drawn.selection == ex.default_selection()
    assert "ExploreView(selection=Selection(" in capsys.readouterr().out


@pytest.mark.slow
def test_the_explorer_trains_a_two_seed_demo_when_given_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ex = notebook.explorer(tolerance=0.05)
    (folder,) = tmp_path.glob("amp-explore-demo-*")
    names = sorted(p.name.rsplit("-", 1)[0] for p in (folder / "results").glob("*.json"))  # without the identity
    assert names == sorted(f"demo-{p}-s{s}" for p in notebook.DEMO_PRECISIONS for s in notebook.DEMO_SEEDS)
    assert ex.tolerance == 0.05 and ex.seeds(ex.settings[0]) == notebook.DEMO_SEEDS
    assert ex.precisions(ex.settings[0]) == notebook.DEMO_PRECISIONS
    with pytest.raises(ValueError, match="tolerance"):
        notebook.explorer(str(folder), tolerance=-1)


def test_the_saved_run_figure_spans_the_whole_run(tmp_path: Path) -> None:
    config = RunConfig(out_dir=str(tmp_path), run_name="x", steps=12)
    path = notebook.save_run_figure(make_result("fp32", rows=history(4)), config)
    png = path.read_bytes()
    assert path == config.result_path.with_suffix(".png") and png.startswith(b"\x89PNG")
    # the x axis is the planned run, not just the 4 steps logged so far: a 40-step plan draws another figure
    longer = notebook.save_run_figure(make_result("fp32", rows=history(4)), dataclasses.replace(config, steps=40))
    assert longer != path and longer.read_bytes() != png  # another config: another file, another figure


# --- why: headroom and profile in words --------------------------------------------------------------


def test_headroom_and_profile_in_words_and_what_to_turn_on_when_they_are_off(tmp_path: Path) -> None:
    off = make_result("fp16-mixed")
    assert notebook.headroom_markdown(off) == "_The headroom map was off (`headroom_every=0`)._"
    assert notebook.profile_markdown(off) == "_No step was profiled (`profile_step=False`)._"
    assert notebook.save_headroom_figure(off, RunConfig(out_dir=str(tmp_path))) is None
    stats = {"max_abs": 2.0, "underflow_subnormal": 0.0, "underflow_normal": 0.5, "nonfinite": 0.0}
    headroom = {
        "modules": ["fc", "out"],
        "samples": [{"step": 0, "activation": {"fc": stats, "out": {**stats, "nonfinite": 1.0}}, "gradient": {}}],
        "first_overflow": [{"step": 0, "module": "out", "phase": "forward", "loss_scale": 4.0}] * 2,
    }
    profile = {
        "step": 3,
        "wall_ms": 10.0,
        "busy_ms": {"matmul": 5.0, "optimizer": 2.0},
        "gemms": [[8, 8, 9, "c10::Half"]],
    }
    run = make_result("fp16-mixed", headroom=headroom, profile=profile, plan={"device_type": "cpu"})
    lines = notebook.headroom_markdown(run).splitlines()
    assert lines[0].startswith("- `out` overflowed fp16 first (forward, step 0): train in bf16-mixed")
    assert lines[1:] == ["- (1 more overflowing steps)", "- `out`: overflowed fp16 (inf/NaN)",
                         "- `fc`: largest |activation| 2, 15.0 doublings of fp16 headroom"]  # fmt: skip
    assert notebook.profile_markdown(run) == (
        "Step 3 took 10.0 ms: matmul 50%, optimizer 20%, idle/host 30%; 1 of 1 reduced-precision GEMMs not multiples of 8."
    )
    config = RunConfig(out_dir=str(tmp_path), run_name="hm")
    saved = notebook.save_headroom_figure(run, config)
    assert saved == tmp_path / f"{config.name}-headroom.png" and saved.exists()
    assert notebook.why_text(build_report([make_result("fp32")])).startswith("_Nothing to explain, or nothing recorded")


def one_overflow_headroom(widths: tuple[float, ...] = (2.0,)) -> dict[str, Any]:
    """A headroom map of one sampled step whose module `m0` overflowed once; `widths` are the modules' |activation|."""
    stats = {"underflow_subnormal": 0.0, "underflow_normal": 0.0, "nonfinite": 0.0}
    modules = [f"m{i}" for i in range(len(widths))]
    return {
        "modules": modules,
        "samples": [
            {
                "step": 0,
                "activation": {m: {**stats, "max_abs": w} for m, w in zip(modules, widths, strict=True)},
                "gradient": {},
            }
        ],
        "first_overflow": [{"step": 0, "module": "m0", "phase": "forward", "loss_scale": 4.0}],
    }


@pytest.mark.parametrize(
    ("device_type", "capability", "suggests_bf16"),
    [("cpu", [7, 5], True), ("cuda", [7, 5], False), ("cuda", [9, 0], True), ("cuda", None, True)],
)
def test_the_way_out_of_an_overflow_suggests_bf16_only_where_the_device_has_it(
    device_type: str, capability: list[int] | None, suggests_bf16: bool
) -> None:
    # bf16 needs a CUDA GPU of compute capability 8.0 or newer; a CPU has it; an unprofiled GPU is assumed new
    profile = {"facts": {"compute_capability": capability}} if capability else None
    run = make_result(
        "fp16-mixed", headroom=one_overflow_headroom(), profile=profile, plan={"device_type": device_type}
    )
    first = notebook.headroom_markdown(run).splitlines()[0]
    assert first.startswith("- `m0` overflowed fp16 first (forward, step 0): ")
    assert ("train in bf16-mixed" in first) is suggests_bf16


def test_the_headroom_map_in_words_lists_one_overflow_once_and_the_three_tightest_layers() -> None:
    run = make_result(
        "fp16-mixed", headroom=one_overflow_headroom((2.0, 64.0, 1.0, 1024.0)), plan={"device_type": "cpu"}
    )
    lines = notebook.headroom_markdown(run).splitlines()
    assert len(lines) == 4 and "more overflowing steps" not in notebook.headroom_markdown(run)  # a single event
    assert [line.split("`")[1] for line in lines[1:]] == ["m3", "m1", "m0"]  # least headroom first, m2 left out
    no_overflow = {k: v for k, v in one_overflow_headroom().items() if k != "first_overflow"}
    assert notebook.headroom_markdown(make_result(headroom=no_overflow)) == (
        "- `m0`: largest |activation| 2, 15.0 doublings of fp16 headroom"
    )
    not_sampled = {"modules": ["m0"], "samples": []}
    assert notebook.headroom_markdown(make_result(headroom=not_sampled)) == "_No sampled step yet._"


def test_a_profiled_step_without_reduced_precision_gemms_says_nothing_about_them() -> None:
    profile = {"step": 1, "wall_ms": 4.0, "busy_ms": {"matmul": 3.0}, "gemms": []}
    assert notebook.profile_markdown(make_result(profile=profile)) == "Step 1 took 4.0 ms: matmul 75%, idle/host 25%."
