"""`amp_lib.sweep.execute`: which runs a resumed sweep skips, the `failed` record of a run that died, one
run through papermill, the sweep loop (progress bar, Ctrl-C) and the worker pool.

Most tests use the kernel name "no-such-kernel": papermill then fails at once, before starting any
kernel, which is enough to test everything around the notebook. The `notebook` tests run real kernels."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch
from factories import make_result
from jupyter_core.utils import ensure_event_loop
from nbclient.exceptions import DeadKernelError

from amp_lib.config import RunConfig
from amp_lib.precision import Capabilities
from amp_lib.results import PlanRecord, RunResult, load_sweep
from amp_lib.sweep.cli import main
from amp_lib.sweep.execute import (
    COMPLETE,
    CONCURRENT_RUNS_ENV,
    KERNEL_ARGUMENTS,
    LocalExecutor,
    Outcome,
    Settings,
    _init_worker,
    _is_port_race,
    _run_parallel,
    _visible_gpus,
    cpu_threads,
    error_text,
    execute_run,
    failed_result,
    ignore_abandoned_cell,
    is_complete,
    kernel_environment,
    lost_run,
    outcome_line,
    remove_scratch,
    run_sweep,
    same_config,
    scratch_folders,
    scratch_prefix,
    stamp,
    wandb_run_id,
)
from amp_lib.sweep.grid import SweepRun, expand_grid, parse_params, timing_runs

CPU = Capabilities(device_type="cpu", device_name="test-cpu")
NO_KERNEL = Settings(kernel="no-such-kernel", retries=1)
NO_KERNEL_ERROR = "NoSuchKernel: No such kernel named no-such-kernel"
TINY = ["steps=8", "timing_warmup_steps=2", "batch_size=4", "seq_len=32", "log_every=2"]


def _saved_result(run: SweepRun, status: str = "ok", **changes: Any) -> RunResult:
    """Save (and return) the result `run` would write, with `changes` to its config."""
    p = run.parameters
    config = {k: v for k, v in p.items() if k in RunConfig.field_names() and k not in ("precision", "seed")}
    result = make_result(
        p["precision"],
        p["seed"],
        status=status,
        error=None if status == "ok" else f"{status}: first line\nsecond",
        **{**config, **changes},
    )
    result.save(run.result_path)
    return result


def _last_frame(stderr: str) -> str:
    return [frame.strip() for frame in stderr.replace("\n", "\r").split("\r") if frame.strip()][-1]


# --- resume: which results count as complete ---


def test_complete_means_same_parameters_and_a_final_status(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [9], "wandb_mode": ["disabled"]})
    assert not is_complete(run)  # no file
    run.result_path.parent.mkdir(parents=True)
    run.result_path.write_text("{not json")
    assert not is_complete(run)  # half a file
    run.result_path.write_text('{"schema_version": 1}')
    assert not is_complete(run)  # missing keys
    for status in ("ok", "diverged", "oom", "failed"):
        _saved_result(run, status)
        assert is_complete(run) == (status in COMPLETE)
    _saved_result(run, steps=10)
    assert not is_complete(run)
    _saved_result(run, out_dir="/moved/elsewhere")
    assert is_complete(run)  # a moved sweep folder still resumes
    (other,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [10], "wandb_mode": ["disabled"]})
    assert other.result_path != run.result_path and not is_complete(other)  # another run, another file
    assert COMPLETE == ("ok", "diverged", "oom")


def test_a_value_left_to_its_default_is_compared_too(tmp_path: Path) -> None:
    # `-p dropout=0.1` names its run apart from a run at the default dropout; a result copied over the other
    # name still does not stand for it (the config is compared, not the name).
    (with_dropout,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [9], "dropout": [0.1]})
    (default,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [9]})
    assert with_dropout.name != default.name
    result = _saved_result(with_dropout)
    result.save(default.result_path)
    assert is_complete(with_dropout) and not is_complete(default)
    assert same_config(default, replace(result, config={**result.config, "dropout": RunConfig().dropout}))
    older = {k: v for k, v in result.config.items() if k != "dropout"}  # a file from before a field existed
    assert same_config(default, replace(result, config=older)) and not same_config(
        with_dropout, replace(result, config=older)
    )


# --- the `failed` record of a run that wrote none ---


def test_failed_result_fills_defaults_and_resolves_the_plan() -> None:
    result = failed_result(
        {"precision": "bf16", "device": "cpu", "steps": 3, "wandb_mode": "disabled", "wandb_group": "g", "stepz": 1},
        "NoSuchKernel: x",
    )
    assert result.status == "failed" and result.error == "NoSuchKernel: x"
    defaults = RunConfig().to_dict()
    assert result.config == {**defaults, "precision": "bf16", "device": "cpu", "steps": 3, "stepz": 1}
    assert result.plan.requested == "bf16" and result.plan.effective == "bf16-mixed"
    assert result.plan.torch_version == torch.__version__ and result.plan.device_type == "cpu"


def test_failed_result_records_a_valid_config_in_its_canonical_spelling() -> None:
    # As train() would: the report then files the failed run under its siblings' setting and label.
    parameters = {"precision": "bf16", "device": "cpu", "model": "gpt-tiny", "nproc": 2}
    result = failed_result({**parameters, "parallelism": "fsdp2", "reduce_dtype": "bfloat16"}, "boom")
    assert result.config["parallelism"] == "fsdp" and result.config["reduce_dtype"] == "bf16"
    assert result.config == RunConfig(**parameters, parallelism="fsdp", reduce_dtype="bf16").to_dict()


def test_failed_result_of_a_broken_config_keeps_what_is_known() -> None:
    result = failed_result(
        {"precision": "fp33", "steps": 3, "wandb_mode": "disabled"}, "ValueError: invalid precision 'fp33'"
    )
    assert result.status == "failed" and result.config["steps"] == 3 and "wandb_mode" not in result.config
    assert result.plan == PlanRecord(requested="fp33")
    result = failed_result({"precision": 33, "device": "cpu"}, "boom")
    assert result.plan == PlanRecord(requested="33")
    assert failed_result({}, "e").config["precision"] == RunConfig().precision


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_run_on_a_cpu_machine_is_recorded_without_a_plan() -> None:
    result = failed_result({"precision": "fp32", "device": "cuda"}, "boom")
    assert result.plan == PlanRecord(requested="fp32")
    assert result.config["device"] == "cuda"


# --- errors: their text, kernel port races ---


def test_error_text_prefers_the_notebook_error_name_and_value() -> None:
    class CellError(Exception):
        ename, evalue = "ValueError", "bad steps"

    assert error_text(CellError("ignored")) == "ValueError: bad steps"
    assert error_text(RuntimeError("kernel died")) == "RuntimeError: kernel died"
    assert error_text(RuntimeError()) == "RuntimeError:"


def test_kernel_port_races_are_recognised_through_exception_chains() -> None:
    try:
        try:
            raise OSError("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5555')")
        except OSError as inner:
            raise RuntimeError("kernel start failed") from inner  # an explicit __cause__
    except RuntimeError as outer:
        assert _is_port_race(outer)
    try:
        try:
            raise RuntimeError("Kernel died before replying to kernel_info")
        except RuntimeError:
            raise ValueError("start failed")
    except ValueError as exc:
        assert _is_port_race(exc)
    assert _is_port_race(OSError("Address already in use"))
    assert not _is_port_race(OSError("Address in use"))
    assert not _is_port_race(ValueError("batch_size=0 must be >= 1"))


def test_outcome_line_is_status_name_and_the_first_error_line() -> None:
    assert outcome_line(Outcome("b", "diverged", "loss became nan\ntrace")) == "diverged b: loss became nan"
    assert outcome_line(Outcome("a", "ok")) == "ok       a"
    assert outcome_line(Outcome("c", "failed", "  \n")) == "failed   c"


# --- one run: execute_run ---


def test_settings_defaults() -> None:
    s = Settings()
    assert (s.kernel, s.timeout, s.retries, s.workdir, s.concurrent_runs) == ("amp-workbook", 3600.0, 3, None, 1)
    assert Path(s.notebooks, "train.ipynb").exists() and Path(s.notebooks, "compare.ipynb").exists()


def teststamp_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    assert stamp(path) is None
    path.write_text("a")
    st = path.stat()
    assert stamp(path) == (st.st_ino, st.st_mtime_ns)


def test_execute_run_creates_its_folders_and_records_the_papermill_call(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "deep" / "sw", CPU, ["fp32"], [0], {"device": ["cpu"], "steps": [9]})
    for _ in range(2):  # the second time the runs/ folder already exists
        outcome = execute_run(run, NO_KERNEL)
        assert (outcome.status, outcome.error) == ("failed", NO_KERNEL_ERROR)
    notebook = json.loads(Path(outcome.notebook).read_text())
    assert Path(outcome.notebook) == (tmp_path / "deep" / "sw").resolve() / "runs" / f"{run.name}.ipynb"
    meta = notebook["metadata"]["papermill"]
    assert meta["input_path"] == str(Path(NO_KERNEL.notebooks) / "train.ipynb")
    assert meta["output_path"] == outcome.notebook and meta["parameters"] == run.parameters
    saved = RunResult.load(run.result_path)
    assert saved.status == "failed" and saved.error == NO_KERNEL_ERROR and saved.config["steps"] == 9


def test_execute_run_without_any_attempt_records_a_missing_result(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})
    outcome = execute_run(run, Settings(kernel="no-such-kernel", retries=0))
    assert (outcome.status, outcome.error) == ("failed", "the notebook finished without writing its result")
    assert RunResult.load(run.result_path).error == "the notebook finished without writing its result"


@pytest.mark.notebook
def test_failing_runs_are_isolated_and_recorded_with_their_error(tmp_path: Path) -> None:
    # A misspelt parameter fails the notebook before it writes a result (so the sweep writes one);
    # seq_len=512 exceeds gpt-tiny's block size: its notebook refuses the config and the sweep records that.
    grid = parse_params([*(t for t in TINY if not t.startswith("seq_len=")), "seq_len=512", "wandb_mode=disabled"])
    (too_long,) = expand_grid(tmp_path, CPU, ["fp32"], [0], grid)
    typo = SweepRun("typo", {**too_long.parameters, "seq_len": 32, "run_name": "typo", "stepz": 3})
    outcomes, interrupted = run_sweep([typo, too_long], Settings(), workers=1)
    assert not interrupted and [(o.name, o.status) for o in outcomes] == [("typo", "failed"), (too_long.name, "failed")]
    assert outcomes[0].error.startswith(
        "ValueError: unknown parameter(s) 'stepz'; valid names: precision, model, steps"
    )
    assert outcomes[1].error == "ValueError: seq_len=512 is longer than the block size of model 'gpt-tiny'; valid: 1 to 256"
    results = {r.config["run_name"]: r for r in load_sweep(tmp_path)}
    results[too_long.name] = results.pop(too_long.parameters["run_name"])
    assert results["typo"].config["stepz"] == 3 and results["typo"].plan.effective == "fp32"  # written by the sweep
    assert results[too_long.name].config["seq_len"] == 512 and results[too_long.name].history == ()
    assert (tmp_path / "runs" / "typo.ipynb").exists()  # the executed notebook shows the error


def _stand_in_notebooks(folder: Path, *cells: str) -> str:
    """A folder with a train.ipynb of `cells` (and a parameters cell papermill fills in), whose metadata
    names a kernel that is not installed: only the sweep's kernel name makes it run."""
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "not-installed", "display_name": "not installed", "language": "python"}})
    notebook.cells = [nbformat.v4.new_code_cell("out_dir = None", metadata={"tags": ["parameters"]})]
    notebook.cells += [nbformat.v4.new_code_cell(cell) for cell in cells]
    folder.mkdir(parents=True)
    nbformat.write(notebook, folder / "train.ipynb")
    return str(folder)


