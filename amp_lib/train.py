"""The measured training loop: `RunConfig` in, `RunResult` out.

Reads top to bottom like nanoGPT's train.py: the precision plan gives the autocast context once,
the loop does forward -> scaled backward -> unscale -> clip -> step, and per-step readings stay on
the device until every `log_every` steps, when the recorder moves them to the host in one transfer.
The recorder owns the run's history: the metrics of a finished run and of a run cut short by
divergence, OOM or an error are both read from it.

The learning-rate schedule (nanoGPT's: linear warm-up, cosine decay to `min_lr`) runs on the device: the
learning rate is a tensor the fused optimizer reads, computed from the count of steps the optimizer
really took, so a step the loss scaler skipped does not advance the schedule, without a host sync.

A run with `parallelism` ddp/fsdp runs under torchrun (`amp_lib.distributed`): called outside torchrun,
`train` launches `torchrun -m amp_lib.train` (this module's `main`) and replays rank 0's result to the
observers; inside, each rank trains its slice of the global batch and rank 0 alone writes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from amp_lib.config import RunConfig, parse_value
from amp_lib.diagnose import StepProfiler, explain, machine_facts
from amp_lib.distributed import (
    Ranks,
    RankSlice,
    gather_floats,
    gradient_sync,
    in_torchrun,
    launch,
    local_tensor,
    mean_over_ranks,
    process_group,
    worker_device,
    wrap_model,
)
from amp_lib.headroom import HeadroomMap
from amp_lib.measure import PeakMemory, StepTimer, percentile
from amp_lib.models import Workload, build_workload
from amp_lib.precision import PrecisionPlan, probe, resolve_device, resolve_precision
from amp_lib.results import EvalRow, HistoryRow, Metrics, RunResult
from amp_lib.scaler import COLLAPSED_SCALE, AmpScaler, StepOutcome


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


def make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device has it: fused AdamW takes GradScaler's inf check without a sync.

    With a learning-rate schedule the learning rate is a device tensor (`scheduled_lr` updates it in place).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    lr: float | torch.Tensor = torch.tensor(config.lr, device=device) if config.schedules_lr else config.lr
    hyper = {"lr": lr, "betas": (0.9, config.beta2), "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(params, **hyper, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **hyper, foreach=False)  # takes a tensor lr too


def scheduled_lr(applied_steps: torch.Tensor, config: RunConfig) -> torch.Tensor:
    """nanoGPT's schedule after `applied_steps` optimizer steps: linear warm-up over `lr_warmup_steps`, then
    cosine decay to `min_lr` at `lr_decay_steps` (constant `lr` after the warm-up when that is 0)."""
    n = applied_steps.float()
    warm = config.lr * (n + 1) / (config.lr_warmup_steps + 1)
    if config.lr_decay_steps:
        span = config.lr_decay_steps - config.lr_warmup_steps
        ratio = ((n - config.lr_warmup_steps) / span).clamp(0.0, 1.0)
        after = config.min_lr + 0.5 * (1.0 + torch.cos(math.pi * ratio)) * (config.lr - config.min_lr)
    else:
        after = torch.full_like(n, config.lr)
    return torch.where(n < config.lr_warmup_steps, warm, after)


def memory_split_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[float, float, float]:
    """Parameters, gradients and optimizer state as tensor sizes (MiB): what the peak holds besides
    activations and workspace. Gradients take their parameters' size and dtype. Under FSDP these are this
    rank's shards (a DTensor's local part), under DDP each rank's full copy."""
    params = [p for p in model.parameters()]
    param_bytes = sum(local_tensor(p).numel() * p.element_size() for p in params)
    grad_bytes = sum(local_tensor(p).numel() * p.element_size() for p in params if p.requires_grad)
    state_bytes = sum(
        local_tensor(t).numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    return param_bytes / 2**20, grad_bytes / 2**20, state_bytes / 2**20


@torch.no_grad()
def evaluate(model: torch.nn.Module, workload: Workload, plan: PrecisionPlan) -> float:
    """Mean loss over the workload's held-out batches, in the run's precision (over all ranks' slices)."""
    model.eval()
    losses, autocast = [], plan.autocast()
    for i in range(len(workload.eval_batches)):
        x, y = workload.eval_batches[i]
        with autocast:
            losses.append(workload.loss_fn(model(plan.convert_input(x)), y).float())
    model.train()
    return mean_over_ranks(torch.stack(losses).mean()).item()


class Recorder:
    """Owns the run's history: per-step device tensors, turned into host rows every `log_every` steps."""

    def __init__(self, timer: StepTimer, item_unit: str = "tokens", constant_lr: float | None = None) -> None:
        self.timer, self.item_unit, self.constant_lr = timer, item_unit, constant_lr
        self.headroom: HeadroomMap | None = None  # set by the loop when the map is on
        self.over_ranks = False  # several processes: the logged loss is the mean of every rank's
        self.profile: dict[str, Any] | None = None  # the profiled step's summary, when asked for
        self.history: list[HistoryRow] = []
        self.evals: list[EvalRow] = []
        self.timed_ms: list[float] = []
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._outcomes: list[StepOutcome] = []
        self._lrs: list[torch.Tensor] = []
        self._timed_steps: list[int] = []

    def record(
        self, step: int, loss: torch.Tensor, outcome: StepOutcome, timed: bool, lr: torch.Tensor | None = None
    ) -> None:
        """Keep one step's device tensors; `lr` is the scheduled learning rate (None: `constant_lr`)."""
        self._steps.append(step)
        self._losses.append(loss)
        self._outcomes.append(outcome)
        if lr is not None:
            self._lrs.append(lr)
        if timed:
            self._timed_steps.append(step)

    def flush(self) -> list[HistoryRow]:
        """The pending steps as history rows: the one host-device transfer per log interval."""
        if not self._steps:
            return []
        nan = torch.full_like(self._outcomes[0].grad_norm, math.nan)
        losses = torch.stack(self._losses).float()
        columns = [
            mean_over_ranks(losses) if self.over_ranks else losses,  # one collective per log interval
            torch.stack([o.grad_norm.float() for o in self._outcomes]),
            torch.stack([o.skipped.float() for o in self._outcomes]),
            torch.stack([(o.scale if o.scale is not None else nan).float() for o in self._outcomes]),
        ]
        if self._lrs:
            columns.append(torch.stack(self._lrs).float().to(columns[0].device))
        table = torch.stack(columns).tolist()  # the one host-device transfer per log interval
        losses, grad_norms, skipped, scales = table[:4]
        lrs = table[4] if self._lrs else [self.constant_lr] * len(self._steps)
        step_ms = dict(zip(self._timed_steps, self.timer.read_ms()))
        self.timed_ms.extend(step_ms.values())
        cumulative = self.history[-1].skipped_steps if self.history else 0
        rows = []
        for i, step in enumerate(self._steps):
            cumulative += bool(skipped[i])
            rows.append(
                HistoryRow(
                    step=step,
                    loss=losses[i],
                    loss_scale=None if math.isnan(scales[i]) else scales[i],
                    grad_norm=grad_norms[i],
                    step_time_ms=step_ms.get(step),
                    skipped=bool(skipped[i]),
                    skipped_steps=cumulative,
                    lr=lrs[i],
                )
            )
        self.history.extend(rows)
        self._steps, self._losses, self._outcomes, self._lrs, self._timed_steps = [], [], [], [], []
        return rows

    def metrics(self) -> Metrics:
        """What the history says: losses, skipped steps and loss scales (all a run cut short has)."""
        scales = [r.loss_scale for r in self.history if r.loss_scale is not None]
        eval_losses = [e.loss for e in self.evals if e.loss is not None]
        return Metrics(
            throughput_unit=self.item_unit,
            best_eval_loss=min(eval_losses) if eval_losses else None,
            final_train_loss=self.history[-1].loss if self.history else None,
            skipped_steps=self.history[-1].skipped_steps if self.history else 0,
            final_loss_scale=scales[-1] if scales else None,
            min_loss_scale=min(scales) if scales else None,
        )


def check_divergence(rows: Sequence[HistoryRow], use_scaler: bool) -> None:
    """Raise `Diverged` on a non-finite loss the scaler did not skip, or a collapsed loss scale."""
    for row in rows:
        loss_ok = row.loss is not None and math.isfinite(row.loss)
        if not loss_ok and not (use_scaler and row.skipped):
            raise Diverged(f"loss became {row.loss} at step {row.step}")
        if use_scaler and row.loss_scale is not None and row.loss_scale < COLLAPSED_SCALE:
            raise Diverged(
                f"loss scale collapsed to {row.loss_scale:g} at step {row.step}: fp16 overflows on every step"
            )


def train(
    config: RunConfig,
    observers: Sequence[RunObserver] = (),
    *,
    plan: PrecisionPlan | None = None,
    write: bool = True,
    timeout: float | None = None,
) -> RunResult:
    """Train per `config`; failures end as a `failed`/`oom`/`diverged` result, never a lost one.

    `plan` is the config's resolved precision when the caller already resolved it (the notebook shows
    it before training); otherwise it is resolved here, once. A ddp/fsdp run outside torchrun is launched
    under torchrun (`timeout` in seconds bounds it) and replayed to the observers when it ends.
    """
    device = resolve_device(config.device)
    if plan is None:
        plan = resolve_precision(config.precision, probe(device), allow_slow=config.allow_slow)
    plan = plan.with_parallelism(config.parallelism, config.reduce_dtype)
    if config.parallelism == "none":
        return _train_here(config, plan, device, observers, write, Ranks())
    if not in_torchrun():
        return _launch(config, plan, observers, write, timeout)
    with process_group(device, config.nproc) as ranks:
        device = worker_device(device, ranks.local_rank)
        # Rank 0 alone reports (its rows are every rank's: losses are averaged, scaler decisions agree).
        return _train_here(config, plan, device, observers if ranks.is_main else (), write and ranks.is_main, ranks)


def _launch(
    config: RunConfig, plan: PrecisionPlan, observers: Sequence[RunObserver], write: bool, timeout: float | None
) -> RunResult:
    """Run under torchrun, then hand the observers what rank 0 recorded, as a run in this process would."""
    for obs in observers:
        obs.on_start(config, plan)
    result = launch(config, plan, timeout=timeout)
    if result.history:
        for obs in observers:
            obs.on_log(result.history, result.metrics.items_per_step or 0)
    if write:
        result.save(config.result_path)
    for obs in observers:
        obs.on_end(result)
    return result


def _train_here(
    config: RunConfig,
    plan: PrecisionPlan,
    device: torch.device,
    observers: Sequence[RunObserver],
    write: bool,
    ranks: Ranks,
) -> RunResult:
    """This process's part of the run. Under torchrun an error other than divergence (which every rank
    sees alike) is raised, not recorded: torchrun then stops every rank and the launcher reports it."""
    for obs in observers:
        obs.on_start(config, plan)
    recorder = Recorder(StepTimer(device))
    parallel = plan.parallelism != "none"
    try:
        metrics, status, error = _run(config, plan, device, observers, recorder, ranks), "ok", None
    except Diverged as exc:
        metrics, status, error = recorder.metrics(), "diverged", str(exc)
    except torch.cuda.OutOfMemoryError as exc:
        if parallel:
            raise
        metrics, status, error = recorder.metrics(), "oom", f"out of memory: {exc}"
    except Exception as exc:  # a user model can raise anything; the result must still be written
        if parallel:
            raise
        tail = "".join(traceback.format_exception(exc)[-3:])
        metrics, status, error = recorder.metrics(), "failed", f"{type(exc).__name__}: {exc}\n{tail}"
    gc.collect()  # the workload (model, optimizer, batches) died with _run's frame: return its memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = RunResult(
        config=config.to_dict(),
        plan={**plan.to_dict(), "torch_version": torch.__version__, **_machine_share()},
        metrics=metrics,
        history=tuple(recorder.history),
        evals=tuple(recorder.evals),
        headroom=recorder.headroom.to_dict() if recorder.headroom else None,
        profile=recorder.profile,
        status=status,
        error=error,
    )
    if write:
        result.save(config.result_path)
    for obs in observers:
        obs.on_end(result)
    return result


