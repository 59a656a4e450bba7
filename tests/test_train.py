"""amp_lib.train: the measured training loop on real torch (CPU; the `gpu` section on CUDA), its recorder,
its statuses and metrics."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import statistics
import time
import warnings
from dataclasses import replace

import pytest
import torch
from user_models import PLAN_DTYPES

from amp_lib.config import RECIPES, RunConfig
from amp_lib.distributed import Ranks
from amp_lib.models import build_workload
from amp_lib.precision import Capabilities, probe, resolve_precision
from amp_lib.results import Metrics, RunResult
from amp_lib.scaler import COLLAPSED_SCALE
from amp_lib.train import (
    global_batch_config,
    make_optimizer,
    rank_rows,
    scheduled_lr,
    seed_everything,
    train,
)


class KeepingObserver:
    """A real RunObserver that keeps what it was given."""

    def __init__(self):
        self.started, self.logs, self.evals, self.ended = [], [], [], []

    def on_start(self, config, plan):
        self.started.append((config, plan))

    def on_log(self, rows, items_per_step):
        self.logs.append((list(rows), items_per_step))

    def on_eval(self, row):
        self.evals.append((row, len(self.ended)))  # with how many results it had seen: 0 while the run trains

    def on_end(self, result):
        self.ended.append(result)


def initial_losses(config: RunConfig, n: int) -> list[float]:
    """fp32 losses of the untrained model on the run's first `n` batches, built the way train() builds them."""
    seed_everything(config.seed)
    workload = build_workload(config, torch.device("cpu"))
    with torch.no_grad():
        return [float(workload.loss_fn(workload.model(x), y)) for x, y in (workload.train_batches[i] for i in range(n))]


def assert_cumulative_skips(result: RunResult) -> None:
    running = 0
    for row in result.history:
        running += row.skipped
        assert row.skipped_steps == running
    assert result.metrics.skipped_steps == running


def assert_written(config: RunConfig, result: RunResult) -> dict:
    assert config.result_path.exists()
    data = json.loads(config.result_path.read_text())
    assert data["status"] == result.status
    assert RunResult.load(config.result_path).status == result.status
    return data


def user_run(name: str, **overrides) -> RunConfig:
    """A few steps of one of tests/user_models.py's factories on the CPU (milliseconds a step)."""
    values = {"model": f"user_models:{name}", "steps": 3, "timing_warmup_steps": 1, "batch_size": 4, "device": "cpu"}
    return RunConfig(**{**values, **overrides})


# --- convergence ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_runs_reduce_the_loss(tiny_config, precision):
    config = tiny_config(precision=precision, steps=20, lr=3e-3, log_every=5, allow_slow=True)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan.effective == precision  # allow_slow: fp16 really ran on this CPU
    assert result.plan.fallback_reason is None
    losses = [row.loss for row in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert result.metrics.eval_loss < losses[0]
    assert result.metrics.final_train_loss == losses[-1]


@pytest.mark.slow
def test_first_step_loss_is_the_untrained_models_loss(tiny_config):
    config = tiny_config(steps=4)
    result = train(config, write=False)
    assert result.history[0].loss == pytest.approx(initial_losses(config, 1)[0], rel=1e-6)


@pytest.mark.slow
def test_fp16_on_this_cpu_falls_back_without_allow_slow(tiny_config):
    result = train(tiny_config(precision="16-mixed", steps=3, timing_warmup_steps=1), write=False)
    assert result.status == "ok"
    assert result.plan.requested == "fp16-mixed"  # the config holds the canonical name of what was asked
    if not probe("cpu").fp16_fast and result.plan.device_type == "cpu":
        assert result.plan.effective == "bf16-mixed"
        assert "fast fp16" in result.plan.fallback_reason
        assert all(row.loss_scale is None for row in result.history)


@pytest.mark.slow
def test_bf16_true_trains_bf16_parameters(tiny_config):
    config = tiny_config(precision="bf16-true", lr=3e-3, steps=10)
    result = train(config, write=False)
    assert result.status == "ok", result.error
    assert result.plan.param_dtype == "bfloat16" and result.plan.autocast_dtype is None
    assert result.history[-1].loss < result.history[0].loss
    assert all(row.loss_scale is None for row in result.history)


@pytest.mark.slow
@pytest.mark.parametrize("requested,effective", [("tf32", "fp32"), ("fp8-rowwise", "bf16-mixed")])
def test_fallback_is_recorded_in_the_result(tiny_config, requested, effective):
    config = tiny_config(precision=requested, steps=3, timing_warmup_steps=0)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan.requested == requested and result.plan.effective == effective
    assert result.plan.fallback_reason
    assert RunResult.load(config.result_path).plan.fallback_reason == result.plan.fallback_reason
    assert result.metrics.timed_steps == 3  # timing_warmup_steps=0: every step is timed


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_gives_identical_fp32_history(tiny_config):
    a = train(tiny_config(seed=7, run_name="a"))
    b = train(tiny_config(seed=7, run_name="b"))
    assert a.status == b.status == "ok"
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.grad_norm for r in a.history] == [r.grad_norm for r in b.history]
    assert a.metrics.eval_loss == b.metrics.eval_loss


@pytest.mark.slow
def test_different_seeds_differ(tiny_config):
    a = train(tiny_config(seed=1), write=False)
    b = train(tiny_config(seed=2), write=False)
    assert [r.loss for r in a.history] != [r.loss for r in b.history]


def test_seed_everything_also_seeds_pythons_random_for_user_factories():
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), torch.rand(2).tolist()))
    assert draws[0] == draws[1]
    seed_everything(8)
    assert random.random() != draws[0][0]


# --- gradient accumulation -----------------------------------------------------------------------


