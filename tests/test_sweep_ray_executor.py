"""`amp_lib.sweep.ray_executor`: the options it checks, the resources each run's task asks for, and real
sweeps on one real local Ray instance (2 CPUs, started once for this module): end to end, resume, a
failing run isolated, Ctrl-C cancelling the outstanding tasks and keeping what finished."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amp_lib.config import RunConfig
from amp_lib.precision import Capabilities
from amp_lib.results import load_sweep
from amp_lib.sweep.cli import main, sweep
from amp_lib.sweep.execute import Settings, run_sweep, scratch_folders
from amp_lib.sweep.grid import SweepRun, expand_grid, parse_params
from amp_lib.sweep.ray_executor import EXTRA, RayExecutor, address_problems, task_resources, unreachable, wants_gpus

CPU = Capabilities(device_type="cpu", device_name="test-cpu")
# The tiniest real run: a few steps of gpt-tiny, one eval batch, no profiling, no W&B.
TINY = ["device=cpu", "steps=4", "timing_warmup_steps=1", "batch_size=2", "seq_len=16", "log_every=2",
        "eval_batches=1", "profile_step=false", "wandb_mode=disabled"]  # fmt: skip


# --- options: checked before anything runs ---


@pytest.mark.parametrize("address", [None, "auto", "10.0.0.5:6379", "ray://head.example.org:10001"])
def test_ray_addresses_ray_init_takes_are_accepted(address: str | None) -> None:
    assert address_problems(address) == []


@pytest.mark.parametrize("address", ["", "head", "http://head:8265", "ray://head", "head:port"])
def test_a_bad_ray_address_is_refused_with_the_accepted_forms(address: str) -> None:
    expected = f"invalid --ray-address {address!r}; expected auto, host:port or ray://host:port"
    assert address_problems(address) == [f"{expected} (leave it out to start a local Ray instance)"]


def test_the_command_refuses_ray_options_with_another_executor_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "-p", "device=cpu"]  # the default kernel
    assert main([*argv, "--ray-address", "auto"]) == 2
    assert main([*argv, "--executor", "ray", "--ray-address", "nowhere", "--workers", "2"]) == 2
    assert main([*argv, "--executor", "dask"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --ray-address applies to --executor ray, not local",
        "error: --workers applies to --executor local, not ray",
        "error: invalid --ray-address 'nowhere'; expected auto, host:port or ray://host:port (leave it out to start a"
        + " local Ray instance)",
        "error: invalid --executor 'dask'; valid values are: local, ray, slurm",
    ]
    assert not (tmp_path / "sw").exists()


def test_a_cluster_address_nothing_answers_at_is_refused_in_seconds_and_writes_nothing(tmp_path: Path) -> None:
    # The sweep as a user starts it, in a process of its own: this module's Ray instance, which another test may
    # have started in this process, is not there. The port is held bound, not listening: a connection is
    # refused, and no other process can take the port while the sweep probes it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert unreachable(f"ray://127.0.0.1:{port}", timeout=1.0) == (
            f"nothing answers at 127.0.0.1:{port} within 1 s (Connection refused)"
        )
        started = time.monotonic()
        argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "--speed-budget", "0", "-p", "device=cpu"]
        done = subprocess.run(
            [sys.executable, "-m", "amp_lib.sweep", *argv, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert time.monotonic() - started < 60  # Ray alone retries for minutes (this includes starting Python)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: --ray-address 127.0.0.1:{port}: cannot connect to Ray") and "nothing answers" in line
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_an_address_of_another_cluster_is_refused_where_ray_is_already_initialised(
    ray_instance: RayExecutor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    current = ray.get_runtime_context().gcs_address
    port = int(current.rpartition(":")[2])
    other = f"127.0.0.1:{port + 1 if port < 65535 else port - 1}"
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "--speed-budget", "0", "-p", "device=cpu"]
    assert main([*argv, "--executor", "ray", "--ray-address", other]) == 2
    refusal = (
        f"error: --ray-address {other}: Ray is already initialised in this process, connected to {current}; call"
        " ray.shutdown() first, or leave --ray-address out to use that cluster"
    )
    assert capsys.readouterr().err.splitlines() == [refusal]
    assert not (tmp_path / "sw").exists() and ray_is_running()
    same = RayExecutor(address=f"ray://localhost:{port}")  # the same cluster (its port): used, and left running
    same.open()
    same.close()
    assert ray_is_running()
    auto = RayExecutor(address="auto")
    auto.open()
    auto.close()
    assert ray_is_running()


def test_without_ray_installed_the_sweep_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert address_problems(None) == [f"--executor ray needs Ray, which is not installed: {EXTRA}"]
    assert EXTRA == "pip install amp-workbook[ray]"


# --- resources: what each run's task asks Ray for ---


def test_a_task_is_named_after_its_run_and_asks_for_one_cpu_and_its_gpus(tmp_path: Path) -> None:
    cpu_run, cuda_run, auto_run = (
        expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": [device], "nproc": [2]})[0]
        for device in ("cpu", "cuda", "auto")
    )
    assert task_resources(cpu_run, cluster_has_gpus=True) == {
        "name": cpu_run.name, "num_cpus": 1, "num_gpus": 0, "max_retries": 0
    }  # fmt: skip
    assert task_resources(cuda_run, cluster_has_gpus=False)["num_gpus"] == 2  # nproc GPUs, one per process
    assert task_resources(auto_run, cluster_has_gpus=True)["num_gpus"] == 2
    assert task_resources(auto_run, cluster_has_gpus=False)["num_gpus"] == 0
    (default,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": ["cuda:1"]})
    assert wants_gpus(default, False) and task_resources(default, False)["num_gpus"] == 1  # nproc defaults to 1
    # No `-p device=`: the run's device is `auto`, so it trains on a GPU where the cluster has one.
    (plain,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {})
    assert "device" not in plain.parameters
    assert [wants_gpus(plain, True), wants_gpus(plain, False)] == [True, False]


# --- real sweeps on one local Ray instance ---


def _processes() -> dict[int, tuple[int, int, bytes]]:
    """pid -> (parent pid, start time, command line) of every living (not zombie) process."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]), cmdline)
    return table


