"""The report's table, as data: each result placed in its setting and row (`place`), and every figure of a
run or of a row's seeds, mean and spread (`Measurements`), each run against the fp32 run of its seed. The
verdicts drawn from them are `amp_lib.report`'s."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from amp_lib.optim import baseline_optimizer
from amp_lib.precision import CANONICAL
from amp_lib.results import DEFAULT_OPTIMIZER, RowKey, RunResult, SettingKey
from amp_lib.stats import Stat

BASELINE = "fp32"


# -- settings and order --------------------------------------------------------------------------


def _order(key: RowKey) -> tuple[int, str]:
    return (CANONICAL.index(key.requested) if key.requested in CANONICAL else len(CANONICAL), key.label)


def setting_labels(results: Sequence[RunResult]) -> dict[SettingKey, str]:
    """A short label per setting: the model plus the config values that differ between settings."""
    keys = {r.setting_key: r for r in results}
    names = sorted({k for key in keys for k, _ in key})
    varying = [k for k in names if k != "model" and len({dict(key).get(k) for key in keys}) > 1]
    labels = {}
    for key, result in keys.items():
        values = result.setting_values
        parts = [result.model, *(f"{k}={values.get(k)!r}" for k in varying)]
        labels[key] = " ".join(p for p in parts if p)
    return labels


@dataclass(frozen=True)
class Run:
    """One result placed in the report: its setting's label and its row."""

    result: RunResult
    setting: str
    key: RowKey
    base_optimizer: str = DEFAULT_OPTIMIZER  # the optimizer of its setting's baseline (`baseline_optimizer`)

    @property
    def seed(self) -> int | None:
        return self.result.seed

    @property
    def in_baseline_row(self) -> bool:
        """Whether it is in its setting's baseline row: fp32 with the baseline optimizer."""
        return is_baseline_key(self.key, self.base_optimizer)


def is_baseline_key(key: RowKey, base_optimizer: str = DEFAULT_OPTIMIZER) -> bool:
    """Whether a row is the baseline of its setting: fp32, one device or not, with the setting's baseline optimizer."""
    return key.requested == BASELINE and key.optimizer == base_optimizer


def place(results: Sequence[RunResult]) -> list[Run]:
    """Every result with its setting and row, in report order: setting, precision, row, seed (as text)."""
    labels = setting_labels(results)
    optimizers: dict[str, set[str]] = defaultdict(set)
    for r in results:
        optimizers[labels[r.setting_key]].add(r.optimizer)
    base = {setting: baseline_optimizer(used) for setting, used in optimizers.items()}
    runs = [Run(r, labels[r.setting_key], r.row, base[labels[r.setting_key]]) for r in results]
    return sorted(runs, key=lambda r: (r.setting, _order(r.key), str(r.seed)))


def results_by_precision(results: Sequence[RunResult]) -> dict[tuple[str, RowKey], list[RunResult]]:
    """The results behind each row, keyed by (setting label, row), in report order."""
    groups: dict[tuple[str, RowKey], list[RunResult]] = defaultdict(list)
    for run in place(results):
        groups[(run.setting, run.key)].append(run.result)
    return dict(groups)






@dataclass(frozen=True)
class Measurements:
    """Every figure of one run, or of the seeds of one precision in one setting: mean and spread."""

    setting: str
    key: RowKey
    effective: str | None
    status: str  # "ok", or e.g. "ok×2, diverged×1" over seeds
    runs: int
    ok_runs: int
    seeds: tuple[int, ...]
    run_names: tuple[str, ...]
    throughput_unit: str
    items_per_s: Stat | None
    speedup: Stat | None  # throughput / fp32 throughput
    peak_memory_mb: Stat | None
    memory_saved_pct: Stat | None  # (fp32 peak - this peak) / fp32 peak * 100
    final_loss: Stat | None
    eval_loss: Stat | None
    loss_diff: Stat | None  # eval loss - fp32 eval loss
    skipped_steps: Stat | None
    final_loss_scale: Stat | None
    min_loss_scale: Stat | None
    fallback_reason: str | None
    error: str | None  # first line of the first error among the runs
    base_optimizer: str = DEFAULT_OPTIMIZER  # the optimizer of its setting's baseline

    @property
    def requested(self) -> str:
        return self.key.label

    @property
    def is_baseline(self) -> bool:
        return is_baseline_key(self.key, self.base_optimizer) and self.effective == BASELINE

    @property
    def all_ok(self) -> bool:
        return self.runs > 0 and self.ok_runs == self.runs




