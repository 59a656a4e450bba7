"""The workbook layer in-process, exactly: parameter validation, the progress bar driven by hand-made rows,
the markdown views and the report of a folder of hand-made results (no training, no kernel)."""

from __future__ import annotations

import io
import types
from pathlib import Path

import pytest

from amp_lib import workbook
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import HistoryRow, Metrics, RunResult
from amp_lib.train import RunConfig


def row(step: int, loss: float | None = 1.5, scale: float | None = None, skipped: int = 0) -> HistoryRow:
    return HistoryRow(step=step, loss=loss, loss_scale=scale, grad_norm=1.0, step_time_ms=5.0, skipped_steps=skipped)


# -- parameters ----------------------------------------------------------------------------------


def test_parameter_names_are_the_runconfig_fields_then_the_wandb_extras() -> None:
    assert workbook.parameter_names() == [*RunConfig.field_names(), "wandb_mode", "wandb_project", "wandb_group"]
    assert workbook.NOTEBOOK_EXTRAS == {"wandb_mode": None, "wandb_project": "amp-workbook", "wandb_group": None}


def test_notebook_parameters_become_a_config_a_plan_and_wandb_settings() -> None:
    namespace = {
        "precision": "bf16",
        "steps": 6,
        "warmup_steps": 1,
        "device": "cpu",
        "wandb_mode": "disabled",
        "wandb_group": "g",
        "workbook": workbook,  # a module imported before the parameters cell
        "np": types.ModuleType("np"),  # a module imported by the parameters cell itself: not a parameter
        "_private": 1,
        "earlier": 2,
    }
    run = workbook.run_notebook_parameters(namespace, before={"workbook", "earlier"})
    assert run.config == RunConfig(precision="bf16", steps=6, warmup_steps=1, device="cpu")
    assert (run.plan.requested, run.plan.effective) == ("bf16", "bf16-mixed")
    assert (run.wandb_mode, run.wandb_project, run.wandb_group) == ("disabled", "amp-workbook", "g")
    defaults = workbook.NotebookRun(config=run.config, plan=run.plan)
    assert (defaults.wandb_mode, defaults.wandb_project, defaults.wandb_group) == (None, "amp-workbook", None)


def test_allow_slow_reaches_the_precision_plan() -> None:
    namespace = {"precision": "fp16-mixed", "device": "cpu", "allow_slow": True}
    assert workbook.run_notebook_parameters(namespace, before=()).plan.effective == "fp16-mixed"


def test_unknown_and_mistyped_parameters_are_named_exactly() -> None:
    valid = ", ".join(workbook.parameter_names())
    with pytest.raises(ValueError) as info:
        workbook.run_notebook_parameters({"zeta": 1, "alpha": 2, "steps": 3}, before=())
    assert str(info.value) == f"unknown parameter(s) 'alpha', 'zeta'; valid names: {valid}"
    with pytest.raises(ValueError) as info:
        workbook.run_notebook_parameters({"wandb_project": 3.5}, before=())
    assert str(info.value) == "wandb_project=3.5 has type float; expected str or None"
    assert workbook.run_notebook_parameters({"wandb_project": "p", "device": "cpu"}, before=()).wandb_project == "p"


# -- progress ------------------------------------------------------------------------------------


def test_progress_bar_counts_rows_and_shows_loss_scale_and_status() -> None:
    config = RunConfig(run_name="demo", steps=6, warmup_steps=1, device="cpu")
    plan = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)
    stream = io.StringIO()
    bar = workbook.ProgressBar(file=stream, mininterval=0)
    bar.on_log([row(0)], 1)  # before on_start: nothing to update, no error
    assert bar.bar is None and bar.tqdm_kwargs == {"file": stream, "mininterval": 0}
    bar.on_start(config, plan)
    assert (bar.bar.total, bar.bar.desc, bar.bar.unit, bar.bar.n) == (6, "demo [fp16-mixed]", "step", 0)
    bar.on_log([], 128)
    assert bar.bar.n == 0
    bar.on_log([row(0, 2.0), row(1, 1.23456, scale=1024.0, skipped=2)], 128)
    assert bar.bar.n == 2 and bar.bar.postfix == "loss=1.2346, scale=1024, skipped=2"
    bar.on_log([row(2, None)], 128)
    assert bar.bar.n == 3 and bar.bar.postfix == "loss=nan"
    bar.on_end(RunResult(config={}, plan={}, status="diverged"))
    assert bar.bar.postfix == "status=diverged" and bar.bar.disable  # closed
    assert "demo [fp16-mixed]" in stream.getvalue()
    workbook.ProgressBar().on_end(RunResult(config={}, plan={}))  # never started: nothing to close


