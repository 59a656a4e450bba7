"""`python -m amp_lib.sweep`: run `train.ipynb` over a grid with papermill, then the report.

    python -m amp_lib.sweep --out sweeps/default                      # native precisions, device defaults
    python -m amp_lib.sweep --out sweeps/lr --precisions fp32,bf16 --seeds 0,1,2 -p lr=1e-3,3e-3 --workers 2

Layout of `<out>`: `runs/<run_name>.ipynb` (each executed notebook), `results/<run_name>.json`,
`report.ipynb`, `report.html`, `figures/*.png`, `summary.md`.

A re-run skips every run whose result is complete (status ok, diverged or oom, with the same
parameters); `failed` runs are retried and `--force` re-runs everything. One run failing never stops
the others: it is recorded, shown in the report, and makes the command exit 1 at the end. Runs go
to separate processes with `--workers` because papermill's `cwd` is a process-wide chdir.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import queue
import re
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from amp_lib.precision import native_precisions, parse_precision, probe
from amp_lib.report import DEFAULT_TOLERANCE, load_sweep, recommendations, summary_markdown
from amp_lib.results import RunResult
from amp_lib.train import RunConfig

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "amp-workbook"
COMPLETE = ("ok", "diverged", "oom")  # outcomes of the config itself; "failed" is retried on resume
RESERVED = ("precision", "seed", "run_name", "out_dir")  # set by --precisions, --seeds and the sweep
# What `make sweep` runs when not told otherwise: sized to finish in seconds on a CPU, to measure on a GPU.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 40, "warmup_steps": 8, "batch_size": 8, "seq_len": 64, "log_every": 5},
    "cuda": {"steps": 300, "warmup_steps": 20, "batch_size": 16, "seq_len": 512, "log_every": 25, "lr": 6e-4},
}
PORT_RACE = ("Address already in use", "Kernel died before replying to kernel_info")


def _notebook_extras() -> dict[str, Any]:
    from amp_lib.workbook import NOTEBOOK_EXTRAS

    return NOTEBOOK_EXTRAS


# -- the grid ------------------------------------------------------------------------------------


def parse_value(key: str, text: str) -> Any:
    """A `-p key=value` value as the type its `RunConfig` field (or notebook parameter) declares."""
    annotation = {f.name: str(f.type) for f in fields(RunConfig)}.get(key, "str | None")
    raw = text.strip()
    if "None" in annotation and raw.lower() in ("none", "null"):
        return None
    try:
        if annotation == "bool":
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if annotation == "int":
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"invalid value {text!r} for {key} (expected {annotation})") from None
    return raw


def parse_params(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["lr=1e-3,3e-3", "steps=20"]` -> `{"lr": [0.001, 0.003], "steps": [20]}`, names checked."""
    valid = [*RunConfig.field_names(), *_notebook_extras()]
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"invalid -p {item!r}; expected key=value[,value...]")
        if key in RESERVED:
            raise ValueError(
                f"-p {key}=... is set by the sweep; use --precisions / --seeds (run_name and out_dir follow --out)"
            )
        if key not in valid:
            raise ValueError(
                f"unknown parameter {key!r}; valid names: {', '.join(k for k in valid if k not in RESERVED)}"
            )
        grid[key] = [parse_value(key, v) for v in values.split(",")]
    return grid


@dataclass(frozen=True)
class PlannedRun:
    """One notebook execution: its name and every parameter papermill injects."""

    name: str
    parameters: dict[str, Any]

    @property
    def result_path(self) -> Path:
        return Path(self.parameters["out_dir"]) / f"{self.name}.json"


def _slug(value: Any) -> str:
    return re.sub(r"[^\w.=+-]", "_", str(value).replace(":", "."))


