"""amp_lib.diagnose: one profiled step, the machine facts, and the ranked causes of a missing speed-up."""

from __future__ import annotations

import pytest
import torch

from amp_lib.config import RunConfig
from amp_lib.diagnose import StepProfile, StepProfiler, categorize, explain, machine_facts
from amp_lib.precision import Capabilities, cpu_isa, probe
from amp_lib.train import train

CPU_FACTS = {"device_type": "cpu", "device_name": "AVX2", "cpu_isa": ["avx2"]}


def recorded(wall: float = 100.0, gemms: tuple = (), device_type: str = "cpu", **busy: float) -> StepProfile:
    """A profile as a run records it, written by hand."""
    return StepProfile(wall_ms=wall, busy_ms={"matmul": 0.0, **busy}, gemms=gemms, device_type=device_type)


# --- where the time goes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,category",
    [
        ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention", "matmul"), ("aten::convolution", "matmul"),
        ("aten::cudnn_convolution", "matmul"), ("ampere_bf16_s16816gemm_bf16_128x64", "matmul"),
        ("aten::native_layer_norm", "norm"), ("aten::native_layer_norm_backward", "norm"),
        ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_mul_", "optimizer"), ("Optimizer.step#AdamW.step", "optimizer"),
        ("aten::copy_", "data_movement"), ("aten::_to_copy", "data_movement"), ("aten::embedding", "data_movement"),
        ("aten::gelu", "elementwise"), ("aten::add", "elementwise"), ("aten::mul", "elementwise"),
    ],
)  # fmt: skip
def test_ops_fall_into_the_category_their_name_says(name: str, category: str) -> None:
    assert categorize(name) == category


def test_a_profile_knows_its_idle_time_shares_and_misaligned_gemms() -> None:
    p = recorded(wall=100.0, matmul=30.0, elementwise=20.0, optimizer=10.0,
                 gemms=((64, 512, 64, "c10::BFloat16"), (512, 64, 65, "c10::BFloat16"), (16, 24, 8, "c10::Float8_e4m3fn")))  # fmt: skip
    assert p.busy_total_ms == 60.0 and p.idle_ms == 40.0 and p.share("matmul") == 0.3 and p.share("norm") == 0.0
    assert p.misaligned_gemms == [(512, 64, 65, "c10::BFloat16"), (16, 24, 8, "c10::Float8_e4m3fn")]  # fp8 wants 16
    assert StepProfile.from_dict(p.to_dict()) == p and p.to_dict()["idle_ms"] == 40.0
    assert recorded(wall=10.0, matmul=12.0).idle_ms == 0.0  # overlapping ops never make idle time negative


def test_a_real_profiled_step_splits_its_time_and_lists_the_bf16_gemms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(65, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    profiler = StepProfiler(torch.device("cpu"))
    profiler.start()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(32, 65)).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    profile = profiler.stop()
    assert profile.wall_ms > 0 and profile.device_type == "cpu"
    assert all(profile.busy_ms[c] > 0 for c in ("matmul", "norm", "optimizer", "elementwise"))
    assert (32, 65, 128, "c10::BFloat16") in profile.gemms  # the first layer's forward GEMM, in bf16
    assert all(g[3] == "c10::BFloat16" for g in profile.gemms)  # fp32 GEMMs are not listed
    assert (32, 65, 128, "c10::BFloat16") in profile.misaligned_gemms


# --- machine facts ------------------------------------------------------------------------------------


