"""`python -m amp_lib.sweep`: run `train.ipynb` over a grid with papermill, then the report.

    python -m amp_lib.sweep --out sweeps/default                      # native precisions, device defaults
    python -m amp_lib.sweep --out sweeps/lr --precisions fp32,bf16 --seeds 0,1,2 -p lr=1e-3,3e-3 --workers 2
    python -m amp_lib.sweep --out /shared/sweeps/lr --executor ray --ray-address auto ...     # a Ray cluster
    python -m amp_lib.sweep --out /shared/sweeps/lr --executor slurm --slurm-partition gpu ... # Slurm jobs

Layout of `<out>`: `runs/<run_name>.ipynb` (each executed notebook), `results/<run_name>.json`,
`report.ipynb`, `report.html`, `figures/*.png`, `summary.md`, `sweep.json` (the runs of the grid last
asked for: the report covers those) and, while a sweep runs, `.sweep.lock` (its pid). One run failing
never stops the others: it is recorded, shown in the report, and makes the command exit 1 at the end.
Everything is checked before the first kernel starts: a refused sweep exits 2, one `error:` line per
problem, and writes nothing.
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import importlib.util
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from amp_lib.config import PROJECT
from amp_lib.details import summary_markdown
from amp_lib.precision import parse_precision, probe, valid_precision_names
from amp_lib.render import short_reason
from amp_lib.report import DEFAULT_TOLERANCE, SweepReport, build_report, check_tolerance
from amp_lib.results import MANIFEST, grid_names, load_sweep, write_json_atomic
from amp_lib.speed import DEFAULT_BUDGET_S
from amp_lib.sweep.execute import Executor, LocalExecutor, Outcome, Settings, error_text, outcome_line, run_sweep
from amp_lib.sweep.grid import SweepRun, check_runs, expand_grid, parse_params, timing_runs
from amp_lib.sweep.lock import SweepLock
from amp_lib.sweep.publish import mark_stale, notes_markdown, remove_partial, unmark, unmarked, write_report
from amp_lib.sweep.ray_executor import RayExecutor, address_problems
from amp_lib.sweep.slurm_executor import SlurmExecutor, parse_sbatch
from amp_lib.tracking import credentials_problem, record_report


@dataclass(frozen=True)
class SweepResult:
    out: Path
    outcomes: tuple[Outcome, ...]
    planned: int = 0
    interrupted: bool = False
    report: SweepReport | None = None  # None when interrupted or when no run left a result
    files: dict[str, Path] = field(default_factory=dict)
    report_error: str | None = None
    skipped: tuple[str, ...] = ()  # combinations of the grid that cannot run, one line each

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.report_error else 0


class SweepRefused(ValueError):
    """A sweep refused before anything ran or was written: every problem, one line each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def path_problems(out: Path) -> list[str]:
    """What stops the sweep from writing in `out`, its `results/` and `runs/`: found before any run."""
    problems = []
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        return [f"--out {out}: {existing} is a file, not a folder"]
    for folder in (out, out / "results", out / "runs"):
        if folder.exists() and not folder.is_dir():
            problems.append(f"--out {out}: {folder} is a file, not a folder")
        elif folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"--out {out}: no permission to write in {folder}")
    if existing != out and not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"--out {out}: no permission to create it in {existing}")
    if not problems and existing.is_dir():
        try:  # what os.access cannot tell: a read-only or special file system (/proc), a full disk
            fd, probe_file = tempfile.mkstemp(prefix=".amp-probe-", dir=existing)
            os.close(fd)
            os.unlink(probe_file)
        except OSError as exc:
            problems.append(f"--out {out}: cannot create files in {existing} ({exc.strerror or exc})")
    return problems


def model_problems(runs: Sequence[SweepRun], workdir: str) -> list[str]:
    """A user model ("module:function") whose module the kernels could not import, or whose module has no
    such function (read from its source: the module is not imported, so nothing of it runs here)."""
    problems = []
    for model in sorted({str(r.parameters.get("model", "")) for r in runs}):
        module, _, function = model.partition(":")
        if ":" not in model or not module:
            continue
        top = module.split(".")[0]
        # The kernels see `workdir` (their PYTHONPATH) and what is installed here; an editable install
        # is found only by its meta-path finder, so the installed half asks `find_spec`, not sys.path.
        if importlib.machinery.PathFinder.find_spec(top, [workdir]) is None and importlib.util.find_spec(top) is None:
            problems.append(
                f"model={model!r}: no module named {top!r} in {workdir} (the kernels' PYTHONPATH) or the installed packages"
            )
        elif (names := _module_names(module, workdir)) is not None and function not in names:
            problems.append(f"model={model!r}: module {module!r} defines no {function!r}")
    return problems