@pytest.mark.slow
@pytest.mark.notebook
def test_each_attempt_runs_in_the_runs_folder_with_its_own_scratch_and_quiet_kernel_and_only_port_races_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "attempts.jsonl"
    record = (
        "import json, os, sys, tempfile\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'cwd': os.getcwd(), 'tmp': tempfile.gettempdir(), 'argv': sys.argv}) + '\\n')"
    )
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})
    for error, attempts in (("Address already in use", 3), ("boom", 1)):
        log.unlink(missing_ok=True)
        notebooks = _stand_in_notebooks(tmp_path / error.replace(" ", "-"), record, f"raise RuntimeError({error!r})")
        outcome = execute_run(run, Settings(notebooks=notebooks, retries=3))
        assert outcome.status == "failed" and outcome.error == f"RuntimeError: {error}"
        seen = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(seen) == attempts  # a kernel port race is retried, up to `retries`; any other error is not
        assert {s["cwd"] for s in seen} == {str((tmp_path / "sw" / "runs").resolve())}
        assert all(Path(s["tmp"]).name.startswith(scratch_prefix(run)) for s in seen)  # found after a kill
        assert all(set(KERNEL_ARGUMENTS) <= set(s["argv"]) for s in seen)
        assert len({s["tmp"] for s in seen}) == attempts and scratch_folders(run) == []
    assert "Executing" not in capfd.readouterr().err  # no papermill progress bar under the sweep's