def global_batch_config(config: RunConfig, world: int) -> RunConfig:
    """The config each of `world` ranks builds the workload from: the global batch, `world` times the
    per-rank one. The recipe is cleared, not applied again: its values are in the config already, and a
    global batch that happened to equal the default would be reset to the recipe's."""
    return replace(config, batch_size=config.batch_size * world, recipe="") if world > 1 else config


def rank_rows(workload: Workload, ranks: Ranks) -> Workload:
    """This rank's rows of each global batch, training and evaluation alike (all of them on one process)."""
    if ranks.world_size == 1:
        return workload
    return replace(
        workload, train_batches=RankSlice(workload.train_batches, ranks), eval_batches=RankSlice(workload.eval_batches, ranks)
    )


def _machine_share() -> dict[str, int]:
    """The intra-op threads this run used, and how many runs shared the machine (a sweep's workers set
    AMP_WORKBOOK_CONCURRENT_RUNS): the report marks timings taken in parallel."""
    try:
        concurrent = max(1, int(os.environ.get("AMP_WORKBOOK_CONCURRENT_RUNS", "1")))
    except ValueError:
        concurrent = 1
    return {"threads": torch.get_num_threads(), "concurrent_runs": concurrent}


def _run(
    config: RunConfig,
    plan: PrecisionPlan,
    device: torch.device,
    observers: Sequence[RunObserver],
    recorder: Recorder,
    ranks: Ranks,
) -> Metrics:
    seed_everything(config.seed)  # the same on every rank: FSDP shards one model, DDP checks it is one
    world = ranks.world_size
    workload = rank_rows(build_workload(global_batch_config(config, world), device), ranks)
    recorder.over_ranks = world > 1  # the history's loss is the mean over the ranks' rows
    recorder.item_unit = workload.item_unit
    wrap = partial(wrap_model, plan=plan, device=device) if plan.parallelism != "none" else None
    model = plan.prepare_model(workload.model, device, config.compile, parallel=wrap)
    optimizer = make_optimizer(model, config, device)
    scaler = AmpScaler(
        device.type, enabled=plan.use_loss_scaler, init_scale=config.init_scale, growth_interval=config.growth_interval
    )
    autocast, memory = plan.autocast(), PeakMemory(device)  # the forward context, chosen once
    clip = config.grad_clip or None
    items_per_step = workload.items_per_batch * config.grad_accum  # over all ranks: the batch was built global
    batches, accum = workload.train_batches, config.grad_accum
    lr = optimizer.param_groups[0]["lr"] if config.schedules_lr else None  # the device tensor the optimizer reads
    recorder.constant_lr = config.lr  # the rows' rate when no step records a scheduled one
    applied = torch.zeros((), device=device)  # optimizer steps really taken: skipped ones don't count
    clock = _Clock(device)
    headroom = recorder.headroom = HeadroomMap(model, config.headroom_every) if config.headroom_every else None
    scale_in_use = config.init_scale if plan.use_loss_scaler else None
    # One profiled step, the last untimed one, so the profiler's overhead stays out of the timings.
    profiled = max(config.timing_warmup_steps - 1, 0) if config.profile_step else None

    with plan.tf32_scope():
        model.train()
        for step in range(config.steps):
            timed = step >= config.timing_warmup_steps
            if step == config.timing_warmup_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                memory.reset()
            if timed:
                recorder.timer.start()
            profiler = StepProfiler(device) if step == profiled else None
            if profiler is not None:
                profiler.start()
            if lr is not None:
                lr.copy_(scheduled_lr(applied, config))
            if headroom is not None:
                headroom.begin_step(step)
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = batches[(step * accum + micro) % len(batches)]
                with gradient_sync(model, micro == accum - 1):  # one gradient reduction per optimizer step
                    with autocast:
                        loss = workload.loss_fn(model(plan.convert_input(x)), y) / accum
                    outcome = scaler.step(loss, optimizer, clip, update=micro == accum - 1)
                step_loss += loss.detach().float()
            optimizer.zero_grad(set_to_none=True)
            if headroom is not None:
                headroom.end_step(step)
            if profiler is not None:
                profile, facts = profiler.stop(), machine_facts(probe(device))
                # What this run alone can tell (the report adds fp32's profile and the measured speed-up).
                causes = (
                    [c.text for c in explain(plan.effective, profile, None, facts)]
                    if plan.family != "fp32"
                    else []
                )
                recorder.profile = {"step": step, **profile.to_dict(), "facts": facts, "causes": causes}
            if lr is not None:
                applied += 1 - outcome.skipped.to(applied.dtype)
            if timed:
                recorder.timer.stop()
            recorder.record(step, step_loss, outcome, timed, lr.clone() if lr is not None else None)
            eval_due = bool(config.eval_every) and (step + 1) % config.eval_every == 0 and step + 1 < config.steps
            if eval_due or (step + 1) % config.log_every == 0 or step + 1 == config.steps:  # an eval syncs anyway
                rows = recorder.flush()
                if headroom is not None:
                    used = []  # the scale each step's backward ran with: the one before its update
                    for row in rows:
                        used.append(scale_in_use)
                        scale_in_use = row.loss_scale
                    headroom.flush([r.skipped for r in rows], used)
                began = time.perf_counter()  # a live figure's drawing is not training time
                for obs in observers:
                    obs.on_log(rows, items_per_step)
                clock.excluded += time.perf_counter() - began
                check_divergence(rows, plan.use_loss_scaler)
            if eval_due:
                _evaluate_into(recorder, clock, step + 1, model, workload, plan)
        # the training peak (the final eval below adds no gradients to it), of every rank
        peaks = gather_floats(memory.peak_mb(), device)
        eval_loss = _evaluate_into(recorder, clock, config.steps, model, workload, plan)
    if headroom is not None:
        headroom.remove()

    step_ms = statistics.median(recorder.timed_ms)
    throughput = items_per_step / (step_ms / 1e3)
    peak_flops = plan.peak_tflops
    flops = workload.flops_per_item
    mfu = throughput * flops / (peak_flops * 1e12 * world) if peak_flops and flops else None  # per device
    param_mb, grad_mb, optimizer_mb = memory_split_mb(model, optimizer)
    return replace(
        recorder.metrics(),
        items_per_s=throughput,
        step_time_ms_median=step_ms,
        step_time_ms_p10=percentile(recorder.timed_ms, 0.1),
        step_time_ms_p90=percentile(recorder.timed_ms, 0.9),
        timed_steps=len(recorder.timed_ms),
        peak_memory_mb=max((p for p in peaks if p is not None), default=None),
        peak_memory_mb_ranks=tuple(p for p in peaks if p is not None) if world > 1 else None,
        items_per_step=items_per_step,
        # the profiled step's collectives (DDP/FSDP reductions, FSDP all-gathers): only a profiled step tells
        comm_time_ms=recorder.profile["busy_ms"]["communication"] if recorder.profile and world > 1 else None,
        peak_memory_kind=memory.kind,
        eval_loss=eval_loss,
        train_time_s=clock.training_s(),
        mfu=mfu,
        param_memory_mb=param_mb,
        grad_memory_mb=grad_mb,
        optimizer_memory_mb=optimizer_mb,
    )


