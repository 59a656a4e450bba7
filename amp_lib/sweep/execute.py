"""Executing a sweep's runs: each is `train.ipynb` run by papermill, writing one result JSON.

A re-run skips every run whose result is complete (status ok, diverged or oom, with the same
parameters); `failed` runs are retried and `force` re-runs everything. One run failing never stops
the others: it is recorded as a `failed` result. Runs go to separate processes with `workers`
because papermill's `cwd` is a process-wide chdir; each worker dies with the sweep (PR_SET_PDEATHSIG,
so even a SIGKILL of the sweep leaves no worker, and ipykernel exits with its worker) and gets its
share of the CPU threads. A run's name ends with its config's identity, so a result on disk under
that name is exactly that run's (checked again against its config before it is skipped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import nbformat
import papermill as pm
import torch
from jupyter_core.utils import ensure_event_loop
from nbclient.exceptions import DeadKernelError
from tqdm import tqdm

from amp_lib.config import PROJECT, RunConfig, TrackingConfig, config_identity
from amp_lib.precision import probe, resolve_precision
from amp_lib.processes import die_with_parent, thread_share
from amp_lib.results import RunResult, TimingRecord, first_line, read_result, write_text_atomic
from amp_lib.speed import SPEED_MARGIN, SPREAD_LIMIT
from amp_lib.sweep.grid import SweepRun

NOTEBOOKS = Path(__file__).resolve().parent.parent.parent / "notebooks"
COMPLETE = ("ok", "diverged", "oom")  # outcomes of the config itself; "failed" is retried on resume
PORT_RACE = ("Address already in use", "Kernel died before replying to kernel_info")


def same_config(run: SweepRun, result: RunResult) -> bool:
    """`result` was trained with exactly the config `run` stands for: the same identity (its name and folder
    aside; a value an older result lacks counts as the default it had)."""
    return config_identity(result.config) == run.identity


def is_complete(run: SweepRun) -> bool:
    """A finished result for exactly this config is on disk (so a resumed sweep skips the run); for a timing
    run, a timing of the same precisions."""
    loaded = read_result(run.result_path)
    if not (isinstance(loaded, RunResult) and loaded.status in COMPLETE and same_config(run, loaded)):
        return False
    if run.timed_precisions:
        return loaded.timing is not None and list(loaded.timing.precisions) == list(run.timed_precisions)
    return loaded.timing is None


# -- one run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How notebooks are executed (picklable: it travels to worker processes)."""

    kernel: str = PROJECT
    timeout: float | None = 3600.0  # per cell, i.e. per training run
    notebooks: str = str(NOTEBOOKS)
    retries: int = 3
    # Put on the kernels' PYTHONPATH, so `-p model=mymodule:fn` finds a module beside the user (the
    # kernels run in <out>/runs); None means the current directory when the sweep starts.
    workdir: str | None = None
    concurrent_runs: int = 1  # runs executing at once (the workers): recorded in each result's plan
    executor: str = "local"  # local, ray or slurm: recorded in each result's plan


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str
    error: str | None = None
    resumed: bool = False
    notebook: str | None = None


def failed_run_result(run: SweepRun, error: str) -> RunResult:
    """The `failed` result of `run` (a timing run's carries an empty timing record: the report knows it as one)."""
    result = failed_result(run.config_values(), error)
    if not run.timed_precisions:
        return result
    timing = TimingRecord(tuple(run.timed_precisions), {}, (), 0, 0.0, 0.0, "failed", SPEED_MARGIN, SPREAD_LIMIT)
    return replace(result, timing=timing)


def failed_result(parameters: dict[str, Any], error: str) -> RunResult:
    """The `failed` result the sweep writes for a run whose notebook died before writing one."""
    tracking, settings = TrackingConfig.field_names(), RunConfig.field_names()
    given = {k: v for k, v in parameters.items() if k not in tracking}
    # A valid config is recorded in its canonical spelling (fsdp2 -> fsdp), as train() records it, so the
    # report puts the failed run in its siblings' row; a broken one is kept as given, over the defaults.
    try:
        canonical = RunConfig.from_dict({k: v for k, v in given.items() if k in settings}).to_dict()
        config = {**canonical, **{k: v for k, v in given.items() if k not in settings}}
    except Exception:  # noqa: BLE001
        config = {**RunConfig().to_dict(), **given}
    plan: dict[str, Any] = {"requested": str(config.get("precision")), "effective": None, "fallback_reason": None}
    try:
        caps = probe(config["device"])  # filled in above, from the run or the defaults
        fp8 = {k: config[k] for k in ("emulate_fp8", "fp8_layers") if k in config}
        plan = {**resolve_precision(config["precision"], caps, **fp8).to_dict(), "torch_version": torch.__version__}
    except Exception:  # noqa: BLE001, S110 - the config itself may be what is broken: record what is known
        pass
    return RunResult(config=config, plan=plan, status="failed", error=error)


