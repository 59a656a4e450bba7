"""Contracts of the built-in models, data and measurements that mutation testing showed untested."""

from __future__ import annotations

import math
import random
import re
import resource
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from user_models import PLAN_DTYPES

from amp_lib.data import CharTokenizer, TokenBatches
from amp_lib.examples import linear_regression
from amp_lib.models import BUILTIN_MODELS, GPT, GPT_SIZES, GPTConfig, build_workload, load_user_factory
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import HistoryRow
from amp_lib.train import (
    COLLAPSED_SCALE,
    Diverged,
    PeakMemory,
    RunConfig,
    StepTimer,
    _check_divergence,
    _percentile,
    make_optimizer,
    peak_tflops,
    prepare_model,
    seed_everything,
    train,
)


def _reference_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A pre-LayerNorm residual block written out with torch.nn.functional, from the block's own weights."""
    b, t, c = x.shape
    h = block.n_head
    q, k, v = F.linear(F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias), block.qkv.weight, block.qkv.bias).split(c, 2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    x = x + F.linear((att @ v).transpose(1, 2).reshape(b, t, c), block.proj.weight, block.proj.bias)
    fc, proj = block.mlp[0], block.mlp[-1]
    hidden = F.gelu(F.linear(F.layer_norm(x, (c,), block.ln_2.weight, block.ln_2.bias), fc.weight, fc.bias))
    return x + F.linear(hidden, proj.weight, proj.bias)


def test_gpt_matches_a_written_out_reference_transformer() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=11, block_size=16)).eval()
    for module in model.modules():  # non-zero biases, so a dropped bias or a flipped residual shows
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.1)
    idx = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    x = model.wte(idx) + model.wpe(torch.arange(9))
    for block in model.blocks:
        x = _reference_block(block, x)
    expected = F.linear(F.layer_norm(x, (32,), model.ln_f.weight, model.ln_f.bias), model.wte.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, rtol=1e-4, atol=1e-5)
    assert model.lm_head.bias is None and len(model.blocks) == 2


def test_gpt_init_is_centred() -> None:
    torch.manual_seed(0)
    weight = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=128, vocab_size=64)).blocks[0].qkv.weight
    assert abs(weight.mean().item()) < 2e-3 and weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_attention_flops_grow_by_12_L_d_per_token_of_context() -> None:
    model = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=10))
    assert model.flops_per_token(200) - model.flops_per_token(100) == 12 * 3 * 64 * 100


def test_gpt_accepts_a_sequence_as_long_as_its_block_and_keeps_the_size_block() -> None:
    config = RunConfig(model="gpt-tiny", seq_len=GPT_SIZES["gpt-tiny"].block_size, steps=2, warmup_steps=0, device="cpu")
    assert build_workload(config, torch.device("cpu")).train_batches[0][0].shape == (8, 256)
    small = build_workload(RunConfig(model="gpt-small", seq_len=512, batch_size=1, steps=1, warmup_steps=0, device="cpu"), torch.device("cpu"))
    assert small.model.cfg.block_size == GPT_SIZES["gpt-small"].block_size


def test_token_windows_reach_both_ends_of_the_stream_and_never_past_them() -> None:
    tokens = torch.arange(7)  # seq_len 4: windows of 5 start at 0 or 1 only
    batches = TokenBatches(tokens, num_batches=64, batch_size=4, seq_len=4, seed=0)
    firsts = {int(v) for i in range(len(batches)) for v in batches[i][0][:, 0]}
    assert firsts == {0, 1}
    x, y = batches[0]
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.dtype == torch.long


def test_token_stream_must_hold_one_window_and_a_target() -> None:
    TokenBatches(torch.arange(6), num_batches=1, batch_size=1, seq_len=4, seed=0)  # 6 > 4 + 1
    with pytest.raises(ValueError, match="seq_len=5"):
        TokenBatches(torch.arange(6), num_batches=1, batch_size=1, seq_len=5, seed=0)


