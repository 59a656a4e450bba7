"""`make bench`: fp32 vs bf16-mixed vs fp16-mixed on a built-in model, in one process.

Prints median step time, throughput, the ratio to fp32 measured in the same process, peak memory,
and the overhead of `amp_lib.train`'s loop against a bare `torch.autocast` + `GradScaler` loop on
the same model and batches (the loop's bookkeeping should cost under 3%). Then the speed-up with its
95% interval and verdict from the sweep's own paired, interleaved protocol (`amp_lib.speed`), so that
`make bench` and a sweep's report quote the same kind of figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from amp_lib.config import BUILTIN_MODELS, RunConfig
from amp_lib.diagnose import cpu_model
from amp_lib.measure import PeakMemory, StepTimer
from amp_lib.models import build_workload, default_model_for
from amp_lib.precision import Capabilities, PrecisionPlan, probe, resolve_device, resolve_precision
from amp_lib.speed import speed_verdicts, time_precisions, timing_reason
from amp_lib.train import make_optimizer, seed_everything, train

DEFAULT_PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")


@dataclass(frozen=True)
class BenchRow:
    precision: str
    effective: str
    step_ms: float
    bare_step_ms: float
    items_per_s: float
    peak_memory_mb: float | None
    eval_loss: float | None
    fallback_reason: str | None
    unit: str = "tokens"

    @property
    def overhead(self) -> float:
        """How much slower amp_lib's loop is than the bare loop (0.01 = 1%)."""
        return self.step_ms / self.bare_step_ms - 1.0


@dataclass(frozen=True)
class BareRun:
    step_ms: float  # median over the timed steps
    final_loss: float  # of the last step: equal to amp_lib's, or the comparison would be unfair
    timed_steps: int  # steps after the warm-up, as amp_lib times them


def bare_loop(config: RunConfig, plan: PrecisionPlan) -> BareRun:
    """The textbook AMP loop (autocast, GradScaler, unscale, clip, step, update) on amp_lib's batches."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    work = build_workload(config, device)
    model = plan.prepare_model(work.model, device, config.compile)
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(
        device.type,
        init_scale=config.init_scale,
        growth_interval=config.growth_interval,
        enabled=plan.use_loss_scaler,
    )
    autocast = plan.autocast()
    timer = StepTimer(device)
    times: list[float] = []
    loss = torch.zeros(())
    with plan.tf32_scope():
        for step in range(config.steps):
            if step >= config.timing_warmup_steps:
                timer.start()
            x, y = work.train_batches[step]
            with autocast:
                loss = work.loss_fn(model(plan.convert_input(x)), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if step >= config.timing_warmup_steps:
                timer.stop()
            if (step + 1) % config.log_every == 0:
                times.extend(timer.read_ms())
        times.extend(timer.read_ms())
    return BareRun(step_ms=statistics.median(times), final_loss=loss.item(), timed_steps=len(times))


def bench(base: RunConfig, precisions: Sequence[str], repeats: int) -> list[BenchRow]:
    """Alternate amp_lib and bare runs `repeats` times per precision; keep the median of each."""
    device = resolve_device(base.device)
    caps = probe(device)
    rows = []
    for precision in precisions:
        config = replace(base, precision=precision)
        plan = resolve_precision(precision, caps, allow_slow=config.allow_slow)
        lib_ms, bare_ms, results = [], [], []
        for _ in range(repeats):
            result = train(config, plan=plan, write=False)
            if not result.ok:
                print(f"{precision}: skipped, the run ended {result.status}: {result.error}", file=sys.stderr)
                break
            results.append(result)
            lib_ms.append(result.metrics.step_time_ms_median)
            bare_ms.append(bare_loop(config, plan).step_ms)
        if not results:
            continue
        step_ms = statistics.median(lib_ms)
        last = results[-1].metrics
        items_per_step = last.items_per_s * last.step_time_ms_median / 1e3
        rows.append(
            BenchRow(
                precision=precision,
                effective=plan.effective,
                step_ms=step_ms,
                bare_step_ms=statistics.median(bare_ms),
                items_per_s=items_per_step / (step_ms / 1e3),
                peak_memory_mb=statistics.median(r.metrics.peak_memory_mb or 0.0 for r in results),
                eval_loss=last.eval_loss,
                fallback_reason=plan.fallback_reason,
                unit=last.throughput_unit,
            )
        )
        del results
        PeakMemory(device).reset()
    return rows


@dataclass(frozen=True)
class HeadroomCost:
    """What the fp16 headroom map costs a step: off, on but not sampling (device-side flags), and sampling."""

    precision: str
    off_ms: float
    unsampled_ms: float
    sampled_ms: float


def headroom_cost(base: RunConfig, precisions: Sequence[str], every: int, repeats: int) -> list[HeadroomCost]:
    """Median step times with the map off and on (every `every` steps), the same runs alternated `repeats` times."""
    rows = []
    for precision in precisions:
        off, unsampled, sampled = [], [], []
        for _ in range(repeats):
            config = replace(base, precision=precision)
            off.append(train(config, write=False).metrics.step_time_ms_median)
            mapped = train(replace(config, headroom_every=every), write=False)
            for row in mapped.history:
                if row.step_time_ms is not None:
                    (sampled if row.step % every == 0 else unsampled).append(row.step_time_ms)
        if off[0] is not None and sampled and unsampled:
            rows.append(HeadroomCost(precision, statistics.median(off), statistics.median(unsampled), statistics.median(sampled)))
    return rows


def format_headroom_table(rows: Sequence[HeadroomCost], every: int) -> str:
    lines = [
        f"headroom map (sampled every {every} steps): median step ms",
        "| precision | map off | on, unsampled step | on, sampled step | unsampled vs off | sampled vs off |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.precision} | {r.off_ms:.2f} | {r.unsampled_ms:.2f} | {r.sampled_ms:.2f} | "
            f"{r.unsampled_ms / r.off_ms - 1:+.1%} | {r.sampled_ms / r.off_ms - 1:+.1%} |"
        )
    return "\n".join(lines)


def device_label(caps: Capabilities, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The device as the table's header names it: the GPU's name, or the CPU's model and the instruction set
    torch dispatches to (`AVX512`, `AVX2`...), which decides whether half precision can be fast."""
    if caps.device_type == "cuda":
        return caps.device_name
    return f"{cpu_model(cpuinfo) or 'CPU'} (torch's CPU capability: {caps.device_name})"