@pytest.mark.slow
def test_grad_accum_two_micro_batches_per_step(tiny_config):
    config = tiny_config(grad_accum=2, steps=6, timing_warmup_steps=1, lr=3e-3)
    observer = KeepingObserver()
    result = train(config, [observer])
    assert result.status == "ok", result.error
    assert len(result.history) == config.steps
    # the first step's loss is the mean over its two micro-batches, both seen by the untrained model
    first_two = initial_losses(config, 2)
    assert result.history[0].loss == pytest.approx(sum(first_two) / 2, rel=1e-5)
    assert all(items == config.batch_size * config.seq_len * 2 for _, items in observer.logs)
    assert result.metrics.timed_steps == config.steps - config.timing_warmup_steps


# --- optimizer and gradient clipping -------------------------------------------------------------


def test_optimizer_is_fused_so_grad_scaler_steps_without_a_sync():
    """GradScaler hands a fused optimizer its inf flag as a tensor instead of reading it on the host."""
    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    optimizer = make_optimizer(model, RunConfig(lr=0.1), torch.device("cpu"))
    assert getattr(optimizer, "_step_supports_amp_scaling", False) is True
    assert [p for group in optimizer.param_groups for p in group["params"]] == [model.weight]
    assert optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.slow
def test_grad_clip_zero_turns_clipping_off(tiny_config):
    a = train(tiny_config(grad_clip=0, lr=3e-2, steps=4, timing_warmup_steps=1), write=False)
    b = train(tiny_config(grad_clip=None, lr=3e-2, steps=4, timing_warmup_steps=1), write=False)
    c = train(tiny_config(grad_clip=1e-3, lr=3e-2, steps=4, timing_warmup_steps=1), write=False)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.loss for r in a.history] != [r.loss for r in c.history]


@pytest.mark.slow
def test_history_records_the_unclipped_gradient_norm_of_each_step(user_models, tmp_path):
    import user_models as factories

    config = user_run("build_ok", log_every=2, grad_clip=1e-3, out_dir=str(tmp_path))
    result = train(config, write=False)
    model, batches, loss_fn = factories.build_ok(config)  # the same seeded model and batches
    x, y = batches[0]
    loss_fn(model(x), y).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()
    assert result.history[0].grad_norm == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3  # so clipping was active: the norm is the one before the clip
    assert [type(r.grad_norm) for r in result.history] == [float] * 3


# --- the precision plan in the loop --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "param_dtype", "output_dtype"), PLAN_DTYPES)
def test_the_loop_runs_the_model_in_the_plans_dtypes(user_models, precision, param_dtype, output_dtype):
    import user_models as factories

    factories.SEEN_DTYPES.clear()
    assert train(user_run("build_dtype_probe", precision=precision, steps=2), write=False).ok
    assert set(factories.SEEN_DTYPES) == {(param_dtype, output_dtype, False)}  # and TF32 stays off: not asked for


def test_ranks_build_the_global_batch_from_their_config_without_applying_its_recipe_again() -> None:
    config = RunConfig(recipe="shakespeare-char", batch_size=RunConfig().batch_size // 2)
    assert config.batch_size != RECIPES["shakespeare-char"]["batch_size"]  # the recipe's value, overridden
    assert global_batch_config(config, 1) is config
    for world in (2, 3):
        expected = replace(config, recipe="").to_dict() | {"batch_size": config.batch_size * world, "recipe": ""}
        assert global_batch_config(config, world).to_dict() == expected  # twice: the default batch size


def test_each_rank_trains_and_evaluates_on_its_own_rows_of_the_global_batches(user_models) -> None:
    whole = build_workload(user_run("build_ok", batch_size=4), torch.device("cpu"))
    assert rank_rows(whole, Ranks()) is whole
    for rank in (0, 1):
        mine = rank_rows(whole, Ranks(rank=rank, world_size=2))
        for part in ("train_batches", "eval_batches"):
            (x, y), (all_x, all_y) = getattr(mine, part)[0], getattr(whole, part)[0]
            assert torch.equal(x, all_x[2 * rank : 2 * rank + 2]) and torch.equal(y, all_y[2 * rank : 2 * rank + 2])


@pytest.mark.slow
def test_a_run_asked_to_compile_trains_the_model_under_torch_compile(user_models):
    import user_models as factories

    for compile in (False, True):
        factories.COMPILING.clear()
        torch.compiler.reset()  # an earlier compile in this process (its caches and recompile counts) decides nothing
        result = train(user_run("build_compile_probe", compile=compile), write=False)
        assert result.ok and factories.COMPILING == {"forward": compile} and result.config["compile"] is compile


def test_a_given_plan_is_used_instead_of_resolving_the_configs_precision(user_models):
    import user_models as factories

    config = user_run("build_dtype_probe")  # precision fp32
    plan = resolve_precision("bf16-true", Capabilities())
    observer = KeepingObserver()
    factories.SEEN_DTYPES.clear()
    result = train(config, [observer], plan=plan, write=False)
    assert result.ok, result.error
    assert set(factories.SEEN_DTYPES) == {(torch.bfloat16, torch.bfloat16, False)}
    assert observer.started == [(config, plan)] and observer.started[0][1] is plan
    assert result.plan.to_dict() == {
        **plan.to_dict(), "torch_version": torch.__version__, "threads": torch.get_num_threads(), "concurrent_runs": 1,
        "machine": result.plan.machine, "executor": None,  # not run by a sweep
    }  # fmt: skip
    assert result.plan.machine["torch"] == torch.__version__ and result.plan.machine["device_type"] == "cpu"
    assert result.config["precision"] == "fp32"  # the config is recorded as given


def test_a_given_fp16_plan_runs_the_loss_scaler_the_config_alone_would_not(user_models):
    # no allow_slow: resolving here would give bf16-mixed on this CPU, without a scaler
    config = user_run("build_ok", precision="fp16-mixed", init_scale=256.0)
    plan = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)
    result = train(config, plan=plan, write=False)
    assert result.ok, result.error
    assert result.plan.effective == "fp16-mixed" and result.plan.use_loss_scaler is True
    assert [r.loss_scale for r in result.history] == [256.0] * 3  # the config's scaler settings still apply
    assert result.metrics.final_loss_scale == result.metrics.min_loss_scale == 256.0