def test_tokenizer_ids_are_embedding_indices() -> None:
    ids = CharTokenizer.for_text("abca").encode("cab")
    assert ids.dtype == torch.long and ids.tolist() == [2, 0, 1]


def test_example_workload_is_seeded_and_fits_its_targets() -> None:
    config = RunConfig(model="amp_lib.examples:linear_regression", batch_size=5, device="cpu", seed=3)
    model, batches, loss_fn = linear_regression(config)
    again = linear_regression(config)[1]
    assert len(batches) == 8 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    x, y = batches[0]
    assert model(x).shape == y.shape == (5, 1) and loss_fn(model(x), y).ndim == 0
    other = linear_regression(RunConfig(model=config.model, batch_size=5, device="cpu", seed=4))[1]
    assert not torch.equal(other[0][0], x)


def test_errors_list_the_valid_names_separated_by_commas() -> None:
    with pytest.raises(ValueError, match="gpt-tiny, gpt-small, gpt2-124m, mlp"):
        load_user_factory("no_colon_here")
    with pytest.raises(ValueError, match="valid names: precision, model, steps"):
        RunConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'lr_rate', 'stpes'; valid names"):
        RunConfig.from_dict({"stpes": 3, "lr_rate": 0.1, "seed": 1})


def test_optimizer_is_fused_so_grad_scaler_steps_without_a_sync() -> None:
    """GradScaler hands a fused optimizer its inf flag as a tensor instead of reading it on the host."""
    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    optimizer = make_optimizer(model, 0.1, torch.device("cpu"))
    assert getattr(optimizer, "_step_supports_amp_scaling", False) is True
    assert [p for group in optimizer.param_groups for p in group["params"]] == [model.weight]
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_percentile_interpolates_between_ranks() -> None:
    assert _percentile([30.0, 0.0, 10.0, 20.0], 0.5) == 15.0
    assert _percentile([0.0, 10.0, 20.0, 30.0], 0.1) == pytest.approx(3.0)
    assert _percentile([], 0.5) is None


def test_mfu_peak_is_the_dense_peak_of_the_precision_in_use() -> None:
    h100 = Capabilities(device_type="cuda", cuda_available=True, device_name="NVIDIA H100 80GB HBM3",
                        compute_capability=(9, 0))
    assert peak_tflops(resolve_precision("fp32", h100)) == 67.0
    assert peak_tflops(resolve_precision("tf32", h100)) == 494.0
    assert peak_tflops(resolve_precision("bf16-mixed", h100)) == 989.0
    assert peak_tflops(resolve_precision("bf16-mixed", Capabilities())) is None


def test_cpu_peak_memory_covers_the_timed_region_only() -> None:
    """After reset, a big allocation freed earlier no longer counts, and the figure is in MiB."""
    big = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB touched
    big.add_(1)
    del big
    meter = PeakMemory(torch.device("cpu"))
    lifetime_peak_mib = meter.peak_mb()
    # the kernel's high-water mark, in KiB / 1024 (ru_maxrss is the same counter; allow a few pages of drift)
    assert lifetime_peak_mib * 1024 == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, abs=64)
    meter.reset()
    assert 0 < meter.peak_mb() < lifetime_peak_mib - 200


def test_cpu_step_timer_reports_milliseconds_per_timed_step_and_clears() -> None:
    ticks = iter([10.0, 10.25, 11.0, 11.5, 20.0, 20.001])
    timer = StepTimer(torch.device("cpu"), clock=lambda: next(ticks))
    for _ in range(2):
        timer.start()
        timer.stop()
    assert timer.read_ms() == [250.0, 500.0]
    assert timer.read_ms() == []  # read once: the next interval starts empty
    timer.start()
    timer.stop()
    assert timer.read_ms() == [pytest.approx(1.0)]


