"""The result schema (one JSON file per run) and its atomic I/O, nothing else.

A result is written to a temp file in the same folder and renamed into place, so a crash never
leaves half a file and a resumed sweep can trust that any result file it finds is complete.
JSON has no NaN or Infinity: non-finite floats are stored as null (`finite_or_none`), and the
status says why a value is missing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# 2: metrics.tokens_per_s became items_per_s (it holds samples/s for non-LM models), config.warmup_steps
# became timing_warmup_steps (the learning-rate warm-up is lr_warmup_steps); eval curves, the learning rate
# per step, the best eval loss, training time and the memory split were added.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("ok", "failed", "oom", "diverged")


def finite_or_none(value: Any) -> float | None:
    """A float for a finite number, None for anything else (NaN/inf are not a loss, a scale, nor a timing)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int too large for a float
        return None
    return number if math.isfinite(number) else None


def first_line(text: str | None) -> str | None:
    """The first non-blank line of an error text: what a table cell or a log line shows."""
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else None


@dataclass(frozen=True)
class Metrics:
    items_per_s: float | None = None  # median over timed steps, in `throughput_unit` (tokens or samples)
    throughput_unit: str = "tokens"
    step_time_ms_median: float | None = None
    step_time_ms_p10: float | None = None
    step_time_ms_p90: float | None = None
    timed_steps: int = 0
    peak_memory_mb: float | None = None
    peak_memory_kind: str | None = None  # "cuda_allocated" or "cpu_rss"
    final_train_loss: float | None = None
    eval_loss: float | None = None
    skipped_steps: int = 0
    final_loss_scale: float | None = None
    min_loss_scale: float | None = None
    mfu: float | None = None
    best_eval_loss: float | None = None  # lowest of the periodic evals (the final one included)
    train_time_s: float | None = None  # wall time of the training steps, evals excluded
    # What the peak memory holds, as tensor sizes: the rest of the peak is activations and workspace.
    param_memory_mb: float | None = None
    grad_memory_mb: float | None = None
    optimizer_memory_mb: float | None = None
    # Runs over several processes (added within schema 2; absent in older files). The split above is rank 0's
    # share (FSDP shards it), `peak_memory_mb` the largest rank's peak, these the peaks of every rank in order.
    peak_memory_mb_ranks: tuple[float, ...] | None = None
    items_per_step: int | None = None  # items (tokens/samples) per optimizer step over all processes
    # Time the profiled step spent in collectives, where the profiler names them (None: not profiled or not told apart)
    comm_time_ms: float | None = None

    @property
    def peak_memory_spread_mb(self) -> float | None:
        """Largest minus smallest peak over the ranks: how unevenly a sharding spread the memory."""
        ranks = [r for r in self.peak_memory_mb_ranks or () if r is not None]
        return max(ranks) - min(ranks) if ranks else None


@dataclass(frozen=True)
class HistoryRow:
    step: int
    loss: float | None
    loss_scale: float | None
    grad_norm: float | None
    step_time_ms: float | None
    skipped: bool = False
    skipped_steps: int = 0  # cumulative
    lr: float | None = None  # learning rate the step used


@dataclass(frozen=True)
class EvalRow:
    """One evaluation on the held-out batches, after `step` optimizer steps (skipped ones included)."""

    step: int
    loss: float | None
    elapsed_s: float  # training wall time until this eval, earlier evals excluded: for time-to-quality