def test_machine_facts_of_this_cpu_and_of_a_gpu_described_as_data() -> None:
    assert machine_facts(probe("cpu")) == {"device_type": "cpu", "device_name": probe("cpu").device_name, "cpu_isa": sorted(cpu_isa())}
    h100 = Capabilities(device_type="cuda", cuda_available=True, device_name="NVIDIA H100", compute_capability=(9, 0))
    facts = machine_facts(h100)
    assert facts["compute_capability"] == [9, 0] and facts["tf32_for_fp32"] is False  # torch's default: off
    assert cpu_isa() <= {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile", "avx512f", "avx2"}


# --- causes, ranked ------------------------------------------------------------------------------------


def test_a_cpu_without_bf16_instructions_explains_bf16_first() -> None:
    causes = explain("bf16-mixed", 0.2, recorded(matmul=80.0), recorded(matmul=80.0), CPU_FACTS)
    assert [c.text for c in causes] == ["this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"]
    with_amx = {**CPU_FACTS, "cpu_isa": ["amx_bf16", "avx512_bf16"]}
    assert explain("bf16-mixed", 0.9, recorded(matmul=80.0), None, with_amx) == []
    fp16 = explain("fp16-mixed", 0.1, None, None, with_amx)
    assert [c.text for c in fp16] == ["this CPU has no fp16 instructions (avx512_fp16/amx_fp16): fp16 matmuls are emulated"]


def test_causes_are_computed_from_the_profile_and_ranked_by_weight() -> None:
    profile = recorded(wall=100.0, matmul=10.0, elementwise=20.0, optimizer=30.0, data_movement=25.0,
                       gemms=((512, 64, 65, "c10::Half"), (64, 64, 64, "c10::Half")))  # fmt: skip
    fp32 = recorded(wall=100.0, matmul=40.0, data_movement=5.0)
    facts = {"device_type": "cuda", "device_name": "NVIDIA H100", "compute_capability": [9, 0], "tf32_for_fp32": True}
    texts = [c.text for c in explain("fp16-mixed", 1.02, profile, fp32, facts)]
    assert texts == [
        "90% of the step is outside matmuls: the model is too small to gain",  # 0.72
        "fp32 already ran its matmuls on TF32 tensor cores: the baseline is fast",  # 0.5
        "1 of 2 reduced-precision GEMMs have a dimension that is not a multiple of 8 (e.g. 512x64x65): pad vocabulary/hidden sizes",
        "dtype casts add 20% of the step (autocast copies)",  # 0.2
        "the optimizer takes 30% of the step: it updates fp32 weights whatever the precision",  # 0.18
    ]
    idle = recorded(wall=100.0, matmul=30.0, device_type="cuda")
    assert explain("bf16-mixed", 1.0, idle, None, {**facts, "tf32_for_fp32": False})[0].text == (
        "launch-bound: the device is idle 70% of the step — try a bigger batch or compile"
    )


def test_old_gpus_lack_the_tensor_cores_a_precision_needs() -> None:
    turing = {"device_type": "cuda", "compute_capability": [7, 5], "tf32_for_fp32": False}
    assert explain("bf16-mixed", 0.5, None, None, turing)[0].text == "compute capability 7.5 has no bf16 tensor cores"
    assert explain("fp16-mixed", 0.5, None, None, {**turing, "compute_capability": [6, 1]})[0].text == (
        "compute capability 6.1 has no fp16 tensor cores"
    )
    assert explain("fp16-mixed", 3.0, recorded(matmul=90.0, device_type="cuda"), None, turing) == []  # it pays


# --- in a run -------------------------------------------------------------------------------------------


def test_a_run_profiles_its_last_untimed_step_only_when_asked(user_models) -> None:
    base = {"model": "user_models:build_ok", "steps": 5, "timing_warmup_steps": 2, "batch_size": 4, "device": "cpu"}
    plain = train(RunConfig(**base), write=False)
    assert plain.profile is None
    result = train(RunConfig(**base, profile_step=True), write=False)
    assert result.ok and result.profile["step"] == 1 and result.metrics.timed_steps == 3  # steps 2, 3, 4
    assert result.profile["facts"] == machine_facts(probe("cpu"))
    assert StepProfile.from_dict(result.profile).busy_ms["matmul"] > 0
    assert result.profile["causes"] == []  # fp32 is the baseline: nothing to explain
    bf16 = train(RunConfig(**base, precision="bf16-mixed", profile_step=True), write=False)
    expected = explain("bf16-mixed", None, StepProfile.from_dict(bf16.profile), None, bf16.profile["facts"])
    assert bf16.profile["causes"] == [c.text for c in expected]  # what the run alone can tell, in its JSON


@pytest.mark.slow
def test_on_this_cpu_bf16s_slowness_is_explained_from_real_profiles(tiny_config) -> None:
    runs = {p: train(tiny_config(precision=p, profile_step=True, steps=8), write=False) for p in ("fp32", "bf16-mixed")}
    speedup = runs["bf16-mixed"].metrics.items_per_s / runs["fp32"].metrics.items_per_s
    profiles = {p: StepProfile.from_dict(r.profile) for p, r in runs.items()}
    causes = explain("bf16-mixed", speedup, profiles["bf16-mixed"], profiles["fp32"], runs["bf16-mixed"].profile["facts"])
    texts = [c.text for c in causes]
    emulated = "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"
    if cpu_isa() & {"avx512_bf16", "amx_bf16"}:
        assert emulated not in texts
    else:
        assert texts[0] == emulated
    assert any("pad vocabulary" in t for t in texts)  # the 65-character vocabulary