def format_bench_table(rows: Sequence[BenchRow], device_name: str) -> str:
    fp32 = next((r for r in rows if r.effective == "fp32"), None)
    unit = rows[0].unit if rows else "tokens"
    lines = [
        f"device: {device_name}, torch {torch.__version__}",
        f"| precision | effective | step ms (median) | {unit}/s | speedup vs fp32 | peak MiB | memory vs fp32 | eval loss | loop overhead vs bare |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r.items_per_s / fp32.items_per_s:.2f}x" if fp32 else "n/a"
        mem = (
            f"{r.peak_memory_mb / fp32.peak_memory_mb:.2f}x"
            if fp32 and r.peak_memory_mb and fp32.peak_memory_mb
            else "n/a"
        )
        lines.append(
            f"| {r.precision} | {r.effective} | {r.step_ms:.2f} | {r.items_per_s:,.0f} | {speed} | "
            f"{r.peak_memory_mb or 0:.0f} | {mem} | {r.eval_loss:.4f} | {r.overhead:+.1%} |"
        )
    notes = [f"- {r.precision}: {r.fallback_reason}" for r in rows if r.fallback_reason]
    return "\n".join(lines + (["", "fallbacks:", *notes] if notes else []))


def format_interleaved(base: RunConfig, precisions: Sequence[str], budget_s: float) -> str:
    """The paired, interleaved speed-ups against the first precision, as a sweep's report quotes them."""
    result = time_precisions(base, precisions, budget_s=budget_s)
    timing = result.timing
    assert timing is not None
    if not result.ok:
        return f"interleaved timing: {result.error}"
    head = (
        f"interleaved timing (the sweep's protocol: ABBA blocks of {timing.block_steps} steps, "
        f"{timing.elapsed_s:.0f} s of a {timing.budget_s:.0f} s budget, stopped: {timing.stopped}):"
    )
    lines = [
        head,
        f"| precision | speed-up vs {timing.precisions[0]} [95% CI] | rounds | verdict |",
        "|---|---|---|---|",
    ]
    for v in speed_verdicts(timing).values():
        interval = f"{v.interval.mean:.2f}x [{v.interval.low:.2f}x, {v.interval.high:.2f}x]" if v.interval else "n/a"
        reason = timing_reason(v, timing)
        lines.append(f"| {v.precision} | {interval} | {v.rounds} | {v.verdict}{f' ({reason})' if reason else ''} |")
    lines += [f"- {p}: could not be timed: {why}" for p, why in timing.failed.items()]
    return "\n".join(lines)


def build_parser(cuda: bool) -> argparse.ArgumentParser:
    """The defaults are the documented set-up: GPT-2 small at 16 x 1024 tokens on a GPU, gpt-tiny on a CPU."""
    parser = argparse.ArgumentParser(prog="python -m amp_lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=BUILTIN_MODELS, default=default_model_for("cuda" if cuda else "cpu"))
    parser.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--timing-warmup-steps", type=int, default=10, help="untimed steps before measuring")
    parser.add_argument("--batch-size", type=int, default=16 if cuda else 8)
    parser.add_argument("--seq-len", type=int, default=1024 if cuda else 128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--allow-slow", action="store_true", help="run fp16 even on a CPU without fast fp16")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--headroom-every", type=int, default=0, help="also measure the fp16 headroom map sampling every N steps"
    )
    parser.add_argument(
        "--speed-budget", type=float, default=30.0, help="seconds for the interleaved timing (0: skip it)"
    )
    return parser


def base_config(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model,
        steps=args.steps,
        timing_warmup_steps=args.timing_warmup_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device=args.device,
        log_every=10,
        allow_slow=args.allow_slow,
        compile=args.compile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(torch.cuda.is_available()).parse_args(argv)
    base = base_config(args)
    rows = bench(base, args.precisions, args.repeats)
    print(format_bench_table(rows, device_label(probe(resolve_device(base.device)))))
    if args.speed_budget > 0 and len(args.precisions) > 1:
        print("\n" + format_interleaved(base, args.precisions, args.speed_budget))
    if args.headroom_every > 0:
        costs = headroom_cost(base, args.precisions, args.headroom_every, args.repeats)
        print("\n" + format_headroom_table(costs, args.headroom_every))
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "overhead": r.overhead} for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