def test_history_records_the_unclipped_gradient_norm_of_each_step(user_models, tmp_path) -> None:
    import user_models as factories

    config = RunConfig(model="user_models:build_ok", steps=3, warmup_steps=1, log_every=2, grad_clip=1e-3,
                       batch_size=4, device="cpu", out_dir=str(tmp_path))  # fmt: skip
    result = train(config, write=False)
    model, batches, loss_fn = factories.build_ok(config)  # the same seeded model and batches
    x, y = batches[0]
    loss_fn(model(x), y).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()])).item()
    assert result.history[0].grad_norm == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3  # so clipping was active: the norm is the one before the clip
    assert [type(r.grad_norm) for r in result.history] == [float] * 3


def test_a_non_finite_loss_on_a_step_the_scaler_did_not_skip_is_divergence() -> None:
    row = HistoryRow(step=4, loss=math.nan, loss_scale=1024.0, grad_norm=0.0, step_time_ms=None)
    with pytest.raises(Diverged, match="loss became nan at step 4"):
        _check_divergence([row], use_scaler=True)
    _check_divergence([replace(row, skipped=True, skipped_steps=1)], use_scaler=True)  # GradScaler's skip: fine
    with pytest.raises(Diverged):
        _check_divergence([replace(row, skipped=True, skipped_steps=1)], use_scaler=False)


def test_loss_scale_collapse_is_strictly_below_the_smallest_fp16_subnormal() -> None:
    at_floor = HistoryRow(step=1, loss=1.0, loss_scale=COLLAPSED_SCALE, grad_norm=0.0, step_time_ms=None)
    _check_divergence([at_floor], use_scaler=True)
    with pytest.raises(Diverged, match="loss scale collapsed"):
        _check_divergence([replace(at_floor, loss_scale=COLLAPSED_SCALE / 2)], use_scaler=True)


def test_prepare_model_compiles_only_when_asked() -> None:
    model = torch.nn.Linear(4, 4)
    plan = resolve_precision("fp32", Capabilities())
    assert prepare_model(model, plan, compile=False) is model
    compiled = prepare_model(model, plan, compile=True)  # lazy: nothing is compiled until it is called
    assert compiled is not model and compiled._orig_mod is model


def test_seed_everything_also_seeds_pythons_random_for_user_factories() -> None:
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), torch.rand(2).tolist()))
    assert draws[0] == draws[1]
    seed_everything(8)
    assert random.random() != draws[0][0]


def test_a_failed_run_keeps_the_last_frames_of_its_traceback(user_models) -> None:
    result = train(RunConfig(model="user_models:build_fail", device="cpu", steps=3, warmup_steps=1), write=False)
    lines = result.error.splitlines()
    assert result.status == "failed" and lines[0] == lines[-1] == "RuntimeError: user factory exploded on purpose"
    frames = [line for line in lines if line.startswith('  File "')]
    assert len(frames) == 2 and re.search(r'user_models\.py", line \d+, in build_fail$', frames[-1])
    assert 'raise RuntimeError("user factory exploded on purpose")' in lines[-2]
    assert all(line.startswith((" ", "RuntimeError: ")) for line in lines)  # nothing but the traceback's own text


def test_the_model_is_freed_before_observers_see_the_result(user_models) -> None:
    """train() drops its workload (and gc's it) before on_end, so a sweep's next run starts with that memory back."""
    import user_models as factories

    class FreedAtEnd:
        def on_start(self, config, plan) -> None: ...
        def on_log(self, rows, items_per_step) -> None: ...
        def on_end(self, result) -> None:
            self.alive = [ref() is not None for ref in factories.BUILT_MODELS]

    factories.BUILT_MODELS.clear()
    observer = FreedAtEnd()
    result = train(RunConfig(model="user_models:build_tracked", device="cpu", steps=3, warmup_steps=1), [observer], write=False)
    assert result.ok and observer.alive == [False]


