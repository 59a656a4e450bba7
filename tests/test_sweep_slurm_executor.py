"""`amp_lib.sweep.slurm_executor`: the options it checks, what a job the scheduler ended becomes, and a
real sweep on a real single-node Slurm (munged, slurmctld, slurmd started by scripts/slurm/cluster.sh
once for this module, stopped by pid afterwards) through submitit: a run finished, a run killed at its
time limit recorded `failed` with Slurm's reason and re-run on resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from amp_lib.config import RunConfig
from amp_lib.precision import Capabilities
from amp_lib.results import RunResult, load_sweep
from amp_lib.sweep.cli import main, sweep
from amp_lib.sweep.execute import Settings, run_sweep, scratch_folders
from amp_lib.sweep.grid import expand_grid, parse_params
from amp_lib.sweep.slurm_executor import (
    EXTRA,
    SlurmExecutor,
    ended_state,
    gpus_for,
    parse_sbatch,
    scheduler_reason,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"
CPU = Capabilities(device_type="cpu", device_name="test-cpu")
LOGS = Path("/out/runs/slurm/r")


# --- what a job Slurm ended becomes ---


@pytest.mark.parametrize(
    ("state", "reason", "said", "why"),
    [
        ("TIMEOUT", "TimeLimit", "TIMEOUT, reason TimeLimit", "it reached its time limit of 3 min (--slurm-time)"),
        ("PREEMPTED", "None", "PREEMPTED", "it was pre-empted"),
        ("CANCELLED by 0", "", "CANCELLED", "it was cancelled"),  # sacct's spelling
        ("NODE_FAIL", "NodeDown", "NODE_FAIL, reason NodeDown", "its node failed"),
        ("OUT_OF_MEMORY", "OutOfMemory", "OUT_OF_MEMORY, reason OutOfMemory", "it ran out of memory"),
        ("COMPLETED", "(null)", "COMPLETED", "it ended without the run's result"),
        ("", "", "UNKNOWN", "it ended without the run's result"),  # neither squeue nor sacct knew the job
    ],
)
def test_a_job_slurm_ended_is_recorded_with_its_state_reason_and_logs(
    state: str, reason: str, said: str, why: str
) -> None:
    assert scheduler_reason("7", state, reason, 3, LOGS) == (
        f"Slurm job 7 ended {said}: {why} before the run finished; job logs in /out/runs/slurm/r"
    )


def test_a_job_has_ended_when_squeue_or_sacct_says_so_or_neither_knows_it() -> None:
    def never() -> str:
        raise AssertionError("sacct asked about a job squeue knows")

    assert ended_state("5", {"5": ("RUNNING", "None")}, never) is None
    assert ended_state("5", {"5": ("COMPLETING", "TimeLimit")}, never) is None  # still being killed
    assert ended_state("5", {"5": ("PENDING", "Priority")}, never) is None
    assert ended_state("5", {"5": ("TIMEOUT", "TimeLimit")}, never) == ("TIMEOUT", "TimeLimit")
    assert ended_state("5", {}, lambda: "CANCELLED by 1000") == ("CANCELLED", "")  # aged out of squeue
    assert ended_state("5", {}, lambda: "RUNNING") is None
    assert ended_state("5", {}, lambda: "UNKNOWN") == ("UNKNOWN", "")  # neither knows it: gone
    assert ended_state("5", {}, lambda: "") == ("UNKNOWN", "")
    assert ended_state("5", {}, lambda: "  \n") == ("UNKNOWN", "")  # sacct printed only blanks
    assert ended_state("5", {"5": ("", "")}, never) is None  # squeue lists it, state not yet filled in


# --- options: checked before anything runs ---


def test_sbatch_options_are_key_value_pairs_without_dashes() -> None:
    assert parse_sbatch(["mem=16G", "--qos=high", "constraint=a100|h100"]) == {
        "mem": "16G", "qos": "high", "constraint": "a100|h100"
    }  # fmt: skip
    assert parse_sbatch(["comment=a=b"]) == {"comment": "a=b"}  # the value may hold '='
    for bad in ("mem", "=16G", "mem=", "Mem=1", "me m=1"):
        with pytest.raises(ValueError, match=rf"invalid --sbatch '{bad}'; expected KEY=VALUE, an sbatch option"):
            parse_sbatch([bad])


def test_a_job_asks_for_the_gpus_given_or_nproc_for_a_cuda_run(tmp_path: Path) -> None:
    cpu_run, cuda_run, auto_run = (
        expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": [device], "nproc": [4]})[0]
        for device in ("cpu", "cuda", "auto")
    )
    assert [gpus_for(r, None) for r in (cpu_run, cuda_run, auto_run)] == [0, 4, 0]
    assert [gpus_for(r, 2) for r in (cpu_run, cuda_run, auto_run)] == [2, 2, 2]
    options = SlurmExecutor("gpu", 30, None, {"mem": "8G"}).sbatch_options(cuda_run)
    assert options == {
        "job_name": cuda_run.name, "time": 30, "additional_parameters": {"mem": "8G"}, "signal_delay_s": 0,
        "partition": "gpu", "gpus_per_node": 4,
    }  # fmt: skip
    assert "gpus_per_node" not in SlurmExecutor().sbatch_options(cpu_run)
    assert SlurmExecutor(gpus_per_run=2).sbatch_options(cpu_run)["gpus_per_node"] == 2  # --slurm-gpus-per-run wins
    # Without `-p nproc=` a cuda run asks for one GPU; without `-p device=` (auto) for none.
    (one,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": ["cuda"]})
    (plain,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {})
    assert "nproc" not in one.parameters and "device" not in plain.parameters
    assert [gpus_for(one, None), gpus_for(plain, None)] == [1, 0]


def test_the_smallest_valid_time_limit_and_gpu_count_are_accepted() -> None:
    assert SlurmExecutor(time_min=1, gpus_per_run=0).problems() == []


def test_bad_slurm_options_exit_2_one_line_each_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "-p", "device=cpu"]  # the default kernel
    assert main([*argv, "--slurm-time", "5", "--sbatch", "mem=1G"]) == 2  # slurm options, local executor
    assert main([*argv, "--executor", "slurm", "--slurm-time", "0", "--slurm-gpus-per-run", "-1", "--sbatch", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [
        "error: --slurm-time applies to --executor slurm, not local",
        "error: --sbatch applies to --executor slurm, not local",
    ]
    assert err[2:] == [
        "error: invalid --sbatch 'x'; expected KEY=VALUE, an sbatch option, e.g. mem=16G or qos=high",
        "error: invalid --slurm-time 0; expected minutes >= 1",
        "error: invalid --slurm-gpus-per-run -1; expected >= 0",
    ]
    assert not (tmp_path / "sw").exists()


def test_without_submitit_installed_the_sweep_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "submitit" else real(name, *a))
    assert f"--executor slurm needs submitit, which is not installed: {EXTRA}" in SlurmExecutor().problems()
    assert EXTRA == "pip install amp-workbook[slurm]"


def test_without_the_slurm_commands_the_sweep_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "--executor slurm needs the Slurm commands (sbatch, squeue) on PATH: run it on a login node"
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no sbatch, no squeue
    out = tmp_path / "sw"
    assert main(["--out", str(out), "--precisions", "fp32", "-p", "device=cpu", "--executor", "slurm"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {missing}"]
    assert not out.exists()
    with pytest.raises(ValueError) as refused:  # every problem, one per line
        SlurmExecutor(time_min=0).open()
    assert str(refused.value).splitlines() == ["invalid --slurm-time 0; expected minutes >= 1", missing]
    # Stand-ins that only exist (and refuse everything): one of the two is not enough; with both, the
    # check passes and Slurm is asked (`sbatch --test-only`), whose refusal is what is reported.
    for present in (["sbatch"], ["squeue"], ["sbatch", "squeue"]):
        folder = tmp_path / "-".join(present)
        folder.mkdir()
        for command in present:
            (folder / command).write_text("#!/bin/sh\necho 'sbatch: error: refused' >&2\nexit 1\n")
            (folder / command).chmod(0o755)
        monkeypatch.setenv("PATH", str(folder))
        with pytest.raises(ValueError) as refused:
            SlurmExecutor().open()
        assert (missing in str(refused.value)) == (len(present) == 1), present


# --- a real single-node Slurm ---


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _jobs_still_running(timeout: float) -> str:
    """squeue's lines for this cluster's running or pending jobs, once there are none or at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        listed = subprocess.run(
            ["squeue", "--noheader", "--states=RUNNING,PENDING,COMPLETING"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if not listed or time.monotonic() > deadline:
            return listed
        time.sleep(0.5)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """munged + slurmctld + slurmd for this module (scripts/slurm/cluster.sh up), SLURM_CONF pointing at
    them; afterwards `cluster.sh down` and a check, by pid, that none of the three is left."""
    if os.geteuid() != 0:
        pytest.skip("a real Slurm needs root (slurmd starts job steps as their users); run the tests as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and there is no apt-get to install it (Debian/Ubuntu only)")
    state = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(CLUSTER), "up", str(state)], capture_output=True, text=True, timeout=600, check=False)
    assert up.returncode == 0, up.stderr
    info = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    pids = [int(p) for p in info["PIDS"].split()]
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = info["SLURM_CONF"]
    try:
        yield info
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        subprocess.run([str(CLUSTER), "down", str(state)], timeout=60, check=True)
        assert [pid for pid in pids if _alive(pid)] == [], "Slurm daemons left running"


