"""`amp_lib.sweep.cli`: `sweep()` (plan, run, report) and `python -m amp_lib.sweep` (its parser, its
errors, what it prints, its exit code).

Most tests run on finished results (a resumed sweep executes nothing) with the kernel "amp-dead-kernel",
a kernel spec whose program does not exist, so that a run or report notebook that is (wrongly) executed
fails in a moment instead of starting a kernel. The `notebook` tests at the end run one real two-precision sweep with its report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_result
from wandb_readback import only_run_dir, read_run, read_summary

from amp_lib.config import RECIPES, RunConfig, parameter_names
from amp_lib.details import summary_markdown
from amp_lib.precision import Capabilities, valid_precision_names
from amp_lib.render import answer, short_reason
from amp_lib.report import NO_BASELINE as R_NO_BASELINE
from amp_lib.report import SweepReport, build_report
from amp_lib.results import RunResult, load_sweep
from amp_lib.sweep.cli import SweepRefused, SweepResult, _csv, build_parser, main, make_executor, sweep
from amp_lib.sweep.execute import LocalExecutor, Outcome, Settings
from amp_lib.sweep.grid import SweepRun, expand_grid, parse_params
from amp_lib.sweep.lock import LOCK_NAME, FolderLocked
from amp_lib.sweep.publish import STALE_MD
from amp_lib.sweep.ray_executor import RayExecutor
from amp_lib.sweep.slurm_executor import SlurmExecutor

CPU = Capabilities(device_type="cpu", device_name="test-cpu")
ARGS = ["-p", "device=cpu", "-p", "steps=9", "-p", "wandb_mode=disabled"]
PARAMS = ARGS[1::2]  # the same, as sweep()'s params
DEAD_KERNEL = "amp-dead-kernel"
# a run that is (wrongly) executed fails in a moment, starting no kernel; no timing runs unless a test asks for them
NO_KERNEL = ["--kernel", DEAD_KERNEL, "--speed-budget", "0"]
NO_KERNEL_SETTINGS = Settings(kernel=DEAD_KERNEL, retries=1)
DEAD_KERNEL_ERROR = f"FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/{DEAD_KERNEL}'"


@pytest.fixture(autouse=True)
def _every_test_has_the_dead_kernel(dead_kernel: str) -> None:
    """Every test here may name DEAD_KERNEL (see conftest.dead_kernel)."""


def _finished_sweep(
    out: Path,
    statuses: dict[str, str],
    tps: dict[str, float],
    grid: dict[str, list[Any]] | None = None,
    seeds: tuple[int, ...] = (0,),
) -> list[SweepRun]:
    """The result files a sweep over `statuses`' precisions (`seeds`, ARGS) would have left in `out`."""
    grid = {"device": ["cpu"], "steps": [9], "wandb_mode": ["disabled"], **(grid or {})}
    runs = expand_grid(out, CPU, list(statuses), list(seeds), grid)
    for run in runs:
        p = run.parameters
        status = statuses[p["precision"]]
        config = {k: v for k, v in p.items() if k in RunConfig.field_names() and k not in ("precision", "seed")}
        make_result(
            p["precision"],
            p["seed"],
            status=status,
            tps=tps[p["precision"]],
            eval_loss=2.0 if status == "ok" else None,
            error=None if status == "ok" else f"{status}: first line\nsecond",
            **config,
        ).save(run.result_path)
    return runs


def _recommendation_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("recommendation")]


# --- SweepResult: what failed, the exit code ---


def test_exit_code_interrupted_then_failed_then_report() -> None:
    ok, bad = Outcome("a", "ok"), Outcome("b", "diverged", "loss became nan\ntrace")
    assert SweepResult(Path("x"), (ok,)).exit_code == 0
    assert SweepResult(Path("x"), (ok, bad)).failed == [bad]
    assert SweepResult(Path("x"), (ok, bad)).exit_code == 1
    assert SweepResult(Path("x"), (ok,), report_error="boom").exit_code == 1
    assert SweepResult(Path("x"), (ok, bad), interrupted=True, report_error="boom").exit_code == 130
    empty = SweepResult(Path("x"), ())
    assert (empty.planned, empty.interrupted, empty.report, empty.report_error) == (0, False, None, None)
    assert empty.files == {}


# --- the command line: parser, help, errors ---


def test_csv_and_parser_defaults() -> None:
    assert _csv(" a, ,b ,") == ["a", "b"]
    args = build_parser().parse_args(["--out", "o"])
    assert (args.out, args.precisions, args.seeds, args.param) == ("o", None, ["0"], [])
    assert (args.workers, args.force, args.kernel, args.timeout) == (1, False, "amp-workbook", 3600.0)
    assert (args.tolerance, args.report) == (0.02, True)
    args = build_parser().parse_args(
        ["--out", "o", "--precisions", "fp32, bf16", "--seeds", "1,2", "-p", "a=1", "--param", "b=2", "--workers",
         "3", "--force", "--kernel", "k", "--timeout", "5", "--tolerance", "0.1", "--no-report"]
    )  # fmt: skip
    assert (args.precisions, args.seeds, args.param) == (["fp32", "bf16"], ["1", "2"], ["a=1", "b=2"])
    assert (args.workers, args.force, args.kernel, args.timeout, args.tolerance, args.report) == (
        3, True, "k", 5.0, 0.1, False
    )  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # --out is required


HELP = """\
usage: python -m amp_lib.sweep [-h] --out OUT [--precisions PRECISIONS] [--seeds SEEDS]
                               [-p KEY=V1[,V2]] [--workers WORKERS] [--force]
                               [--executor {local,ray,slurm}] [--ray-address ADDRESS]
                               [--ray-dashboard] [--slurm-partition NAME] [--slurm-time MIN]
                               [--slurm-gpus-per-run N] [--sbatch KEY=VALUE] [--kernel KERNEL]
                               [--timeout TIMEOUT] [--tolerance TOLERANCE]
                               [--speed-budget SECONDS] [--no-report]

Run notebooks/train.ipynb over precisions x seeds x parameters with papermill, then the report.

options:
  -h, --help            show this help message and exit
  --out OUT             sweep folder (runs/, results/, report.html, summary.md, figures/)
  --precisions PRECISIONS
                        comma-separated; default: what this device runs natively
  --seeds SEEDS         comma-separated ints (default 0); several give mean ± spread
  -p KEY=V1[,V2], --param KEY=V1[,V2]
                        any RunConfig field (or wandb_mode/project/group); repeatable
  --workers WORKERS     runs in parallel, one process each (one GPU each on multi-GPU machines)
  --force               re-run runs whose results are already complete
  --executor {local,ray,slurm}
                        where runs execute: this machine (default), a Ray cluster, Slurm jobs
                        (docs/clusters.md)
  --ray-address ADDRESS
                        Ray cluster to use: auto, host:port or ray://host:port (default: a local
                        one)
  --ray-dashboard       start the local Ray instance with its dashboard
  --slurm-partition NAME
                        Slurm partition (default: the cluster's default)
  --slurm-time MIN      minutes each run's job may take (default 60)
  --slurm-gpus-per-run N
                        GPUs per job (default: nproc for cuda runs, else 0)
  --sbatch KEY=VALUE    extra sbatch option, e.g. mem=16G; repeatable
  --kernel KERNEL       Jupyter kernel to run the notebooks with (default amp-workbook)
  --timeout TIMEOUT     seconds a notebook cell may run (default 3600)
  --tolerance TOLERANCE
                        relative eval-loss tolerance vs fp32 for the recommendation
  --speed-budget SECONDS
                        seconds to time each setting's precisions against fp32 in alternating
                        blocks (default: 20 on a CPU, 60 on a GPU; 0: no timing, speed from the
                        training runs alone)
  --no-report           skip report.ipynb / report.html
"""


