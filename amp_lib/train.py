"""The measured training loop: `RunConfig` in, `RunResult` out.

Reads top to bottom like nanoGPT's train.py: the precision plan picks the autocast context once,
the loop does forward -> scaled backward -> unscale -> clip -> step, and per-step readings stay on
the device until every `log_every` steps, when they cross to the host in one transfer.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from amp_lib.models import BUILTIN_MODELS, build_workload
from amp_lib.precision import PrecisionPlan, parse_precision, probe, resolve_precision
from amp_lib.results import HistoryRow, Metrics, RunResult
from amp_lib.scaler import AmpScaler, StepOutcome

# Dense peak TFLOP/s by (GPU name fragment, precision family), for the MFU estimate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 67.0, "tf32": 494.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H200": {"fp32": 67.0, "tf32": 494.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.0},
}
# A loss scale this small means fp16 overflowed on every step: training has stopped.
COLLAPSED_SCALE = 2.0**-24


@dataclass(frozen=True)
class RunConfig:
    """Every knob of one run. Unknown keys, wrong types and out-of-range values raise `ValueError`."""

    precision: str | int = "fp32"
    model: str = "gpt-tiny"
    steps: int = 30
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    warmup_steps: int = 5
    log_every: int = 5
    out_dir: str = "results"
    run_name: str = ""
    init_scale: float = 2.0**16
    growth_interval: int = 2000
    allow_slow: bool = False  # run fp16 on a CPU without fast fp16 instead of falling back to bf16
    compile: bool = False  # torch.compile the model (fp8 needs it to be fast)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        parse_precision(self.precision)
        _check_range("steps", self.steps, 1)
        _check_range("batch_size", self.batch_size, 1)
        _check_range("seq_len", self.seq_len, 1)
        _check_range("grad_accum", self.grad_accum, 1)
        _check_range("log_every", self.log_every, 1)
        _check_range("growth_interval", self.growth_interval, 1)
        _check_range("warmup_steps", self.warmup_steps, 0)
        _check_range("seed", self.seed, 0)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be less than steps={self.steps} (nothing left to time)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a positive finite number")
        if self.grad_clip is not None and not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip={self.grad_clip!r} must be None, 0 (off) or a positive number")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init_scale={self.init_scale!r} must be a positive finite number")
        if self.model not in BUILTIN_MODELS and ":" not in self.model:
            raise ValueError(f"invalid model {self.model!r}; valid: {', '.join(BUILTIN_MODELS)} or 'package.module:function'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"invalid device {self.device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.run_name and not re.fullmatch(r"[\w.=+-]+", self.run_name):
            raise ValueError(f"invalid run_name {self.run_name!r}; use letters, digits and . _ = + -")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(cls.field_names())}")
        return cls(**values)

    @property
    def name(self) -> str:
        return self.run_name or f"{self.model.replace(':', '.')}-{self.precision}-s{self.seed}"

    @property
    def result_path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "str | int": (str, int),
    "float | None": (float, int, type(None)),
}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    allowed = _TYPES[str(annotation)]
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise ValueError(f"{name}={value!r} has type {type(value).__name__}; expected {annotation}")


def _check_range(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")


class RunObserver(Protocol):
    """Receives a run's plan, its history rows as they are flushed, and its result (e.g. W&B)."""

    def on_start(self, config: RunConfig, plan: PrecisionPlan) -> None: ...

    def on_log(self, rows: Sequence[HistoryRow], items_per_step: int) -> None: ...

    def on_end(self, result: RunResult) -> None: ...