SLOW_ONCE = """
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MARKER = Path(__file__).with_name("slow_once.started")


def build(config):
    # Seed 1's first attempt outlives any time limit; once the marker exists, every attempt is quick.
    if config.seed == 1 and not MARKER.exists():
        MARKER.write_text("started")
        time.sleep(3600)
    gen = torch.Generator().manual_seed(config.seed)
    w = torch.randn(8, 1, generator=gen)
    xs = torch.randn(4, config.batch_size, 8, generator=gen)
    return nn.Linear(8, 1), [(x, x @ w) for x in xs], F.mse_loss
"""
PARAMS = ["device=cpu", "model=slow_once:build", "steps=4", "timing_warmup_steps=1", "batch_size=2", "log_every=2",
          "profile_step=false", "wandb_mode=disabled"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.notebook
def test_a_sweep_through_submitit_records_a_timed_out_job_as_failed_and_reruns_it_on_resume(
    slurm_cluster: dict[str, str], tmp_path: Path
) -> None:
    # One sweep, two jobs at once: seed 0 finishes, seed 1 sleeps past its 1-minute limit (Slurm checks
    # time limits every 30 s, so this takes 60-90 s: the other run's job overlaps it).
    (tmp_path / "slow_once.py").write_text(SLOW_ONCE)
    out, settings = tmp_path / "sw", Settings(workdir=str(tmp_path))
    names = [r.name for r in expand_grid(out, CPU, ["fp32"], [0, 1], parse_params(PARAMS))]
    assert [n.split("-", 3)[:3] for n in names] == [["slow_once.build", "fp32", "s0"], ["slow_once.build", "fp32", "s1"]]
    start = time.monotonic()
    first = sweep(out, ["fp32"], [0, 1], PARAMS, report=False, settings=settings, executor=SlurmExecutor(time_min=1))
    assert time.monotonic() - start >= 60  # seed 1 really ran into its limit
    assert [(o.name, o.status) for o in first.outcomes] == [(names[0], "ok"), (names[1], "failed")]
    assert first.exit_code == 1
    timed_out = RunResult.load(out / "results" / f"{names[1]}.json")
    logs = out.resolve() / "runs" / "slurm" / names[1]
    assert timed_out.error.startswith("Slurm job ") and timed_out.error.endswith(
        f" ended TIMEOUT, reason TimeLimit: it reached its time limit of 1 min (--slurm-time) before the run"
        f" finished; job logs in {logs}"
    )
    assert timed_out.config["seed"] == 1 and timed_out.plan.effective == "fp32"
    assert list(logs.glob("*_0_log.err")) and list((out / "runs" / "slurm" / names[0]).glob("*_0_log.out"))
    assert (out / "runs" / f"{names[0]}.ipynb").exists()  # the notebook beside its job's logs
    ok_stamp = (out / "results" / f"{names[0]}.json").stat().st_mtime_ns
    again = sweep(out, ["fp32"], [0, 1], PARAMS, report=False, settings=settings, executor=SlurmExecutor(time_min=1))
    assert [(o.name, o.status, o.resumed) for o in again.outcomes] == [(names[0], "ok", True), (names[1], "ok", False)]
    assert (out / "results" / f"{names[0]}.json").stat().st_mtime_ns == ok_stamp  # the finished run: not re-run
    assert {RunConfig.from_dict(r.config).name: r.status for r in load_sweep(out)} == dict.fromkeys(names, "ok")
    assert _jobs_still_running(timeout=30) == ""  # each job ends soon after its run: none is left behind
    assert [
        run.name for run in expand_grid(out, CPU, ["fp32"], [0, 1], parse_params(PARAMS)) if scratch_folders(run)
    ] == []


@pytest.mark.slow
@pytest.mark.notebook
def test_ctrl_c_cancels_the_outstanding_jobs_and_keeps_the_finished_results(
    slurm_cluster: dict[str, str], ctrl_c_stdout: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "slow_once.py").write_text(SLOW_ONCE)  # seed 1's job sleeps until cancelled
    out = tmp_path / "sw"
    grid = expand_grid(out, CPU, ["fp32"], [0, 1], parse_params(PARAMS))
    monkeypatch.setattr("sys.stdout", ctrl_c_stdout(grid[0].name))  # Ctrl-C once seed 0 has finished
    executor = SlurmExecutor(time_min=5)
    executor.open()
    try:
        outcomes, interrupted = run_sweep(grid, Settings(workdir=str(tmp_path)), executor=executor)
    finally:
        executor.close()
    assert interrupted and [(o.name, o.status) for o in outcomes] == [(grid[0].name, "ok")]
    assert [RunConfig.from_dict(r.config).name for r in load_sweep(out)] == [grid[0].name]  # kept; the cancelled run wrote nothing
    assert not grid[1].result_path.exists()
    assert _jobs_still_running(timeout=30) == ""  # scancel'ed: no job is left in the queue
    assert scratch_folders(grid[1]) == []  # the temp folder the cancelled job could not remove: removed


@pytest.mark.slow
def test_options_slurm_refuses_stop_the_sweep_before_anything_is_written(
    slurm_cluster: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "-p", "device=cpu", "--executor", "slurm"]
    assert main([*argv, "--slurm-partition", "nosuch"]) == 2
    assert main([*argv, "--sbatch", "nosuchoption=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: Slurm refuses the sweep's jobs (--time=60 --partition=nosuch): ")
    assert "invalid partition specified: nosuch" in err[0].lower()
    # sbatch's own messages, on one line, one space apart, without its "sbatch: error: " labels
    said = subprocess.run(
        ["sbatch", "--test-only", "--time=60", "--partition=nosuch", "--wrap=true"],
        check=False, capture_output=True, text=True, timeout=60,
    ).stderr.splitlines()
    assert len(said) > 1 and said[0].startswith("sbatch: error: ")
    assert err[0].endswith("): " + " ".join(line.removeprefix("sbatch: error: ") for line in said))
    assert err[1].startswith("error: Slurm refuses the sweep's jobs (--time=60 --nosuchoption=1): ")
    assert not (tmp_path / "sw").exists()
