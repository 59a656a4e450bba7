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
import warnings
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from amp_lib.config import RunConfig, parse_value
from amp_lib.diagnose import ProfileProbe, machine_context
from amp_lib.distributed import (
    Ranks,
    RankSlice,
    gather_floats,
    gradient_sync,
    in_torchrun,
    launch,
    mean_over_ranks,
    process_group,
    worker_device,
    wrap_model,
)
from amp_lib.energy import EnergyMeter
from amp_lib.fp8 import gemm_rows
from amp_lib.headroom import HeadroomProbe
from amp_lib.measure import PeakMemory, StepTimer, percentile
from amp_lib.memtrack import StepMemoryProbe
from amp_lib.models import Workload, build_workload
from amp_lib.optim import make_optimizer as make_named_optimizer
from amp_lib.precision import PrecisionPlan, probe, resolve_device, resolve_precision
from amp_lib.record import Diverged, Recorder, check_divergence
from amp_lib.results import EvalRow, HistoryRow, Metrics, RunResult


class RunObserver(Protocol):
    """Receives a run's plan, its history rows as they are flushed, each eval as it is measured, and its
    result (e.g. W&B, the live figure, the progress bar)."""

    def on_start(self, config: RunConfig, plan: PrecisionPlan) -> None: ...

    def on_log(self, rows: Sequence[HistoryRow], items_per_step: int) -> None: ...

    def on_eval(self, row: EvalRow) -> None: ...

    def on_end(self, result: RunResult) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def make_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """The config's optimizer (`amp_lib.optim`): `adamw` is AdamW, fused where the device has it (fused AdamW
    takes GradScaler's inf check without a sync); the others are torchao's AdamW with low-precision state.

    With a learning-rate schedule the learning rate is a device tensor (`scheduled_lr` updates it in place).
    """
    lr: float | torch.Tensor = torch.tensor(config.lr, device=device) if config.schedules_lr else config.lr
    return make_named_optimizer(model, lr, (0.9, config.beta2), config.weight_decay, device, config.optimizer)


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