# -- measurements ------------------------------------------------------------------------------------


def status_of(results: Sequence[RunResult]) -> str:
    counts = Counter(r.status for r in results)
    if len(counts) == 1:
        return results[0].status
    return ", ".join(f"{s}×{n}" for s, n in sorted(counts.items(), key=lambda kv: (kv[0] != "ok", kv[0])))


def is_baseline_run(run: Run) -> bool:
    return run.in_baseline_row and run.result.ok and run.result.effective == BASELINE


def _baseline_for(run: Run, runs: Sequence[Run]) -> list[RunResult]:
    """The ok FP32 runs this run is measured against: the same seed if it ran, else every seed."""
    pool = [r.result for r in runs if r.setting == run.setting and is_baseline_run(r)]
    same_seed = [r for r in pool if r.seed == run.seed]
    return same_seed or pool


def _mean(results: Sequence[RunResult], get: Callable[[RunResult], float | None]) -> float | None:
    stat = Stat.of(get(r) for r in results)
    return stat.mean if stat else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def _per_run(run: Run, runs: Sequence[Run]) -> dict[str, float | None]:
    m = run.result.metrics
    base = _baseline_for(run, runs)
    base_tps = _mean(base, lambda r: r.metrics.items_per_s)
    base_mem = _mean(base, lambda r: r.metrics.peak_memory_mb)
    base_eval = _mean(base, lambda r: r.metrics.eval_loss)
    return {
        "items_per_s": m.items_per_s,
        "speedup": _ratio(m.items_per_s, base_tps),
        "peak_memory_mb": m.peak_memory_mb,
        "memory_saved_pct": None
        if m.peak_memory_mb is None or not base_mem
        else 100 * (base_mem - m.peak_memory_mb) / base_mem,
        "final_loss": m.final_train_loss,
        "eval_loss": m.eval_loss,
        "loss_diff": None if m.eval_loss is None or base_eval is None else m.eval_loss - base_eval,
        "skipped_steps": float(m.skipped_steps),
        "final_loss_scale": m.final_loss_scale,
        "min_loss_scale": m.min_loss_scale,
    }


def measure(members: Sequence[Run], runs: Sequence[Run]) -> Measurements:
    """The measurements of `members` (one row), each run against fp32 of its seed among `runs`."""
    results = [m.result for m in members]
    values = [_per_run(m, runs) for m in members]
    effective = sorted({r.effective for r in results if r.effective})
    reasons = sorted({r.plan.fallback_reason for r in results if r.plan.fallback_reason})
    errors = [r.error_line for r in results if r.error_line]
    return Measurements(
        setting=members[0].setting,
        key=members[0].key,
        effective=", ".join(effective) or None,
        status=status_of(results),
        runs=len(results),
        ok_runs=sum(r.ok for r in results),
        seeds=tuple(m.seed for m in members if m.seed is not None),
        run_names=tuple(r.run_name for r in results),
        throughput_unit=results[0].metrics.throughput_unit,
        fallback_reason="; ".join(reasons) or None,
        error=errors[0] if errors else None,
        **{key: Stat.of(v[key] for v in values) for key in values[0]},
        base_optimizer=members[0].base_optimizer,
    )


def run_table(results: Sequence[RunResult]) -> list[Measurements]:
    """One row per run, in setting / precision / seed order."""
    runs = place(results)
    return [measure([r], runs) for r in runs]


