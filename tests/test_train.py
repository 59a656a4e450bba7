"""The training loop on real torch on the CPU: convergence, determinism, statuses, metrics, RunConfig."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from amp_lib.models import build_workload
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import RunResult
from amp_lib.train import (
    COLLAPSED_SCALE,
    PEAK_TFLOPS,
    RunConfig,
    _percentile,
    peak_tflops,
    resolve_device,
    seed_everything,
    tf32_matmuls,
    train,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is as fast, and far faster on a busy 2-core box."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Recorder:
    """A real RunObserver that keeps what it was given."""

    def __init__(self):
        self.started, self.logs, self.ended = [], [], []

    def on_start(self, config, plan):
        self.started.append((config, plan))

    def on_log(self, rows, items_per_step):
        self.logs.append((list(rows), items_per_step))

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


# --- convergence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_runs_reduce_the_loss(tiny_config, precision):
    config = tiny_config(precision=precision, steps=20, lr=3e-3, log_every=5, allow_slow=True)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan["effective"] == precision  # allow_slow: fp16 really ran on this CPU
    assert result.plan["fallback_reason"] is None
    losses = [row.loss for row in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert result.metrics.eval_loss < losses[0]
    assert result.metrics.final_train_loss == losses[-1]


def test_first_step_loss_is_the_untrained_models_loss(tiny_config):
    config = tiny_config(steps=4)
    result = train(config, write=False)
    assert result.history[0].loss == pytest.approx(initial_losses(config, 1)[0], rel=1e-6)


def test_fp16_on_this_cpu_falls_back_without_allow_slow(tiny_config):
    result = train(tiny_config(precision="16-mixed", steps=3, warmup_steps=1), write=False)
    assert result.status == "ok"
    assert result.plan["requested"] == "16-mixed"
    if not Capabilities().fp16_fast and result.plan["device_type"] == "cpu":
        assert result.plan["effective"] == "bf16-mixed"
        assert "fast fp16" in result.plan["fallback_reason"]
        assert all(row.loss_scale is None for row in result.history)


def test_bf16_true_trains_bf16_parameters(tiny_config):
    config = tiny_config(precision="bf16-true", lr=3e-3, steps=10)
    result = train(config, write=False)
    assert result.status == "ok", result.error
    assert result.plan["param_dtype"] == "bfloat16" and result.plan["autocast_dtype"] is None
    assert result.history[-1].loss < result.history[0].loss
    assert all(row.loss_scale is None for row in result.history)


@pytest.mark.parametrize("requested,effective", [("tf32", "fp32"), ("fp8", "bf16-mixed")])
def test_fallback_is_recorded_in_the_result(tiny_config, requested, effective):
    config = tiny_config(precision=requested, steps=3, warmup_steps=0)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan["requested"] == requested and result.plan["effective"] == effective
    assert result.plan["fallback_reason"]
    assert RunResult.load(config.result_path).plan["fallback_reason"] == result.plan["fallback_reason"]
    assert result.metrics.timed_steps == 3  # warmup_steps=0: every step is timed


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_fp32_history(tiny_config):
    a = train(tiny_config(seed=7, run_name="a"))
    b = train(tiny_config(seed=7, run_name="b"))
    assert a.status == b.status == "ok"
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.grad_norm for r in a.history] == [r.grad_norm for r in b.history]
    assert a.metrics.eval_loss == b.metrics.eval_loss


def test_different_seeds_differ(tiny_config):
    a = train(tiny_config(seed=1), write=False)
    b = train(tiny_config(seed=2), write=False)
    assert [r.loss for r in a.history] != [r.loss for r in b.history]


# --- gradient accumulation -----------------------------------------------------------------------


def test_grad_accum_two_micro_batches_per_step(tiny_config):
    config = tiny_config(grad_accum=2, steps=6, warmup_steps=1, lr=3e-3)
    observer = Recorder()
    result = train(config, [observer])
    assert result.status == "ok", result.error
    assert len(result.history) == config.steps
    # the first step's loss is the mean over its two micro-batches, both seen by the untrained model
    first_two = initial_losses(config, 2)
    assert result.history[0].loss == pytest.approx(sum(first_two) / 2, rel=1e-5)
    assert all(items == config.batch_size * config.seq_len * 2 for _, items in observer.logs)
    assert result.metrics.timed_steps == config.steps - config.warmup_steps


# --- metrics and history -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_metrics_of_a_non_fp16_run(tiny_config, precision):
    config = tiny_config(precision=precision)
    result = train(config)
    m = result.metrics
    assert result.status == "ok" and result.error is None
    assert m.timed_steps == config.steps - config.warmup_steps
    assert m.step_time_ms_p10 <= m.step_time_ms_median <= m.step_time_ms_p90
    assert m.tokens_per_s > 0 and m.throughput_unit == "tokens"
    assert m.peak_memory_mb > 0 and m.peak_memory_kind == "cpu_rss"
    assert m.mfu is None  # no peak-flops entry for a CPU
    assert [r.step for r in result.history] == list(range(config.steps))
    assert all(r.loss_scale is None for r in result.history)
    assert m.final_loss_scale is None and m.min_loss_scale is None
    assert m.skipped_steps == 0
    timed = [r.step_time_ms for r in result.history]
    assert all(t is None for t in timed[: config.warmup_steps])
    assert all(t is not None and t > 0 for t in timed[config.warmup_steps :])
    assert m.step_time_ms_median == pytest.approx(statistics.median(timed[config.warmup_steps :]))
    assert m.tokens_per_s == pytest.approx(config.batch_size * config.seq_len / (m.step_time_ms_median / 1e3))
    assert math.isfinite(m.eval_loss)


def test_metrics_and_history_of_an_fp16_run(tiny_config):
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, warmup_steps=1, growth_interval=2)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.plan["effective"] == "fp16-mixed"
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
    assert m.timed_steps == config.steps - config.warmup_steps


def test_fp16_overflow_steps_are_skipped_and_counted(tiny_config):
    # an absurd initial scale overflows fp16 at once: the first steps skip until the scale is small enough
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, warmup_steps=1, init_scale=2.0**60)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.history[0].skipped
    assert result.metrics.skipped_steps >= 1
    assert_cumulative_skips(result)
    for row, before in zip(result.history, [config.init_scale] + [r.loss_scale for r in result.history]):
        assert row.loss_scale == (before * 0.5 if row.skipped else before)


def test_observers_see_start_every_flush_and_end(tiny_config):
    config = tiny_config(steps=7, log_every=3)
    observer = Recorder()
    result = train(config, [observer])
    assert len(observer.started) == 1 and observer.started[0][0] is config
    assert observer.started[0][1].effective == result.plan["effective"]
    assert [len(rows) for rows, _ in observer.logs] == [3, 3, 1]  # flush every 3 steps and at the end
    assert [row for rows, _ in observer.logs for row in rows] == list(result.history)
    assert observer.ended == [result]


def test_result_file_is_written_and_loads_equal(tiny_config):
    config = tiny_config()
    result = train(config)
    assert config.result_path.exists()
    assert RunResult.load(config.result_path) == result
    assert result.config == config.to_dict()
    assert result.plan["torch_version"] == torch.__version__


def test_write_false_writes_nothing(tiny_config, tmp_path):
    train(tiny_config(), write=False)
    assert list(tmp_path.iterdir()) == []


def test_mlp_model_counts_samples(tiny_config):
    result = train(tiny_config(model="mlp", steps=4, warmup_steps=1, precision="bf16-mixed"), write=False)
    assert result.status == "ok", result.error
    assert result.metrics.throughput_unit == "samples"
    assert result.metrics.eval_loss is not None and math.isfinite(result.metrics.eval_loss)


# --- failures end as a result, never a crash -----------------------------------------------------


def assert_written(config: RunConfig, result: RunResult) -> dict:
    assert config.result_path.exists()
    data = json.loads(config.result_path.read_text())
    assert data["status"] == result.status
    assert RunResult.load(config.result_path).status == result.status
    return data


def test_huge_lr_diverges_with_result_written_and_process_healthy(tiny_config):
    config = tiny_config(lr=1e6, run_name="diverge")
    result = train(config)
    assert result.status == "diverged"
    assert "loss became" in result.error
    data = assert_written(config, result)
    assert any(row["loss"] is None for row in data["history"])  # NaN is stored as null
    assert not math.isfinite(result.history[-1].loss)
    # the process carries on: a healthy run right after works
    after = train(tiny_config(steps=3, warmup_steps=1, run_name="after"))
    assert after.status == "ok"


def test_nan_loss_user_model_diverges(tiny_config, user_models):
    config = tiny_config(model="user_models:build_nan")
    result = train(config)
    assert result.status == "diverged"
    assert "nan" in result.error.lower()
    data = assert_written(config, result)
    assert data["metrics"]["final_train_loss"] is None


def test_nan_loss_under_fp16_ends_diverged_not_ok(tiny_config, user_models):
    # every fp16 step is skipped (the scaler tolerates it), but the run must not be reported 'ok'
    config = tiny_config(
        model="user_models:build_nan", precision="fp16-mixed", allow_slow=True, steps=4, warmup_steps=1
    )
    result = train(config)
    assert result.status == "diverged"
    assert result.metrics.skipped_steps == len(result.history) == 4
    assert_written(config, result)


def test_collapsed_loss_scale_diverges(tiny_config, user_models):
    # start just above the collapse threshold: two skipped steps push the scale below it
    config = tiny_config(
        model="user_models:build_nan",
        precision="fp16-mixed",
        allow_slow=True,
        init_scale=COLLAPSED_SCALE * 2,
        steps=6,
        warmup_steps=1,
    )
    result = train(config)
    assert result.status == "diverged"
    assert "collapsed" in result.error
    assert result.metrics.min_loss_scale < COLLAPSED_SCALE


def test_oom_in_factory_ends_oom(tiny_config, user_models):
    config = tiny_config(model="user_models:build_oom")
    result = train(config)
    assert result.status == "oom"
    assert "out of memory" in result.error and "80.00 GiB (test)" in result.error
    assert result.history == ()
    assert_written(config, result)
    # the process carries on: the next run in it trains normally
    after = train(tiny_config(steps=3, warmup_steps=1, run_name="after-oom"), write=False)
    assert after.status == "ok", after.error


def test_failing_factory_ends_failed_with_the_error_text(tiny_config, user_models):
    config = tiny_config(model="user_models:build_fail")
    result = train(config)
    assert result.status == "failed"
    assert "RuntimeError: user factory exploded on purpose" in result.error
    assert result.metrics.final_train_loss is None
    assert_written(config, result)


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
    assert_written(config, result)


def test_seq_len_beyond_block_size_fails(tiny_config):
    result = train(tiny_config(seq_len=4096), write=False)
    assert result.status == "failed"
    assert "block size" in result.error


# --- user models that work -----------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_examples_linear_regression(tiny_config, precision):
    config = tiny_config(model="amp_lib.examples:linear_regression", precision=precision, lr=5e-2, steps=16)
    result = train(config)
    assert result.status == "ok", result.error
    assert result.metrics.throughput_unit == "samples"
    # eval runs over the same 8 batches the run cycles through: compare with the untrained model on them
    before = statistics.mean(initial_losses(config, 8))
    assert result.metrics.eval_loss < 0.8 * before, (result.metrics.eval_loss, before)
    assert config.result_path.name == "amp_lib.examples.linear_regression-" + precision + "-s0.json"


@pytest.mark.parametrize("factory", ["build_ok", "build_workload", "build_callable", "build_iterable"])
def test_user_factory_return_shapes(tiny_config, user_models, factory):
    observer = Recorder()
    result = train(tiny_config(model=f"user_models:{factory}", lr=1e-2), [observer], write=False)
    assert result.status == "ok", result.error
    assert observer.logs[0][1] == 4  # items per step: the batch's first dimension
    assert result.metrics.throughput_unit == ("rows" if factory == "build_workload" else "samples")


# --- RunConfig validation ------------------------------------------------------------------------


def test_defaults_are_valid_and_round_trip():
    config = RunConfig()
    assert RunConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == set(RunConfig.field_names())


def test_from_dict_rejects_unknown_keys_naming_them_and_the_valid_names():
    with pytest.raises(ValueError) as info:
        RunConfig.from_dict({"steps": 4, "stpes": 4, "zzz": 1})
    message = str(info.value)
    assert "'stpes'" in message and "'zzz'" in message
    for name in RunConfig.field_names():
        assert name in message


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", "8"),
        ("steps", 8.0),
        ("steps", True),
        ("batch_size", False),
        ("seed", None),
        ("lr", "0.1"),
        ("lr", True),
        ("grad_clip", "1"),
        ("grad_clip", True),
        ("allow_slow", 1),
        ("allow_slow", "yes"),
        ("precision", 16.0),
        ("precision", True),
        ("model", 3),
        ("device", None),
        ("run_name", 5),
        ("out_dir", Path("results")),
        ("init_scale", "65536"),
    ],
    ids=lambda v: repr(v),
)
def test_wrong_types_name_the_field(field, value):
    with pytest.raises(ValueError) as info:
        RunConfig(**{field: value})
    message = str(info.value)
    assert field in message or (field == "precision" and "invalid precision" in message)


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("batch_size", 0),
        ("seq_len", 0),
        ("grad_accum", 0),
        ("log_every", 0),
        ("growth_interval", 0),
        ("warmup_steps", -1),
        ("seed", -1),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("grad_clip", -1.0),
        ("grad_clip", float("inf")),
        ("grad_clip", float("nan")),
        ("init_scale", 0.0),
        ("init_scale", float("inf")),
        ("precision", "int8"),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("device", "tpu"),
        ("model", "resnet"),
        ("run_name", "a b"),
        ("run_name", "../escape"),
    ],
    ids=lambda v: repr(v),
)
def test_out_of_range_values_name_the_field(field, value):
    kwargs = {field: value}
    if field == "steps":
        kwargs["warmup_steps"] = 0
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs)
    message = str(info.value)
    assert (field if field != "precision" else "precision") in message
    assert repr(value) in message


@pytest.mark.parametrize("warmup", [8, 9])
def test_warmup_must_leave_timed_steps(warmup):
    with pytest.raises(ValueError, match="warmup_steps"):
        RunConfig(steps=8, warmup_steps=warmup)
    assert RunConfig(steps=8, warmup_steps=7).warmup_steps == 7


@pytest.mark.parametrize(
    "field,value",
    [
        ("grad_clip", None),
        ("grad_clip", 0),
        ("grad_clip", 0.5),
        ("lr", 1),
        ("precision", 16),
        ("precision", "bf16"),
        ("device", "cuda:1"),
        ("device", "auto"),
        ("model", "my_pkg.mod:build"),
        ("run_name", "a.b=c+d-e_f"),
    ],
    ids=lambda v: repr(v),
)
def test_accepted_values_survive_the_papermill_round_trip(field, value):
    # a sweep passes a config as plain JSON parameters: an accepted value comes back as the same config
    config = RunConfig(**{field: value})
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_name_and_result_path():
    config = RunConfig(model="pkg.mod:fn", precision="bf16", seed=3, out_dir="out")
    assert config.name == "pkg.mod.fn-bf16-s3"
    assert config.result_path == Path("out") / "pkg.mod.fn-bf16-s3.json"
    assert RunConfig(run_name="mine", out_dir="o").result_path == Path("o") / "mine.json"


def test_grad_clip_zero_turns_clipping_off(tiny_config):
    a = train(tiny_config(grad_clip=0, lr=3e-2, steps=4, warmup_steps=1), write=False)
    b = train(tiny_config(grad_clip=None, lr=3e-2, steps=4, warmup_steps=1), write=False)
    c = train(tiny_config(grad_clip=1e-3, lr=3e-2, steps=4, warmup_steps=1), write=False)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    assert [r.loss for r in a.history] != [r.loss for r in c.history]


# --- helpers -------------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_tf32_matmuls_restores_the_settings():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with pytest.raises(RuntimeError), tf32_matmuls(not saved[0]):
        assert torch.backends.cuda.matmul.allow_tf32 is (not saved[0])
        assert torch.backends.cudnn.allow_tf32 is (not saved[0])
        raise RuntimeError("inside")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_percentile_interpolates():
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert _percentile(values, 0.0) == 1.0 and _percentile(values, 1.0) == 5.0
    assert _percentile(values, 0.5) == 3.0
    assert _percentile(values, 0.1) == pytest.approx(1.4)
    assert _percentile([], 0.5) is None


def test_peak_tflops_by_gpu_name_and_family():
    h100 = Capabilities(
        device_type="cuda",
        cuda_available=True,
        device_name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        fp16_fast=True,
        fp8_backend=True,
    )
    for name, family in [
        ("fp32", "fp32"),
        ("tf32", "tf32"),
        ("bf16-mixed", "bf16"),
        ("fp16-mixed", "fp16"),
        ("fp8-mixed", "fp8"),
    ]:
        assert peak_tflops(resolve_precision(name, h100)) == PEAK_TFLOPS["H100"][family]
    a100 = Capabilities(
        device_type="cuda",
        cuda_available=True,
        device_name="NVIDIA A100-SXM4-40GB",
        compute_capability=(8, 0),
        fp16_fast=True,
    )
    assert peak_tflops(resolve_precision("bf16", a100)) == PEAK_TFLOPS["A100"]["bf16"]
    assert peak_tflops(resolve_precision("bf16", Capabilities())) is None  # a CPU
