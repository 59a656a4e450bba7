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

SCHEMA_VERSION = 2  # 2: metrics.tokens_per_s became items_per_s (it holds samples/s for non-LM models)
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


@dataclass(frozen=True)
class HistoryRow:
    step: int
    loss: float | None
    loss_scale: float | None
    grad_norm: float | None
    step_time_ms: float | None
    skipped: bool = False
    skipped_steps: int = 0  # cumulative


@dataclass(frozen=True)
class RunResult:
    config: dict[str, Any]
    plan: dict[str, Any]
    metrics: Metrics = field(default_factory=Metrics)
    history: tuple[HistoryRow, ...] = ()
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
        return _finite(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported schema_version {version!r}; this amp_lib reads {', '.join(map(str, READABLE_VERSIONS))}")
        metrics = dict(d.get("metrics", {}))
        if version == 1:
            metrics["items_per_s"] = metrics.pop("tokens_per_s", None)
        return cls(
            config=dict(d["config"]),
            plan=dict(d["plan"]),
            metrics=Metrics(**metrics),
            history=tuple(HistoryRow(**row) for row in d.get("history", [])),
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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync it, then rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
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


def load_results(directory: str | os.PathLike[str]) -> list[RunResult]:
    """Every complete result JSON in `directory` (recursively), sorted by path."""
    return [RunResult.load(p) for p in sorted(Path(directory).rglob("*.json")) if not p.name.startswith(".")]


def load_sweep(directory: str | os.PathLike[str]) -> list[RunResult]:
    """The results of a sweep folder (its `results/` subfolder when it has one) or of a folder of JSONs."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"sweep_dir {str(directory)!r} is not a folder")
    results_dir = root / "results"
    return load_results(results_dir if results_dir.is_dir() else root)
