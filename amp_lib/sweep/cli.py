"""`python -m amp_lib.sweep`: run `train.ipynb` over a grid with papermill, then the report.

    python -m amp_lib.sweep --out sweeps/default                      # native precisions, device defaults
    python -m amp_lib.sweep --out sweeps/lr --precisions fp32,bf16 --seeds 0,1,2 -p lr=1e-3,3e-3 --workers 2

Layout of `<out>`: `runs/<run_name>.ipynb` (each executed notebook), `results/<run_name>.json`,
`report.ipynb`, `report.html`, `figures/*.png`, `summary.md`. One run failing never stops the
others: it is recorded, shown in the report, and makes the command exit 1 at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from amp_lib.config import PROJECT
from amp_lib.precision import probe
from amp_lib.report import DEFAULT_TOLERANCE, SweepReport, build_report, check_tolerance
from amp_lib.results import load_sweep
from amp_lib.sweep.execute import Outcome, Settings, outcome_line, run_sweep
from amp_lib.sweep.grid import expand_grid, parse_params
from amp_lib.sweep.publish import write_report


@dataclass(frozen=True)
class SweepResult:
    out: Path
    outcomes: tuple[Outcome, ...]
    planned: int = 0
    interrupted: bool = False
    report: SweepReport | None = None  # None when interrupted or when no run left a result
    files: dict[str, Path] = field(default_factory=dict)
    report_error: str | None = None

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "ok"]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.report_error else 0


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
) -> SweepResult:
    """Plan, run (resumably, failures isolated) and report a sweep; the Python face of the CLI."""
    settings = settings or Settings()
    check_tolerance(tolerance)  # before any run: a bad tolerance must not waste a sweep
    out_path = Path(out)
    grid = parse_params(params)
    devices = grid.get("device", ["auto"])
    caps = probe(devices[0] if len(devices) == 1 else "auto")
    runs = expand_grid(out_path, caps, precisions, seeds, grid)
    outcomes, interrupted = run_sweep(runs, settings, workers=workers, force=force)
    summary: SweepReport | None = None
    files: dict[str, Path] = {}
    report_error = None
    if outcomes and not interrupted:
        summary = build_report(load_sweep(out_path), tolerance)
        if report:
            try:
                files = write_report(out_path, summary, settings)
            except Exception as exc:  # noqa: BLE001 - the runs are done and kept whatever the report does
                report_error = str(exc)
    return SweepResult(out_path, tuple(outcomes), len(runs), interrupted, summary, files, report_error)


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
    parser.add_argument("--kernel", default=PROJECT, help=f"Jupyter kernel to run the notebooks with (default {PROJECT})")
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
    for key, path in result.files.items():
        print(f"  {key + ':':10} {path}")
    if result.report is not None:
        for rec in result.report.recommendations:
            print(
                f"recommendation{f' ({rec.setting})' if rec.setting else ''}: {rec.precision or 'none'} — {rec.reason}"
            )
    if result.interrupted:
        print("interrupted: finished results are kept; run the same command again to resume", file=sys.stderr)
    if result.report_error:
        print(f"report failed: {result.report_error}", file=sys.stderr)
    for outcome in result.failed:
        print(f"FAILED {outcome_line(outcome)}", file=sys.stderr)
    return result.exit_code