def _module_names(module: str, workdir: str) -> set[str] | None:
    """The names a module's source defines at its top level; None when that cannot be told without running it
    (no source, a module `__getattr__`, a star import)."""
    sys.path.insert(0, workdir)
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    finally:
        sys.path.remove(workdir)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(alias.name == "*" for alias in node.names):
                return None
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return None if "__getattr__" in names else names


def kernel_problems(kernel: str) -> list[str]:
    """A Jupyter kernel the notebooks could not start."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(kernel)
    except NoSuchKernel:
        return [f"--kernel {kernel!r}: no such Jupyter kernel; valid: {', '.join(sorted(manager.find_kernel_specs()))}"]
    return []


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will run, and the combinations of its grid it skips (one line each)."""

    runs: tuple[SweepRun, ...]
    skipped: tuple[str, ...] = ()


def plan_sweep(
    out: str | os.PathLike[str],
    precisions: Sequence[str] | None,
    seeds: Sequence[int],
    params: Sequence[str],
    tolerance: float,
    settings: Settings,
    problems: Sequence[str] = (),
    speed_budget: float | None = None,
) -> SweepPlan:
    """The sweep's runs, every parameter, path, kernel and tolerance checked: raises `SweepRefused` listing every
    problem (one line each, `problems` found earlier first) before any kernel starts or anything is written."""
    problems = list(problems)
    given, out = str(out), Path(out)

    def check(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except ValueError as exc:
            problems.extend(line for line in str(exc).splitlines() if line not in problems)
            return None

    check(check_tolerance, tolerance)
    before_grid = len(problems)
    if precisions is not None and not [p for p in precisions if str(p).strip()]:
        problems.append(f"--precisions is empty; valid values are: {', '.join(valid_precision_names())}")
    for p in precisions or ():
        check(parse_precision, p)
    if not seeds:
        problems.append("--seeds is empty; expected comma-separated ints, e.g. 0 or 0,1,2")
    grid: dict[str, list[Any]] = check(parse_params, list(params)) or {}
    if len(problems) > before_grid and not grid:  # one bad item: check the others one by one too
        for item in params:
            grid.update(check(parse_params, [item]) or {})
    runs: list[SweepRun] = []
    skipped: tuple[str, ...] = ()
    devices = grid.get("device", ["auto"])
    caps = check(probe, devices[0] if len(devices) == 1 else "auto")
    if caps is not None and len(problems) == before_grid:  # the grid itself is sound: check every run
        sorted_runs = check_runs(check(expand_grid, out, caps, precisions, seeds, grid) or [])
        problems += [p for p in sorted_runs.problems if p not in problems]
        runs, skipped = list(sorted_runs.runs), sorted_runs.skipped
        budget = DEFAULT_BUDGET_S.get(caps.device_type, 60.0) if speed_budget is None else speed_budget
        if not budget >= 0:
            problems.append(f"invalid --speed-budget {speed_budget!r}; expected seconds >= 0 (0: no timing)")
        else:
            runs += timing_runs(runs, budget)
        problems += model_problems(runs, settings.workdir or os.getcwd())
        problems += [p for p in map(credentials_problem, {r.parameters.get("wandb_mode") for r in runs}) if p]
    problems += kernel_problems(settings.kernel)
    problems += path_problems(out) if given.strip() else ["--out is empty; give the sweep's folder, e.g. --out sweeps/mine"]
    if problems:
        raise SweepRefused(problems)
    return SweepPlan(tuple(runs), skipped)


def _report_text(report: SweepReport, notes: Sequence[str]) -> str:
    return summary_markdown(report) + notes_markdown(notes)


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
    settings: Settings | None = None,
    executor: Executor | None = None,
    speed_budget: float | None = None,
) -> SweepResult:
    """Plan, run (resumably, failures isolated) and report a sweep; the Python face of the CLI.

    Everything is checked first (`plan_sweep`, then `executor.open()`, which connects to Ray or asks
    Slurm whether it takes such jobs): a refused sweep raises `SweepRefused` (a `ValueError`) and writes
    nothing. The folder is then locked for this sweep (`SweepLock`), its grid recorded in `sweep.json`,
    the runs executed by `executor` (default: this machine with `workers` processes), and the report
    covers exactly that grid's runs.
    """
    if executor is not None and workers != 1:
        raise SweepRefused(
            [f"workers={workers} applies to the local executor; {type(executor).__name__} places runs itself"]
        )
    executor = executor if executor is not None else LocalExecutor(workers)
    settings = settings or Settings()
    settings = replace(settings, workdir=settings.workdir or os.getcwd())
    plan = plan_sweep(out, precisions, seeds, params, tolerance, settings, speed_budget=speed_budget)
    out_path = Path(out)
    try:
        executor.open()
    except ValueError as exc:
        raise SweepRefused(str(exc).splitlines()) from None
    for line in plan.skipped:
        print(line, file=sys.stderr)
    try:
        result = _run_and_report(out_path, plan.runs, settings, executor, force=force, report=report, tolerance=tolerance)
    finally:
        executor.close()
    return replace(result, skipped=plan.skipped)