def test_help_text_documents_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert build_parser().format_help() == HELP


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "stepz=3"], "unknown parameter 'stepz'; valid names: model, steps, batch_size"),
        (["-p", "steps=abc"], "invalid value 'abc' for steps (expected int)"),
        # runs are not planned from a grid that is not the one asked for: no run-level problems on top
        (["-p", "steps=abc", "-p", "model=nowhere:build"], "invalid value 'abc' for steps (expected int)"),
        (["-p", "precision=fp16"], "-p precision=... is set by the sweep; use --precisions / --seeds"),
        (["-p", "steps"], "invalid -p 'steps'; expected key=value[,value...]"),
        (["--precisions", "fp33"], "invalid precision 'fp33'; valid values are: fp32, tf32"),
        (["--precisions", "fp32,32"], "precisions ['fp32', 'fp32'] and seeds [0] must not repeat"),
        (["--seeds", "0,x"], "invalid --seeds '0,x'; expected comma-separated ints"),
        (["--workers", "0"], "invalid --workers 0; expected >= 1"),
        (["--tolerance", "-1"], "tolerance=-1.0 must be a finite number >= 0"),
    ],
)
def test_bad_command_lines_exit_2_with_one_error_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["--out", str(tmp_path / "sw"), *argv, *NO_KERNEL]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "seq_len=1000000"], "seq_len=1000000 is longer than the block size of model 'gpt-tiny'; valid: 1 to 256"),
        (["-p", "model=amp_lib.examples:nosuchfn"],
         "model='amp_lib.examples:nosuchfn': module 'amp_lib.examples' defines no 'nosuchfn'"),
        (["--kernel", "nosuchkernel"], "--kernel 'nosuchkernel': no such Jupyter kernel; valid: "),
        (["-p", "wandb_mode=online"], "wandb_mode='online' needs a W&B API key (WANDB_API_KEY, or `wandb login` for "),
        (["-p", "steps=3", "-p", "steps=4"], "-p steps is given twice; give its values once, comma-separated"),
    ],
)  # fmt: skip
def test_inputs_a_kernel_used_to_find_are_refused_before_any_kernel_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "")  # no W&B login here: neither a key nor a .netrc entry
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert main(["--out", str(tmp_path / "sw"), *NO_KERNEL, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1
    assert not (tmp_path / "sw").exists()  # no result, no notebook: nothing started


def test_every_problem_of_a_command_line_is_listed_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path / "sw"), "--seeds", "x", "--precisions", "fp33", "-p", "batch_size=0", *NO_KERNEL]
    assert main(argv) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == "error: invalid --seeds 'x'; expected comma-separated ints, e.g. 0,1,2"
    assert errors[1].startswith("error: invalid precision 'fp33'; valid values are: fp32") and len(errors) == 2
    assert main(["--out", str(tmp_path / "sw"), "--seeds", "x", "-p", "batch_size=0", *NO_KERNEL]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == ["error: batch_size=0 must be >= 1"]
    assert not (tmp_path / "sw").exists()


def test_an_out_folder_nothing_can_be_written_in_or_no_folder_at_all_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--out", "/proc/amp-x", *ARGS, *NO_KERNEL]) == 2  # root may write anywhere, but not in /proc
    assert capsys.readouterr().err.startswith("error: --out /proc/amp-x: cannot create files in /proc (")
    assert main(["--out", "", *ARGS, *NO_KERNEL]) == 2
    assert capsys.readouterr().err == "error: --out is empty; give the sweep's folder, e.g. --out sweeps/mine\n"
    assert list(tmp_path.iterdir()) == []  # no report written into the current folder


def test_the_command_line_picks_the_executor_with_its_options() -> None:
    def executor(*argv: str) -> object:
        return make_executor(build_parser().parse_args(["--out", "o", *argv]))

    assert executor() == LocalExecutor(1) and executor("--workers", "3") == LocalExecutor(3)
    assert executor("--executor", "ray") == RayExecutor(None, dashboard=False)
    assert executor("--executor", "ray", "--ray-address", "auto", "--ray-dashboard") == RayExecutor("auto", True)
    slurm = executor("--executor", "slurm", "--slurm-partition", "gpu", "--slurm-time", "30",
                     "--slurm-gpus-per-run", "2", "--sbatch", "mem=8G", "--sbatch", "qos=high")  # fmt: skip
    assert slurm == SlurmExecutor("gpu", 30, 2, {"mem": "8G", "qos": "high"})


def test_every_problem_of_the_executor_options_is_listed_at_once() -> None:
    def problems(*argv: str) -> list[str]:
        with pytest.raises(SweepRefused) as refused:
            make_executor(build_parser().parse_args(["--out", "o", *argv]))
        return refused.value.problems

    assert problems("--executor", "ray", "--ray-address", "nowhere", "--slurm-time", "5") == [
        "--slurm-time applies to --executor slurm, not ray",
        (
            "invalid --ray-address 'nowhere'; expected auto, host:port or ray://host:port"
            " (leave it out to start a local Ray instance)"
        ),
    ]
    assert problems("--executor", "slurm", "--ray-dashboard", "--sbatch", "mem", "--slurm-time", "0") == [
        "--ray-dashboard applies to --executor ray, not slurm",
        "invalid --sbatch 'mem'; expected KEY=VALUE, an sbatch option, e.g. mem=16G or qos=high",
        "invalid --slurm-time 0; expected minutes >= 1",
    ]

def test_workers_and_another_executor_are_refused_together(tmp_path: Path) -> None:
    with pytest.raises(SweepRefused, match="workers=2 applies to the local executor; RayExecutor places runs itself"):
        sweep(tmp_path / "sw", ["fp32"], [0], PARAMS, workers=2, executor=RayExecutor(), settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert not (tmp_path / "sw").exists()


# --- sweep(): checked before anything runs ---


@pytest.mark.parametrize("tolerance", [-1, float("nan")])
def test_a_bad_tolerance_is_rejected_before_any_run_starts(tmp_path: Path, tolerance: float) -> None:
    out = tmp_path / "sw"
    out.mkdir()
    # Were the tolerance checked only when the report is built, the run would start (here it would fail
    # at once, the kernel missing), leave runs/ and results/ behind and still end in the same ValueError.
    with pytest.raises(ValueError, match=r"must be a finite number >= 0"):
        sweep(out, ["fp32"], [0], PARAMS, tolerance=tolerance, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_sweep_on_a_cpu_machine_is_rejected_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        sweep(tmp_path / "sw", ["fp32"], [0], ["device=cuda"], settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert not (tmp_path / "sw").exists()


def test_precisions_that_are_all_blank_are_refused_as_empty(tmp_path: Path) -> None:
    with pytest.raises(SweepRefused) as refused:
        sweep(tmp_path / "sw", [" ", ""], [0], PARAMS, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert refused.value.problems[0].startswith("--precisions is empty; valid values are: fp32, tf32, ")
    assert not (tmp_path / "sw").exists()

def test_the_device_probed_is_the_one_in_the_grid_or_auto_for_several(tmp_path: Path) -> None:
    one = sweep(tmp_path / "one", ["fp32"], [0], ["device=cpu"], report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    (result,) = load_sweep(one.out)
    assert result.config["model"] == "gpt-tiny" and result.config["steps"] == RECIPES["shakespeare-char-tiny"]["steps"]
    several = sweep(tmp_path / "two", ["fp32"], [0], ["device=cpu,cuda", "model=gpt-tiny"], report=False,
                    settings=NO_KERNEL_SETTINGS, speed_budget=0)  # fmt: skip
    assert [o.name.rsplit("-", 1)[0] for o in several.outcomes] == [
        "gpt-tiny-fp32-s0-device=cpu", "gpt-tiny-fp32-s0-device=cuda"]  # fmt: skip
    assert several.planned == 2 and {o.status for o in several.outcomes} == {"failed"}


# --- sweep(): resume, the report it returns, the files it writes ---


def test_sweep_function_resumes_and_returns_the_report_summary_md_was_written_from(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    runs = _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "oom"}, {"fp32": 1000.0, "bf16-mixed": 1.0})
    result = sweep(out, ["fp32", "bf16"], [0], PARAMS, tolerance=0.3, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert result.planned == 2 and result.interrupted is False and result.exit_code == 1 and result.out == out
    assert [(o.name, o.status, o.resumed) for o in result.outcomes] == [(r.name, s, True) for r, s in
                                                                         zip(runs, ("ok", "oom"))]  # fmt: skip
    assert result.outcomes[1].error == "oom: first line\nsecond"
    assert result.report_error.startswith("report notebook failed (") and DEAD_KERNEL_ERROR in result.report_error
    assert result.files == {}  # the report notebook failed: no files to list
    assert isinstance(result.report, SweepReport) and result.report.tolerance == 0.3
    assert result.report.results == tuple(load_sweep(out)) and len(result.report.results) == 2
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary == summary_markdown(result.report)  # summary.md is written from the report sweep() returns
    assert summary.startswith("# AMP Workbook sweep summary") and "| oom |" in summary
    assert "±30% of fp32's" in summary  # the tolerance it was given
    assert not (out / "summary.md.tmp").exists()
    quiet = sweep(out, ["fp32", "bf16"], [0], PARAMS, report=False, tolerance=0.3, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert quiet.report_error is None and quiet.files == {} and quiet.out == out
    assert quiet.report == result.report  # computed even without the report files


def test_the_folder_is_made_with_its_parents_and_a_resume_leaves_the_grid_file_alone(tmp_path: Path) -> None:
    out = tmp_path / "new" / "nested" / "sw"
    result = sweep(out, ["fp32"], [0], PARAMS, report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert [o.status for o in result.outcomes] == ["failed"] and (out / "sweep.json").is_file()
    stamp = (out / "sweep.json").stat().st_mtime_ns
    sweep(out, ["fp32"], [0], PARAMS, report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)  # the same grid: retried
    assert (out / "sweep.json").stat().st_mtime_ns == stamp  # rewritten only when the grid changes


def test_a_sweep_cut_short_after_executing_a_run_marks_the_summary_it_left_stale(
    ctrl_c_stdout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sw"
    first, _ = _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 100.0, "bf16-mixed": 150.0})
    sweep(out, ["fp32", "bf16"], [0], PARAMS, settings=NO_KERNEL_SETTINGS, speed_budget=0)  # summary.md, from the results
    assert not (out / "summary.md").read_text().startswith(STALE_MD)
    monkeypatch.setattr(sys, "stdout", ctrl_c_stdout(first.name))
    cut = sweep(out, ["fp32", "bf16"], [0], PARAMS, force=True, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert cut.interrupted and [(o.name, o.resumed) for o in cut.outcomes] == [(first.name, False)]
    banner = (out / "summary.md").read_text().splitlines()[0]
    assert banner.startswith(f"{STALE_MD} the sweep was interrupted after new runs finished; ")

def test_sweep_runs_in_this_process_with_one_worker_and_the_bar_names_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = _finished_sweep(tmp_path / "sw", {"fp32": "ok"}, {"fp32": 1.0})
    result = sweep(tmp_path / "sw", ["fp32"], [0], PARAMS, force=True, report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert [(o.status, o.resumed) for o in result.outcomes] == [("failed", False)]  # forced: executed
    frames = capsys.readouterr().err.replace("\n", "\r").split("\r")
    assert [f.strip() for f in frames if f.strip()][-1].endswith(f"run/s, {run.name}]")


def test_ctrl_c_exits_130_keeps_finished_runs_and_writes_no_report(
    ctrl_c_stdout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    (first, second) = expand_grid(out, CPU, ["fp32", "bf16"], [0], {"device": ["cpu"], "steps": [9]})
    monkeypatch.setattr(sys, "stdout", ctrl_c_stdout(first.name))
    result = sweep(out, ["fp32", "bf16"], [0], ["device=cpu", "steps=9"], settings=NO_KERNEL_SETTINGS, speed_budget=0)
    assert (result.interrupted, result.exit_code, result.planned) == (True, 130, 2)
    assert [o.name for o in result.outcomes] == [first.name]
    assert (result.report, result.files, result.report_error) == (None, {}, None)  # no report of half a sweep
    # the grid is recorded; the lock went with the sweep
    assert (
        sorted(p.name for p in out.iterdir()) == ["results", "runs", "sweep.json"] and not second.result_path.exists()
    )
    capsys.readouterr()
    stdout = ctrl_c_stdout(first.name)  # again, through the command (the failed run is retried)
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["--out", str(out), "--precisions", "fp32,bf16", "-p", "device=cpu", "-p", "steps=9", *NO_KERNEL]
    assert main(argv) == 130
    assert f"sweep {out}: 1 of 2 runs done (1 executed, 0 resumed), 1 not ok" in stdout.getvalue().splitlines()
    assert _recommendation_lines(stdout.getvalue()) == [] and not (out / "summary.md").exists()
    err = capsys.readouterr().err
    assert "interrupted: finished results are kept; run the same command again to resume\n" in err
    assert "report failed" not in err and f"FAILED failed   {first.name}: {DEAD_KERNEL_ERROR}" in err
    monkeypatch.setattr(sys, "stdout", ctrl_c_stdout(first.name))  # forced: the same command would start over
    assert main([*argv, "--force"]) == 130
    assert (
        "interrupted: finished results are kept; run the same command without --force to resume (with it, every run"
        " starts again)\n"
    ) in capsys.readouterr().err



@pytest.mark.slow
def test_the_verdicts_go_to_a_wandb_run_of_their_own_in_the_runs_project_and_group(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    wandb = ["wandb_mode=offline", "wandb_project=amp-test", "wandb_group=night"]
    grid = {k: [v] for k, v in (p.split("=") for p in wandb)}
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 100.0, "bf16-mixed": 150.0}, grid=grid)
    result = sweep(out, ["fp32", "bf16-mixed"], [0], ["device=cpu", "steps=9", *wandb], settings=NO_KERNEL_SETTINGS, speed_budget=0, report=False)
    assert result.exit_code == 0 and result.report is not None
    record = read_run(only_run_dir(out / "runs"))  # beside the runs' own folders, not in WANDB_DIR
    assert (record.run["project"], record.run["run_group"], record.run["job_type"]) == ("amp-test", "night", "report")
    assert record.run["display_name"] == "night-report"
    assert read_summary(only_run_dir(out / "runs"))["summary"]["report/answer"] == answer(result.report)

# --- what the command prints ---


def test_resumed_sweep_prints_counts_paths_and_recommendation_and_no_report_writes_no_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0})
    assert main(["--out", str(out), "--precisions", "fp32,bf16", *ARGS, *NO_KERNEL, "--no-report"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "resuming: 2 of 2 runs already complete (--force re-runs them)"  # tqdm.write: stdout
    assert lines[1] == ""
    assert lines[2] == f"sweep {out}: 2 of 2 runs done (0 executed, 2 resumed), 0 not ok"
    assert lines[3] == f"  results:   {out / 'results'}/"
    assert lines[4] == f"  notebooks: {out / 'runs'}/"
    (rec,) = build_report(load_sweep(out)).recommendations  # what the command prints is the report's
    assert lines[5] == f"recommendation (gpt-tiny): {rec.precision} — {short_reason(rec)}" and len(lines) == 6
    assert "FAILED" not in captured.err and "interrupted" not in captured.err
    # --no-report: no summary.md, report.*, figures/; only the grid it was asked for, and no lock left behind
    assert sorted(p.name for p in out.iterdir()) == ["results", "sweep.json"]
    names = [RunConfig(**r.config).name for r in load_sweep(out)]
    assert json.loads((out / "sweep.json").read_text()) == {"runs": sorted(names, key=lambda n: "bf16" in n)}


def test_the_printed_recommendations_are_those_of_the_returned_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0},
                    grid={"lr": [0.001, 0.003]})  # fmt: skip
    argv = ["--out", str(out), "--precisions", "fp32,bf16", *ARGS, "-p", "lr=1e-3,3e-3", *NO_KERNEL]
    assert main([*argv, "--no-report", "--tolerance", "0.1"]) == 0
    printed = _recommendation_lines(capsys.readouterr().out)
    result = sweep(out, ["fp32", "bf16"], [0], [*PARAMS, "lr=1e-3,3e-3"], report=False, tolerance=0.1,
                   settings=NO_KERNEL_SETTINGS, speed_budget=0)  # fmt: skip
    recs = result.report.recommendations
    assert [r.setting for r in recs] == ["gpt-tiny lr=0.001", "gpt-tiny lr=0.003"]
    assert printed == [f"recommendation ({r.setting}): {r.precision} — {short_reason(r)}" for r in recs]
    assert result.report.tolerance == 0.1 and len(printed) == 2


def test_resumed_sweep_with_a_diverged_run_exits_1_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "fp16-mixed": "diverged"}, {"fp32": 1000.0, "fp16-mixed": 3000.0})
    argv = ["--out", str(out), "--precisions", "fp32,fp16-mixed", *ARGS, *NO_KERNEL, "--no-report"]
    assert main([*argv, "--tolerance", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "(0 executed, 2 resumed), 1 not ok" in captured.out
    assert "recommendation (gpt-tiny): fp32 — stay in fp32" in captured.out
    fp16 = next(r for r in load_sweep(out) if r.config["precision"] == "fp16-mixed")
    assert captured.err.splitlines()[-1] == f"FAILED diverged {RunConfig(**fp16.config).name}: diverged: first line"


def test_cli_force_report_kernel_and_tolerance_reach_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    runs = _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0},
                           seeds=(0, 1))  # fmt: skip
    bf16_runs = [r for r in runs if r.parameters["precision"] == "bf16-mixed"]
    for run in bf16_runs:  # bf16's two seeds: eval loss +5% over fp32's
        bf16 = RunResult.load(run.result_path)
        replace(bf16, metrics=replace(bf16.metrics, eval_loss=2.1)).save(run.result_path)
    base = ["--out", str(out), "--precisions", "fp32,bf16", "--seeds", "0,1", *ARGS, *NO_KERNEL]
    assert main([*base, "--tolerance", "0.1"]) == 1  # the report notebook cannot start
    captured = capsys.readouterr()
    assert "recommendation (gpt-tiny): bf16-mixed — " in captured.out  # +5% is within a 10% tolerance
    report_error = [line for line in captured.err.splitlines() if line.startswith("report failed:")]
    assert report_error == [
        (
            f"report failed: report notebook failed ({out.resolve() / 'report.ipynb'}): {DEAD_KERNEL_ERROR}"
        )
    ]
    assert "±10% of fp32's" in (out / "summary.md").read_text()
    assert main([*base, "--no-report"]) == 0
    assert (
        "recommendation (gpt-tiny): fp32 — stay in fp32: bf16-mixed worse by 5.0%, faster 1.50x" in capsys.readouterr().out
    )  # not within 2%
    replace(bf16, status="failed", error="x").save(bf16_runs[1].result_path)
    assert main([*base, "--no-report"]) == 1  # the failed run is retried (and fails: no kernel)
    assert "4 of 4 runs done (1 executed, 3 resumed), 1 not ok" in capsys.readouterr().out
    assert main([*base, "--no-report", "--force"]) == 1
    assert "4 of 4 runs done (4 executed, 0 resumed), 4 not ok" in capsys.readouterr().out


def test_cli_without_a_baseline_recommends_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"bf16-mixed": "ok"}, {"bf16-mixed": 1500.0})
    assert main(["--out", str(out), "--precisions", "bf16", *ARGS, *NO_KERNEL, "--no-report", "--workers", "1"]) == 0
    out_text = capsys.readouterr().out
    assert "1 of 1 runs done (0 executed, 1 resumed), 0 not ok" in out_text  # --workers 1 is accepted
    (rec,) = build_report(load_sweep(out)).recommendations
    assert rec.precision is None and f"recommendation (gpt-tiny): none — {short_reason(rec)}\n" in out_text


# --- end to end: a real two-precision sweep (train.ipynb twice, compare.ipynb once) ---

TINY = ["-p", "steps=8", "-p", "timing_warmup_steps=2", "-p", "batch_size=4", "-p", "seq_len=32", "-p", "log_every=2"]
QUIET = ["-p", "wandb_mode=disabled"]  # W&B itself is tested in test_tracking; here it would only cost time
TWO = ["--precisions", "fp32,bf16-mixed", "--seeds", "0", "-p", "device=cpu", *TINY, *QUIET, "--speed-budget", "0"]


def _two_names(out: Path) -> list[str]:
    """The run names of TWO's grid in `out`: readable, then the config's identity."""
    grid = parse_params(["device=cpu", *(v for v in TINY if v != "-p"), "wandb_mode=disabled"])  # TWO's order
    return [r.name for r in expand_grid(out, CPU, ["fp32", "bf16-mixed"], [0], grid)]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One two-precision sweep with the report, run by `main` with a relative --out; its folder and stdout."""
    root, cwd = tmp_path_factory.mktemp("sweeps"), os.getcwd()
    stdout = io.StringIO()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(stdout):
            assert main(["--out", "two", *TWO]) == 0
    finally:
        os.chdir(cwd)
    return root / "two", stdout.getvalue()


@pytest.mark.notebook
def test_two_precision_sweep_writes_results_notebooks_and_report(real_sweep: tuple[Path, str]) -> None:
    sweep_dir, _ = real_sweep
    names = _two_names(sweep_dir)
    assert [n.split("-s0-")[0] for n in names] == ["gpt-tiny-fp32", "gpt-tiny-bf16-mixed"]
    for name in names:
        result = RunResult.load(sweep_dir / "results" / f"{name}.json")
        assert result.ok and result.config["steps"] == 8 and name.startswith(result.config["run_name"])
        assert (sweep_dir / "runs" / f"{name}.ipynb").exists()
    assert {r.plan.effective for r in load_sweep(sweep_dir)} == {"fp32", "bf16-mixed"}
    summary = (sweep_dir / "summary.md").read_text()
    assert "| fp32 | fp32 | ok |" in summary and "| bf16-mixed | bf16-mixed | ok |" in summary
    assert "## Answer\n\n" in summary
    html = (sweep_dir / "report.html").read_text()
    assert "amp-verdicts" in html and "Every measurement" in html and "data:image/png;base64" in html
    report_nb = json.loads((sweep_dir / "report.ipynb").read_text())
    assert report_nb["metadata"]["papermill"]["parameters"]["sweep_dir"] == str(sweep_dir.resolve())
    assert "report_view" not in html and "Not in this report" not in html  # a report: code hidden, nothing left out
    figures = {p.name for p in (sweep_dir / "figures").glob("*.png")}  # which figures: test_plots' business
    assert {"loss.png", "throughput_memory.png"} <= figures


@pytest.mark.notebook
def test_the_sweep_prints_its_counts_report_files_and_recommendation(real_sweep: tuple[Path, str]) -> None:
    sweep_dir, stdout = real_sweep
    lines = stdout.splitlines()
    start = lines.index("sweep two: 2 of 2 runs done (2 executed, 0 resumed), 0 not ok")
    out = sweep_dir.resolve()
    names = sorted(p.stem for p in (out / "figures").glob("*.png"))
    figures = [f"  figure:{n}: {out / 'figures' / n}.png" for n in names]
    assert len(names) >= 2 and lines[start + 1 : start + 6 + len(names)] == [
        "  results:   two/results/",
        "  notebooks: two/runs/",
        f"  summary:   {out / 'summary.md'}",
        f"  notebook:  {out / 'report.ipynb'}",
        f"  html:      {out / 'report.html'}",
        *figures,
    ]
    assert [line for line in lines[: start - 1] if line] == [
        f"ok       {n}" for n in _two_names(sweep_dir)
    ]
    # The recommendation printed and summary.md both come from the report sweep() computes once.
    resumed = sweep(sweep_dir, ["fp32", "bf16-mixed"], [0], [*(v for v in TINY if v != "-p"), "device=cpu",
                    "wandb_mode=disabled"], report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)  # fmt: skip
    assert [o.resumed for o in resumed.outcomes] == [True, True]
    assert (sweep_dir / "summary.md").read_text(encoding="utf-8") == summary_markdown(resumed.report)
    recs = resumed.report.recommendations
    assert _recommendation_lines(stdout) == [f"recommendation ({r.setting}): {r.precision} — {short_reason(r)}" for r in recs]
    assert len(recs) == 1 and lines[-1] == _recommendation_lines(stdout)[0]


@pytest.mark.notebook
def test_rerun_resumes_without_executing_finished_runs(
    real_sweep: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    sweep_dir, _ = real_sweep
    def state() -> tuple[dict[str, int], dict[str, bytes]]:
        kept = {p.name: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file() and p.parent.name in ("results", "runs")}
        shown = {p.name: p.read_bytes() for p in sweep_dir.glob("*") if p.is_file() and p.name != ".sweep.lock"}
        return kept, shown

    before = state()
    assert main(["--out", str(sweep_dir), *TWO, *NO_KERNEL, "--no-report"]) == 0
    # no run re-run; the report, marked STALE while the sweep ran, is as it was once nothing changed
    assert state() == before
    assert "2 of 2 runs done (0 executed, 2 resumed)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.timeout(240)  # were --timeout lost, the run would train for hours
def test_a_cell_running_past_timeout_fails_its_run_with_the_limit_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 100000 steps would take hours: the training cell is stopped at --timeout (the imports take well under it).
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "-p", "device=cpu", "-p", "steps=100000", *QUIET]
    assert main([*argv, "--timeout", "15", "--no-report"]) == 1
    (result,) = load_sweep(tmp_path / "sw")
    assert result.status == "failed" and "timed out" in result.error and "after 15 seconds" in result.error
    name = re.escape(result.config["run_name"])
    assert re.search(rf"FAILED failed   {name}-[0-9a-f]{{8}}: .*timed out", capsys.readouterr().err)


# --- refused before any kernel starts: every problem, one line each, nothing written ---


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run the command (with the real kernel name: a kernel started by mistake would show as results) and
    return its error lines; it must exit 2 and print nothing on stdout."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert all(line.startswith("error: ") for line in lines)
    return [line.removeprefix("error: ") for line in lines]


def test_every_bad_value_is_listed_before_any_kernel_starts_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    argv = ["--out", str(out), "--precisions", "fp32,bf16", "--seeds", "0,1", "-p", "device=cpu"]
    assert _refused([*argv, "-p", "batch_size=0,-1", "-p", "lr=1e-3,-1", "-p", "wandb_mode=loud"], capsys) == [
        "batch_size=0 must be >= 1",
        "invalid wandb_mode 'loud'; valid values are: offline, online, disabled",
        "lr=-1.0 must be a positive finite number",
        "batch_size=-1 must be >= 1",
    ]  # 16 runs planned, 4 distinct problems, no kernel
    assert not out.exists()
    assert _refused([*argv, "--tolerance", "inf", "-p", "stepz=1", "--precisions", "fp33,fp16"], capsys) == [
        "tolerance=inf must be a finite number >= 0 (relative, e.g. 0.02 for 2%)",
        "invalid precision 'fp33'; valid values are: " + ", ".join(valid_precision_names()),
        "unknown parameter 'stepz'; valid names: "
        + ", ".join(n for n in parameter_names() if n not in ("precision", "seed", "run_name", "out_dir")),
    ]
    assert _refused(["--out", str(out), "--precisions", "", "--seeds", ""], capsys) == [
        "--precisions is empty; valid values are: " + ", ".join(valid_precision_names()),
        "--seeds is empty; expected comma-separated ints, e.g. 0 or 0,1,2",
    ]
    assert _refused(["--out", str(out), "--timeout", "0"], capsys) == ["invalid --timeout 0.0; expected seconds > 0"]
    # Any positive limit is taken, a fraction of a second too: the next problem is the one reported.
    assert _refused(["--out", str(out), "--timeout", "0.5", "--workers", "0"], capsys) == [
        "invalid --workers 0; expected >= 1"
    ]
    assert _refused(["--out", str(out), "-p", "steps=5", "-p", "timing_warmup_steps=5"], capsys) == [
        "timing_warmup_steps=5 must be less than steps=5 (nothing left to time)"
    ]
    assert not out.exists()


def test_a_default_that_depends_on_the_steps_follows_them(tmp_path: Path) -> None:
    # -p steps=5 used to fail in every kernel on the CPU default timing_warmup_steps=8
    result = sweep(tmp_path / "sw", ["fp32"], [0], ["device=cpu", "steps=5"], report=False, settings=NO_KERNEL_SETTINGS, speed_budget=0)
    (saved,) = load_sweep(result.out)
    assert saved.config["steps"] == 5 and saved.config["timing_warmup_steps"] == 1
    assert saved.error == DEAD_KERNEL_ERROR  # it got as far as the kernel


def test_a_user_model_module_must_be_importable_from_here_before_any_kernel_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["--out", "sw", "--precisions", "fp32", "-p", "device=cpu"]
    assert _refused([*argv, "-p", "model=my_models:build"], capsys) == [
        (
            f"model='my_models:build': no module named 'my_models' in {tmp_path} (the kernels' PYTHONPATH) or the "
            "installed packages"
        )
    ]
    (tmp_path / "my_models.py").write_text("def build(config): ...\n")
    assert (
        main([*argv, "-p", "model=my_models:build", *NO_KERNEL, "--no-report"]) == 1
    )  # accepted: the kernel is missing
    # An installed package is found however it is installed; `pip install -e .` puts no folder on sys.path
    # (a meta-path finder serves it), so take the checkout off sys.path as when the CLI runs elsewhere.
    checkout = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != checkout])
    assert main([*argv, "-p", "model=amp_lib.examples:linear_regression", *NO_KERNEL, "--no-report"]) == 1
    # Every model of the grid is checked, built-in ones skipped; the module is what precedes the first ":",
    # as the kernel reads it (amp_lib.models); a package's module is found by its top package.
    capsys.readouterr()
    assert _refused([*argv, "-p", "model=gpt-tiny,nowhere:build:x"], capsys) == [
        (
            f"model='nowhere:build:x': no module named 'nowhere' in {tmp_path} (the kernels' PYTHONPATH) or the "
            "installed packages"
        )
    ]
    # The kernels' folder is the one checked, wherever this process runs from.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    kept = sweep(tmp_path / "sw2", ["fp32"], [0], ["device=cpu", "model=my_models:build"], report=False,
                 settings=replace(NO_KERNEL_SETTINGS, workdir=str(tmp_path)))  # fmt: skip
    assert [o.status for o in kept.outcomes] == ["failed"]  # accepted: the kernel is missing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "models.py").write_text("def build(config): ...\n")
    assert main([*argv, "-p", "model=my_pkg.models:build", *NO_KERNEL, "--no-report"]) == 1


@pytest.mark.parametrize("layout", ["out-is-a-file", "results-is-a-file", "runs-is-a-file", "out-under-a-file"])
def test_an_output_path_that_is_a_file_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    out = tmp_path / "sw"
    blocker = {"out-is-a-file": out, "results-is-a-file": out / "results", "runs-is-a-file": out / "runs",
               "out-under-a-file": tmp_path / "file"}[layout]  # fmt: skip
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    if layout == "out-under-a-file":
        out = blocker / "sw"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert _refused(["--out", str(out), "--precisions", "fp32", "-p", "device=cpu"], capsys) == [
        f"--out {out}: {blocker} is a file, not a folder"
    ]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


# --- one sweep per folder: the lock ---

HOLD_LOCK = """
import sys, time
from amp_lib.sweep.lock import SweepLock
lock = SweepLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_second_sweep_on_a_held_folder_exits_2_naming_the_holder_and_a_killed_holder_blocks_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok"}, {"fp32": 1.0})
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert (out / LOCK_NAME).read_text() == f"{holder.pid}\n"
        argv = ["--out", str(out), "--precisions", "fp32", *ARGS, *NO_KERNEL, "--no-report"]
        assert _refused(argv, capsys) == [
            f"--out {out} is in use by another sweep (pid {holder.pid}); wait for it to finish, stop it, or use another --out"
        ]
        with pytest.raises(FolderLocked) as info:
            sweep(out, ["fp32"], [0], PARAMS, settings=NO_KERNEL_SETTINGS, speed_budget=0)
        assert info.value.holder == holder.pid and info.value.folder == out
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "results"]  # the refused sweep wrote nothing
    finally:
        holder.kill()  # SIGKILL: no chance to unlock or clean up
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed holder...
    assert main(argv) == 0  # ...and blocks nothing: flock died with its process
    assert "1 of 1 runs done (0 executed, 1 resumed)" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()  # a sweep that ends removes its lock file


# --- what a report covers: readable results of the grid asked for, everything else named ---


def test_a_truncated_or_foreign_json_never_breaks_the_sweep_and_is_named_in_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0})
    argv = ["--out", str(out), "--precisions", "fp32,bf16", *ARGS, *NO_KERNEL]
    main(argv)  # the report: summary.md; the notebook fails (no kernel)
    (out / "report.html").write_text("<html><body><p>an old report</p></body></html>")
    fresh = (out / "summary.md").read_text()
    assert "Not in this report" not in fresh and "STALE" not in fresh
    (out / "results" / "truncated.json").write_text('{"schema_version": 2, "config": {"precision"')
    (out / "results" / "hello.json").write_text('{"hello": 1}')
    capsys.readouterr()
    assert main([*argv, "--no-report"]) == 0  # no traceback, no JSONDecodeError
    assert "2 of 2 runs done (0 executed, 2 resumed), 0 not ok" in capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary.startswith("> **STALE:** the results changed since it was written and --no-report skipped")
    assert summary.endswith(fresh)  # the old text, marked, never silently old
    assert '<div id="amp-stale"' in (out / "report.html").read_text()
    result = sweep(out, ["fp32", "bf16"], [0], PARAMS, settings=NO_KERNEL_SETTINGS, speed_budget=0)  # with the report: rebuilt
    summary = (out / "summary.md").read_text()
    assert "STALE" not in summary and len(result.report.results) == 2
    assert summary.endswith(
        "\n## Not in this report\n\n"
        "- not read: hello.json: not an AMP Workbook result (no schema_version)\n"
        "- not read: truncated.json: not valid JSON, truncated or corrupt (Expecting ':' delimiter at line 1 column 45)\n"
    )
    html = (out / "report.html").read_text()  # papermill wrote report.ipynb before failing: exported afresh...
    assert "an old report" not in html and "truncated.json: not valid JSON" in html
    assert "<b>STALE:</b> the report notebook could not run (FileNotFoundError" in html  # ...and marked: it failed


