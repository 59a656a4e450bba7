"""The one factory for hand-made result objects: every test that needs a `RunResult` without training
builds it here, so a schema change is mended in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from amp_lib.results import EvalRow, HistoryRow, Metrics, PlanRecord, RunResult

SCALED = ("fp16-mixed",)  # effective precisions that run with a loss scaler


def history(
    steps: int = 5, *, scaled: bool = False, skip_at: int | None = None, loss0: float = 3.0
) -> tuple[HistoryRow, ...]:
    """`steps` rows of a falling loss; with `scaled`, a 2**16 loss scale that halves at `skip_at` (a skipped step)."""
    rows = []
    for i in range(steps):
        after_skip = skip_at is not None and i >= skip_at
        rows.append(
            HistoryRow(
                step=i,
                loss=loss0 - 0.1 * i,
                loss_scale=(2.0**16 / (2 if after_skip else 1)) if scaled else None,
                grad_norm=1.0,
                step_time_ms=10.0,
                skipped=scaled and i == skip_at,
                skipped_steps=int(scaled and after_skip),
            )
        )
    return tuple(rows)


def eval_curve(*losses: float | None, every: int = 10, step_s: float = 0.1) -> tuple[EvalRow, ...]:
    """One eval every `every` steps with these losses, `step_s` seconds of training per step."""
    return tuple(
        EvalRow(step=every * (i + 1), loss=loss, elapsed_s=round(every * (i + 1) * step_s, 9))
        for i, loss in enumerate(losses)
    )


def make_result(
    precision: Any = "fp32",
    seed: int | None = 0,
    *,
    effective: str | None = None,
    status: str = "ok",
    tps: float | None = 1000.0,
    mem: float | None = 100.0,
    eval_loss: float | None = 2.0,
    final_loss: float | None = 2.5,
    skipped: int = 0,
    final_scale: float | None = None,
    min_scale: float | None = None,
    unit: str = "tokens",
    error: str | None = None,
    reason: str | None = None,
    rows: tuple[HistoryRow, ...] = (),
    metrics: dict[str, Any] | None = None,
    evals: Sequence[EvalRow] = (),
    plan: dict[str, Any] | PlanRecord | None = None,
    headroom: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
    **config: Any,
) -> RunResult:
    """A result as `train()` would write it, with every figure a keyword. `seed=None` leaves the seed out
    of the config; extra keywords become config values (a different setting); `metrics` sets the other
    `Metrics` fields (step times, memory kind, MFU...); `evals` the eval curve (`eval_curve`), whose lowest
    loss becomes `best_eval_loss` unless `metrics` sets it; `plan` adds plan keys (threads, concurrent_runs)."""
    cfg: dict[str, Any] = {
        "precision": precision,
        "model": "gpt-tiny",
        "run_name": f"{precision}-s{seed}",
        "out_dir": "x",
    }
    if seed is not None:
        cfg["seed"] = seed
    cfg.update(config)
    extra = dict(metrics or {})
    finite = [e.loss for e in evals if e.loss is not None]
    if finite and "best_eval_loss" not in extra:
        extra["best_eval_loss"] = min(finite)
    return RunResult(
        config=cfg,
        plan={
            "requested": str(precision),
            "effective": effective or str(precision),
            "fallback_reason": reason,
            **(plan.to_dict() if isinstance(plan, PlanRecord) else plan or {}),
        },
        metrics=Metrics(
            items_per_s=tps,
            throughput_unit=unit,
            peak_memory_mb=mem,
            final_train_loss=final_loss,
            eval_loss=eval_loss,
            skipped_steps=skipped,
            final_loss_scale=final_scale,
            min_loss_scale=min_scale,
            **extra,
        ),
        history=rows,
        evals=tuple(evals),
        headroom=headroom,
        profile=profile,
        status=status,
        error=error,
    )


def seeds(precision: str, values: list[float], *, what: str = "eval_loss", **kw: Any) -> list[RunResult]:
    """One result per seed 0, 1, 2...: `values` are the eval losses (or, with what="tps", throughputs)."""
    return [make_result(precision, seed, **{what: value}, **kw) for seed, value in enumerate(values)]


# Three precisions of one seed each, as the report tables are tested on them.
THREE = [
    make_result("fp32", tps=1000, mem=200, eval_loss=2.0),
    make_result("fp16-mixed", tps=2500, mem=120, eval_loss=2.01, skipped=3, final_scale=32768.0, min_scale=1024.0),
    make_result("bf16", effective="bf16-mixed", tps=2000, mem=110, eval_loss=1.99),
]
# An fp16-mixed run as train() records it: one skipped step halved the scale from 2**16.
FP16_SCALED = {"skipped": 1, "final_scale": 32768.0, "min_scale": 32768.0, "rows": history(5, scaled=True, skip_at=2)}
# What the memory split of a result holds, as train() records it (MB).
SPLIT = {"param_memory_mb": 10.0, "grad_memory_mb": 10.0, "optimizer_memory_mb": 20.0}
# A three-seed sweep of four precisions with eval curves, memory splits and one-run-at-a-time timings.
SWEEP = [
    make_result(
        precision, seed, tps=tps * (1 + 0.01 * (seed * (i + 1) % 4)), mem=peak, eval_loss=curve[-1], evals=eval_curve(*curve, step_s=step_s),
        metrics={**SPLIT, "peak_memory_kind": "cuda_allocated", "train_time_s": 3 * 10 * step_s},
        plan={"concurrent_runs": 1, "threads": 16},
    )
    for i, (precision, tps, peak, step_s, curves) in enumerate((
        ("fp32", 1000.0, 400.0, 0.1, [(3.0, 2.3, 2.0), (3.0, 2.35, 2.02), (3.0, 2.3, 1.98)]),
        ("tf32", 1500.0, 400.0, 0.07, [(3.0, 2.3, 2.01), (3.0, 2.3, 2.0), (3.0, 2.4, 2.05)]),
        ("fp16-mixed", 2600.0, 250.0, 0.04, [(3.0, 2.6, 2.2), (3.0, 2.6, 2.24), (3.0, 2.7, 2.19)]),
        ("bf16-mixed", 2400.0, 240.0, 0.04, [(3.0, 2.03, 2.0), (3.0, 2.02, 2.02), (3.0, 2.035, 1.985)]),
    ))
    for seed, curve in enumerate(curves)
]  # fmt: skip
