"""GPU paths (skipped without CUDA): real fp16 with GradScaler, tf32, bf16, the sync budget of the loop."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from amp_lib.precision import native_precisions, probe, resolve_precision
from amp_lib.train import RunConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_config(tmp_path, **overrides) -> RunConfig:
    values = dict(model="gpt-small", steps=24, warmup_steps=4, batch_size=8, seq_len=128, log_every=8,
                  device="cuda", out_dir=str(tmp_path), lr=3e-3)
    values.update(overrides)
    return RunConfig(**values)


def test_probe_reads_the_real_gpu() -> None:
    caps = probe("cuda")
    assert caps.device_type == "cuda" and caps.compute_capability == torch.cuda.get_device_capability()
    assert caps.device_name == torch.cuda.get_device_name()
    if caps.cc_at_least(8, 0):
        assert {"fp32", "tf32", "fp16-mixed", "bf16-mixed"} <= set(native_precisions(caps))


@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16-mixed", "bf16-mixed", "bf16-true"])
def test_each_gpu_precision_trains_and_reports_cuda_memory(tmp_path, precision) -> None:
    result = train(gpu_config(tmp_path, precision=precision))
    assert result.status == "ok", result.error
    assert result.plan["effective"] == resolve_precision(precision, probe("cuda")).effective
    assert result.history[-1].loss < 0.9 * result.history[0].loss
    assert result.metrics.peak_memory_kind == "cuda_allocated" and result.metrics.peak_memory_mb > 0
    assert result.metrics.mfu is None or 0 < result.metrics.mfu < 1
    scales = [row.loss_scale for row in result.history]
    if precision == "fp16-mixed":
        assert all(s is not None and s > 0 for s in scales)
    else:
        assert scales == [None] * len(scales)


def test_tf32_setting_is_restored_after_the_run(tmp_path) -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    train(gpu_config(tmp_path, precision="tf32", steps=6, warmup_steps=1, log_every=3))
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_fp16_overflow_on_gpu_backs_off_the_scale(tmp_path) -> None:
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


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed"])
def test_hot_loop_adds_no_sync_per_step(tmp_path, precision) -> None:
    """Fused AdamW takes GradScaler's inf check on the device; readings cross every log_every steps.

    Model set-up copies sync too, so compare two runs that differ only by 40 steps (two flushes).
    """
    short = gpu_config(tmp_path, precision=precision, steps=20, warmup_steps=2, log_every=20)
    train(short, write=False)  # warm caches and kernels
    extra = _count_syncs(replace(short, steps=60)) - _count_syncs(short)
    assert extra <= 8, f"40 more steps added {extra} synchronizations"


def test_fp8_mixed_trains_where_the_hardware_has_it(tmp_path) -> None:
    plan = resolve_precision("fp8-mixed", probe("cuda"))
    if plan.effective != "fp8-mixed":
        pytest.skip(plan.fallback_reason)
    result = train(gpu_config(tmp_path, precision="fp8-mixed"))
    assert result.status == "ok", result.error
    assert result.history[-1].loss < 0.9 * result.history[0].loss