def test_a_second_sweep_into_the_folder_keeps_the_first_ones_results_and_names_them_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "st"
    first = _finished_sweep(out, {"fp32": "ok"}, {"fp32": 1000.0}, grid={"lr": [1e-3, 3e-3]})
    kept = {r.result_path: r.result_path.read_bytes() for r in first}
    result = sweep(out, ["fp32", "bf16"], [0], [*PARAMS, "lr=1e-3"], settings=NO_KERNEL_SETTINGS, speed_budget=0)
    fp32, bf16 = result.outcomes
    assert (fp32.name, fp32.status, fp32.resumed) == (first[0].name, "ok", True)  # the same config: the same file
    assert (bf16.status, bf16.resumed) == ("failed", False)
    assert {r.config.get("lr") for r in result.report.results} == {0.001}  # no lr=0.003 nobody asked for
    assert all(row.runs == 1 for row in result.report.table)  # never averaged in as extra seeds
    summary = (out / "summary.md").read_text()
    assert summary.endswith(
        "\n## Not in this report\n\n"
        f"- left out: {first[1].name}.json: from an earlier grid, not part of the one this sweep was last run with\n"
    )
    assert {p: p.read_bytes() for p in kept} == kept  # nothing of the first sweep was touched


def test_two_sweeps_that_differ_in_one_value_keep_both_results(tmp_path: Path) -> None:
    # issue 28: `-p steps=6` then `-p steps=8` into one folder used to overwrite the first run's result
    out = tmp_path / "q"
    six = _finished_sweep(out, {"fp32": "ok"}, {"fp32": 1000.0}, grid={"steps": [6]})
    eight = sweep(out, ["fp32"], [0], ["device=cpu", "steps=8", "wandb_mode=disabled"], report=False,
                  settings=NO_KERNEL_SETTINGS, speed_budget=0)  # fmt: skip
    assert RunResult.load(six[0].result_path).config["steps"] == 6  # still there, still steps=6
    (ran,) = eight.outcomes
    assert ran.name != six[0].name and "steps=8" in ran.name and "steps=6" in six[0].name
    assert load_sweep(out).notes == [
        f"left out: {six[0].name}.json: from an earlier grid, not part of the one this sweep was last run with"
    ]