def plan_sweep(
    out: str | os.PathLike[str],
    precisions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    grid: dict[str, list[Any]] | None = None,
) -> list[PlannedRun]:
    """The runs of a sweep, precisions x seeds x grid; no precisions means the device's native ones."""
    grid = dict(grid or {})
    devices = grid.get("device", ["auto"])
    caps = probe(devices[0] if len(devices) == 1 else "auto")
    if not precisions:
        precisions = native_precisions(caps)
    precisions = [parse_precision(p) for p in precisions]
    if len(set(precisions)) != len(precisions) or len(set(seeds)) != len(seeds):
        raise ValueError(f"precisions {list(precisions)} and seeds {list(seeds)} must not repeat")
    from amp_lib.models import default_model_for

    defaults = {"model": default_model_for(caps.device_type), **DEVICE_DEFAULTS[caps.device_type]}
    base = {k: v for k, v in defaults.items() if k not in grid}
    results_dir = str(Path(out).resolve() / "results")
    varying = [k for k, values in grid.items() if len(values) > 1 and k != "model"]
    runs = []
    for combo in itertools.product(*grid.values()):
        values = {**base, **dict(zip(grid, combo))}
        for precision, seed in itertools.product(precisions, seeds):
            name = "-".join(
                [
                    _slug(values.get("model", "gpt-tiny")),
                    precision,
                    f"s{seed}",
                    *(_slug(f"{k}={values[k]}") for k in varying),
                ]
            )
            parameters = {
                **values,
                "precision": precision,
                "seed": seed,
                "run_name": name,
                "out_dir": results_dir,
                "wandb_group": values.get("wandb_group") or _slug(Path(out).resolve().name),
            }
            runs.append(PlannedRun(name, parameters))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names collide: {sorted({n for n in names if names.count(n) > 1})}")
    return runs


def is_complete(run: PlannedRun) -> bool:
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

    kernel: str = KERNEL
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
    extras = _notebook_extras()
    config = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    config.update({k: v for k, v in parameters.items() if k not in extras})
    plan: dict[str, Any] = {"requested": str(config.get("precision")), "effective": None, "fallback_reason": None}
    try:
        import torch

        from amp_lib.precision import resolve_precision

        caps = probe(config.get("device", "auto"))
        plan = {**resolve_precision(config["precision"], caps).to_dict(), "torch_version": torch.__version__}
    except Exception:  # noqa: BLE001, S110 - the config itself may be what is broken: record what is known
        pass
    return RunResult(config=config, plan=plan, status="failed", error=error)


def _error_text(exc: BaseException) -> str:
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


def execute_run(run: PlannedRun, settings: Settings) -> Outcome:
    """Execute train.ipynb for `run`; whatever happens, a result JSON for it exists afterwards.

    Only `KeyboardInterrupt` escapes, and then nothing is written for the unfinished run.
    """
    import papermill as pm

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
            error = _error_text(exc)
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
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# -- the sweep -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    out: Path
    outcomes: tuple[Outcome, ...]
    planned: int = 0
    interrupted: bool = False
    report: dict[str, Path] = field(default_factory=dict)
    report_error: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.report_error else 0


def _line(outcome: Outcome) -> str:
    first = (outcome.error or "").strip().splitlines()
    return f"{outcome.status:8} {outcome.name}" + (f": {first[0]}" if first else "")


def run_sweep(
    runs: Sequence[PlannedRun], settings: Settings, *, workers: int = 1, force: bool = False
) -> tuple[list[Outcome], bool]:
    """Execute `runs` (skipping complete ones unless `force`); returns outcomes and whether interrupted."""
    from tqdm import tqdm

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
        bar.write(_line(outcome))

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


def _run_parallel(todo: Sequence[PlannedRun], settings: Settings, workers: int, done: Any) -> bool:
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA state
    gpus, pids = ctx.Queue(), ctx.Queue()
    visible = _visible_gpus()
    for i in range(workers):
        gpus.put(visible[i % len(visible)] if len(visible) > 1 else None)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(gpus, pids))
    futures: dict[Future[Outcome], PlannedRun] = {pool.submit(execute_run, run, settings): run for run in todo}
    pending = set(futures)
    try:
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = futures[future]
                try:
                    done(future.result())
                except Exception as exc:  # noqa: BLE001 - the worker process died: record the run, keep going
                    result = failed_result(run.parameters, f"worker process failed: {_error_text(exc)}")
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