class Diverged(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; valid here: 'auto', 'cpu'")
    return dev


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Allow TF32 tensor-core matmuls and convolutions for the run, then restore the settings."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device has it: fused AdamW takes GradScaler's inf check without a sync."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


class StepTimer:
    """Per-step wall time: CUDA events on a GPU (no sync until read), perf_counter on a CPU."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock  # seconds; a parameter so a test can drive the CPU path exactly
        self._open: Any = None
        self._pending: list[tuple[Any, Any]] = []

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = self.clock()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = self.clock()
        self._pending.append((self._open, end))

    def read_ms(self) -> list[float]:
        """Milliseconds of every step since the last read (syncs on the last CUDA event)."""
        if self.cuda and self._pending:
            self._pending[-1][1].synchronize()
            out = [a.elapsed_time(b) for a, b in self._pending]
        else:
            out = [(b - a) * 1e3 for a, b in self._pending]
        self._pending.clear()
        return out


class PeakMemory:
    """Peak memory of the timed region: the CUDA allocator's peak, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "cpu_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM on Linux

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def peak_tflops(plan: PrecisionPlan) -> float | None:
    family = plan.effective.split("-")[0]  # fp32, tf32, fp16, bf16, fp8
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in plan.device_name:
            return table.get(family)
    return None


def as_input(x: Any, dtype: torch.dtype) -> Any:
    """Float inputs in the parameters' dtype: a 'true' precision runs the whole model in half, as
    Lightning's HalfPrecision does; token ids and anything else pass through."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Any, loss_fn: Any, autocast: Any, dtype: torch.dtype = torch.float32
) -> float:
    model.eval()
    losses = []
    for i in range(len(batches)):
        x, y = batches[i]
        x = as_input(x, dtype)
        with autocast:
            losses.append(loss_fn(model(x), y).float())
    model.train()
    return torch.stack(losses).mean().item()


class _Recorder:
    """Per-step device tensors, turned into history rows every `log_every` steps."""

    def __init__(self, scaler: AmpScaler, timer: StepTimer) -> None:
        self.scaler, self.timer = scaler, timer
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.outcomes: list[StepOutcome] = []
        self.history: list[HistoryRow] = []
        self.timed_ms: list[float] = []
        self._timer_steps: list[int] = []

    def record(self, step: int, loss: torch.Tensor, outcome: StepOutcome, timed: bool) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.outcomes.append(outcome)
        if timed:
            self._timer_steps.append(step)

    def flush(self) -> list[HistoryRow]:
        if not self.steps:
            return []
        scales = [o.scale if o.scale is not None else torch.full_like(o.grad_norm, math.nan) for o in self.outcomes]
        table = torch.stack(
            [
                torch.stack(self.losses).float(),
                torch.stack([o.grad_norm.float() for o in self.outcomes]),
                torch.stack([o.skipped.float() for o in self.outcomes]),
                torch.stack([s.float() for s in scales]),
            ]
        ).tolist()  # the one host-device transfer per log interval
        self.scaler.flush()
        step_ms = dict(zip(self._timer_steps, self.timer.read_ms()))
        self.timed_ms.extend(step_ms.values())
        cumulative = self.history[-1].skipped_steps if self.history else 0
        rows = []
        for i, step in enumerate(self.steps):
            skipped = bool(table[2][i])
            cumulative += skipped
            rows.append(
                HistoryRow(
                    step=step,
                    loss=table[0][i],
                    loss_scale=None if math.isnan(table[3][i]) else table[3][i],
                    grad_norm=table[1][i],
                    step_time_ms=step_ms.get(step),
                    skipped=skipped,
                    skipped_steps=cumulative,
                )
            )
        self.history.extend(rows)
        self.steps, self.losses, self.outcomes, self._timer_steps = [], [], [], []
        return rows


def _check_divergence(rows: Sequence[HistoryRow], use_scaler: bool) -> None:
    for row in rows:
        loss_ok = row.loss is not None and math.isfinite(row.loss)
        if not loss_ok and not (use_scaler and row.skipped):
            raise Diverged(f"loss became {row.loss} at step {row.step}")
        if use_scaler and row.loss_scale is not None and row.loss_scale < COLLAPSED_SCALE:
            raise Diverged(f"loss scale collapsed to {row.loss_scale:g} at step {row.step}: fp16 overflows on every step")


def train(config: RunConfig, observers: Sequence[RunObserver] = (), *, write: bool = True) -> RunResult:
    """Train per `config`; failures end as a `failed`/`oom`/`diverged` result, never a lost one."""
    device = resolve_device(config.device)
    plan = resolve_precision(config.precision, probe(device), allow_slow=config.allow_slow)
    for obs in observers:
        obs.on_start(config, plan)
    history: list[HistoryRow] = []
    state: dict[str, Any] = {}
    try:
        metrics = _run(config, plan, device, observers, history, state)
        status, error = "ok", None
    except Diverged as exc:
        metrics, status, error = _partial_metrics(history, state), "diverged", str(exc)
    except torch.cuda.OutOfMemoryError as exc:
        metrics, status, error = _partial_metrics(history, state), "oom", f"out of memory: {exc}"
    except Exception as exc:  # a user model can raise anything; the result must still be written
        tail = "".join(traceback.format_exception(exc)[-3:])
        metrics, status, error = _partial_metrics(history, state), "failed", f"{type(exc).__name__}: {exc}\n{tail}"
    finally:
        state.pop("workload", None)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = RunResult(
        config=config.to_dict(),
        plan={**plan.to_dict(), "torch_version": torch.__version__},
        metrics=metrics,
        history=tuple(history),
        status=status,
        error=error,
    )
    if write:
        result.save(config.result_path)
    for obs in observers:
        obs.on_end(result)
    return result


def prepare_model(model: torch.nn.Module, plan: PrecisionPlan, compile: bool) -> torch.nn.Module:
    """fp8: swap linears whose sizes fp8 matmuls take (multiples of 16) for torchao's Float8Linear."""
    if plan.effective == "fp8-mixed":
        from torchao.float8 import convert_to_float8_training

        def eligible(module: torch.nn.Module, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

        convert_to_float8_training(model, module_filter_fn=eligible)
    return torch.compile(model) if compile else model


def _partial_metrics(history: list[HistoryRow], state: dict[str, Any]) -> Metrics:
    scales = [r.loss_scale for r in history if r.loss_scale is not None]
    return Metrics(
        throughput_unit=state.get("unit", "tokens"),
        final_train_loss=history[-1].loss if history else None,
        skipped_steps=history[-1].skipped_steps if history else 0,
        final_loss_scale=scales[-1] if scales else None,
        min_loss_scale=min(scales) if scales else None,
    )


def _run(
    config: RunConfig,
    plan: PrecisionPlan,
    device: torch.device,
    observers: Sequence[RunObserver],
    history: list[HistoryRow],
    state: dict[str, Any],
) -> Metrics:
    seed_everything(config.seed)
    workload = state["workload"] = build_workload(config, device)
    state["unit"] = workload.item_unit
    model = workload.model.to(device=device, dtype=plan.param_dtype)
    model = prepare_model(model, plan, config.compile)
    optimizer = make_optimizer(model, config.lr, device)
    scaler = AmpScaler(
        device.type, enabled=plan.use_loss_scaler, init_scale=config.init_scale, growth_interval=config.growth_interval
    )
    autocast = torch.autocast(device.type, dtype=plan.autocast_dtype or torch.float32, enabled=plan.autocast_dtype is not None)
    timer, memory = StepTimer(device), PeakMemory(device)
    recorder = _Recorder(scaler, timer)
    clip = config.grad_clip or None
    items_per_step = workload.items_per_batch * config.grad_accum
    batches, accum = workload.train_batches, config.grad_accum

    with tf32_matmuls(plan.effective == "tf32"):
        model.train()
        for step in range(config.steps):
            timed = step >= config.warmup_steps
            if step == config.warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                memory.reset()
            if timed:
                timer.start()
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = batches[(step * accum + micro) % len(batches)]
                x = as_input(x, plan.param_dtype)
                with autocast:
                    loss = workload.loss_fn(model(x), y) / accum
                outcome = scaler.step(loss, optimizer, clip, update=micro == accum - 1)
                step_loss += loss.detach().float()
            optimizer.zero_grad(set_to_none=True)
            if timed:
                timer.stop()
            recorder.record(step, step_loss, outcome, timed)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                rows = recorder.flush()
                history.extend(rows)
                for obs in observers:
                    obs.on_log(rows, items_per_step)
                _check_divergence(rows, plan.use_loss_scaler)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        peak = memory.peak_mb()
        eval_loss = evaluate(model, workload.eval_batches, workload.loss_fn, autocast, plan.param_dtype)

    if not math.isfinite(eval_loss):
        raise Diverged(f"eval loss is {eval_loss}")
    step_ms = statistics.median(recorder.timed_ms)
    throughput = items_per_step / (step_ms / 1e3)
    peak_flops = peak_tflops(plan)
    mfu = throughput * workload.flops_per_item / (peak_flops * 1e12) if peak_flops and workload.flops_per_item else None
    partial = _partial_metrics(history, state)
    return Metrics(
        tokens_per_s=throughput,
        throughput_unit=workload.item_unit,
        step_time_ms_median=step_ms,
        step_time_ms_p10=_percentile(recorder.timed_ms, 0.1),
        step_time_ms_p90=_percentile(recorder.timed_ms, 0.9),
        timed_steps=len(recorder.timed_ms),
        peak_memory_mb=peak,
        peak_memory_kind=memory.kind,
        final_train_loss=partial.final_train_loss,
        eval_loss=eval_loss,
        skipped_steps=partial.skipped_steps,
        final_loss_scale=partial.final_loss_scale,
        min_loss_scale=partial.min_loss_scale,
        mfu=mfu,
    )