@pytest.mark.slow
def test_mfu_is_throughput_times_flops_per_item_over_the_plans_peak(tiny_config):
    # a CPU plan named like an H100 has the H100's peak: the loop's MFU formula runs without a GPU
    caps = Capabilities(device_name="NVIDIA H100 80GB HBM3 (named for the test)")
    plan = resolve_precision("fp32", caps)
    assert plan.peak_tflops == 67.0
    config = tiny_config(steps=4, timing_warmup_steps=1)
    result = train(config, plan=plan, write=False)
    assert result.ok, result.error
    flops = build_workload(config, torch.device("cpu")).flops_per_item
    assert result.metrics.mfu == pytest.approx(result.metrics.items_per_s * flops / 67e12, rel=1e-14, abs=0)
    assert 0 < result.metrics.mfu < 1e-3  # a CPU is nowhere near an H100


# --- metrics and history -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_metrics_of_a_non_fp16_run(tiny_config, precision):
    config = tiny_config(precision=precision)
    result = train(config)
    m = result.metrics
    assert result.status == "ok" and result.error is None
    assert m.timed_steps == config.steps - config.timing_warmup_steps
    assert m.step_time_ms_p10 <= m.step_time_ms_median <= m.step_time_ms_p90
    assert m.items_per_s > 0 and m.throughput_unit == "tokens"
    assert m.peak_memory_mb > 0 and m.peak_memory_kind == "cpu_rss"
    assert m.peak_memory_mb_ranks is None and m.comm_time_ms is None  # one process: no ranks, no collectives
    assert m.mfu is None  # no peak-flops entry for a CPU
    assert [r.step for r in result.history] == list(range(config.steps))
    assert all(r.loss_scale is None for r in result.history)
    assert m.final_loss_scale is None and m.min_loss_scale is None
    assert m.skipped_steps == 0
    timed = [r.step_time_ms for r in result.history]
    assert all(t is None for t in timed[: config.timing_warmup_steps])
    assert all(t is not None and t > 0 for t in timed[config.timing_warmup_steps :])
    assert m.step_time_ms_median == pytest.approx(statistics.median(timed[config.timing_warmup_steps :]))
    assert m.items_per_step == config.batch_size * config.seq_len * config.grad_accum  # the rate's numerator, kept
    assert m.items_per_s == pytest.approx(m.items_per_step / (m.step_time_ms_median / 1e3))
    assert math.isfinite(m.eval_loss)


@pytest.mark.slow
def test_metrics_and_history_of_an_fp16_run(tiny_config):
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, timing_warmup_steps=1, growth_interval=2)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan.effective == "fp16-mixed"
    scales = [r.loss_scale for r in result.history]
    assert all(isinstance(s, float) and s > 0 for s in scales)
    # the scale moves only as GradScaler's rules say: halve on a skipped step, double after 2 clean ones
    prev, clean = config.init_scale, 0
    for row in result.history:
        if row.skipped:
            prev, clean = prev * 0.5, 0
        else:
            clean += 1
            if clean == config.growth_interval:
                prev, clean = prev * 2.0, 0
        assert row.loss_scale == prev, result.history
    assert_cumulative_skips(result)
    m = result.metrics
    assert m.final_loss_scale == scales[-1] and m.min_loss_scale == min(scales)
    assert m.timed_steps == config.steps - config.timing_warmup_steps


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_and_counted(tiny_config):
    # a too large initial scale overflows fp16 at once: the first steps skip until the scale is small enough
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, timing_warmup_steps=1, init_scale=2.0**20)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.history[0].skipped and not result.history[-1].skipped
    assert result.metrics.skipped_steps >= 1
    assert_cumulative_skips(result)
    for row, before in zip(result.history, [config.init_scale] + [r.loss_scale for r in result.history]):
        assert row.loss_scale == (before * 0.5 if row.skipped else before)


@pytest.mark.slow
def test_mlp_model_counts_samples(tiny_config):
    result = train(tiny_config(model="mlp", steps=4, timing_warmup_steps=1, precision="bf16-mixed"), write=False)
    assert result.status == "ok", result.error
    assert result.metrics.throughput_unit == "samples"
    assert result.metrics.eval_loss is not None and math.isfinite(result.metrics.eval_loss)


@pytest.mark.slow
def test_peak_memory_covers_the_timed_steps_and_not_the_warmup(user_models):
    import user_models as factories

    def peak(spike_at_call: int | None) -> float:
        factories.SPIKE_AT["call"] = spike_at_call
        result = train(user_run("build_memory_spike", steps=5, timing_warmup_steps=2, log_every=5), write=False)
        assert result.ok
        return result.metrics.peak_memory_mb

    try:
        quiet, in_warmup, first_timed, last_timed = peak(None), peak(1), peak(2), peak(4)
    finally:
        factories.SPIKE_AT["call"] = None
    assert in_warmup < quiet + 100  # a spike during warm-up is not counted
    assert first_timed > quiet + 400 and last_timed > quiet + 400  # one in any timed step is


# --- observers and the result file ---------------------------------------------------------------