def _descendants(root: int) -> dict[int, tuple[int, bytes]]:
    """pid -> (start time, command line) of every living descendant of `root`."""
    table = _processes()
    found: dict[int, tuple[int, bytes]] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start, cmd) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, cmd)
                frontier.append(pid)
    return found


def _still_alive(seen: dict[int, tuple[int, bytes]], timeout: float) -> dict[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        table = _processes()
        alive = {pid: cmd for pid, (start, cmd) in seen.items() if pid in table and table[pid][1] == start}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def ray_is_running() -> bool:
    import ray

    return ray.is_initialized()


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayExecutor]:
    """One local Ray instance with 2 CPUs for the module, started and stopped the way a sweep without
    --ray-address does (`RayExecutor.open/close`); afterwards none of its processes and none of its
    session files are left."""
    pytest.importorskip("ray", reason=f"Ray is an optional extra: {EXTRA}")
    before = set(_descendants(os.getpid()))
    executor = RayExecutor(num_cpus=2)
    for attempt in range(2):
        try:
            executor.open()
            break
        except ValueError:
            # Ray gives its raylet a fixed 30 s to register, which a 2-core machine busy with other work
            # can miss: stop what the failed start left (ray.shutdown() does not know it), then once more.
            leftovers = {pid: v for pid, v in _descendants(os.getpid()).items() if pid not in before}
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            assert _still_alive(leftovers, timeout=10) == {}
            if attempt:
                raise
    started = {pid: v for pid, v in _descendants(os.getpid()).items() if pid not in before}  # Ray's processes
    assert started, "no Ray process started"
    session_files = Path(executor._temp_dir)
    assert session_files.is_dir() and session_files.name.startswith("amp-ray-")
    yield executor
    executor.close()
    assert _still_alive(started, timeout=30) == {}, "Ray processes left behind"
    assert not session_files.exists()


def _typo(out: Path, name: str) -> SweepRun:
    """A run whose notebook fails at once: a misspelt parameter (the sweep writes its `failed` result)."""
    (run,) = expand_grid(out, CPU, ["fp32"], [0], parse_params(TINY))
    return SweepRun(name, {**run.parameters, "run_name": name, "stepz": 3})