@pytest.mark.slow
@pytest.mark.notebook
def test_a_run_past_its_time_limit_is_stopped_and_recorded_failed(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})
    notebooks = _stand_in_notebooks(tmp_path / "slow", "import time\ntime.sleep(30)")
    outcome = execute_run(run, Settings(notebooks=notebooks, timeout=2, retries=1))
    assert outcome.status == "failed" and "timed out" in outcome.error  # papermill's CellTimeoutError


def test_the_kernel_environment_finds_user_modules_counts_parallel_runs_and_names_the_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (run,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"lr": [1e-3, 3e-3]})[:1]
    monkeypatch.setenv("PYTHONPATH", f"/elsewhere{os.pathsep}/work{os.pathsep}")
    env = kernel_environment(run, Settings(workdir="/work", concurrent_runs=3))
    assert env["PYTHONPATH"] == f"/work{os.pathsep}/elsewhere"  # the invoking folder first, once
    assert env[CONCURRENT_RUNS_ENV] == "3" == str(Settings(concurrent_runs=3).concurrent_runs)
    assert env["AMP_WORKBOOK_EXECUTOR"] == "local" and kernel_environment(run, Settings(executor="ray"))["AMP_WORKBOOK_EXECUTOR"] == "ray"
    assert re.fullmatch(r"gpt-tiny-fp32-s0-lr_0_001-[0-9a-f]{8}-\d{10}", env["WANDB_RUN_ID"])  # the W&B folder names the run
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.chdir(tmp_path)
    assert kernel_environment(run, Settings())["PYTHONPATH"] == str(tmp_path)  # default: the current folder
    assert re.fullmatch(r"a_b_c-\d{10}", wandb_run_id("a:b/c")) and len(wandb_run_id("x" * 300)) == 107