def test_observers_see_start_every_flush_and_end(user_models):
    config = user_run("build_ok", steps=7, log_every=3)
    observer = KeepingObserver()
    result = train(config, [observer], write=False)
    assert len(observer.started) == 1 and observer.started[0][0] is config
    assert observer.started[0][1].effective == result.plan.effective
    assert [len(rows) for rows, _ in observer.logs] == [3, 3, 1]  # flush every 3 steps and at the end
    assert [row for rows, _ in observer.logs for row in rows] == list(result.history)
    assert all(items == config.batch_size for _, items in observer.logs)
    assert observer.ended == [result]


def test_time_spent_in_observers_is_not_training_time(user_models):
    """A live figure or progress bar drawing at each flush must not inflate time-to-quality."""
    import time

    class Slow(KeepingObserver):
        def on_log(self, rows, items_per_step) -> None:
            super().on_log(rows, items_per_step)
            time.sleep(0.25)

    config = user_run("build_ok", steps=6, log_every=2)
    began = time.perf_counter()
    result = train(config, [Slow()], write=False)
    wall = time.perf_counter() - began
    slept = 0.25 * 3
    assert result.ok and wall > slept
    assert result.metrics.train_time_s < wall - slept + 0.05


@pytest.mark.slow
def test_result_file_is_written_and_loads_equal(user_models, tmp_path):
    config = user_run("build_ok", out_dir=str(tmp_path))
    result = train(config)
    assert config.result_path.exists()
    assert RunResult.load(config.result_path) == result
    assert result.config == config.to_dict()
    assert result.plan.torch_version == torch.__version__


@pytest.mark.slow
def test_write_false_writes_nothing(user_models, tmp_path):
    assert train(user_run("build_ok", out_dir=str(tmp_path)), write=False).ok
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_model_is_freed_before_observers_see_the_result(user_models):
    """train() drops its workload (and gc's it) before on_end, so a sweep's next run starts with that memory back."""
    import user_models as factories

    class FreedAtEnd:
        def on_start(self, config, plan) -> None: ...
        def on_log(self, rows, items_per_step) -> None: ...
        def on_eval(self, row) -> None: ...
        def on_end(self, result) -> None:
            self.alive = [ref() is not None for ref in factories.BUILT_MODELS]

    factories.BUILT_MODELS.clear()
    observer = FreedAtEnd()
    result = train(user_run("build_tracked"), [observer], write=False)
    assert result.ok and observer.alive == [False]


# --- user models that work -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["build_ok", "build_workload", "build_callable", "build_iterable"])
def test_user_factory_return_shapes(tiny_config, user_models, factory):
    observer = KeepingObserver()
    result = train(tiny_config(model=f"user_models:{factory}", lr=1e-2), [observer], write=False)
    assert result.status == "ok", result.error
    assert observer.logs[0][1] == 4  # items per step: the batch's first dimension
    assert result.metrics.throughput_unit == ("rows" if factory == "build_workload" else "samples")


# --- failures end as a result, never a crash -----------------------------------------------------


@pytest.mark.slow
def test_huge_lr_diverges_with_result_written_and_process_healthy(tiny_config):
    config = tiny_config(lr=1e6, run_name="diverge")
    result = train(config)
    assert result.status == "diverged"
    assert "loss became" in result.error
    data = assert_written(config, result)
    assert any(row["loss"] is None for row in data["history"])  # NaN is stored as null
    assert not math.isfinite(result.history[-1].loss)
    # the process carries on: a healthy run right after works
    after = train(tiny_config(steps=3, timing_warmup_steps=1, run_name="after"))
    assert after.status == "ok"


def test_nan_loss_user_model_diverges(tiny_config, user_models):
    config = tiny_config(model="user_models:build_nan")
    result = train(config)
    assert result.status == "diverged"
    assert result.error == "loss became nan at step 0"
    data = assert_written(config, result)
    assert data["metrics"]["final_train_loss"] is None


@pytest.mark.slow
def test_nan_loss_under_fp16_ends_diverged_not_ok(tiny_config, user_models):
    # every fp16 step is skipped (the scaler tolerates it), but the run must not be reported 'ok'
    config = tiny_config(
        model="user_models:build_nan", precision="fp16-mixed", allow_slow=True, steps=4, timing_warmup_steps=1
    )
    result = train(config)
    assert result.status == "diverged"
    assert result.metrics.skipped_steps == len(result.history) == 4
    assert_written(config, result)


@pytest.mark.slow
def test_collapsed_loss_scale_diverges(tiny_config, user_models):
    # start just above the collapse threshold: two skipped steps push the scale below it
    config = tiny_config(
        model="user_models:build_nan",
        precision="fp16-mixed",
        allow_slow=True,
        init_scale=COLLAPSED_SCALE * 2,
        steps=6,
        timing_warmup_steps=1,
    )
    result = train(config)
    assert result.status == "diverged"
    assert "collapsed" in result.error
    assert result.metrics.min_loss_scale < COLLAPSED_SCALE


@pytest.mark.slow
def test_oom_in_factory_ends_oom(tiny_config, user_models):
    config = tiny_config(model="user_models:build_oom")
    result = train(config)
    assert result.status == "oom"
    assert "out of memory" in result.error and "80.00 GiB (test)" in result.error
    assert result.history == ()
    assert_written(config, result)
    # the process carries on: the next run in it trains normally
    after = train(user_run("build_ok"), write=False)
    assert after.status == "ok", after.error


@pytest.mark.slow
def test_failing_factory_ends_failed_with_the_error_text(tiny_config, user_models):
    config = tiny_config(model="user_models:build_fail")
    result = train(config)
    assert result.status == "failed"
    assert "RuntimeError: user factory exploded on purpose" in result.error
    assert result.metrics.final_train_loss is None
    assert_written(config, result)