# --- paths the sweep may not write to (as a user without rights: root ignores file modes) ---

AS_NOBODY = """
import sys
from amp_lib.sweep.cli import main
base = sys.argv[1]
args = ["--precisions", "fp32", "-p", "device=cpu", "--no-report"]
for out in (base + "/readonly/sw", base + "/mine/sw"):
    print("exit", main(["--out", out, *args]), flush=True)
"""


@pytest.mark.slow
def test_folders_without_write_permission_are_refused_before_any_run_for_a_non_root_user(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to run the sweep as the unprivileged user 'nobody'")
    base = Path(tempfile.mkdtemp(prefix="amp-perm-"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o755)
        (base / "readonly").mkdir(mode=0o755)  # owned by root: nobody may not create sw/ in it
        (base / "mine" / "sw" / "results").mkdir(parents=True)
        (base / "home").mkdir()
        os.chown(base / "mine" / "sw", 65534, -1)  # nobody's sweep folder, but its results/ is root's
        os.chown(base / "home", 65534, -1)
        env = {**os.environ, "HOME": str(base / "home"), "MPLCONFIGDIR": str(base / "home")}
        as_nobody = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c"]
        probe = subprocess.run(
            [*as_nobody, "import amp_lib"], capture_output=True, text=True, timeout=60, env=env, cwd=str(base), check=False,
        )  # fmt: skip
        if probe.returncode != 0:  # a checkout (or venv) inside a folder only root may enter, e.g. under /root
            reason = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[-1]
            pytest.skip(f"the user 'nobody' cannot run {sys.executable} and import amp_lib here: {reason}")
        done = subprocess.run(
            [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", AS_NOBODY, str(base)],
            capture_output=True, text=True, timeout=120, env=env, cwd=str(base), check=False,
        )  # fmt: skip
        assert done.stdout.splitlines() == ["exit 2", "exit 2"], done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: --out {base}/readonly/sw: no permission to create it in {base}/readonly",
            f"error: --out {base}/mine/sw: no permission to write in {base}/mine/sw/results",
        ]
        assert "Traceback" not in done.stderr
        assert list((base / "readonly").iterdir()) == [] and list((base / "mine" / "sw" / "results").iterdir()) == []
        assert sorted(p.name for p in (base / "mine" / "sw").iterdir()) == ["results"]  # no lock, no runs/
    finally:
        shutil.rmtree(base)


MY_MODELS = """
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn


def build(config):
    seen = {"tmp": tempfile.gettempdir(), "cwd": os.getcwd(), "concurrent": os.environ.get("AMP_WORKBOOK_CONCURRENT_RUNS")}
    with open(os.path.join(os.environ["SEEN_DIR"], "kernel.json"), "w") as fh:
        json.dump(seen, fh)
    gen = torch.Generator().manual_seed(config.seed)
    w = torch.randn(8, 1, generator=gen)
    xs = torch.randn(4, config.batch_size, 8, generator=gen)
    return nn.Linear(8, 1), [(x, x @ w) for x in xs], F.mse_loss
"""


@pytest.mark.notebook
def test_a_user_module_beside_the_user_trains_in_the_kernel_and_wandb_names_its_folder_after_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_env: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    monkeypatch.setenv("SEEN_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the kernel runs in sw/runs/: only PYTHONPATH lets it import my_models
    argv = ["--out", "sw", "--precisions", "fp32", "-p", "device=cpu", "-p", "model=my_models:build", *TINY,
            "-p", "wandb_mode=offline", "--no-report"]  # fmt: skip
    assert main(argv) == 0
    (result,) = load_sweep(tmp_path / "sw")
    assert result.ok and result.config["model"] == "my_models:build" and result.plan.concurrent_runs == 1
    (folder,) = (wandb_env / "wandb_dir" / "wandb").glob("offline-run-*")
    # named after the run (W&B shortens a long name: its readable part, then its own id)
    assert re.fullmatch(r"offline-run-\d{8}_\d{6}-my_models_build-fp32-s0-[\w-]+-\d{10}", folder.name)
    seen = json.loads((tmp_path / "kernel.json").read_text())  # what the kernel itself saw
    assert seen["cwd"] == str((tmp_path / "sw" / "runs").resolve()) and seen["concurrent"] == "1"
    assert Path(seen["tmp"]).name.startswith("amp-run-") and not Path(seen["tmp"]).exists()  # its temp folder: gone
    assert "without encryption" not in capfd.readouterr().err  # the kernel's own stderr: fd 2, not sys.stderr


class BreakResultsOnFirstOutcome(io.StringIO):
    """A stdout that, when the first run's outcome is printed, turns `<out>/results` into a file."""

    def __init__(self, results: Path) -> None:
        super().__init__()
        self.results = results

    def write(self, text: str) -> int:
        if text.startswith("failed") and self.results.is_dir():
            shutil.rmtree(self.results)
            self.results.write_text("a file now")
        return super().write(text)


def test_a_folder_broken_under_a_running_sweep_ends_in_one_error_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    stdout = BreakResultsOnFirstOutcome(out / "results")
    monkeypatch.setattr(sys, "stdout", stdout)
    argv = ["--out", str(out), "--precisions", "fp32,bf16", *ARGS, *NO_KERNEL, "--no-report"]
    assert main(argv) == 1  # the second run cannot write its result: the folder is a file now
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"error: File exists: {out / 'results'}; finished results are kept"
    assert _refused(argv, capsys) == [f"--out {out}: {out / 'results'} is a file, not a folder"]  # next time: refused


# --- end to end: an optimizer axis, one row per optimizer in one report --------------------------------------


@pytest.mark.slow  # torchao compiles the 8-bit optimizer's step in each kernel
@pytest.mark.notebook
def test_a_sweep_over_two_optimizers_gives_both_rows_of_one_setting_with_verdicts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "opt"), "--precisions", "fp32", "--seeds", "0,1", "-p", "device=cpu",
            "-p", "optimizer=adamw,adamw-8bit", *TINY, *QUIET, "--speed-budget", "0"]  # fmt: skip
    assert main(argv) == 0
    results = load_sweep(tmp_path / "opt")
    assert sorted((r.optimizer, r.seed, r.status) for r in results) == [
        ("adamw", 0, "ok"), ("adamw", 1, "ok"), ("adamw-8bit", 0, "ok"), ("adamw-8bit", 1, "ok")]  # fmt: skip
    report = build_report(results)
    assert [(g.name, g.runs) for g in report.groups] == [("fp32", 2), ("fp32 adamw-8bit", 2)]
    base, eight_bit = report.groups
    assert base.is_baseline and len(report.recommendations) == 1  # one setting: the optimizer is a row of it
    assert eight_bit.seeds_used == 2 and eight_bit.loss_diff is not None  # judged against fp32 adamw, paired by seed
    assert eight_bit.verdict not in (R_NO_BASELINE, "baseline") and eight_bit.speed_verdict != "—"
    assert eight_bit.optimizer_saved_mb > 0  # gpt-tiny's larger weights keep 8-bit state: less than fp32 adamw's
    summary = (tmp_path / "opt" / "summary.md").read_text()
    assert "| fp32 adamw-8bit | 2 |" in summary  # its verdict row, both seeds
    assert "| optimizer state vs fp32 |" in summary and "| saves " in summary
    assert "recommendation (gpt-tiny): " in capsys.readouterr().out