def test_progress_bar_redraws_once_per_log_not_once_more_for_the_postfix() -> None:
    # set_postfix(refresh=False): the postfix shows on the redraw update() makes anyway; a second
    # redraw per log call would double the notebook's output traffic.
    stream = io.StringIO()
    bar = workbook.ProgressBar(file=stream, mininterval=0, miniters=1)
    bar.on_start(RunConfig(run_name="demo", steps=6, warmup_steps=1, device="cpu"), resolve_precision("fp32", Capabilities()))
    for step in range(3):
        before = stream.getvalue().count("\r")
        bar.on_log([row(step, 1.0)], 1)
        assert stream.getvalue().count("\r") == before + 1
    assert stream.getvalue().rsplit("\r", 1)[-1].endswith("loss=1.0000]")


def test_figure_goes_beside_the_result_json(tmp_path: Path) -> None:
    config = RunConfig(out_dir=str(tmp_path / "r"), run_name="x")
    assert workbook.figure_path(config) == tmp_path / "r" / "x.png"


# -- views ---------------------------------------------------------------------------------------


def test_plan_markdown_exactly() -> None:
    plan = resolve_precision("fp16-mixed", Capabilities())
    assert workbook.plan_markdown(plan) == (
        "**Precision plan:** requested `fp16-mixed` → effective **`bf16-mixed`** on cpu (cpu); autocast bfloat16,"
        f" parameters float32, loss scaler off\n\n**Fallback:** {plan.fallback_reason}"
    )
    fp16 = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)
    assert workbook.plan_markdown(fp16).endswith("autocast float16, parameters float32, loss scaler on")
    assert workbook.plan_markdown(resolve_precision("fp32", Capabilities())) == (
        "**Precision plan:** requested `fp32` → effective **`fp32`** on cpu (cpu); autocast off, parameters float32,"
        " loss scaler off"
    )


def test_result_markdown_exactly() -> None:
    metrics = Metrics(
        tokens_per_s=12345.6,
        throughput_unit="samples",
        step_time_ms_median=3.14159,
        peak_memory_mb=1234.56,
        peak_memory_kind="cpu_rss",
        final_train_loss=2.5,
        eval_loss=2.25,
        skipped_steps=3,
        final_loss_scale=2048.0,
        min_loss_scale=512.0,
    )
    result = RunResult(config={}, plan={}, metrics=metrics)
    assert workbook.result_markdown(result) == "\n".join(  # noqa: FLY002
        [
            "**Status:** ok",
            "- throughput: 12,346 samples/s (median step 3.14 ms)",
            "- peak memory: 1,234.6 MB (cpu_rss)",
            "- final train loss: 2.5000",
            "- eval loss: 2.2500",
            "- loss scale: final 2048, min 512; skipped steps: 3",
        ]
    )
    only_eval = RunResult(config={}, plan={}, metrics=Metrics(eval_loss=0.0), status="oom", error="OOM\nmore")
    assert workbook.result_markdown(only_eval) == "**Status:** oom — OOM\n- eval loss: 0.0000"


# -- the report of a folder ----------------------------------------------------------------------


def _save(folder: Path, precision: str, tps: float) -> None:
    RunResult(
        config={"precision": precision, "model": "gpt-tiny", "seed": 0, "run_name": precision},
        plan={"requested": precision, "effective": precision},
        metrics=Metrics(tokens_per_s=tps, peak_memory_mb=100.0, eval_loss=2.0),
    ).save(folder / "results" / f"{precision}.json")


def test_build_report_of_a_folder_tabulates_recommends_and_draws(tmp_path: Path) -> None:
    _save(tmp_path, "fp32", 1000.0)
    _save(tmp_path, "bf16-mixed", 1500.0)
    rep = workbook.build_report(str(tmp_path), tolerance=0.1)
    assert rep.sweep_dir == tmp_path and rep.tolerance == 0.1
    assert [r.config["precision"] for r in rep.results] == ["bf16-mixed", "fp32"]  # sorted by path
    assert [r.requested for r in rep.runs] == [r.requested for r in rep.table] == ["fp32", "bf16-mixed"]
    assert [r.precision for r in rep.recommendations] == ["bf16-mixed"]
    assert rep.recommendations[0].tolerance == 0.1
    assert rep.recommendation_markdown() == rep.recommendations[0].to_markdown()
    assert set(rep.figures) == {"loss", "loss_scale", "throughput_memory"}
    assert all(p.parent == tmp_path / "figures" and p.exists() for p in rep.figures.values())
    two = workbook.Report(tmp_path, (), (), (), rep.recommendations * 2, 0.1)
    assert two.recommendation_markdown() == rep.recommendation_markdown() + "\n\n" + rep.recommendation_markdown()
    assert two.figures == {}