@pytest.mark.slow
@pytest.mark.notebook
def test_a_two_precision_two_seed_sweep_runs_as_ray_tasks_isolates_a_failure_and_resumes(
    ray_instance: RayExecutor, tmp_path: Path
) -> None:
    # One sweep proves three points, to spend one round of kernels: the 2x2 grid end to end, a failing
    # run beside it recorded without stopping the others, and a resume that re-runs nothing.
    out = tmp_path / "sw"
    grid = expand_grid(out, CPU, ["fp32", "bf16-mixed"], [0, 1], parse_params(TINY))
    names = [r.name for r in grid]  # readable, then the config's identity
    readable = ["gpt-tiny-fp32-s0", "gpt-tiny-bf16-mixed-s0", "gpt-tiny-fp32-s1", "gpt-tiny-bf16-mixed-s1"]  # seed-major
    assert [n[: len(r)] for n, r in zip(names, readable)] == readable
    executor = RayExecutor()
    executor.open()  # finds the module's instance: uses it, and leaves it running
    outcomes, interrupted = run_sweep([_typo(out, "typo"), *grid], Settings(), executor=executor)
    executor.close()
    assert not interrupted and ray_is_running()
    assert [(o.name, o.status) for o in outcomes] == [("typo", "failed")] + [(n, "ok") for n in names]
    assert outcomes[0].error.startswith("ValueError: unknown parameter(s) 'stepz'")
    results = {r.config["run_name"] if r.config["run_name"] == "typo" else RunConfig.from_dict(r.config).name: r
               for r in load_sweep(out)}  # fmt: skip
    assert sorted(results) == sorted(["typo", *names]) and all(r.config["steps"] == 4 for r in results.values())
    assert {results[n].plan.effective for n in names} == {"fp32", "bf16-mixed"}
    assert {results[n].plan.concurrent_runs for n in names} == {2}  # two CPUs: two runs at a time
    assert all((out / "runs" / f"{n}.ipynb").exists() for n in names)  # each executed by its own task
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    again = sweep(out, ["fp32", "bf16-mixed"], [0, 1], TINY, report=False, executor=RayExecutor(), speed_budget=0)
    assert [(o.name, o.status, o.resumed) for o in again.outcomes] == [(n, "ok", True) for n in names]
    assert again.exit_code == 0 and (out / "sweep.json").exists()
    assert {p: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == stamps  # nothing re-run


class CtrlCOnFirstOutcome(io.StringIO):
    """A stdout on which Ctrl-C (a real SIGINT) arrives as the first run's outcome is printed, noting
    which processes descend from this one at that moment (the other run's worker and kernel)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker, self.seen = marker, {}

    def write(self, text: str) -> int:
        n = super().write(text)
        if self.marker in text and not self.seen:
            self.seen = _descendants(os.getpid())
            signal.raise_signal(signal.SIGINT)
        return n


@pytest.mark.slow
@pytest.mark.notebook
def test_ctrl_c_cancels_the_outstanding_tasks_and_keeps_the_finished_results(
    ray_instance: RayExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "sw"
    (endless,) = expand_grid(out, CPU, ["fp32"], [0], parse_params([*(t for t in TINY if not t.startswith("steps=")), "steps=100000"]))
    stdout = CtrlCOnFirstOutcome("typo")  # the typo run fails in seconds: Ctrl-C then
    monkeypatch.setattr("sys.stdout", stdout)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    executor = RayExecutor()
    executor.open()
    try:
        outcomes, interrupted = run_sweep([_typo(out, "typo"), endless], Settings(), executor=executor)
    finally:
        signal.signal(signal.SIGINT, saved)
        executor.close()
    assert interrupted and [(o.name, o.status) for o in outcomes] == [("typo", "failed")]
    assert [r.config["run_name"] for r in load_sweep(out)] == ["typo"]  # kept; the cancelled run wrote nothing
    kernels = {pid: v for pid, v in stdout.seen.items() if b"ipykernel" in v[1]}
    assert kernels, "the endless run's kernel was not running when Ctrl-C came"
    assert _still_alive(kernels, timeout=20) == {}  # the cancelled task's kernel is gone
    assert scratch_folders(endless) == []  # and so is the temp folder its killed worker could not remove