class _Clock:
    """Training wall time with evaluations and observers (progress bar, live figure) taken out:
    time-to-quality counts training only."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.excluded = device, time.perf_counter(), 0.0

    def training_s(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued steps are part of the time
        return time.perf_counter() - self.start - self.excluded


def _evaluate_into(
    recorder: Recorder, clock: _Clock, step: int, model: torch.nn.Module, workload: Workload, plan: PrecisionPlan
) -> float:
    """Evaluate after `step` optimizer steps, record the eval, and end the run if the loss is not finite."""
    elapsed = clock.training_s()
    began = time.perf_counter()
    loss = evaluate(model, workload, plan)
    clock.excluded += time.perf_counter() - began
    recorder.evals.append(EvalRow(step=step, loss=loss if math.isfinite(loss) else None, elapsed_s=elapsed))
    if not math.isfinite(loss):
        raise Diverged(f"eval loss is {loss} after step {step}")
    return loss


def main(argv: Sequence[str] | None = None) -> int:
    """One run from the command line, as torchrun starts it (`torchrun --nproc-per-node 2 -m amp_lib.train
    --config run.json`; without torchrun a ddp/fsdp config launches it). Rank 0 writes the result JSON,
    the other ranks nothing; an exception on any rank is recorded in torchrun's error file for that rank."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amp_lib.train", description="Train one run; write its result JSON.")
    parser.add_argument("--config", help="a JSON file of RunConfig values")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a RunConfig value (wins over --config)")
    parser.add_argument("--result", help="where rank 0 writes the result (default: <out_dir>/<run name>.json)")
    args = parser.parse_args(argv)
    values: dict[str, Any] = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
    for item in args.param:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"invalid -p {item!r}; expected KEY=VALUE")
        values[key.strip()] = parse_value(key.strip(), text)
    config = RunConfig.from_dict(values)
    result = train(config, write=False)
    if int(os.environ.get("RANK", "0")) == 0:
        path = result.save(args.result or config.result_path)
        print(f"{config.name}: {result.status} -> {path}" + (f" ({result.error_line})" if result.error else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