def test_partial_metrics_of_runs_that_stop_early(user_models) -> None:
    """Before the workload exists nothing is known (tokens, 0 skipped); after, its unit is kept."""
    early = train(RunConfig(model="user_models:build_fail", device="cpu", steps=3, warmup_steps=1), write=False)
    assert (early.metrics.throughput_unit, early.metrics.skipped_steps, early.metrics.final_train_loss) == (
        "tokens", 0, None
    )  # fmt: skip
    mid = train(
        RunConfig(model="user_models:build_fails_mid_run", device="cpu", steps=8, warmup_steps=1, log_every=2),
        write=False,
    )
    assert mid.status == "failed" and mid.metrics.throughput_unit == "samples" and len(mid.history) == 4


@pytest.mark.parametrize(("precision", "param_dtype", "output_dtype"), PLAN_DTYPES)
def test_the_loop_runs_the_model_in_the_plans_dtypes(user_models, precision, param_dtype, output_dtype) -> None:
    import user_models as factories

    factories.SEEN_DTYPES.clear()
    config = RunConfig(model="user_models:build_dtype_probe", precision=precision, device="cpu", steps=2, warmup_steps=1)
    assert train(config, write=False).ok
    assert set(factories.SEEN_DTYPES) == {(param_dtype, output_dtype, False)}  # and TF32 stays off: not asked for


def test_peak_memory_covers_the_timed_steps_and_not_the_warmup(user_models) -> None:
    import user_models as factories

    def peak(spike_at_call: int | None) -> float:
        factories.SPIKE_AT["call"] = spike_at_call
        config = RunConfig(model="user_models:build_memory_spike", device="cpu", steps=5, warmup_steps=2, log_every=5)
        result = train(config, write=False)
        assert result.ok
        return result.metrics.peak_memory_mb

    try:
        quiet, in_warmup, first_timed, last_timed = peak(None), peak(1), peak(2), peak(4)
    finally:
        factories.SPIKE_AT["call"] = None
    assert in_warmup < quiet + 100  # a spike during warm-up is not counted
    assert first_timed > quiet + 200 and last_timed > quiet + 200  # one in any timed step is


def test_a_non_finite_eval_loss_ends_the_run_diverged_and_says_so(user_models) -> None:
    result = train(RunConfig(model="user_models:build_bad_eval", device="cpu", steps=3, warmup_steps=1), write=False)
    assert result.status == "diverged" and result.error in ("eval loss is inf", "eval loss is nan")
    assert len(result.history) == 3 and all(math.isfinite(r.loss) for r in result.history)


@pytest.mark.parametrize(
    ("field", "bad", "minimum"),
    [("steps", 0, 1), ("batch_size", 0, 1), ("seq_len", -3, 1), ("grad_accum", 0, 1), ("log_every", 0, 1),
     ("growth_interval", 0, 1), ("warmup_steps", -1, 0), ("seed", -2, 0)],
)  # fmt: skip
def test_range_errors_name_the_field_its_value_and_the_minimum(field, bad, minimum) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(**{field: bad})
    assert str(info.value) == f"{field}={bad} must be >= {minimum}"


def test_every_minimum_itself_is_accepted() -> None:
    config = RunConfig(steps=1, batch_size=1, seq_len=1, grad_accum=1, log_every=1, growth_interval=1, warmup_steps=0, seed=0)
    assert (config.steps, config.seq_len, config.log_every, config.growth_interval) == (1, 1, 1, 1)


def test_run_config_type_and_model_errors_quote_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(steps="3")  # type: ignore[arg-type]
    assert str(info.value) == "steps='3' has type str; expected int"
    with pytest.raises(ValueError) as info:
        RunConfig(model="gpt-huge")
    assert str(info.value) == (
        f"invalid model 'gpt-huge'; valid: {', '.join(BUILTIN_MODELS)} or 'package.module:function'"
    )
