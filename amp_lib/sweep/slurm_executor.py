"""A sweep's runs as Slurm jobs, submitted through submitit: one job per run, named after the run.

Each job is `execute_run` (train.ipynb through papermill) on the node Slurm picks, writing its result
JSON into the output folder, which must be on a filesystem the nodes share (as must the Python
environment: jobs run this interpreter, `sys.executable`). submitit's logs and pickles for a run are in
`<out>/runs/slurm/<run name>/`, beside the run's executed notebook `<out>/runs/<run name>.ipynb`.

A job the scheduler ends before its run wrote a result (time limit, pre-emption, cancelled, node
failure, out of memory) is recorded `failed` with Slurm's state and reason, read from `squeue` (which
works without an accounting database; a job's record stays there `MinJobAge`, 5 minutes by default),
else from `sacct` through submitit; a resumed sweep re-runs it. Ctrl-C cancels the jobs not yet done.

submitit is an optional extra (`pip install amp-workbook[slurm]`), imported only when a sweep uses it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amp_lib.sweep.execute import Outcome, Settings, error_text, execute_run, lost_run, stamp
from amp_lib.sweep.grid import SweepRun

EXTRA = "pip install amp-workbook[slurm]"
POLL_S = 2.0  # how often the sweep looks for finished jobs (one `squeue` call for all of them)
# Job states after which a job runs no more (squeue/sacct spelling); any other state is still going.
ENDED = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
     "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
)  # fmt: skip
WHY = {
    "TIMEOUT": "it reached its time limit",
    "PREEMPTED": "it was pre-empted",
    "CANCELLED": "it was cancelled",
    "NODE_FAIL": "its node failed",
    "BOOT_FAIL": "its node failed to boot",
    "OUT_OF_MEMORY": "it ran out of memory",
    "DEADLINE": "it reached its deadline",
}
SBATCH_KEY = re.compile(r"[a-z][a-z0-9_-]*")


def scheduler_reason(job_id: str, state: str, reason: str | None, time_min: int, logs: Path) -> str:
    """The `error` of a run whose job Slurm ended before the run wrote a result: the job, Slurm's state
    and reason (`squeue`'s %T and %r), what that means, and where the job's logs are."""
    state = state.split()[0].upper() if state.strip() else "UNKNOWN"  # sacct writes "CANCELLED by 0"
    detail = WHY.get(state, "it ended without the run's result")
    if state == "TIMEOUT":
        detail += f" of {time_min} min (--slurm-time)"
    said = f", reason {reason}" if reason and reason not in ("None", "(null)") else ""
    return f"Slurm job {job_id} ended {state}{said}: {detail} before the run finished; job logs in {logs}"


def parse_sbatch(items: Sequence[str]) -> dict[str, str]:
    """`["mem=16G", "qos=high"]` -> `{"mem": "16G", "qos": "high"}`, each an sbatch long option without
    its dashes; bad items are a `ValueError` naming them."""
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not SBATCH_KEY.fullmatch(key) or not value.strip():
            raise ValueError(
                f"invalid --sbatch {item!r}; expected KEY=VALUE, an sbatch option, e.g. mem=16G or qos=high"
            )
        options[key] = value.strip()
    return options


def gpus_for(run: SweepRun, gpus_per_run: int | None) -> int:
    """GPUs a run's job asks for: `--slurm-gpus-per-run` when given, else `nproc` (one per process of the
    run) for a run whose device says cuda, else none (a run on `auto` needs --slurm-gpus-per-run)."""
    if gpus_per_run is not None:
        return gpus_per_run
    return int(run.config_values().get("nproc", 1)) if str(run.config_values().get("device", "")).startswith("cuda") else 0


class StoppedBySlurm(BaseException):
    """Slurm is ending the job (time limit, pre-emption, scancel): not the run's failure, so, like Ctrl-C,
    it passes `execute_run`'s error handling and the unfinished run writes nothing. The sweep records the
    run with Slurm's own state and reason once the job has ended."""


def _stop(signum: int, frame: object) -> None:
    raise StoppedBySlurm(f"Slurm sent {signal.Signals(signum).name}")


def _job(run: SweepRun, settings: Settings) -> Outcome:
    """The body of a run's job. SIGTERM (Slurm's notice before it kills a job) stops the run instead of
    being ignored, as submitit's own handler would, until the SIGKILL; the run's kernel gets the job's
    CPUs as its threads (Slurm binds none here, as the local pool would)."""
    signal.signal(signal.SIGTERM, _stop)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    if cpus and cpus.isdigit():
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = cpus
    return execute_run(run, settings)