def error_text(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        return f"{ename}: {evalue}"
    return f"{type(exc).__name__}: {exc}".strip()


def _is_port_race(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if any(text in str(seen) for text in PORT_RACE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


# The kernel's warning that its local TCP sockets are unencrypted is noise a user cannot act on.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
CONCURRENT_RUNS_ENV = "AMP_WORKBOOK_CONCURRENT_RUNS"


def wandb_run_id(name: str) -> str:
    """A W&B run id (so the offline folder) named after the run, unique per attempt."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:96]}-{int(time.time() * 1000) % 10**10:010d}"


def kernel_environment(run: SweepRun, settings: Settings) -> dict[str, str]:
    """What a run's kernel finds in its environment besides ours (kernels inherit the process env)."""
    workdir = settings.workdir or os.getcwd()
    path = [workdir, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != workdir)]
    env = {"PYTHONPATH": os.pathsep.join(path), CONCURRENT_RUNS_ENV: str(settings.concurrent_runs)}
    env["AMP_WORKBOOK_EXECUTOR"] = settings.executor
    env["WANDB_RUN_ID"] = wandb_run_id(run.name)
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def scratch_prefix(run: SweepRun) -> str:
    """The start of the temp folder names of `run`'s kernels: one per result file, whichever sweep or machine."""
    key = hashlib.sha1(str(Path(run.result_path).resolve()).encode()).hexdigest()[:12]
    return f"amp-run-{key}-"


def scratch_folders(run: SweepRun) -> list[Path]:
    """The temp folders `run`'s kernels were given (W&B stages media and artifacts there) that still exist.

    Named after the run's result file, so the sweep removes those a killed run (a cancelled Ray task, a
    Slurm job past its limit) could not remove itself.
    """
    return sorted(Path(tempfile.gettempdir()).glob(scratch_prefix(run) + "*"))


def remove_scratch(runs: Sequence[SweepRun]) -> None:
    for run in runs:
        for folder in scratch_folders(run):
            shutil.rmtree(folder, ignore_errors=True)


def ignore_abandoned_cell(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The exception handler of the event loop papermill runs on. Ctrl-C leaves nbclient's cell task
    behind; the kernel's clean-up then fails it with DeadKernelError, which nothing awaits any more, and
    asyncio would print that as a traceback when the task is collected. Anything else is asyncio's to
    report as usual (a kernel that dies mid-run is the run's failure, raised through papermill)."""
    if not isinstance(context.get("exception"), DeadKernelError):
        loop.default_exception_handler(context)


def execute_run(run: SweepRun, settings: Settings) -> Outcome:
    """Execute train.ipynb for `run`; whatever happens, a result JSON for it exists afterwards.

    Only `KeyboardInterrupt` escapes, and then nothing is written for the unfinished run.
    """
    runs_dir = run.result_path.parent.parent / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    notebook = runs_dir / f"{run.name}.ipynb"
    # papermill saves the notebook after every cell: it runs in a hidden file, moved into place whole.
    partial = runs_dir / f".{run.name}.partial.ipynb"
    before = stamp(run.result_path)
    remove_scratch([run])  # what an earlier, killed attempt left on this machine (another node of a cluster)
    ensure_event_loop().set_exception_handler(ignore_abandoned_cell)  # the loop papermill's calls run on
    error: str | None = None
    try:
        for attempt in range(settings.retries):
            try:
                # The kernel's temp files (W&B stages media and artifacts there) go to a folder of this
                # attempt's own, removed afterwards: a sweep leaves nothing in the system temp folder.
                with (
                    tempfile.TemporaryDirectory(prefix=scratch_prefix(run), ignore_cleanup_errors=True) as scratch,
                    _environment({**kernel_environment(run, settings), "TMPDIR": scratch}),
                ):
                    pm.execute_notebook(
                        str(Path(settings.notebooks) / run.notebook),
                        str(partial),
                        parameters=run.parameters,
                        kernel_name=settings.kernel,
                        cwd=str(runs_dir),
                        execution_timeout=settings.timeout,
                        progress_bar=False,
                        extra_arguments=KERNEL_ARGUMENTS,
                        # The notebook is saved by then: a kernel killed, not asked to shut down mid-cell on
                        # Ctrl-C, leaves no zmq traceback of a reply sent to a closed socket.
                        shutdown_kernel="immediate",
                    )
                error = None
                break
            except Exception as exc:  # noqa: BLE001 - a notebook error of any kind is this run's failure, not the sweep's
                error = error_text(exc)
                if not (_is_port_race(exc) and attempt + 1 < settings.retries):
                    break
                time.sleep(0.5 * (attempt + 1))
    except BaseException:  # Ctrl-C: the unfinished run leaves nothing, not even half a notebook
        partial.unlink(missing_ok=True)
        raise
    if partial.exists():
        publish_notebook(partial, notebook)
    if stamp(run.result_path) != before:
        loaded = read_result(run.result_path)
        result = (
            loaded
            if isinstance(loaded, RunResult)
            else failed_run_result(run, f"unreadable result: {loaded.reason}")
        )
        if not isinstance(loaded, RunResult):
            result.save(run.result_path)
        elif error and result.ok:
            result = replace(result, status="failed", error=f"notebook failed after the run finished: {error}")
            result.save(run.result_path)
    else:
        result = failed_run_result(run, error or "the notebook finished without writing its result")
        result.save(run.result_path)
    return Outcome(run.name, result.status, result.error, notebook=str(notebook))


def publish_notebook(partial: Path, target: Path) -> None:
    """Move a notebook papermill executed into `partial` to `target`, whole, naming `target` as its output."""
    nb = nbformat.read(str(partial), as_version=4)
    nb.metadata.setdefault("papermill", {})["output_path"] = str(target)
    write_text_atomic(target, nbformat.writes(nb))
    partial.unlink()


def cpu_threads(workers: int) -> int:
    """Each of `workers` parallel runs gets its share of this process's cores, at least one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return thread_share(cores, workers)


def _init_worker(gpus: Any, pids: Any, parent: int | None = None, threads: int | None = None) -> None:
    """Worker initializer: die with the sweep (any signal, SIGKILL included; its kernels then exit too, as
    ipykernel polls its parent), pin this worker (and the kernels it starts) to one GPU and its share of
    the CPU threads, and leave Ctrl-C to the parent, which stops workers itself (a half-interrupted
    papermill call can linger)."""
    if parent is not None:
        die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids.put(os.getpid())
    gpu = gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads is not None:  # kernels inherit the environment: torch reads OMP_NUM_THREADS at start-up
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def outcome_line(outcome: Outcome) -> str:
    first = first_line(outcome.error)
    return f"{outcome.status:8} {outcome.name}" + (f": {first}" if first else "")


class Executor(Protocol):
    """Where a sweep's runs execute: this machine (`LocalExecutor`), a Ray cluster, Slurm. Each run is
    still `execute_run` (train.ipynb through papermill), writing its result into the output folder,
    which is the only state the sweep and its runs share.

    `open()` connects (and checks the options against the engine) before anything is written, `close()`
    disconnects. `run()` executes `todo`, calling `starting(run)` where it can tell a run starts and
    `done(outcome)` as each finishes, always with a result JSON on disk for it (a run the engine lost is
    recorded `failed` with the engine's reason). On KeyboardInterrupt it cancels what is outstanding and
    re-raises: finished results stay, an unfinished run writes nothing.
    """

    def open(self) -> None: ...

    def close(self) -> None: ...

    def concurrency(self, todo: Sequence[SweepRun]) -> int: ...

    def run(
        self,
        todo: Sequence[SweepRun],
        settings: Settings,
        done: Callable[[Outcome], None],
        starting: Callable[[SweepRun], None],
    ) -> None: ...


def lost_run(run: SweepRun, reason: str, before: tuple[int, int] | None) -> Outcome:
    """Record a run whose process the executor lost (a worker crashed, the scheduler killed the job) as
    `failed` with `reason`, unless the run wrote a final result (its file's `stamp` no longer `before`,
    taken when the run was handed out) before it was lost. `failed` results are re-run on resume."""
    if stamp(run.result_path) != before:
        loaded = read_result(run.result_path)
        if isinstance(loaded, RunResult) and loaded.status in COMPLETE and same_config(run, loaded):
            return Outcome(run.name, loaded.status, loaded.error)
    result = failed_run_result(run, reason)
    result.save(run.result_path)
    return Outcome(run.name, result.status, result.error)


@dataclass(frozen=True)
class LocalExecutor:
    """This machine: in this process with one worker, else a pool of `workers` processes (one GPU each
    on multi-GPU machines, each its share of the cores, each dying with the sweep)."""

    workers: int = 1

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def concurrency(self, todo: Sequence[SweepRun]) -> int:
        return max(1, min(self.workers, len(todo)))

    def run(
        self,
        todo: Sequence[SweepRun],
        settings: Settings,
        done: Callable[[Outcome], None],
        starting: Callable[[SweepRun], None],
    ) -> None:
        if self.workers <= 1:
            for run in todo:
                starting(run)
                done(execute_run(run, settings))
        elif todo:
            _run_parallel(todo, settings, self.concurrency(todo), done)


def run_sweep(
    runs: Sequence[SweepRun],
    settings: Settings,
    *,
    workers: int = 1,
    force: bool = False,
    executor: Executor | None = None,
) -> tuple[list[Outcome], bool]:
    """Execute `runs` (skipping complete ones unless `force`); returns outcomes and whether interrupted.

    Runs go to `executor` (default: this machine with `workers` processes), which must be open.
    """
    executor = executor if executor is not None else LocalExecutor(workers)
    outcomes: dict[str, Outcome] = {}
    todo = []
    for run in runs:
        if not force and is_complete(run):
            result = RunResult.load(run.result_path)
            outcomes[run.name] = Outcome(run.name, result.status, result.error, resumed=True)
        else:
            todo.append(run)
    training = [r for r in todo if not r.timed_precisions]
    timing = [r for r in todo if r.timed_precisions]  # after the training runs, one at a time: timed alone
    kind = type(executor).__name__.removesuffix("Executor").lower()
    settings = replace(settings, workdir=settings.workdir or os.getcwd(), executor=kind)
    bar = tqdm(total=len(runs), initial=len(outcomes), unit="run", desc="sweep", file=sys.stderr, dynamic_ncols=True)
    if outcomes:
        bar.write(f"resuming: {len(outcomes)} of {len(runs)} runs already complete (--force re-runs them)")

    def done(outcome: Outcome) -> None:
        outcomes[outcome.name] = outcome
        bar.update(1)
        bar.write(outcome_line(outcome))

    interrupted = False
    try:
        if training:
            concurrent = executor.concurrency(training)
            executor.run(training, replace(settings, concurrent_runs=concurrent), done, lambda r: bar.set_postfix_str(r.name))
        for run in timing:
            executor.run([run], replace(settings, concurrent_runs=1), done, lambda r: bar.set_postfix_str(r.name))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        remove_scratch(runs)  # what killed runs left in the temp folder, finished ones too (a SIGKILLed sweep)
    order = {r.name: i for i, r in enumerate(runs)}
    return sorted(outcomes.values(), key=lambda o: order[o.name]), interrupted


def _run_parallel(todo: Sequence[SweepRun], settings: Settings, workers: int, done: Callable[[Outcome], None]) -> None:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
    gpus, pids = ctx.Queue(), ctx.Queue()
    visible = _visible_gpus()
    for i in range(workers):
        gpus.put(visible[i % len(visible)] if len(visible) > 1 else None)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(gpus, pids, os.getpid(), cpu_threads(workers)),
    )
    stamps = {run.name: stamp(run.result_path) for run in todo}
    futures: dict[Future[Outcome], SweepRun] = {pool.submit(execute_run, run, settings): run for run in todo}
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - the worker process died: record the run, keep going
                    outcome = lost_run(run, f"worker process failed: {error_text(exc)}", stamps[run.name])
                done(outcome)
    except KeyboardInterrupt:
        # Unfinished runs write nothing (results are written whole, at the end of a run); their
        # kernels exit with their worker (ipykernel polls its parent).
        for _ in range(workers):
            try:
                pid = pids.get(timeout=0.2)
            except queue.Empty:
                break
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