def test_a_wandb_run_id_keeps_the_names_safe_characters_and_ends_in_the_clocks_last_ten_millisecond_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_790_000_000.1235)
    assert wandb_run_id("GPT-tiny:b/c_2") == "GPT-tiny_b_c_2-0000000123"
    monkeypatch.setattr(time, "time", lambda: 1_799_999_999.9995)
    assert wandb_run_id("r") == "r-9999999999"  # a retry a millisecond later gets another id


def test_execute_run_restores_the_environment_it_gave_the_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (run,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": ["cpu"]})
    monkeypatch.setenv("PYTHONPATH", "/before")
    monkeypatch.delenv(CONCURRENT_RUNS_ENV, raising=False)
    execute_run(run, NO_KERNEL)
    assert os.environ["PYTHONPATH"] == "/before" and CONCURRENT_RUNS_ENV not in os.environ


# --- the sweep loop: resume, force, the progress bar ---


def test_forced_rerun_executes_and_records_a_failure_without_a_kernel(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"], "steps": [9]})
    _saved_result(run)
    settings = Settings(kernel="no-such-kernel", retries=2)
    outcomes, interrupted = run_sweep([run], settings, force=True)
    assert not interrupted
    assert [(o.name, o.status, o.resumed) for o in outcomes] == [(run.name, "failed", False)]
    assert outcomes[0].error == NO_KERNEL_ERROR
    assert outcomes[0].notebook == str((tmp_path / "sw").resolve() / "runs" / f"{run.name}.ipynb")
    saved = RunResult.load(run.result_path)
    assert saved.status == "failed" and saved.error == outcomes[0].error and saved.config["steps"] == 9
    assert run_sweep([], settings) == ([], False)


def test_resumed_runs_keep_their_status_and_error_and_execute_nothing(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32", "bf16"], [0], {"device": ["cpu"], "steps": [9]})
    _saved_result(runs[0])
    _saved_result(runs[1], "oom")
    outcomes, interrupted = run_sweep(runs, NO_KERNEL)
    assert not interrupted
    assert outcomes == [
        Outcome(runs[0].name, "ok", None, resumed=True),
        Outcome(runs[1].name, "oom", "oom: first line\nsecond", resumed=True),
    ]
    assert not (tmp_path / "sw" / "runs").exists()  # nothing executed


def test_sweep_progress_bar_counts_runs_and_names_the_one_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32", "bf16"], [0], {"device": ["cpu"], "steps": [9]})
    for run in runs:
        _saved_result(run)
    outcomes, interrupted = run_sweep(runs, NO_KERNEL)  # not forced: complete runs are resumed, none executed
    assert interrupted is False and [(o.status, o.resumed) for o in outcomes] == [("ok", True), ("ok", True)]
    captured = capsys.readouterr()
    assert captured.out == "resuming: 2 of 2 runs already complete (--force re-runs them)\n"  # tqdm.write: stdout
    assert re.fullmatch(r"sweep: 100%\|[^|]*\| 2/2 \[.*run/s\]", _last_frame(captured.err))
    run_sweep(runs[:1], NO_KERNEL, force=True)  # executed in this process (workers=1): the bar names the run
    captured = capsys.readouterr()
    assert captured.out == f"failed   {runs[0].name}: {NO_KERNEL_ERROR}\n"
    frame = _last_frame(captured.err)
    assert re.fullmatch(rf"sweep: 100%\|[^|]*\| 1/1 \[.*run/s, {runs[0].name}\]", frame), frame


# --- Ctrl-C ---


def test_ctrl_c_stops_the_sweep_and_keeps_the_finished_runs(
    ctrl_c_stdout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32", "bf16"], [0], {"device": ["cpu"], "steps": [9]})
    stdout = ctrl_c_stdout(runs[0].name)
    monkeypatch.setattr(sys, "stdout", stdout)
    outcomes, interrupted = run_sweep(runs, NO_KERNEL)
    assert stdout.sent and interrupted is True
    assert [(o.name, o.status) for o in outcomes] == [(runs[0].name, "failed")]
    assert runs[0].result_path.exists() and not runs[1].result_path.exists()  # the second run never started
    assert not (tmp_path / "sw" / "runs" / f"{runs[1].name}.ipynb").exists()


def test_a_cell_left_behind_by_ctrl_c_fails_quietly_when_its_kernel_is_killed_and_other_task_errors_still_show(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Ctrl-C mid-cell leaves nbclient's cell task on papermill's event loop; the kernel's clean-up then
    # fails it with DeadKernelError, and nothing awaits it: asyncio reports that when the task is collected.
    async def fail(exc: Exception) -> None:
        raise exc

    loop = ensure_event_loop()
    try:
        execute_run(expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})[0], NO_KERNEL)
        assert loop.get_exception_handler() is ignore_abandoned_cell
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for exc in (DeadKernelError("Kernel died"), RuntimeError("a task's own error")):
                task = loop.create_task(fail(exc))
                loop.run_until_complete(asyncio.wait([task]))  # it fails; nothing retrieves its exception
                del task
                gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert [type(r.exc_info[1]) for r in caplog.records if r.name == "asyncio" and r.exc_info] == [RuntimeError]


# --- executors: a run lost by the engine, the local executor ---


def test_a_lost_run_is_recorded_failed_unless_it_wrote_a_final_result_since_it_was_handed_out(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"], "steps": [9]})
    assert lost_run(run, "Slurm job 3 ended TIMEOUT", stamp(run.result_path)) == Outcome(
        run.name, "failed", "Slurm job 3 ended TIMEOUT"
    )
    saved = RunResult.load(run.result_path)
    assert saved.status == "failed" and saved.config["steps"] == 9 and saved.plan.effective == "fp32"
    before = stamp(run.result_path)
    _saved_result(run, "oom")  # the run finished (out of memory) before its worker died: that result stands
    assert lost_run(run, "worker died", before) == Outcome(run.name, "oom", "oom: first line\nsecond")
    assert RunResult.load(run.result_path).status == "oom"
    finished = stamp(run.result_path)  # an old complete result, e.g. under --force: the lost run replaces it
    assert lost_run(run, "worker died", finished).status == "failed"
    assert RunResult.load(run.result_path).error == "worker died"
    before = stamp(run.result_path)
    _saved_result(run, "failed")  # a `failed` result written by the run itself: the engine's reason wins
    assert lost_run(run, "Slurm job 4 ended CANCELLED", before).error == "Slurm job 4 ended CANCELLED"


def test_the_sweep_removes_the_temp_folders_its_killed_runs_left_and_no_other_sweeps(tmp_path: Path) -> None:
    # A run killed by its engine (a cancelled Ray task, a Slurm job past its limit) cannot remove the temp
    # folder its kernel was given; the folder is named after the run's result file, so the sweep can.
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})
    (elsewhere,) = expand_grid(tmp_path / "other", CPU, ["fp32"], [0], {"device": ["cpu"]})
    assert run.name == elsewhere.name  # same run, another sweep's folder: another temp folder name
    left = [Path(tempfile.mkdtemp(prefix=scratch_prefix(r))) for r in (run, run, elsewhere)]
    (left[0] / "tmpabcwandb-media").mkdir()
    try:
        assert scratch_folders(run) == sorted(left[:2]) and scratch_folders(elsewhere) == [left[2]]
        outcomes, _ = run_sweep([run], NO_KERNEL)
        assert [o.status for o in outcomes] == ["failed"]
        assert scratch_folders(run) == [] and scratch_folders(elsewhere) == [left[2]]
        # The run's next attempt removes what a killed one left on its machine (another node's sweep can't).
        assert execute_run(elsewhere, NO_KERNEL).status == "failed" and scratch_folders(elsewhere) == []
    finally:
        for folder in left:
            shutil.rmtree(folder, ignore_errors=True)


def test_removing_scratch_never_follows_a_link_out_of_the_temp_folder_nor_fails_on_it(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0], {"device": ["cpu"]})
    kept = tmp_path / "elsewhere"
    kept.mkdir()
    (kept / "data").write_text("x")
    link = Path(tempfile.gettempdir()) / f"{scratch_prefix(run)}link"
    link.symlink_to(kept, target_is_directory=True)
    try:
        remove_scratch([run])
        assert (kept / "data").read_text() == "x"
    finally:
        link.unlink()


def test_the_local_executor_runs_as_many_at_once_as_it_has_workers_and_runs(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0, 1], {"device": ["cpu"]})
    assert [LocalExecutor(w).concurrency(runs) for w in (0, 1, 3, 9)] == [1, 1, 3, 4]
    assert LocalExecutor(4).concurrency([]) == 1