@dataclass(frozen=True)
class RunResult:
    config: dict[str, Any]
    plan: dict[str, Any]
    metrics: Metrics = field(default_factory=Metrics)
    history: tuple[HistoryRow, ...] = ()
    evals: tuple[EvalRow, ...] = ()
    headroom: dict[str, Any] | None = None  # the fp16 headroom map (amp_lib.headroom), when it was on
    profile: dict[str, Any] | None = None  # one profiled step (amp_lib.diagnose), when asked for
    status: str = "ok"
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"invalid status {self.status!r}; valid: {', '.join(STATUSES)}")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error_line(self) -> str | None:
        return first_line(self.error)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["history"] = [asdict(row) for row in self.history]
        d["evals"] = [asdict(row) for row in self.evals]
        return _finite(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"unsupported schema_version {version!r}; this amp_lib reads {', '.join(map(str, READABLE_VERSIONS))}"
            )
        metrics, config = dict(d.get("metrics", {})), dict(d["config"])
        if version == 1:
            metrics["items_per_s"] = metrics.pop("tokens_per_s", None)
            if "warmup_steps" in config:
                config["timing_warmup_steps"] = config.pop("warmup_steps")
        if metrics.get("peak_memory_mb_ranks") is not None:
            metrics["peak_memory_mb_ranks"] = tuple(metrics["peak_memory_mb_ranks"])  # JSON has lists
        return cls(
            config=config,
            plan=dict(d["plan"]),
            metrics=Metrics(**metrics),
            history=tuple(HistoryRow(**row) for row in d.get("history", [])),
            evals=tuple(EvalRow(**row) for row in d.get("evals", [])),
            headroom=d.get("headroom"),
            profile=d.get("profile"),
            status=d["status"],
            error=d.get("error"),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunResult:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _file_mode() -> int:
    """The mode a plain `open()` would give a new file: 0666 less the umask (0644 under the usual 022)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync it, then rename it over `path`. The file gets the
    mode a plain `open()` would give it (mkstemp's 0600 would hide results from the rest of the team)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write JSON atomically (`write_text_atomic`); NaN and Infinity are refused, not written."""
    return write_text_atomic(path, json.dumps(data, indent=2, allow_nan=False))


# -- reading a folder of results -------------------------------------------------------------------

MANIFEST = "sweep.json"  # written by a sweep into its folder: the runs of the grid it was last asked for


@dataclass(frozen=True)
class LoadProblem:
    """A JSON file in a results folder that is not in a report, and why."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


class LoadedResults(list):  # type: ignore[type-arg]
    """The results read from a folder (a plain list of `RunResult`), plus what was not read:
    `problems` (unreadable, truncated or foreign JSON files) and `left_out` (well-formed results of an
    earlier grid in a sweep folder, not part of the grid it was last asked for)."""

    def __init__(self, results: Any = (), problems: Any = (), left_out: Any = ()) -> None:
        super().__init__(results)
        self.problems: tuple[LoadProblem, ...] = tuple(problems)
        self.left_out: tuple[LoadProblem, ...] = tuple(left_out)

    @property
    def notes(self) -> list[str]:
        """One line per file not in the results, for a report: unreadable ones first."""
        return [f"not read: {p}" for p in self.problems] + [f"left out: {p}" for p in self.left_out]


def read_result(path: str | os.PathLike[str]) -> RunResult | LoadProblem:
    """The result in `path`, or a `LoadProblem` saying (in one line) why it is not one."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        return LoadProblem(path, f"unreadable ({exc.strerror or exc})")
    except UnicodeDecodeError:
        return LoadProblem(path, "not text (not a result file)")
    except json.JSONDecodeError as exc:
        return LoadProblem(
            path, f"not valid JSON, truncated or corrupt ({exc.msg} at line {exc.lineno} column {exc.colno})"
        )
    if not isinstance(data, dict) or "schema_version" not in data:
        return LoadProblem(path, "not an AMP Workbook result (no schema_version)")
    try:
        return RunResult.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        return LoadProblem(path, f"not a readable result of this schema ({first_line(detail)})")


def _read_folder(directory: Path) -> list[tuple[Path, RunResult | LoadProblem]]:
    return [(p, read_result(p)) for p in sorted(directory.rglob("*.json")) if not p.name.startswith(".")]


def load_results(directory: str | os.PathLike[str]) -> LoadedResults:
    """Every well-formed result JSON in `directory` (recursively), sorted by path. A truncated, corrupt
    or foreign JSON file never raises: it is listed in `.problems` with the reason."""
    read = _read_folder(Path(directory))
    return LoadedResults(
        [r for _, r in read if isinstance(r, RunResult)], [r for _, r in read if isinstance(r, LoadProblem)]
    )


def grid_names(directory: str | os.PathLike[str]) -> set[str] | None:
    """The run names of the grid a sweep folder was last asked for (its `sweep.json`); None without one."""
    try:
        names = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(n) for n in names} if isinstance(names, list) else None


def load_sweep(directory: str | os.PathLike[str]) -> LoadedResults:
    """The results of a sweep folder (its `results/` subfolder when it has one) or of a folder of JSONs.

    A sweep folder lists the runs of the grid it was last asked for (`sweep.json`): results of earlier
    grids in the same folder are not returned but named in `.left_out`, so a report never averages
    in runs nobody asked for this time. Unreadable or foreign JSON files are named in `.problems`.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"sweep_dir {str(directory)!r} is not a folder")
    results_dir = root / "results"
    read = _read_folder(results_dir if results_dir.is_dir() else root)
    names = grid_names(root) if results_dir.is_dir() else None
    results, problems, left_out = [], [], []
    for path, loaded in read:
        if isinstance(loaded, LoadProblem):
            problems.append(loaded)
        elif names is None or path.stem in names:
            results.append(loaded)
        else:
            left_out.append(LoadProblem(path, "from an earlier grid, not part of the one this sweep was last run with"))
    return LoadedResults(results, problems, left_out)