def queue_states() -> dict[str, tuple[str, str]] | None:
    """job id -> (state, reason) of this user's jobs that squeue knows, finished ones included; None when
    squeue failed (a busy controller): ask again later."""
    try:
        listed = subprocess.run(
            ["squeue", "--me", "--noheader", "--states=all", "--format=%i|%T|%r"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    if listed.returncode != 0:
        return None
    states = {}
    for line in listed.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        states[job_id] = (state, reason)
    return states


def ended_state(
    job_id: str, states: dict[str, tuple[str, str]], accounted: Callable[[], str]
) -> tuple[str, str] | None:
    """(state, reason) of a job that runs no more, None while it is pending or running. squeue knows a
    job until `MinJobAge` after it ended; after that `accounted()` (sacct) may, and a job neither knows is
    gone (its state UNKNOWN)."""
    if job_id in states:
        state, reason = states[job_id]
    else:
        state, reason = accounted() or "UNKNOWN", ""
    name = state.split()[0].upper() if state.strip() else "UNKNOWN"  # sacct writes "CANCELLED by 0"
    if name in ENDED or (name == "UNKNOWN" and job_id not in states):
        return name, reason
    return None


@dataclass
class SlurmExecutor:
    """Runs as Slurm jobs: `partition` (None: the cluster's default), `time_min` per job, `gpus_per_run`
    (None: from each run's device and nproc) and extra `sbatch` options (submitit's
    `slurm_additional_parameters`)."""

    partition: str | None = None
    time_min: int = 60
    gpus_per_run: int | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    _cpus_per_node: int = field(default=1, init=False, repr=False)

    def problems(self) -> list[str]:
        """What is wrong with the options (and whether submitit is installed), before asking Slurm anything."""
        problems = []
        if importlib.util.find_spec("submitit") is None:
            problems.append(f"--executor slurm needs submitit, which is not installed: {EXTRA}")
        if self.time_min < 1:
            problems.append(f"invalid --slurm-time {self.time_min}; expected minutes >= 1")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            problems.append(f"invalid --slurm-gpus-per-run {self.gpus_per_run}; expected >= 0")
        return problems

    def sbatch_options(self, run: SweepRun) -> dict[str, Any]:
        """submitit `update_parameters` for `run`'s job."""
        gpus = gpus_for(run, self.gpus_per_run)
        options: dict[str, Any] = {"job_name": run.name, "time": self.time_min, "additional_parameters": self.sbatch}
        # No end-of-time warning signal: submitit's default (SIGUSR2 90 s before the limit, which Slurm
        # sends up to 30 s early) would stop a job long before its limit, and reach the run's kernel
        # too. A run is not checkpointable: it runs to its limit and is recorded TIMEOUT.
        options["signal_delay_s"] = 0
        if self.partition:
            options["partition"] = self.partition
        if gpus:
            options["gpus_per_node"] = gpus
        return options

    def open(self) -> None:
        """Check the options and that Slurm would accept such a job (`sbatch --test-only` submits
        nothing): a `ValueError` with sbatch's own message before the sweep writes anything."""
        problems = self.problems()
        if not shutil.which("sbatch") or not shutil.which("squeue"):
            problems.append(
                "--executor slurm needs the Slurm commands (sbatch, squeue) on PATH: run it on a login node"
            )
        if problems:
            raise ValueError("\n".join(problems))
        flags = [f"--time={self.time_min}", *(f"--{k}={v}" for k, v in self.sbatch.items())]
        if self.partition:
            flags.append(f"--partition={self.partition}")
        if self.gpus_per_run:
            flags.append(f"--gpus-per-node={self.gpus_per_run}")
        tried = subprocess.run(
            ["sbatch", "--test-only", *flags, "--wrap=true"], capture_output=True, text=True, timeout=60, check=False
        )
        if tried.returncode != 0:
            said = " ".join(line.removeprefix("sbatch: error: ") for line in tried.stderr.splitlines() if line.strip())
            raise ValueError(
                f"Slurm refuses the sweep's jobs ({' '.join(flags)}): {said or 'sbatch --test-only failed'}"
            )
        nodes = subprocess.run(
            ["sinfo", "--noheader", "--format=%c", *([f"--partition={self.partition}"] if self.partition else [])],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        counts = [int(c) for c in re.findall(r"\d+", nodes.stdout)]
        self._cpus_per_node = max(counts, default=1)

    def close(self) -> None:
        pass

    def concurrency(self, todo: Sequence[SweepRun]) -> int:
        """Runs one node can hold at once (one CPU each): what each result records about contention."""
        return max(1, min(self._cpus_per_node, len(todo)))

    def run(
        self,
        todo: Sequence[SweepRun],
        settings: Settings,
        done: Callable[[Outcome], None],
        starting: Callable[[SweepRun], None],
    ) -> None:
        import submitit

        jobs: dict[str, tuple[Any, SweepRun, tuple[int, int] | None]] = {}
        try:
            for run in todo:
                folder = run.result_path.parent.parent / "runs" / "slurm" / run.name
                executor = submitit.SlurmExecutor(folder=folder)
                executor.update_parameters(**self.sbatch_options(run))
                before = stamp(run.result_path)
                job = executor.submit(_job, run, settings)
                jobs[job.job_id] = (job, run, before)
            while jobs:
                states = None
                for job_id, (job, run, before) in list(jobs.items()):
                    if job.paths.result_pickle.exists():  # the job returned (or raised): submitit's result
                        outcome = self._finished(job, run, before)
                    else:
                        states = queue_states() if states is None else states
                        ended = None if states is None else ended_state(job_id, states, lambda j=job: j.state)
                        if ended is None:
                            continue
                        reason = scheduler_reason(job_id, *ended, self.time_min, job.paths.folder)
                        outcome = lost_run(run, reason, before)
                    del jobs[job_id]
                    done(outcome)
                if jobs:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            for job, _, _ in jobs.values():
                job.cancel(check=False)  # scancel: the job's processes, the run's kernel among them, end
            raise

    def _finished(self, job: Any, run: SweepRun, before: tuple[int, int] | None) -> Outcome:
        try:
            return job.result()
        except Exception as exc:  # noqa: BLE001 - the job itself failed outside the run: record it, keep going
            return lost_run(run, f"Slurm job {job.job_id} failed: {error_text(exc)}", before)