@dataclass
class _HandOverExecutor:
    """An engine that executes nothing: it keeps the settings the sweep hands it and records each run as
    lost, as an engine that lost it would."""

    slots: int
    handed: list[Settings] = field(default_factory=list)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def concurrency(self, todo: Any) -> int:
        return self.slots

    def run(self, todo: Any, settings: Settings, done: Any, starting: Any) -> None:
        self.handed.append(settings)
        for run in todo:
            starting(run)
            done(lost_run(run, "not run", None))


def test_runs_travel_with_the_invoking_folder_and_the_executors_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run on another machine (Ray, Slurm) cannot ask for the folder the sweep started in: it travels.
    monkeypatch.chdir(tmp_path)
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0, 1], {"device": ["cpu"]})
    executor = _HandOverExecutor(slots=3)
    outcomes, _ = run_sweep(runs, NO_KERNEL, executor=executor)
    run_sweep(runs, replace(NO_KERNEL, workdir="/given"), executor=executor)
    assert [(h.workdir, h.concurrent_runs) for h in executor.handed] == [(str(tmp_path), 3), ("/given", 3)]
    assert [(o.status, o.error) for o in outcomes] == [("failed", "not run")] * 2


# --- the worker pool ---


def test_each_worker_gets_its_own_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, ,1")
    assert _visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _visible_gpus() == [str(i) for i in range(torch.cuda.device_count())]