def _run_and_report(
    out_path: Path,
    runs: Sequence[SweepRun],
    settings: Settings,
    executor: Executor,
    *,
    force: bool,
    report: bool,
    tolerance: float,
) -> SweepResult:
    out_path.mkdir(parents=True, exist_ok=True)
    with SweepLock(out_path):
        remove_partial(out_path)
        # Stale until proven fresh: whatever ends this sweep (SIGKILL included), the old report says so.
        mark_stale(out_path, f"a sweep started at {time.strftime('%Y-%m-%d %H:%M:%S')} has not rebuilt it")
        if grid_names(out_path) != {r.name for r in runs}:  # rewritten only when the grid changes
            write_json_atomic(out_path / MANIFEST, {"runs": [r.name for r in runs]})
        outcomes, interrupted = run_sweep(runs, settings, force=force, executor=executor)
        summary: SweepReport | None = None
        files: dict[str, Path] = {}
        report_error = None
        executed = any(not o.resumed for o in outcomes)
        if interrupted:
            if executed:
                mark_stale(out_path, "the sweep was interrupted after new runs finished")
            else:
                unmark(out_path)  # nothing new finished: the old report still shows these results
            return SweepResult(out_path, tuple(outcomes), len(runs), interrupted, None, files, None)
        loaded = load_sweep(out_path)
        try:
            summary = build_report(list(loaded), tolerance)
        except Exception as exc:  # noqa: BLE001 - the runs are done and kept whatever the report does
            report_error = f"the report could not be built: {error_text(exc)}"
            mark_stale(out_path, report_error)
        if summary is not None:
            _record_in_wandb(summary, runs, out_path)
        if summary is not None and report:
            try:
                files = write_report(out_path, summary, settings, notes=loaded.notes)
            except Exception as exc:  # noqa: BLE001 - the runs are done and kept whatever the report does
                report_error = str(exc)
        elif summary is not None:
            summary_path = out_path / "summary.md"
            if summary_path.exists() and unmarked(summary_path) != _report_text(summary, loaded.notes):
                mark_stale(out_path, "the results changed since it was written and --no-report skipped the report")
            else:
                unmark(out_path)
    return SweepResult(out_path, tuple(outcomes), len(runs), interrupted, summary, files, report_error)


def _record_in_wandb(report: SweepReport, runs: Sequence[SweepRun], out: Path) -> None:
    """The verdicts go to a W&B run of their own, in the runs' mode, project and group; W&B trouble is
    reported and never costs the sweep its results or its report."""
    values = runs[0].parameters  # plan_sweep refuses an empty grid
    group = values.get("wandb_group")
    try:
        record_report(
            report, mode=values.get("wandb_mode"), project=values.get("wandb_project"), group=group,
            name=f"{group or out.name}-report", dir=out / "runs",
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - tracking must not be why a sweep fails
        print(f"warning: the report's W&B run failed: {error_text(exc)}", file=sys.stderr)


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
    parser.add_argument(
        "--executor",
        default="local",
        metavar="{local,ray,slurm}",
        help="where runs execute: this machine (default), a Ray cluster, Slurm jobs (docs/clusters.md)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to use: auto, host:port or ray://host:port (default: a local one)",
    )
    parser.add_argument("--ray-dashboard", action="store_true", help="start the local Ray instance with its dashboard")
    parser.add_argument(
        "--slurm-partition", default=None, metavar="NAME", help="Slurm partition (default: the cluster's default)"
    )
    parser.add_argument(
        "--slurm-time", type=int, default=60, metavar="MIN", help="minutes each run's job may take (default 60)"
    )
    parser.add_argument(
        "--slurm-gpus-per-run",
        type=int,
        default=None,
        metavar="N",
        help="GPUs per job (default: nproc for cuda runs, else 0)",
    )
    parser.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option, e.g. mem=16G; repeatable",
    )
    parser.add_argument(
        "--kernel", default=PROJECT, help=f"Jupyter kernel to run the notebooks with (default {PROJECT})"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a notebook cell may run (default 3600)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative eval-loss tolerance vs fp32 for the recommendation",
    )
    parser.add_argument(
        "--speed-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds to time each setting's precisions against fp32 in alternating blocks (default: 20 on a CPU, "
        "60 on a GPU; 0: no timing, speed from the training runs alone)",
    )
    parser.add_argument("--no-report", dest="report", action="store_false", help="skip report.ipynb / report.html")
    return parser


