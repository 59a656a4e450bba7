"""Executing a sweep's runs: each is `train.ipynb` run by papermill, writing one result JSON.

A re-run skips every run whose result is complete (status ok, diverged or oom, with the same
parameters); `failed` runs are retried and `force` re-runs everything. One run failing never stops
the others: it is recorded as a `failed` result. Runs go to separate processes with `workers`
because papermill's `cwd` is a process-wide chdir.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import papermill as pm
import torch
from tqdm import tqdm

from amp_lib.config import PROJECT, RunConfig, TrackingConfig
from amp_lib.precision import probe, resolve_precision
from amp_lib.results import RunResult, first_line
from amp_lib.sweep.grid import SweepRun

NOTEBOOKS = Path(__file__).resolve().parent.parent.parent / "notebooks"
COMPLETE = ("ok", "diverged", "oom")  # outcomes of the config itself; "failed" is retried on resume
PORT_RACE = ("Address already in use", "Kernel died before replying to kernel_info")


def is_complete(run: SweepRun) -> bool:
    """A finished result for exactly these parameters is on disk (so a resumed sweep skips the run)."""
    try:
        result = RunResult.load(run.result_path)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    fields_ = set(RunConfig.field_names()) - {"out_dir"}  # a moved sweep folder still resumes
    same = all(result.config.get(k) == v for k, v in run.parameters.items() if k in fields_)
    return same and result.status in COMPLETE


# -- one run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How notebooks are executed (picklable: it travels to worker processes)."""

    kernel: str = PROJECT
    timeout: float | None = 3600.0  # per cell, i.e. per training run
    notebooks: str = str(NOTEBOOKS)
    retries: int = 3


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str
    error: str | None = None
    resumed: bool = False
    notebook: str | None = None


def failed_result(parameters: dict[str, Any], error: str) -> RunResult:
    """The `failed` result the sweep writes for a run whose notebook died before writing one."""
    tracking = TrackingConfig.field_names()
    config = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    config.update({k: v for k, v in parameters.items() if k not in tracking})
    plan: dict[str, Any] = {"requested": str(config.get("precision")), "effective": None, "fallback_reason": None}
    try:
        caps = probe(config.get("device", "auto"))
        plan = {**resolve_precision(config["precision"], caps).to_dict(), "torch_version": torch.__version__}
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


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def execute_run(run: SweepRun, settings: Settings) -> Outcome:
    """Execute train.ipynb for `run`; whatever happens, a result JSON for it exists afterwards.

    Only `KeyboardInterrupt` escapes, and then nothing is written for the unfinished run.
    """
    runs_dir = Path(run.parameters["out_dir"]).parent / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    notebook = runs_dir / f"{run.name}.ipynb"
    before = _stamp(run.result_path)
    error: str | None = None
    for attempt in range(settings.retries):
        try:
            pm.execute_notebook(
                str(Path(settings.notebooks) / "train.ipynb"),
                str(notebook),
                parameters=run.parameters,
                kernel_name=settings.kernel,
                cwd=str(runs_dir),
                execution_timeout=settings.timeout,
                progress_bar=False,
            )
            error = None
            break
        except Exception as exc:  # noqa: BLE001 - a notebook error of any kind is this run's failure, not the sweep's
            error = error_text(exc)
            if not (_is_port_race(exc) and attempt + 1 < settings.retries):
                break
            time.sleep(0.5 * (attempt + 1))
    if _stamp(run.result_path) != before:
        result = RunResult.load(run.result_path)
        if error and result.ok:
            result = replace(result, status="failed", error=f"notebook failed after the run finished: {error}")
            result.save(run.result_path)
    else:
        result = failed_result(run.parameters, error or "the notebook finished without writing its result")
        result.save(run.result_path)
    return Outcome(run.name, result.status, result.error, notebook=str(notebook))


def _init_worker(gpus: Any, pids: Any) -> None:
    """Worker initializer: pin this worker (and the kernels it starts) to one GPU, and leave Ctrl-C to
    the parent, which stops workers itself (a half-interrupted papermill call can linger)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pids.put(os.getpid())
    gpu = gpus.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def outcome_line(outcome: Outcome) -> str:
    first = first_line(outcome.error)
    return f"{outcome.status:8} {outcome.name}" + (f": {first}" if first else "")


def run_sweep(
    runs: Sequence[SweepRun], settings: Settings, *, workers: int = 1, force: bool = False
) -> tuple[list[Outcome], bool]:
    """Execute `runs` (skipping complete ones unless `force`); returns outcomes and whether interrupted."""
    outcomes: dict[str, Outcome] = {}
    todo = []
    for run in runs:
        if not force and is_complete(run):
            result = RunResult.load(run.result_path)
            outcomes[run.name] = Outcome(run.name, result.status, result.error, resumed=True)
        else:
            todo.append(run)
    bar = tqdm(total=len(runs), initial=len(outcomes), unit="run", desc="sweep", file=sys.stderr, dynamic_ncols=True)
    if outcomes:
        bar.write(f"resuming: {len(outcomes)} of {len(runs)} runs already complete (--force re-runs them)")

    def done(outcome: Outcome) -> None:
        outcomes[outcome.name] = outcome
        bar.update(1)
        bar.write(outcome_line(outcome))

    interrupted = False
    try:
        if workers <= 1:
            for run in todo:
                bar.set_postfix_str(run.name)
                done(execute_run(run, settings))
        elif todo:
            interrupted = _run_parallel(todo, settings, workers, done)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    order = {r.name: i for i, r in enumerate(runs)}
    return sorted(outcomes.values(), key=lambda o: order[o.name]), interrupted


def _run_parallel(
    todo: Sequence[SweepRun], settings: Settings, workers: int, done: Callable[[Outcome], None]
) -> bool:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
    gpus, pids = ctx.Queue(), ctx.Queue()
    visible = _visible_gpus()
    for i in range(workers):
        gpus.put(visible[i % len(visible)] if len(visible) > 1 else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(gpus, pids))
    futures: dict[Future[Outcome], SweepRun] = {pool.submit(execute_run, run, settings): run for run in todo}
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = futures[future]
                try:
                    done(future.result())
                except Exception as exc:  # noqa: BLE001 - the worker process died: record the run, keep going
                    result = failed_result(run.parameters, f"worker process failed: {error_text(exc)}")
                    result.save(run.result_path)
                    done(Outcome(run.name, result.status, result.error))
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
        return True
    pool.shutdown(wait=True)
    return False