@pytest.mark.slow
def test_a_failed_run_keeps_the_last_frames_of_its_traceback(user_models):
    result = train(user_run("build_fail"), write=False)
    lines = result.error.splitlines()
    assert result.status == "failed" and lines[0] == lines[-1] == "RuntimeError: user factory exploded on purpose"
    frames = [line for line in lines if line.startswith('  File "')]
    assert len(frames) == 2 and re.search(r'user_models\.py", line \d+, in build_fail$', frames[-1])
    assert 'raise RuntimeError("user factory exploded on purpose")' in lines[-2]
    assert all(line.startswith((" ", "RuntimeError: ")) for line in lines)  # nothing but the traceback's own text


@pytest.mark.slow
@pytest.mark.parametrize(
    "factory,text",
    [
        ("user_models:build_bad_return", "must return a Workload"),
        ("user_models:build_empty", "no batches"),
        ("user_models:not_callable", "no callable"),
        ("user_models:missing", "no callable"),
        ("no_such_module_xyz:build", "cannot import"),
    ],
)
def test_bad_user_factories_end_failed(tiny_config, user_models, factory, text):
    result = train(tiny_config(model=factory))
    assert result.status == "failed"
    assert text in result.error


def test_failure_mid_run_keeps_the_flushed_history(tiny_config, user_models):
    config = tiny_config(model="user_models:build_fails_mid_run", log_every=2)
    result = train(config)
    assert result.status == "failed"
    assert "ArithmeticError: loss blew up at call 6" in result.error
    assert [r.step for r in result.history] == [0, 1, 2, 3]  # step 5's loss raised before its flush
    assert result.metrics.final_train_loss == result.history[-1].loss
    assert result.metrics.throughput_unit == "samples"  # the workload was built: its unit is kept
    assert_written(config, result)


@pytest.mark.slow
def test_a_run_that_fails_before_its_workload_exists_knows_nothing(user_models):
    early = train(user_run("build_fail"), write=False)
    assert early.status == "failed" and early.history == ()
    assert early.metrics == Metrics(throughput_unit="tokens", skipped_steps=0)  # the defaults: nothing measured


@pytest.mark.slow
def test_an_fp16_run_whose_every_step_was_skipped_is_diverged_not_ok(tiny_config):
    # issue 28: -p init_scale=1e30 skipped all steps and the run said "ok" although nothing was trained
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, timing_warmup_steps=1, init_scale=1e30)
    result = train(config, write=False)
    assert result.status == "diverged" and all(row.skipped for row in result.history)
    assert result.error == "the loss scaler skipped every one of the 6 steps (init_scale=1e+30): nothing was trained"
    assert result.metrics.skipped_steps == 6 and result.evals == ()  # no eval of an untrained model


@pytest.mark.slow
def test_a_cpu_allocation_that_fails_ends_the_run_oom_not_failed(tiny_config, user_models):
    result = train(tiny_config(model="user_models:build_cpu_oom"), write=False)
    assert result.status == "oom" and result.error.startswith("out of memory: ")


@pytest.mark.slow
def test_a_non_finite_eval_loss_ends_the_run_diverged_and_says_so(user_models):
    result = train(user_run("build_bad_eval"), write=False)
    assert result.status == "diverged" and result.error in ("eval loss is inf after step 3", "eval loss is nan after step 3")
    assert len(result.history) == 3 and all(math.isfinite(r.loss) for r in result.history)


# --- learning-rate schedule ----------------------------------------------------------------------


def lr_after(applied: int, config: RunConfig) -> float:
    return float(scheduled_lr(torch.tensor(applied), config))


def test_the_schedule_warms_up_linearly_then_decays_by_a_cosine_to_the_minimum() -> None:
    config = RunConfig(lr=1e-3, lr_warmup_steps=4, lr_decay_steps=12, min_lr=1e-4, steps=20)
    assert [lr_after(n, config) for n in range(4)] == pytest.approx([1e-3 * (n + 1) / 5 for n in range(4)])
    assert lr_after(4, config) == pytest.approx(1e-3)  # the peak: the decay starts from lr
    assert lr_after(8, config) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half way: the cosine's middle
    assert lr_after(12, config) == pytest.approx(1e-4) and lr_after(19, config) == pytest.approx(1e-4)
    decay = [lr_after(n, config) for n in range(4, 13)]
    assert all(a > b for a, b in itertools.pairwise(decay))
    no_decay = RunConfig(lr=1e-3, lr_warmup_steps=2, steps=20)
    assert [lr_after(n, no_decay) for n in (0, 1, 2, 10)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])


def test_the_optimizer_reads_the_scheduled_lr_and_history_records_it(user_models) -> None:
    config = user_run("build_ok", steps=6, lr=1e-2, lr_warmup_steps=2, lr_decay_steps=6, min_lr=1e-3, log_every=4)
    result = train(config, write=False)
    assert result.ok, result.error
    assert [r.lr for r in result.history] == pytest.approx([lr_after(n, config) for n in range(6)])
    constant = train(user_run("build_ok", steps=3, lr=5e-3), write=False)
    assert [r.lr for r in constant.history] == [5e-3] * 3  # no schedule: the config's lr, no device tensor