def resolve_plan(config: RunConfig, device: torch.device) -> PrecisionPlan:
    """The precision plan a config runs with on `device`: its precision, fallbacks and parallelism, resolved once."""
    return resolve_precision(
        config.precision,
        probe(device),
        allow_slow=config.allow_slow,
        parallelism=config.parallelism,
        reduce_dtype=config.reduce_dtype,
        emulate_fp8=config.emulate_fp8,
        fp8_layers=config.fp8_layers,
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
    under torchrun with this plan (`timeout` in seconds bounds it) and replayed to the observers when it ends.
    """
    device = resolve_device(config.device)
    plan = plan if plan is not None else resolve_plan(config, device)
    if plan.parallelism != config.parallelism:
        raise ValueError(
            f"the plan is for parallelism {plan.parallelism!r} but the config runs {config.parallelism!r}; "
            "resolve it with amp_lib.train.resolve_plan(config, device)"
        )
    if config.lr_warmup_steps >= config.steps:
        warnings.warn(
            f"lr_warmup_steps={config.lr_warmup_steps} is not shorter than the run (steps={config.steps}): "
            "the learning rate never reaches lr",
            stacklevel=2,
        )
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
    for row in result.evals:
        for obs in observers:
            obs.on_eval(row)
    if write:
        result.save(config.result_path)
    for obs in observers:
        obs.on_end(result)
    return result


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or a CPU allocation that failed (torch's allocator, or Python's)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator: can't allocate memory" in text or
                                              "DefaultCPUAllocator: not enough memory" in text)  # fmt: skip


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
    except Exception as exc:  # a user model can raise anything; the result must still be written
        if parallel:
            raise
        tail = "".join(traceback.format_exception(exc)[-3:])
        if _out_of_memory(exc):
            metrics, status, error = recorder.metrics(), "oom", f"out of memory: {exc}"
        else:
            metrics, status, error = recorder.metrics(), "failed", f"{type(exc).__name__}: {exc}\n{tail}"
    gc.collect()  # the workload (model, optimizer, batches) died with _run's frame: return its memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = RunResult(
        config=config.to_dict(),
        plan={**plan.to_dict(), "torch_version": torch.__version__, **_machine_share(), "machine": recorder.machine},
        metrics=metrics,
        history=tuple(recorder.history),
        evals=tuple(recorder.evals),
        headroom=recorder.headroom,
        profile=recorder.profile,
        fp8_layers=recorder.fp8_layers,
        memory=recorder.memory,
        energy=recorder.energy,
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
        workload,
        train_batches=RankSlice(workload.train_batches, ranks),
        eval_batches=RankSlice(workload.eval_batches, ranks),
    )


def _machine_share() -> dict[str, Any]:
    """The intra-op threads this run used, and how many runs shared the machine (a sweep's workers set
    AMP_WORKBOOK_CONCURRENT_RUNS): the report marks timings taken in parallel."""
    try:
        concurrent = max(1, int(os.environ.get("AMP_WORKBOOK_CONCURRENT_RUNS", "1")))
    except ValueError:
        concurrent = 1
    share: dict[str, Any] = {"threads": torch.get_num_threads(), "concurrent_runs": concurrent}
    if executor := os.environ.get("AMP_WORKBOOK_EXECUTOR"):
        share["executor"] = executor
    return share


class Probe(Protocol):
    """An optional instrument of the loop (the fp16 headroom map, the profiled step): it sees each step begin
    and end, and the rows at each flush; `close()` removes what it put on the model. Off, it does not exist."""

    def begin_step(self, step: int) -> None: ...

    def end_step(self, step: int) -> None: ...

    def flush(self, rows: Sequence[HistoryRow]) -> None: ...

    def close(self) -> None: ...


def _probes(config: RunConfig, plan: PrecisionPlan, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device, clock: _Clock) -> dict[str, Any]:  # fmt: skip
    """The probes of the run, by name: what held the memory at one untimed step's peak always (MemTracker: that
    step only, and its time is no training time), the others only when asked (a diagnostic that is off costs
    nothing)."""
    profiled = max(config.timing_warmup_steps - 1, 0) if config.profile_step else None
    # the split of an untimed step after the first (which makes the optimizer state), and not the profiled one
    step = next((s for s in (1, 0) if s < config.timing_warmup_steps and s != profiled), None)
    why_not = "no untimed step to measure" + (" besides the profiled one" if config.profile_step else "")
    why_not += f" (timing_warmup_steps={config.timing_warmup_steps})"
    probes: dict[str, Any] = {"memory": StepMemoryProbe(model, optimizer, device, step, clock.exclude, why_not)}
    if config.headroom_every:
        probes["headroom"] = HeadroomProbe(
            model, config.headroom_every, config.init_scale if plan.use_loss_scaler else None
        )
    if profiled is not None:  # the last untimed step, so the profiler's overhead stays out of the timings
        probes["profile"] = ProfileProbe(device, profiled, plan.effective, probe(device))
    return probes


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
    recorder.machine = {
        **machine_context(probe(device)),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    workload = rank_rows(build_workload(global_batch_config(config, world), device), ranks)
    recorder.over_ranks = world > 1  # the history's loss is the mean over the ranks' rows
    param_count = sum(p.numel() for p in workload.model.parameters())
    recorder.item_unit = workload.item_unit
    wrap = partial(wrap_model, plan=plan, device=device) if plan.parallelism != "none" else None
    tokens = gemm_rows(workload.train_batches[0][0]) if plan.fp8_recipe else None  # a micro-batch's, this rank's
    model, recorder.fp8_layers = plan.prepare(workload.model, device, config.compile, wrap, tokens_per_step=tokens)
    if world > 1:  # each rank draws its own dropout masks (the model and data were built alike above)
        torch.manual_seed(config.seed * 1_000_003 + ranks.rank)
    optimizer = make_optimizer(model, config, device)
    scaler = plan.scaler(config.init_scale, config.growth_interval)
    autocast, memory, clock = plan.autocast(), PeakMemory(device), _Clock(device)  # the forward context, chosen once
    meter = EnergyMeter(device)  # NVML's energy counter around the timed steps (a reason elsewhere)
    clip, batches, accum = config.grad_clip or None, workload.train_batches, config.grad_accum
    items_per_step = workload.items_per_batch * accum  # over all ranks: the batch was built global
    lr = optimizer.param_groups[0]["lr"] if config.schedules_lr else None  # the device tensor the optimizer reads
    recorder.constant_lr = config.lr  # the rows' rate when no step records a scheduled one
    applied = torch.zeros((), device=device)  # optimizer steps really taken: skipped ones don't count
    probes = _probes(config, plan, model, optimizer, device, clock)

    def log_and_eval(step: int, rows: list[HistoryRow]) -> None:
        for p in probes.values():
            p.flush(rows)
        began = time.perf_counter()  # a live figure's drawing is not training time
        for obs in observers:
            obs.on_log(rows, items_per_step)
        clock.excluded += time.perf_counter() - began
        check_divergence(rows, plan.use_loss_scaler)
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            _evaluate_into(recorder, clock, observers, step + 1, model, workload, plan)

    try:
        with plan.tf32_scope():
            model.train()
            for step in range(config.steps):
                timed = step >= config.timing_warmup_steps
                if step == config.timing_warmup_steps:
                    _sync(device)
                    memory.reset()
                    meter.start()
                for p in probes.values():
                    p.begin_step(step)
                if timed:
                    recorder.timer.start()
                if lr is not None:
                    lr.copy_(scheduled_lr(applied, config))
                step_loss = torch.zeros((), device=device)
                for micro in range(accum):
                    x, y = batches[(step * accum + micro) % len(batches)]
                    with gradient_sync(model, micro == accum - 1):  # one gradient reduction per optimizer step
                        with autocast:
                            loss = workload.loss_fn(model(plan.convert_input(x)), y) / accum
                        outcome = scaler.step(loss, optimizer, clip, update=micro == accum - 1)
                    step_loss += loss.detach().float()
                optimizer.zero_grad(set_to_none=True)
                if lr is not None:
                    applied += 1 - outcome.skipped.to(applied.dtype)
                if timed:
                    recorder.timer.stop()
                for p in probes.values():
                    p.end_step(step)
                recorder.record(step, step_loss, outcome, timed, lr.clone() if lr is not None else None)
                eval_due = bool(config.eval_every) and (step + 1) % config.eval_every == 0
                if eval_due or (step + 1) % config.log_every == 0 or step + 1 == config.steps:  # an eval syncs anyway
                    log_and_eval(step, recorder.flush())
            if plan.use_loss_scaler and recorder.history and recorder.history[-1].skipped_steps == config.steps:
                raise Diverged(
                    f"the loss scaler skipped every one of the {config.steps} steps (init_scale={config.init_scale:g}): "
                    "nothing was trained"
                )
            _sync(device)  # the queued steps are part of the energy
            timed_items = items_per_step * (config.steps - config.timing_warmup_steps)
            reading = meter.stop(timed_items)  # each rank reads its own GPU: the run's energy is their sum
            recorder.energy = reading.over_ranks(gather_floats(reading.joules, device), timed_items)
            # the training peak (the final eval below adds no gradients to it), of every rank, and the tensor sizes
            peaks, sizes = gather_floats(memory.peak_mb(), device), probes["memory"].counted()
            eval_loss = _evaluate_into(recorder, clock, observers, config.steps, model, workload, plan)
    finally:
        if recorder.energy is None:
            meter.stop()  # a run cut short: no reading, but NVML let go
        for p in probes.values():
            p.close()
        recorder.memory = probes["memory"].record()
        recorder.headroom = probes["headroom"].record() if "headroom" in probes else None
        recorder.profile = probes["profile"].record() if "profile" in probes else None

    step_ms = statistics.median(recorder.timed_ms)
    throughput = items_per_step / (step_ms / 1e3)
    peak_flops, flops = plan.peak_tflops, workload.flops_per_item
    mfu = throughput * flops / (peak_flops * 1e12 * world) if peak_flops and flops else None  # per device
    mixed = plan.mixed_mfu(recorder.fp8_layers, throughput, flops, world)  # fp8 runs: against both peaks
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
        mfu=mixed.mfu_vs_bf16_peak if mixed else mfu,
        **(mixed.to_dict() if mixed else {}),
        param_memory_mb=sizes.parameters_mb,  # tensor sizes; what held the peak is `recorder.memory`
        grad_memory_mb=sizes.gradients_mb,
        optimizer_memory_mb=sizes.optimizer_state_mb,
        param_count=param_count,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Training wall time with evaluations and observers (progress bar, live figure) taken out:
    time-to-quality counts training only."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.excluded = device, time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        """Take `seconds` out of training time (a step a diagnostic slowed down)."""
        self.excluded += seconds

    def training_s(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued steps are part of the time
        return time.perf_counter() - self.start - self.excluded


def _evaluate_into(
    recorder: Recorder,
    clock: _Clock,
    observers: Sequence[RunObserver],
    step: int,
    model: torch.nn.Module,
    workload: Workload,
    plan: PrecisionPlan,
) -> float:
    """Evaluate after `step` optimizer steps, record the eval, show it to the observers, and end the run if the
    loss is not finite."""
    elapsed = clock.training_s()
    began = time.perf_counter()
    loss = evaluate(model, workload, plan)
    row = EvalRow(step=step, loss=loss if math.isfinite(loss) else None, elapsed_s=elapsed)
    recorder.evals.append(row)
    for obs in observers:
        obs.on_eval(row)
    clock.excluded += time.perf_counter() - began
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
    parser = argparse.ArgumentParser(
        prog="python -m amp_lib.train", description="Train one run; write its result JSON."
    )
    parser.add_argument("--config", help="a JSON file of RunConfig values")
    parser.add_argument(
        "-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a RunConfig value (wins over --config)"
    )
    parser.add_argument(
        "--plan", help="a JSON file of the precision plan to run (a launcher's); default: resolved here"
    )
    parser.add_argument("--result", help="where rank 0 writes the result (default: <out_dir>/<run name>.json)")
    args = parser.parse_args(argv)
    try:
        values: dict[str, Any] = json.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
        for item in args.param:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"invalid -p {item!r}; expected KEY=VALUE")
            values[key.strip()] = parse_value(key.strip(), text)
        config = RunConfig.from_dict(values)
        plan = PrecisionPlan.from_dict(json.loads(Path(args.plan).read_text(encoding="utf-8"))) if args.plan else None
    except (OSError, ValueError) as exc:  # one line naming the bad value, no traceback
        parser.exit(2, f"error: {exc}\n")
    result = train(config, plan=plan, write=False)
    if int(os.environ.get("RANK", "0")) == 0:
        path = result.save(args.result or config.result_path)
        print(f"{config.name}: {result.status} -> {path}" + (f" ({result.error_line})" if result.error else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