def write_report(out: Path, settings: Settings, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Path]:
    """summary.md from Python, then compare.ipynb -> report.ipynb (figures/*.png) -> report.html."""
    import papermill as pm
    from nbconvert import HTMLExporter

    out = out.resolve()  # the notebook runs with cwd=out: relative paths would point elsewhere
    results = load_sweep(out)
    files = {"summary": out / "summary.md", "notebook": out / "report.ipynb", "html": out / "report.html"}
    tmp = files["summary"].with_suffix(".md.tmp")
    tmp.write_text(summary_markdown(results, tolerance), encoding="utf-8")
    os.replace(tmp, files["summary"])
    error: Exception | None = None
    try:
        pm.execute_notebook(
            str(Path(settings.notebooks) / "compare.ipynb"),
            str(files["notebook"]),
            parameters={"sweep_dir": str(out), "tolerance": tolerance, "figures_dir": str(out / "figures")},
            kernel_name=settings.kernel,
            cwd=str(out),
            execution_timeout=settings.timeout,
            progress_bar=False,
        )
    except Exception as exc:  # noqa: BLE001 - any notebook failure: still export what ran, then raise
        error = exc
    if files["notebook"].exists():  # export even a failed report: it shows where it failed
        body, _ = HTMLExporter().from_filename(str(files["notebook"]))
        files["html"].write_text(body, encoding="utf-8")
    if error is not None:
        raise RuntimeError(f"report notebook failed ({files['notebook']}): {_error_text(error)}") from error
    files.update({f"figure:{p.stem}": p for p in sorted((out / "figures").glob("*.png"))})
    return files


def sweep(
    out: str | os.PathLike[str],
    precisions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    params: Sequence[str] = (),
    *,
    workers: int = 1,
    force: bool = False,
    report: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    settings: Settings = Settings(),
) -> SweepResult:
    """Plan, run (resumably, failures isolated) and report a sweep; the Python face of the CLI."""
    out_path = Path(out)
    runs = plan_sweep(out_path, precisions, seeds, parse_params(params))
    outcomes, interrupted = run_sweep(runs, settings, workers=workers, force=force)
    files: dict[str, Path] = {}
    report_error = None
    if report and not interrupted:
        try:
            files = write_report(out_path, settings, tolerance)
        except Exception as exc:  # noqa: BLE001 - the runs are done and kept whatever the report does
            report_error = str(exc)
    return SweepResult(out_path, tuple(outcomes), len(runs), interrupted, files, report_error)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amp_lib.sweep",
        description="Run notebooks/train.ipynb over precisions x seeds x parameters with papermill, then the report.",
    )
    parser.add_argument(
        "--out", required=True, help="sweep folder (runs/, results/, report.html, summary.md, figures/)"
    )
    parser.add_argument(
        "--precisions", type=_csv, default=None, help="comma-separated; default: what this device runs natively"
    )
    parser.add_argument(
        "--seeds", type=_csv, default=["0"], help="comma-separated ints (default 0); several give mean ± spread"
    )
    parser.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=V1[,V2]",
        help="any RunConfig field (or wandb_mode/project/group); repeatable",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="runs in parallel, one process each (one GPU each on multi-GPU machines)"
    )
    parser.add_argument("--force", action="store_true", help="re-run runs whose results are already complete")
    parser.add_argument("--kernel", default=KERNEL, help=f"Jupyter kernel to run the notebooks with (default {KERNEL})")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a notebook cell may run (default 3600)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative eval-loss tolerance vs fp32 for the recommendation",
    )
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip report.ipynb / report.html")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        print(f"error: invalid --seeds {','.join(args.seeds)!r}; expected comma-separated ints", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: invalid --workers {args.workers}; expected >= 1", file=sys.stderr)
        return 2
    settings = Settings(kernel=args.kernel, timeout=args.timeout)
    try:
        result = sweep(
            args.out, args.precisions, seeds, args.param,
            workers=args.workers, force=args.force, report=args.report, tolerance=args.tolerance, settings=settings,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = result.out
    ran = sum(not o.resumed for o in result.outcomes)
    print(
        f"\nsweep {out}: {len(result.outcomes)} of {result.planned} runs done "
        f"({ran} executed, {len(result.outcomes) - ran} resumed), {len(result.failed)} not ok"
    )
    print(f"  results:   {out / 'results'}/\n  notebooks: {out / 'runs'}/")
    for key, path in result.report.items():
        print(f"  {key + ':':10} {path}")
    if result.outcomes and not result.interrupted:
        for rec in recommendations(load_sweep(out), args.tolerance):
            print(
                f"recommendation{f' ({rec.setting})' if rec.setting else ''}: {rec.precision or 'none'} — {rec.reason}"
            )
    if result.interrupted:
        print("interrupted: finished results are kept; run the same command again to resume", file=sys.stderr)
    if result.report_error:
        print(f"report failed: {result.report_error}", file=sys.stderr)
    for outcome in result.failed:
        print(f"FAILED {_line(outcome)}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