def test_a_step_the_loss_scaler_skips_does_not_advance_the_schedule(user_models) -> None:
    """A real fp16 run on GradScaler('cpu') with an overflow injected at step 2 (batch 2)."""
    config = user_run(
        "build_overflow_at_batch_2", precision="fp16-mixed", allow_slow=True, steps=5, init_scale=256.0,
        lr=1e-2, lr_warmup_steps=2, lr_decay_steps=5, min_lr=1e-3, log_every=5,
    )  # fmt: skip
    result = train(config, write=False)
    assert result.ok, result.error
    assert [r.skipped for r in result.history] == [False, False, True, False, False]
    applied = [0, 1, 2, 2, 3]  # the skipped step took no optimizer step, so the next one gets its lr again
    assert [r.lr for r in result.history] == pytest.approx([lr_after(n, config) for n in applied])
    fp32 = train(RunConfig(**{**config.to_dict(), "precision": "fp32"}), write=False)
    assert not any(r.skipped for r in fp32.history)
    assert [r.lr for r in fp32.history] == pytest.approx([lr_after(n, config) for n in range(5)])


def test_adamw_takes_beta2_and_weight_decay_from_the_config() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = make_optimizer(model, RunConfig(beta2=0.99, weight_decay=0.1), torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["lr"]) == ((0.9, 0.99), 0.1, 1e-3)
    assert type(group["lr"]) is float  # no schedule: a plain number, as a user's scheduler or logger expects
    scheduled = make_optimizer(model, RunConfig(lr=2e-3, lr_warmup_steps=3), torch.device("cpu"))
    assert torch.is_tensor(scheduled.param_groups[0]["lr"]) and float(scheduled.param_groups[0]["lr"]) == pytest.approx(2e-3)


# --- periodic evaluation --------------------------------------------------------------------------


def test_evals_run_every_n_steps_and_at_the_end_with_training_time_only(user_models) -> None:
    result = train(user_run("build_ok", steps=5, eval_every=2, log_every=5), write=False)
    assert result.ok, result.error
    assert [e.step for e in result.evals] == [2, 4, 5]
    assert all(e.loss is not None and math.isfinite(e.loss) for e in result.evals)
    elapsed = [e.elapsed_s for e in result.evals]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert result.metrics.eval_loss == result.evals[-1].loss
    assert result.metrics.best_eval_loss == min(e.loss for e in result.evals)
    assert result.metrics.train_time_s >= elapsed[-1]
    once = train(user_run("build_ok", steps=4, eval_every=4), write=False)
    assert [e.step for e in once.evals] == [4]  # the last step's eval is not taken twice


def test_observers_get_each_eval_as_it_is_taken_not_at_the_end(user_models) -> None:
    """A live figure draws eval points while the run trains: every eval row reaches `on_eval` before `on_end`."""
    observer = KeepingObserver()
    result = train(user_run("build_ok", steps=5, eval_every=2, log_every=5), [observer], write=False)
    assert result.ok and len(observer.ended) == 1
    assert [(row.step, row.loss, seen) for row, seen in observer.evals] == [(e.step, e.loss, 0) for e in result.evals]
    assert [row.step for row, _ in observer.evals] == [2, 4, 5]


def test_time_spent_evaluating_is_not_training_time(user_models) -> None:
    """Time-to-quality counts training only: two evaluations of 4 x 0.1 s each are left out of it."""
    from user_models import EVAL_FORWARD_S  # importable once the fixture put tests/ on the path

    config = user_run("build_slow_eval", steps=4, eval_every=2)
    began = time.perf_counter()
    result = train(config, write=False)
    wall = time.perf_counter() - began
    slept = 2 * 4 * EVAL_FORWARD_S
    assert result.ok and [e.step for e in result.evals] == [2, 4] and wall > slept
    # Four steps of an 8x1 linear layer take milliseconds: half the evaluations' time is a wide margin.
    assert result.metrics.train_time_s < slept / 2
    assert result.evals[1].elapsed_s < slept / 4  # the eval at step 2 is not in step 4's clock


def test_a_non_finite_periodic_eval_ends_the_run_diverged_keeping_the_evals(user_models) -> None:
    result = train(user_run("build_bad_eval", steps=4, eval_every=2), write=False)
    assert result.status == "diverged"
    assert result.error in ("eval loss is inf after step 2", "eval loss is nan after step 2")
    assert [(e.step, e.loss) for e in result.evals] == [(2, None)]
    assert len(result.history) == 2 and result.metrics.best_eval_loss is None


@pytest.mark.slow
def test_the_eval_curve_of_a_builtin_model_falls_on_held_out_text(tiny_config) -> None:
    result = train(tiny_config(steps=30, eval_every=10, eval_batches=4, lr=3e-3, log_every=10), write=False)
    losses = [e.loss for e in result.evals]
    assert [e.step for e in result.evals] == [10, 20, 30] and losses[-1] < losses[0] < math.log(65)


# --- memory split and the machine share ----------------------------------------------------------


def test_without_an_untimed_step_the_memory_split_is_the_tensor_count_with_the_reason(user_models) -> None:
    for precision, size in (("fp32", 36), ("bf16-true", 18)):  # nn.Linear(8, 1): 9 parameters
        result = train(user_run("build_ok", steps=2, timing_warmup_steps=0, precision=precision), write=False)
        m = result.metrics
        assert m.param_memory_mb * 2**20 == size and m.grad_memory_mb * 2**20 == size
        # AdamW's two moments in the parameters' dtype, plus a step counter per tensor
        assert 2 * size <= m.optimizer_memory_mb * 2**20 <= 2 * size + 2 * 8
        assert result.memory.source == (
            "tensor count (no untimed step to measure (timing_warmup_steps=0))"
        )
        assert not result.memory.tracked and result.memory.peak_mb is None


def test_the_plan_records_threads_and_how_many_runs_shared_the_machine(user_models, monkeypatch) -> None:
    result = train(user_run("build_ok", steps=2), write=False)
    assert (result.plan.threads, result.plan.concurrent_runs) == (torch.get_num_threads(), 1)
    monkeypatch.setenv("AMP_WORKBOOK_CONCURRENT_RUNS", "3")
    assert train(user_run("build_ok", steps=2), write=False).plan.concurrent_runs == 3
    monkeypatch.setenv("AMP_WORKBOOK_CONCURRENT_RUNS", "many")
    assert train(user_run("build_ok", steps=2), write=False).plan.concurrent_runs == 1