def test_each_worker_gets_its_share_of_the_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(1) == cores and cpu_threads(0) == cores
    assert cpu_threads(2) == max(1, cores // 2) and cpu_threads(cores + 1) == 1  # never 0 threads
    # A whole number: it becomes OMP_NUM_THREADS and torch.set_num_threads, which refuse "1.0" and 1.5.
    assert all(type(cpu_threads(n)) is int for n in range(1, cores + 2))


def test_a_worker_takes_its_thread_share_for_its_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    saved_threads, saved_int = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    # Set, not deleted: monkeypatch restores only what it saw, and an absent variable that the worker then
    # sets would leak into every later test of this process (it gave torchrun's workers one thread).
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("MKL_NUM_THREADS", "7")
    gpus: queue.Queue[str | None] = queue.Queue()
    gpus.put(None)
    try:
        _init_worker(gpus, queue.Queue(), None, 1)  # no parent to die with: that is tested on real processes
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved_threads)
        signal.signal(signal.SIGINT, saved_int)


def test_a_worker_ignores_ctrl_c_reports_its_pid_and_pins_its_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_init_worker` run in this process (what each pool worker runs first); SIGINT restored after."""
    saved = signal.getsignal(signal.SIGINT)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    gpus: queue.Queue[str | None] = queue.Queue()
    pids: queue.Queue[int] = queue.Queue()
    try:
        gpus.put("1")
        _init_worker(gpus, pids)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the parent stops workers itself
        assert pids.get_nowait() == os.getpid() and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        gpus.put(None)  # one GPU or none: the worker leaves the variable alone
        _init_worker(gpus, pids)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1" and pids.get_nowait() == os.getpid()
    finally:
        signal.signal(signal.SIGINT, saved)


@pytest.mark.slow
def test_runs_that_cannot_start_in_worker_processes_are_reported_one_line_each_and_exit_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dead_kernel: str
) -> None:
    argv = ["--out", str(tmp_path), "--precisions", "fp32,bf16", "-p", "device=cpu", "--kernel", dead_kernel,
            "--speed-budget", "0"]  # fmt: skip
    assert main([*argv, *(f for p in TINY for f in ("-p", p)), "--workers", "2"]) == 1  # two workers, a run each
    err = capsys.readouterr().err
    error = f"FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/{dead_kernel}'"
    names = [r.name for r in expand_grid(tmp_path, CPU, ["fp32", "bf16-mixed"], [0], parse_params(["device=cpu", *TINY]))]
    assert sorted(line for line in err.splitlines() if line.startswith("FAILED")) == sorted(
        f"FAILED failed   {name}: {error}" for name in names
    )
    assert re.search(r"sweep: 100%\|[^|]*\| 2/2 \[[^],]*,[^],]*\]", err)  # the pool: the bar names no run
    assert "report failed: report notebook failed" in err
    results = load_sweep(tmp_path)
    assert {r.status for r in results} == {"failed"} and len(results) == 2
    assert all(r.config["steps"] == 8 and r.error == error for r in results)  # written in the workers
    assert "| failed |" in (tmp_path / "summary.md").read_text()  # written from Python even without the notebook


@pytest.mark.slow
@pytest.mark.notebook
def test_parallel_runs_each_see_their_workers_gpu_and_share_of_the_cores_and_are_reported_as_they_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # on a CPU machine only the variable tells
    log, go = tmp_path / "seen.jsonl", tmp_path / "go"
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0, 1, 2], {"device": ["cpu"]})
    notebooks = _stand_in_notebooks(
        tmp_path / "nb",
        "import json, os, time\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps([os.getppid(), os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS']]))\n"
        "    f.write('\\n')",
        # the last run waits until the sweep has reported a finished one: runs are reported as they finish
        f"deadline = time.monotonic() + 30\nwhile run_name == {runs[2].name!r} and not os.path.exists({str(go)!r}):\n"
        "    assert time.monotonic() < deadline, 'no run was reported before all had finished'\n"
        "    time.sleep(0.1)",
    )
    reported: list[Outcome] = []

    def done(outcome: Outcome) -> None:
        reported.append(outcome)
        go.touch()

    _run_parallel(runs, Settings(notebooks=notebooks, retries=1), 2, done)  # three runs in two workers
    assert sorted((o.name, o.error) for o in reported) == [
        (r.name, "the notebook finished without writing its result") for r in runs
    ]
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(seen) == 3 and {gpu for _, gpu, _ in seen} <= {"3", "5"}
    pinned = {(worker, gpu) for worker, gpu, _ in seen}
    assert len(pinned) == len({w for w, _ in pinned}) == len({g for _, g in pinned})  # a GPU of its own each
    assert {threads for *_, threads in seen} == {str(cpu_threads(2))}


@pytest.mark.slow
@pytest.mark.notebook
def test_a_run_whose_worker_dies_is_lost_unless_it_had_written_its_final_result(tmp_path: Path) -> None:
    finished, lost = expand_grid(tmp_path / "sw", CPU, ["fp32"], [0, 1], {"device": ["cpu"]})
    written = tmp_path / "written.json"
    _saved_result(finished).save(written)
    finished.result_path.unlink()
    notebooks = _stand_in_notebooks(
        tmp_path / "nb",
        "import os, signal\n"
        f"if run_name == {finished.parameters['run_name']!r}:\n"
        f"    os.replace({str(written)!r}, {str(finished.result_path)!r})\n"
        "os.kill(os.getppid(), signal.SIGKILL)  # the worker that started this kernel",
    )
    for run, expected in ((finished, ("ok", None)), (lost, ("failed", "worker process failed: BrokenProcessPool"))):
        reported, _ = run_sweep([run], Settings(notebooks=notebooks, retries=1), workers=2)  # a pool of one
        assert [(o.name, o.status, (o.error or "")[: len(expected[1] or "")] or None) for o in reported] == [
            (run.name, *expected)
        ]
        assert scratch_folders(run) == []  # the killed worker's run could not remove its temp folder: the sweep did
    assert RunResult.load(lost.result_path).error.startswith("worker process failed: BrokenProcessPool")


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (parent pid, state, start time) of every process, read from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # it exited meanwhile
        fields_ = text[text.rindex(")") + 2 :].split()
        table[int(stat.parent.name)] = (int(fields_[1]), fields_[0], int(fields_[19]))
    return table


def _kernels(root: int) -> dict[int, int]:
    """pid -> start time of the Jupyter kernels among the living descendants of `root`."""
    found = {}
    for pid, start in _descendants(root).items():
        with contextlib.suppress(OSError):  # it exited meanwhile
            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found[pid] = start
    return found


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every living descendant of `root`."""
    table = _processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _alive(pid: int, start: int) -> bool:
    entry = _processes().get(pid)
    return entry is not None and entry[2] == start and entry[1] != "Z"  # same process, not a zombie


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and relies on PR_SET_PDEATHSIG")
def test_sigkill_of_a_parallel_sweep_takes_its_workers_and_kernels_with_it(tmp_path: Path, dead_kernel: str) -> None:
    out = tmp_path / "k"
    argv = ["--out", str(out), "--precisions", "fp32,bf16-mixed", "--seeds", "0,1", "-p", "device=cpu",
            *(f for p in [*TINY, "wandb_mode=disabled"] for f in ("-p", p)), "--no-report"]  # fmt: skip
    log = (tmp_path / "stderr.txt").open("w")
    sweep_proc = subprocess.Popen(
        [sys.executable, "-m", "amp_lib.sweep", *argv, "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,  # setsid, as in the issue
    )  # fmt: skip
    seen: dict[int, int] = {}
    commands: dict[int, bytes] = {}

    def look() -> None:
        for pid, start in _descendants(sweep_proc.pid).items():
            if pid not in seen:
                with contextlib.suppress(OSError):
                    commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            seen[pid] = start

    try:
        deadline = time.monotonic() + 300
        while not list((out / "results").glob("*.json")):
            assert sweep_proc.poll() is None and time.monotonic() < deadline, "no result before the deadline"
            look()
            time.sleep(0.2)
        look()
        assert sum(b"spawn_main" in c for c in commands.values()) == 2  # the two workers...
        assert sum(b"ipykernel" in c for c in commands.values()) >= 2  # ...and the kernels they started
    finally:
        sweep_proc.kill()  # SIGKILL: the parent can clean nothing up
        sweep_proc.wait()
        log.close()
    deadline = time.monotonic() + 30
    while any(_alive(pid, start) for pid, start in seen.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid, s in seen.items() if _alive(pid, s)}
    assert survivors == {}, "orphaned processes"
    finished = load_sweep(out)
    assert finished and all(r.plan.concurrent_runs == 2 for r in finished if r.ok)
    assert all(r.plan.threads == cpu_threads(2) for r in finished if r.ok)  # each run its share of cores
    assert "without encryption" not in (tmp_path / "stderr.txt").read_text()  # the kernels' noise is gone
    # The killed sweep's lock blocks nothing, and what it finished is resumed, not run twice.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    assert main([*argv, "--kernel", dead_kernel]) == 1
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    # ...and the temp folders of the runs the kill cut short, finished ones included, are gone with it.
    grid = expand_grid(out, CPU, ["fp32", "bf16-mixed"], [0, 1], parse_params([*TINY, "device=cpu"]))
    assert [r.name for r in grid if scratch_folders(r)] == []


@pytest.mark.slow
@pytest.mark.notebook
def test_ctrl_c_of_a_serial_sweep_mid_run_prints_no_traceback_and_leaves_no_kernel(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path / "c"), "--precisions", "fp32", "-p", "device=cpu", "-p", "steps=100000",
            "-p", "wandb_mode=disabled", "--no-report"]  # fmt: skip
    # Started as from a terminal, where Ctrl-C raises KeyboardInterrupt: a process started in the background
    # (`make test &`, nohup) ignores SIGINT, its children inherit that, and Python then keeps ignoring it.
    # -X faulthandler: if the sweep hangs after Ctrl-C, SIGABRT makes it print where (every thread's stack).
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: reset to the default by exec
    try:
        proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "amp_lib.sweep", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, saved)
    kernels: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 120
        while not kernels:
            assert proc.poll() is None and time.monotonic() < deadline, "no kernel started"
            kernels = _kernels(proc.pid)
            time.sleep(0.2)
        time.sleep(4)  # the kernel is training now (100000 steps: it will not finish on its own)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the sweep did not exit within 60 s of Ctrl-C; where it was:\n{err[-6000:]}")
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "Traceback" not in err and "ZMQError" not in err, err
    assert "interrupted: finished results are kept; run the same command again to resume" in err
    deadline = time.monotonic() + 15
    while any(_alive(p, s) for p, s in kernels.items()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p, s) for p, s in kernels.items())
    assert list((tmp_path / "c" / "results").glob("*.json")) == []  # the unfinished run wrote nothing


# --- timing runs (speed.ipynb) --------------------------------------------------------------------------


def test_a_timing_run_is_complete_only_as_a_timing_of_its_precisions_and_fails_as_one(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0], {"steps": [9], "device": ["cpu"]})
    (timing,) = timing_runs(runs, 5.0)
    assert not is_complete(timing)
    fp32 = next(r for r in runs if r.parameters["precision"] == "fp32")
    _saved_result(fp32).save(timing.result_path)  # the same config trained, not timed: not this run's result
    assert not is_complete(timing)
    outcomes, _ = run_sweep([timing], NO_KERNEL)
    assert [(o.name, o.status) for o in outcomes] == [(timing.name, "failed")]
    saved = RunResult.load(timing.result_path)
    assert saved.timing is not None and saved.timing.precisions == ("fp32", "bf16-mixed") and saved.timing.blocks == ()
    assert saved.error == NO_KERNEL_ERROR and not is_complete(timing)  # failed: retried on resume
    replace(saved, status="ok", error=None).save(timing.result_path)
    assert is_complete(timing)
    other = replace(saved, status="ok", error=None, timing=replace(saved.timing, precisions=("fp32", "fp16-mixed")))
    other.save(timing.result_path)
    assert not is_complete(timing)  # a timing of other precisions
    assert (tmp_path / "runs" / f"{timing.name}.ipynb").exists()  # its notebook, as a training run's


@pytest.mark.slow
@pytest.mark.notebook
def test_timing_runs_start_after_every_training_run_and_alone_with_every_core(tmp_path: Path) -> None:
    """The interleaved timing must not share the machine with training runs: it runs after them, one at a time,
    in a worker that has all the cores, whatever `--workers` says."""
    log = tmp_path / "seen.jsonl"
    runs = expand_grid(tmp_path / "sw", CPU, ["fp32", "bf16-mixed"], [0, 1], {"device": ["cpu"]})
    timing = timing_runs(runs, 5.0)
    notebooks = _stand_in_notebooks(
        tmp_path / "nb",
        "import json, os, time\n"
        "began = time.time()\n"
        "time.sleep(0.3)\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    name = globals().get('run_name') or 'timing ' + '+'.join(globals().get('precisions', []))\n"
        "    f.write(json.dumps([name, os.environ['OMP_NUM_THREADS'], began, time.time()]) + '\\n')",
    )
    shutil.copy(Path(notebooks) / "train.ipynb", Path(notebooks) / "speed.ipynb")
    outcomes, interrupted = run_sweep([*timing, *runs], Settings(notebooks=notebooks, retries=1), workers=2)
    assert not interrupted and len(outcomes) == 5
    seen = {name: (threads, began, ended) for name, threads, began, ended in map(json.loads, log.read_text().splitlines())}
    (timed,) = [v for k, v in seen.items() if k.startswith("timing")]
    trained = [v for k, v in seen.items() if not k.startswith("timing")]
    assert len(trained) == 4 and timed[1] >= max(ended for _, _, ended in trained)
    assert {threads for threads, _, _ in trained} == {str(cpu_threads(2))} and timed[0] == str(cpu_threads(1))