EXECUTORS = ("local", "ray", "slurm")
# The options of each executor: given with another executor, they would be silently ignored.
EXECUTOR_OPTIONS = {
    "ray": (("ray_address", None), ("ray_dashboard", False)),
    "slurm": (("slurm_partition", None), ("slurm_time", 60), ("slurm_gpus_per_run", None), ("sbatch", [])),
    "local": (("workers", 1),),
}


def make_executor(args: argparse.Namespace) -> Executor:
    """The executor the command line asks for; a `SweepRefused` listing every bad or misplaced option."""
    if args.executor not in EXECUTORS:
        raise SweepRefused([f"invalid --executor {args.executor!r}; valid values are: {', '.join(EXECUTORS)}"])
    problems = [
        f"--{name.replace('_', '-')} applies to --executor {kind}, not {args.executor}"
        for kind, options in EXECUTOR_OPTIONS.items()
        if kind != args.executor
        for name, default in options
        if getattr(args, name) != default
    ]
    executor: Executor
    if args.executor == "ray":
        problems += address_problems(args.ray_address)
        executor = RayExecutor(args.ray_address, dashboard=args.ray_dashboard)
    elif args.executor == "slurm":
        sbatch: dict[str, str] = {}
        try:
            sbatch = parse_sbatch(args.sbatch)
        except ValueError as exc:
            problems.append(str(exc))
        executor = SlurmExecutor(args.slurm_partition, args.slurm_time, args.slurm_gpus_per_run, sbatch)
        problems += executor.problems()
    else:
        executor = LocalExecutor(args.workers)
    if problems:
        raise SweepRefused(problems)
    return executor


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping the sweep as Ctrl-C does (exit 143 instead of 130)."""


def _resume_hint(force: bool) -> str:
    """How to go on after an interrupted sweep: the same command resumes it, unless it forced every run again."""
    if force:
        return "run the same command without --force to resume (with it, every run starts again)"
    return "run the same command again to resume"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems: list[str] = []  # every problem of the command line, reported together with the plan's
    seeds: list[int] = []
    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        problems.append(f"invalid --seeds {','.join(args.seeds)!r}; expected comma-separated ints, e.g. 0,1,2")
    if args.timeout is not None and not args.timeout > 0:
        problems.append(f"invalid --timeout {args.timeout}; expected seconds > 0")
    if args.workers < 1:
        problems.append(f"invalid --workers {args.workers}; expected >= 1")
    settings = Settings(kernel=args.kernel, timeout=args.timeout)
    executor: Executor | None = None
    try:
        executor = make_executor(args)
    except SweepRefused as exc:
        problems += exc.problems
    terminated: list[int] = []

    def terminate(signum: int, frame: Any) -> None:
        terminated.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        if problems:  # refused: say everything else that is wrong too, then stop before anything runs
            plan_sweep(args.out, args.precisions, seeds or [0], args.param, args.tolerance, settings, problems,
                       args.speed_budget)  # fmt: skip
        result = sweep(
            args.out, args.precisions, seeds, args.param, force=args.force, report=args.report,
            tolerance=args.tolerance, settings=settings, executor=executor, speed_budget=args.speed_budget,
        )  # fmt: skip
    except ValueError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except Terminated:  # before the runs started or after they ended: nothing is lost, the report says STALE
        print(f"terminated (SIGTERM): finished results are kept; {_resume_hint(args.force)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # Ctrl-C while connecting to an engine (the runs' own Ctrl-C is the sweep's to handle)
        print("interrupted: nothing ran; run the same command again", file=sys.stderr)
        return 130
    except OSError as exc:  # the folder changed under a running sweep (checked at the start): say so, no traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or args.out}; finished results are kept", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = result.out
    ran = sum(not o.resumed for o in result.outcomes)
    print(
        f"\nsweep {out}: {len(result.outcomes)} of {result.planned} runs done "
        f"({ran} executed, {len(result.outcomes) - ran} resumed), {len(result.failed)} not ok"
    )
    print(f"  results:   {out / 'results'}/\n  notebooks: {out / 'runs'}/")
    for key, path in result.files.items():
        print(f"  {key + ':':10} {path}")
    if result.report is not None:
        for rec in result.report.recommendations:
            print(f"recommendation ({rec.setting}): {rec.precision or 'none'} — {short_reason(rec)}")
    for line in result.skipped:
        print(line)
    if result.interrupted:
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"{how}: finished results are kept; {_resume_hint(args.force)}", file=sys.stderr)
    if result.report_error:
        print(f"report failed: {result.report_error}", file=sys.stderr)
    for outcome in result.failed:
        print(f"FAILED {outcome_line(outcome)}", file=sys.stderr)
    return 143 if terminated else result.exit_code