# --- fp8 recipes, the optimizer, the memory split and energy in a run ------------------------------------

FP8_RECIPES = ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"]
FP8_GPT_LINEARS = tuple(f"blocks.{b}.{n}" for b in (0, 1) for n in ("qkv", "proj", "mlp.0", "mlp.2")) + ("lm_head",)


def fp8_gpt(**overrides) -> RunConfig:
    """A few steps of tests/user_models.py's build_fp8_gpt: every linear can run in fp8."""
    return user_run("build_fp8_gpt", **{"steps": 4, "timing_warmup_steps": 2, "batch_size": 2, "seq_len": 16, **overrides})


@pytest.mark.slow  # importing torchao takes seconds
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_each_fp8_recipe_trains_emulated_on_this_cpu_and_records_its_layer_plan(user_models, tmp_path, recipe):
    config = fp8_gpt(precision=recipe, emulate_fp8=True, fp8_layers="all", out_dir=str(tmp_path))
    result = train(config)
    assert result.status == "ok", result.error
    assert (result.plan.effective, result.plan.emulated, result.plan.fallback_reason) == (recipe, True, None)
    layers = result.fp8_layers
    assert (layers.precision, layers.emulate, layers.fp8_fqns) == (recipe, True, FP8_GPT_LINEARS)
    assert layers.tokens_per_step == 2 * 16  # the rows of one micro-batch: batch_size x seq_len
    assert all(math.isfinite(row.loss) for row in result.history)
    assert result.metrics.mfu is None and result.metrics.mfu_vs_mixed_peak is None  # emulated: no claim on speed
    assert RunResult.load(config.result_path).fp8_layers == layers  # typed again after the JSON file


@pytest.mark.slow
def test_fp8_layers_keeps_the_named_linears_in_high_precision_and_the_result_says_why(user_models) -> None:
    result = train(fp8_gpt(precision="fp8-rowwise", emulate_fp8=True, fp8_layers="lm_head+blocks.0.*"), write=False)
    assert result.status == "ok", result.error
    layers = result.fp8_layers
    assert set(layers.high_precision_fqns) == {"lm_head", *(n for n in FP8_GPT_LINEARS if n.startswith("blocks.0."))}
    reasons = {d.fqn: d.reason for d in layers.decisions}
    assert reasons["lm_head"] == "kept in high precision by pattern 'lm_head'"
    assert reasons["blocks.0.qkv"] == "kept in high precision by pattern 'blocks.0.*'"
    assert layers.summary == "4 of 9 linears in fp8 (fp8-rowwise, emulated, fp8_layers=lm_head,blocks.0.*; 32 tokens per step)"


@pytest.mark.slow
def test_an_fp8_layers_pattern_that_names_no_linear_fails_the_run_naming_the_linears(user_models) -> None:
    result = train(fp8_gpt(precision="fp8-rowwise", emulate_fp8=True, fp8_layers="lm_haed"), write=False)
    assert result.status == "failed"
    assert result.error_line.startswith("ValueError: fp8_layers pattern 'lm_haed' names no linear layer of the model")


def test_without_emulate_fp8_an_fp8_recipe_runs_bf16_here_and_says_how_to_emulate_it(user_models) -> None:
    result = train(user_run("build_ok", precision="fp8-rowwise"), write=False)
    assert result.status == "ok" and result.plan.effective == "bf16-mixed" and not result.plan.emulated
    assert "emulate_fp8=True forecasts its loss in emulation" in result.plan.fallback_reason
    assert result.fp8_layers is None


# The optimizer state of build_fp8_gpt against fused AdamW's fp32 state, as torchao keeps it: 8-bit and fp8 codes
# with an fp32 scale per 256, 4-bit codes two to a byte with a scale per 128; tensors under 4096 values stay plain.
STATE_SHARE = {"adamw-8bit": (0.25, 0.35), "adamw-4bit": (0.125, 0.2), "adamw-fp8": (0.25, 0.35)}


@pytest.mark.slow  # torchao compiles its optimizer's step: seconds to a minute on this CPU
@pytest.mark.parametrize("optimizer", [*STATE_SHARE, "adamw-bf16"])
def test_each_optimizer_trains_and_the_result_records_the_bytes_its_state_holds(user_models, optimizer) -> None:
    precision = "bf16-true" if optimizer == "adamw-bf16" else "fp32"  # adamw-bf16 needs bf16 parameters
    adamw = train(fp8_gpt(timing_warmup_steps=1), write=False)  # the report's baseline: fp32, fused AdamW
    result = train(fp8_gpt(precision=precision, timing_warmup_steps=1, optimizer=optimizer), write=False)
    assert result.status == adamw.status == "ok", result.error
    assert result.config["optimizer"] == optimizer and result.row.label == f"{precision} {optimizer}"
    assert all(math.isfinite(row.loss) for row in result.history)
    share = result.metrics.optimizer_memory_mb / adamw.metrics.optimizer_memory_mb
    low, high = STATE_SHARE.get(optimizer, (0.49, 0.51))  # adamw-bf16: bf16 state
    assert low < share < high, share
    assert result.memory.source.startswith("tensor count (torchao's ")  # its compiled step runs under no tracker
    params = result.metrics.param_memory_mb / adamw.metrics.param_memory_mb
    assert params == (0.5 if precision == "bf16-true" else 1.0)


