"""The result schema (one JSON file per run), its typed records and its atomic I/O.

A result is written to a temp file in the same folder and renamed into place, so a crash never
leaves half a file and a resumed sweep can trust that any result file it finds is complete.
JSON has no NaN or Infinity: non-finite floats are stored as null (`finite_or_none`), and the
status says why a value is missing. Values are cleaned once, where a record is made: a `Metrics` or
`EvalRow` holds a finite float or None, never NaN, so nothing downstream cleans them again.

The records are typed at the seam: the plan is a `PlanRecord`, and what the report needs of a run's
config is a property (`seed`, `requested`, `row`, `setting_key`, `identity`), so nothing outside this
module reads the config or plan dicts by key. On reading, an `ok` result whose eval loss is not finite
is read as `diverged`: a status never says `ok` for a run that did not train.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from amp_lib.config import NON_SETTING_FIELDS, config_identity
from amp_lib.energy import EnergyReading
from amp_lib.fp8 import LayerPlan
from amp_lib.memtrack import MemorySplit
from amp_lib.optim import parse_optimizer
from amp_lib.precision import parallel_label, parse_precision

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


def _clean_floats(record: Any) -> None:
    """Replace every non-finite float field of a frozen record by None (the one place NaN is cleaned)."""
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            object.__setattr__(record, f.name, None)


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
    # What the model and optimizer hold, as tensor sizes (what held the peak, by MemTracker: `RunResult.memory`).
    param_memory_mb: float | None = None
    grad_memory_mb: float | None = None
    optimizer_memory_mb: float | None = None
    # Runs over several processes (added within schema 2; absent in older files). The split above is rank 0's
    # share (FSDP shards it), `peak_memory_mb` the largest rank's peak, these the peaks of every rank in order.
    peak_memory_mb_ranks: tuple[float, ...] | None = None
    items_per_step: int | None = None  # items (tokens/samples) per optimizer step over all processes
    # Time the profiled step spent in collectives, where the profiler names them (None: not profiled or not told apart)
    comm_time_ms: float | None = None
    param_count: int | None = None  # the model's parameters (all of them, over every rank)
    # fp8 runs on a GPU whose peaks the table knows: MFU against the bf16 dense peak (also `mfu`) and against
    # the mixed peak of the GEMMs that ran in fp8 and in bf16 (`amp_lib.fp8.MFU_LABELS`).
    mfu_vs_bf16_peak: float | None = None
    mfu_vs_mixed_peak: float | None = None
    mixed_peak_tflops: float | None = None
    fp8_flop_share: float | None = None  # of the training FLOPs per item, the part in fp8 GEMMs

    def __post_init__(self) -> None:
        _clean_floats(self)

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
    elapsed_s: float | None  # training wall time until this eval, earlier evals excluded: for time-to-quality

    def __post_init__(self) -> None:
        _clean_floats(self)


@dataclass(frozen=True)
class PlanRecord:
    """What a run really did (a `PrecisionPlan` as written, and where it ran). Every field is optional, so a
    result of an older schema, or of a run that failed before it had a plan, still reads."""

    requested: str | None = None
    effective: str | None = None
    device_type: str | None = None
    device_name: str | None = None
    autocast_dtype: str | None = None
    param_dtype: str | None = None
    use_loss_scaler: bool = False
    fallback_reason: str | None = None
    parallelism: str = "none"
    gather_dtype: str | None = None
    reduce_dtype: str | None = None
    torch_version: str | None = None
    threads: int | None = None  # intra-op threads the run used
    concurrent_runs: int | None = None  # runs that trained on the machine at once (a sweep's workers)
    executor: str | None = None  # where a sweep ran it: local, ray or slurm
    fp8_layers: str | None = None  # fp8 plans: the layer selection
    emulated: bool = False  # an fp8 recipe emulated on a device without fp8 GEMMs: its speed says nothing
    machine: dict[str, Any] = field(default_factory=dict)  # the header's facts: CPU model, ISA, versions, commit
    extra: dict[str, Any] = field(default_factory=dict)  # keys this schema does not know, kept as written

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PlanRecord:
        d = dict(d or {})
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: d[k] for k in known if k in d}, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **self.extra}

    @property
    def timed_in_parallel(self) -> bool:
        return isinstance(self.concurrent_runs, int) and self.concurrent_runs > 1


@dataclass(frozen=True)
class TimingBlock:
    """One block of the interleaved timing: `steps` consecutive steps of one precision in one round."""

    round: int
    precision: str  # the precision asked for, canonical
    steps: int
    step_ms: float  # the median step time of the block
    spread: float  # its p90 / p10 step time: how steady the machine was while it ran
    dropped: bool = False  # spread beyond the limit: left out of the comparison, and counted


@dataclass(frozen=True)
class TimingRecord:
    """A setting's speed, measured by `amp_lib.speed`: its precisions timed in alternating short blocks on the
    same model, batches and threads, until every comparison with the baseline was decided or the budget ran out."""

    precisions: tuple[str, ...]  # timed, the baseline first
    effective: dict[str, str]  # what each ran as
    blocks: tuple[TimingBlock, ...]
    block_steps: int
    budget_s: float
    elapsed_s: float
    stopped: str  # "decided", "budget" or "rounds"
    margin: float  # "faster" means a speed-up above 1 + margin
    spread_limit: float  # a block whose p90 / p10 step time exceeds it is dropped
    failed: dict[str, str] = field(default_factory=dict)  # precisions that could not be timed, and why

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TimingRecord:
        return cls(**{**d, "precisions": tuple(d["precisions"]), "blocks": tuple(TimingBlock(**b) for b in d["blocks"])})

    def paired_logs(self, precision: str) -> list[float]:
        """log(baseline step time / `precision`'s) of every round where both blocks were kept: its log speed-ups."""
        kept = {(b.round, b.precision): b.step_ms for b in self.blocks if not b.dropped}
        base = self.precisions[0]
        rounds = sorted({r for r, p in kept if p == precision and (r, base) in kept})
        return [math.log(kept[(r, base)] / kept[(r, precision)]) for r in rounds]

    def dropped(self, precision: str) -> int:
        return sum(b.dropped for b in self.blocks if b.precision == precision)


DEFAULT_OPTIMIZER = "adamw"  # fused AdamW with fp32 state: the optimizer of the baseline, named in no label


@dataclass(frozen=True, order=True)
class RowKey:
    """Which row of a report a run belongs to within its setting: the precision asked for, the parallelism,
    under FSDP the dtype gradients were reduced in, and the optimizer. Typed, so no display string is ever
    parsed back."""

    requested: str
    parallelism: str = "none"
    reduce_dtype: str | None = None
    optimizer: str = DEFAULT_OPTIMIZER

    @property
    def label(self) -> str:
        """`fsdp bf16-mixed (reduce fp32)`, `ddp fp16-mixed`, `bf16-mixed`, `fp32 adamw-8bit`."""
        label = parallel_label(self.requested, self.parallelism, self.reduce_dtype)
        return label if self.optimizer == DEFAULT_OPTIMIZER else f"{label} {self.optimizer}"


SettingKey = tuple[tuple[str, str], ...]  # (field, repr(value)) of everything a run shares with its comparisons
ROW_FIELDS: tuple[str, ...] = ("reduce_dtype", "optimizer")  # config values that make a row within a setting


def _canonical(name: Any, parse: Any = parse_precision) -> str:
    try:
        return parse(name)
    except ValueError:
        return str(name)


@dataclass(frozen=True)
class RunResult:
    config: dict[str, Any]
    plan: PlanRecord
    metrics: Metrics = field(default_factory=Metrics)
    history: tuple[HistoryRow, ...] = ()
    evals: tuple[EvalRow, ...] = ()
    headroom: dict[str, Any] | None = None  # the fp16 headroom map (amp_lib.headroom), when it was on
    profile: dict[str, Any] | None = None  # one profiled step (amp_lib.diagnose), when asked for
    timing: TimingRecord | None = None  # a speed measurement (amp_lib.speed) instead of a training run
    fp8_layers: LayerPlan | None = None  # an fp8 run's linears: which ran in fp8, and why the others did not
    memory: MemorySplit | None = None  # what held the memory at the peak of one untimed step (amp_lib.memtrack)
    energy: EnergyReading | None = None  # the timed steps' energy, or None with the reason (amp_lib.energy)
    status: str = "ok"
    error: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"invalid status {self.status!r}; valid: {', '.join(STATUSES)}")
        if not isinstance(self.plan, PlanRecord):
            object.__setattr__(self, "plan", PlanRecord.from_dict(self.plan))
        if isinstance(self.timing, dict):
            object.__setattr__(self, "timing", TimingRecord.from_dict(self.timing))
        for name, record in (("fp8_layers", LayerPlan), ("memory", MemorySplit), ("energy", EnergyReading)):
            if isinstance(value := getattr(self, name), dict):
                object.__setattr__(self, name, _record(record, value))
        if self.ok and (any(e.loss is None for e in self.evals) or (self.history and self.metrics.eval_loss is None)):
            # an "ok" run that did not train to a finite eval loss (NaN, written as null) is no parity evidence
            object.__setattr__(self, "status", "diverged")
            object.__setattr__(self, "error", "its eval loss is not finite: read as diverged")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    # -- what the report needs of the config, typed ----------------------------------------------------

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def requested(self) -> str:
        """The precision asked for, canonical (as the config holds it; the plan's for older files)."""
        return _canonical(self.config.get("precision", self.plan.requested))

    @property
    def effective(self) -> str | None:
        """The precision that ran, canonical (an older result's `fp8-mixed` is `fp8-tensorwise`, what it ran)."""
        return None if self.plan.effective is None else _canonical(self.plan.effective)

    @property
    def optimizer(self) -> str:
        """The optimizer it trained with, canonical (adamw for results older than the choice)."""
        return _canonical(self.config.get("optimizer", DEFAULT_OPTIMIZER), parse_optimizer)

    @property
    def row(self) -> RowKey:
        """The report row this run belongs to (its setting aside)."""
        parallelism = str(self.config.get("parallelism", "none"))
        reduce = self.plan.reduce_dtype or self.config.get("reduce_dtype")
        return RowKey(self.requested, parallelism, reduce if parallelism == "fsdp" else None, self.optimizer)

    @property
    def label(self) -> str:
        """What ran, in words: `fp16-mixed (ran as bf16-mixed)` when a request fell back."""
        effective = self.effective
        base = self.row.label
        return base if effective in (None, self.requested) else f"{base} (ran as {effective})"

    @property
    def setting_key(self) -> SettingKey:
        """Everything a run shares with the runs it is compared with: its config but the precision, the seed, the
        name, the folder, the reduce dtype (a choice of precision under FSDP) and the optimizer (a row of its own
        each, against the same fp32). The parallelism, the processes and the batch per process stay: rows compare
        one global batch."""
        skip = (*NON_SETTING_FIELDS, *ROW_FIELDS, "recipe")
        return tuple(sorted((k, repr(v)) for k, v in self.config.items() if k not in skip))

    @property
    def setting_values(self) -> dict[str, Any]:
        """The config values of `setting_key`, as values (for labels)."""
        return {k: self.config.get(k) for k, _ in self.setting_key}

    @property
    def identity(self) -> str:
        """The identity of the config it ran (`RunConfig.identity`)."""
        return config_identity(self.config)

    @property
    def steps(self) -> int | None:
        """The optimizer steps it was asked to train (the config's, else its history's)."""
        steps = self.config.get("steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            return steps
        return self.history[-1].step + 1 if self.history else None

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))

    @property
    def eval_curve(self) -> list[tuple[int, float, float | None]]:
        """(step, loss, elapsed_s) of each finite eval. A result without evals (schema 1, or none recorded)
        counts its final `eval_loss` as one eval at its last step, timed by `train_time_s` when recorded."""
        rows = [(e.step, e.loss, e.elapsed_s) for e in self.evals if e.loss is not None]
        if rows or self.evals:
            return rows
        loss, step = self.metrics.eval_loss, self.steps
        return [] if loss is None or step is None else [(step, loss, self.metrics.train_time_s)]

    @property
    def best_eval_loss(self) -> float | None:
        """The lowest eval loss of the run: its eval curve, else `metrics.best_eval_loss`, else `eval_loss`."""
        losses = [loss for _, loss, _ in self.eval_curve] if self.evals else []
        if losses:
            return min(losses)
        m = self.metrics
        return m.best_eval_loss if m.best_eval_loss is not None else m.eval_loss

    def first_reach(self, target: float) -> tuple[int, float | None] | None:
        """(step, elapsed_s) of the first eval at or below `target`; None when the run never got there."""
        return next(((step, t) for step, loss, t in self.eval_curve if loss <= target), None)

    @property
    def run_name(self) -> str:
        """The name the run was given ("" when it took its default one)."""
        return str(self.config.get("run_name") or "")

    @property
    def bf16_capable(self) -> bool:
        """Whether the device it ran on computes in bf16 (every CPU; GPUs from compute capability 8.0): where
        an fp16 overflow's way out can be bf16."""
        if self.plan.device_type != "cuda":
            return True
        cc = self.plan.machine.get("compute_capability") or (self.profile or {}).get("facts", {}).get(
            "compute_capability"
        )
        return tuple(cc or (8, 0)) >= (8, 0)

    @property
    def error_line(self) -> str | None:
        return first_line(self.error)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        d["history"] = [asdict(row) for row in self.history]
        d["evals"] = [asdict(row) for row in self.evals]
        for name in ("fp8_layers", "memory", "energy"):
            record = getattr(self, name)
            d[name] = None if record is None else record.to_dict()
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
        result = cls(
            config=config,
            plan=PlanRecord.from_dict(d["plan"]),
            metrics=Metrics(**metrics),
            history=tuple(HistoryRow(**row) for row in d.get("history", [])),
            evals=tuple(EvalRow(**row) for row in d.get("evals", [])),
            headroom=d.get("headroom"),
            profile=d.get("profile"),
            timing=d.get("timing"),
            fp8_layers=d.get("fp8_layers"),
            memory=d.get("memory"),
            energy=d.get("energy"),
            status=d["status"],
            error=d.get("error"),
        )
        return result

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunResult:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))


def _record(cls: Any, d: dict[str, Any]) -> Any:
    """A typed record from its JSON dict: its own `from_dict` where it has one, else its fields (JSON's lists
    back to tuples)."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