def test_the_memtracker_split_of_an_untimed_step_reaches_the_result(tiny_config) -> None:
    config = tiny_config(steps=4, timing_warmup_steps=2)
    result = train(config)
    split = result.memory
    assert (split.source, split.tracked, split.device) == ("MemTracker", True, "cpu")
    assert sum(split.holders_mb().values()) == pytest.approx(split.peak_mb)
    m = result.metrics  # the tensor sizes the model and optimizer hold, beside what held the peak
    assert m.param_memory_mb * 2**20 == m.grad_memory_mb * 2**20 == 4 * m.param_count  # fp32, each parameter once
    assert split.parameters_mb == m.param_memory_mb  # one process: every parameter is whole at the peak
    assert split.optimizer_state_mb == pytest.approx(m.optimizer_memory_mb)  # step 1: both moments exist
    assert split.optimizer_state_mb == pytest.approx(2 * split.parameters_mb, rel=0.01)
    assert split.activations_mb > 0
    # on a CPU the process holds far more than its tensors: the two are reported apart
    assert split.process_rss_peak_mb >= split.process_rss_start_mb > split.peak_mb
    assert RunResult.load(config.result_path).memory == split


def test_the_memory_split_is_never_taken_on_the_profiled_step(user_models) -> None:
    result = train(user_run("build_ok", steps=3, timing_warmup_steps=1, profile_step=True), write=False)
    assert result.profile is not None  # step 0 was profiled: the one untimed step
    assert result.memory.source == (
        "tensor count (no untimed step to measure besides the profiled one (timing_warmup_steps=1))"
    )


def test_on_a_cpu_a_run_has_no_energy_reading_and_says_why(user_models) -> None:
    result = train(user_run("build_ok"), write=False)
    assert (result.energy.joules, result.energy.reason) == (None, "no NVIDIA GPU: the run is on cpu")


# --- gpu (CUDA only; skipped with the reason elsewhere) -------------------------------------------


def gpu_config(tmp_path, **overrides) -> RunConfig:
    values = {"model": "gpt-small", "steps": 24, "timing_warmup_steps": 4, "batch_size": 8, "seq_len": 128, "log_every": 8,
              "device": "cuda", "out_dir": str(tmp_path), "lr": 3e-3}  # fmt: skip
    return RunConfig(**{**values, **overrides})


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16-mixed", "bf16-mixed", "bf16-true"])
def test_each_gpu_precision_trains_and_reports_cuda_memory(tmp_path, precision):
    result = train(gpu_config(tmp_path, precision=precision))
    assert result.status == "ok", result.error
    assert result.plan.effective == resolve_precision(precision, probe("cuda")).effective
    assert result.history[-1].loss < 0.9 * result.history[0].loss
    assert result.metrics.peak_memory_kind == "cuda_allocated" and result.metrics.peak_memory_mb > 0
    assert result.metrics.mfu is None or 0 < result.metrics.mfu < 1
    scales = [row.loss_scale for row in result.history]
    if precision == "fp16-mixed":
        assert all(s is not None and s > 0 for s in scales)
    else:
        assert scales == [None] * len(scales)


@pytest.mark.gpu
def test_fp16_overflow_on_gpu_backs_off_the_scale(tmp_path):
    # An absurd initial scale overflows fp16 gradients: the scaler must skip and halve until it fits.
    result = train(gpu_config(tmp_path, precision="fp16-mixed", init_scale=2.0**40, steps=30))
    assert result.status == "ok", result.error
    assert result.metrics.skipped_steps > 0
    assert result.metrics.min_loss_scale < 2.0**40
    first_skip = next(row for row in result.history if row.skipped)
    assert first_skip.loss_scale == 2.0**39


def _count_syncs(config: RunConfig) -> int:
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(config, write=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.status == "ok", result.error
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_hot_loop_adds_no_sync_per_step(tmp_path, precision):
    """Fused AdamW takes GradScaler's inf check on the device; readings cross every log_every steps.

    Model set-up copies sync too, so compare two runs that differ only by 40 steps (two flushes).
    """
    short = gpu_config(tmp_path, precision=precision, steps=20, timing_warmup_steps=2, log_every=20)
    train(short, write=False)  # warm caches and kernels
    extra = _count_syncs(replace(short, steps=60)) - _count_syncs(short)
    assert extra <= 8, f"40 more steps added {extra} synchronizations"


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"])
def test_each_fp8_recipe_trains_where_the_hardware_has_it_with_its_mfu_against_both_peaks(tmp_path, recipe):
    plan = resolve_precision(recipe, probe("cuda"))
    if plan.effective != recipe:
        pytest.skip(plan.fallback_reason)
    result = train(gpu_config(tmp_path, precision=recipe, fp8_layers="all"))
    assert result.status == "ok", result.error
    assert result.history[-1].loss < 0.9 * result.history[0].loss
    assert not result.plan.emulated and result.fp8_layers.fp8_fqns
    m = result.metrics
    if plan.peak_table.get("fp8"):
        assert 0 < m.mfu_vs_mixed_peak < m.mfu_vs_bf16_peak == m.mfu < 1 and 0 < m.fp8_flop_share <= 1


@pytest.mark.gpu
def test_a_gpu_run_reads_its_energy_where_nvml_reports_it(tmp_path):
    result = train(gpu_config(tmp_path, precision="bf16-mixed"))
    assert result.status == "ok", result.error
    energy = result.energy
    if energy.joules is None:
        pytest.skip(f"no energy reading: {energy.reason}")
    timed_items = result.metrics.items_per_step * result.metrics.timed_steps
    assert energy.joules > 0 and energy.items == timed_items
    assert energy.joules_per_item == pytest.approx(energy.joules / timed_items)
    assert 10 < energy.watts < 2000  # a GPU board's power, not a unit slip
