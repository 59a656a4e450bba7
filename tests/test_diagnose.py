"""amp_lib.diagnose: one profiled step, the machine facts, and the ranked causes of a missing speed-up."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import torch
from torch.autograd.profiler_util import DeviceType, FunctionEvent

from amp_lib.config import RunConfig
from amp_lib.diagnose import StepProfile, StepProfiler, categorize, explain, machine_facts, summarize
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


def test_a_step_too_short_for_the_clock_has_no_shares() -> None:
    instant = recorded(wall=0.0, matmul=0.2)
    assert instant.share("matmul") == 0.0 and instant.share("norm") == 0.0  # no division by a zero wall time
    assert recorded(wall=0.5, matmul=0.25).share("matmul") == 0.5  # a sub-millisecond step still has shares


def test_a_profile_survives_the_result_json_and_older_results_without_its_newer_fields() -> None:
    cuda = recorded(wall=8.0, matmul=5.0, gemms=((64, 65, 128, "c10::Half"),), device_type="cuda")
    stored = json.loads(json.dumps(cuda.to_dict()))
    assert stored == {
        "wall_ms": 8.0, "busy_ms": {"matmul": 5.0}, "gemms": [[64, 65, 128, "c10::Half"]], "device_type": "cuda", "idle_ms": 3.0
    }  # fmt: skip
    assert StepProfile.from_dict(stored) == cuda
    old = StepProfile.from_dict({"wall_ms": 4, "busy_ms": {"matmul": 1.0}})  # written before gemms and device_type
    assert old == StepProfile(wall_ms=4.0, busy_ms={"matmul": 1.0}, gemms=(), device_type="cpu")


def op(name: str, us: float, shapes: list | None = None, dtypes: list | None = None, **kw) -> FunctionEvent:
    """One profiler event, as torch.profiler reports it: `us` of self time (device time for a CUDA kernel)."""
    return FunctionEvent(0, name, 0, 0, us, input_shapes=shapes or [], input_dtypes=dtypes, **kw)


def test_a_cpu_profile_adds_up_the_ops_self_times_and_lists_the_reduced_precision_gemms() -> None:
    bf16, half, f32 = "c10::BFloat16", "c10::Half", "float"
    events = [
        op("aten::mm", 300, [[32, 65], [65, 128]], [bf16, bf16]),
        op("aten::addmm", 200, [[64], [32, 128], [128, 64], [], []], [f32, f32, f32, "Scalar", "Scalar"]),  # fp32
        op("aten::baddbmm", 100, [[4, 8, 16], [4, 8, 24], [4, 24, 16], [], []], [half] * 3 + ["Scalar"] * 2),
        op("aten::mm", 0, [[16, 16], [16, 16]], None),  # no dtypes recorded: not listed, not an error
        op("Optimizer.step#AdamW.step", 100),
        op("aten::gelu", 1),  # a 1 µs op counts too
        op("gloo:all_reduce", 40),  # a collective, counted though not an aten op
        op("autograd::engine::evaluate_function: MmBackward0", 50),  # a wrapper, not an op: not counted
        op("aten::layer_norm", 0),  # no self time (its children did the work)
    ]
    profile = summarize(events, wall_ms=2.0, device_type="cpu")
    assert profile.busy_ms == pytest.approx(
        {
            "matmul": 0.6,
            "elementwise": 0.001,
            "norm": 0.0,
            "optimizer": 0.1,
            "data_movement": 0.0,
            "communication": 0.04,
        }
    )
    assert profile.gemms == ((8, 24, 16, half), (32, 65, 128, bf16))  # batched GEMMs by their matrices
    assert profile.device_type == "cpu" and profile.idle_ms == pytest.approx(2.0 - 0.741)


def test_a_cuda_profile_counts_device_time_of_every_kernel() -> None:
    def kernel(name: str, us: float) -> FunctionEvent:
        return op(name, us, device_type=DeviceType.CUDA, use_device="cuda")

    events = [
        op("aten::mm", 300, [[32, 64], [64, 128]], ["c10::Half"] * 2),  # the host's launch: no device time
        kernel("ampere_fp16_s16816gemm_fp16_128x64", 500),
        kernel("void at::native::vectorized_elementwise_kernel", 100),
    ]
    profile = summarize(events, wall_ms=1.0, device_type="cuda")
    assert profile.busy_ms["matmul"] == pytest.approx(0.5) and profile.busy_ms["elementwise"] == pytest.approx(0.1)
    assert profile.gemms == ((32, 64, 128, "c10::Half"),) and profile.device_type == "cuda"


def test_a_real_profiled_step_splits_its_time_and_lists_the_bf16_gemms() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(65, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64)
    )
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    profiler = StepProfiler(torch.device("cpu"))
    began = time.perf_counter()
    profiler.start()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(32, 65)).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    profile = profiler.stop()
    outside_ms = (time.perf_counter() - began) * 1e3
    assert profile.device_type == "cpu" and profile.busy_ms["matmul"] < profile.wall_ms < outside_ms
    assert profile.busy_ms["communication"] == 0.0  # one process: no collectives
    assert all(profile.busy_ms[c] > 0 for c in ("matmul", "norm", "optimizer", "elementwise"))
    assert (32, 65, 128, "c10::BFloat16") in profile.gemms  # the first layer's forward GEMM, in bf16
    assert all(g[3] == "c10::BFloat16" for g in profile.gemms)  # fp32 GEMMs are not listed
    assert (32, 65, 128, "c10::BFloat16") in profile.misaligned_gemms


@pytest.mark.gpu
def test_a_profiled_cuda_step_counts_kernel_time_and_waits_for_the_device() -> None:
    a, b = torch.randn(2048, 2048, device="cuda"), torch.randn(2048, 2048, device="cuda")
    profiler = StepProfiler(torch.device("cuda"))
    profiler.start()
    with torch.autocast("cuda", dtype=torch.float16):
        for _ in range(20):
            a @ b
    profile = profiler.stop()
    assert profile.device_type == "cuda" and profile.busy_ms["matmul"] > 0  # kernels' device time was recorded
    assert profile.wall_ms >= profile.busy_ms["matmul"]  # the clock stopped after the device finished
    assert (2048, 2048, 2048, "c10::Half") in profile.gemms


# --- machine facts ------------------------------------------------------------------------------------


def test_machine_facts_of_this_cpu_and_of_a_gpu_described_as_data() -> None:
    assert machine_facts(probe("cpu")) == {
        "device_type": "cpu",
        "device_name": probe("cpu").device_name,
        "cpu_isa": sorted(cpu_isa()),
    }
    h100 = Capabilities(device_type="cuda", cuda_available=True, device_name="NVIDIA H100", compute_capability=(9, 0))
    facts = machine_facts(h100)
    assert facts["compute_capability"] == [9, 0] and facts["tf32_for_fp32"] is False  # torch's default: off
    assert cpu_isa() <= {"avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile", "avx512f", "avx2"}


@pytest.fixture
def matmul_precision_restored() -> Iterator[None]:
    """The test sets torch's process-wide matmul precision; put torch's default back afterwards."""
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "none"


def test_tf32_for_fp32_follows_either_api_and_survives_a_program_that_mixed_them(matmul_precision_restored) -> None:
    h100 = Capabilities(device_type="cuda", cuda_available=True, device_name="NVIDIA H100", compute_capability=(9, 0))
    torch.backends.cuda.matmul.allow_tf32 = True  # the legacy flag
    assert machine_facts(h100)["tf32_for_fp32"] is True
    torch.set_float32_matmul_precision("high")  # the newer global setting...
    assert machine_facts(h100)["tf32_for_fp32"] is True
    torch.backends.cuda.matmul.allow_tf32 = False  # ...then the legacy one: torch's own global getter now raises
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    assert machine_facts(h100)["tf32_for_fp32"] is False


def test_a_backend_left_at_none_takes_the_global_tf32_setting(matmul_precision_restored) -> None:
    h100 = Capabilities(device_type="cuda", cuda_available=True, device_name="NVIDIA H100", compute_capability=(9, 0))
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "none"
    assert machine_facts(h100)["tf32_for_fp32"] is True
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = "tf32", "ieee"  # the backend's wins
    assert machine_facts(h100)["tf32_for_fp32"] is False


# --- causes, ranked ------------------------------------------------------------------------------------


def test_a_cpu_without_bf16_instructions_explains_bf16_first() -> None:
    causes = explain("bf16-mixed", recorded(matmul=80.0), recorded(matmul=80.0), CPU_FACTS)
    assert [c.text for c in causes] == [
        "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"
    ]
    with_amx = {**CPU_FACTS, "cpu_isa": ["amx_bf16", "avx512_bf16"]}
    assert explain("bf16-mixed", recorded(matmul=80.0), None, with_amx) == []
    fp16 = explain("fp16-mixed", None, None, with_amx)
    assert [c.text for c in fp16] == [
        "this CPU has no fp16 instructions (avx512_fp16/amx_fp16): fp16 matmuls are emulated"
    ]


def test_causes_are_computed_from_the_profile_and_ranked_by_weight() -> None:
    profile = recorded(wall=100.0, matmul=10.0, elementwise=20.0, optimizer=30.0, data_movement=25.0,
                       gemms=((512, 64, 65, "c10::Half"), (64, 64, 64, "c10::Half")))  # fmt: skip
    fp32 = recorded(wall=100.0, matmul=40.0, data_movement=5.0)
    facts = {"device_type": "cuda", "device_name": "NVIDIA H100", "compute_capability": [9, 0], "tf32_for_fp32": True}
    texts = [c.text for c in explain("fp16-mixed", profile, fp32, facts)]
    assert texts == [
        "90% of the step is outside matmuls: the model is too small to gain",  # 0.72
        "fp32 already ran its matmuls on TF32 tensor cores: the baseline is fast",  # 0.5
        "1 of 2 reduced-precision GEMMs have a dimension that is not a multiple of 8 (e.g. 512x64x65): pad vocabulary/hidden sizes",
        "dtype casts add 20% of the step (autocast copies)",  # 0.2
        "the optimizer takes 30% of the step: it updates fp32 weights whatever the precision",  # 0.18
    ]
    idle = recorded(wall=100.0, matmul=30.0, device_type="cuda")
    assert explain("bf16-mixed", idle, None, {**facts, "tf32_for_fp32": False})[0].text == (
        "launch-bound: the device is idle 70% of the step — try a bigger batch or compile"
    )


def test_old_gpus_lack_the_tensor_cores_a_precision_needs() -> None:
    turing = {"device_type": "cuda", "compute_capability": [7, 5], "tf32_for_fp32": False}
    assert explain("bf16-mixed", None, None, turing)[0].text == "compute capability 7.5 has no bf16 tensor cores"
    assert explain("fp16-mixed", None, None, {**turing, "compute_capability": [6, 1]})[0].text == (
        "compute capability 6.1 has no fp16 tensor cores"
    )
    assert explain("fp16-mixed", recorded(matmul=90.0, device_type="cuda"), None, turing) == []  # it pays


@pytest.mark.parametrize(
    "precision,isa",
    [
        ("bf16-mixed", ["avx512_bf16"]),
        ("bf16-true", ["amx_bf16"]),
        ("fp16-mixed", ["avx512_fp16"]),
        ("fp16-true", ["amx_fp16"]),
    ],
)
def test_either_instruction_set_extension_gives_a_cpu_native_half_matmuls(precision: str, isa: list[str]) -> None:
    assert explain(precision, recorded(matmul=80.0), None, {**CPU_FACTS, "cpu_isa": ["avx2", *isa]}) == []


@pytest.mark.parametrize(
    "precision,cc,missing",
    [
        ("bf16-mixed", [8, 0], None), ("bf16-mixed", [8, 6], None), ("bf16-mixed", [7, 5], "7.5 has no bf16"),
        ("fp16-mixed", [7, 0], None), ("fp16-mixed", [7, 5], None), ("fp16-mixed", [6, 1], "6.1 has no fp16"),
        ("bf16-mixed", [], "0.0 has no bf16"),  # an unknown compute capability is taken as too old
        ("fp16-mixed", None, "0.0 has no fp16"),
    ],
)  # fmt: skip
def test_bf16_tensor_cores_start_at_ampere_and_fp16_at_volta(
    precision: str, cc: list[int] | None, missing: str | None
) -> None:
    facts = {"device_type": "cuda", "compute_capability": cc, "tf32_for_fp32": False}
    texts = [c.text for c in explain(precision, recorded(matmul=80.0, device_type="cuda"), None, facts)]
    assert texts == ([f"compute capability {missing} tensor cores"] if missing else [])


@pytest.mark.parametrize("precision", ["fp16-mixed", "bf16-mixed", "bf16-true", "fp8-mixed"])
def test_a_tf32_baseline_explains_every_reduced_precision_but_tf32_itself(precision: str) -> None:
    h100 = {"device_type": "cuda", "compute_capability": [9, 0], "tf32_for_fp32": True}
    tf32_baseline = "fp32 already ran its matmuls on TF32 tensor cores: the baseline is fast"
    assert [c.text for c in explain(precision, recorded(matmul=80.0, device_type="cuda"), None, h100)] == [
        tf32_baseline
    ]
    assert (
        explain(precision, recorded(matmul=80.0, device_type="cuda"), None, {**h100, "tf32_for_fp32": False}) == []
    )
    assert explain("tf32", recorded(matmul=80.0, device_type="cuda"), None, h100) == []


def test_a_cause_is_named_only_past_its_threshold() -> None:
    bf16_cpu = {**CPU_FACTS, "cpu_isa": ["amx_bf16"]}
    # Exactly at every threshold: half the step outside matmuls, 30% idle, 20% optimizer, 10% more casts than fp32.
    at = recorded(wall=100.0, matmul=50.0, optimizer=20.0)
    assert explain("bf16-mixed", at, None, bf16_cpu) == []
    casts = recorded(wall=100.0, matmul=60.0, data_movement=10.0)
    assert explain("bf16-mixed", casts, recorded(wall=100.0, matmul=60.0, data_movement=0.0), bf16_cpu) == []
    small_casts = recorded(wall=100.0, matmul=65.0, data_movement=5.0)  # 5% of the step: below the threshold
    assert explain("bf16-mixed", small_casts, recorded(wall=100.0, matmul=65.0), bf16_cpu) == []


def test_causes_weigh_what_they_plausibly_cost_and_name_the_host_on_a_cpu() -> None:
    busy_host = recorded(wall=100.0, matmul=30.0, device_type="cpu")
    causes = explain("fp16-mixed", busy_host, None, CPU_FACTS)
    assert [(round(c.weight, 2), c.text) for c in causes] == [
        (1.0, "this CPU has no fp16 instructions (avx512_fp16/amx_fp16): fp16 matmuls are emulated"),  # all of it
        (0.63, "launch-bound: the host runs Python/dispatch, not ops, 70% of the step — try a bigger batch or compile"),
        (0.56, "70% of the step is outside matmuls: the model is too small to gain"),
    ]
    bf16 = explain("bf16-mixed", recorded(wall=100.0, matmul=80.0), None, CPU_FACTS)
    assert [(c.weight, c.text) for c in bf16] == [
        (1.0, "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated")
    ]
    for precision, cc in (("bf16-mixed", [7, 5]), ("fp16-mixed", [6, 1])):
        old_gpu = {"device_type": "cuda", "compute_capability": cc, "tf32_for_fp32": False}
        # Casts costing more than the wall time (overlapping streams) are still ranked after missing tensor cores.
        heavy_casts = recorded(wall=10.0, matmul=9.0, data_movement=15.0, device_type="cuda")
        ranked = explain(precision, heavy_casts, recorded(wall=10.0, matmul=9.0), old_gpu)
        assert [round(c.weight, 2) for c in ranked] == [1.5, 1.0] and "tensor cores" in ranked[1].text


def test_a_step_too_short_for_the_clock_is_not_called_launch_bound() -> None:
    texts = [
        c.text for c in explain("bf16-mixed", recorded(wall=0.0), None, {**CPU_FACTS, "cpu_isa": ["amx_bf16"]})
    ]
    assert not any(t.startswith("launch-bound") for t in texts)


def test_casts_are_compared_with_an_older_profile_that_lacks_the_category() -> None:
    bf16_cpu = {**CPU_FACTS, "cpu_isa": ["amx_bf16"]}
    no_casts = recorded(wall=5.0, matmul=4.5)  # neither profile recorded data movement: no cast cause
    assert explain("bf16-mixed", no_casts, recorded(wall=5.0, matmul=4.5), bf16_cpu) == []
    casts = recorded(wall=5.0, matmul=3.5, data_movement=1.0)  # fp32's profile has no data movement: all 20% are extra
    texts = [c.text for c in explain("bf16-mixed", casts, recorded(wall=5.0, matmul=4.5), bf16_cpu)]
    assert texts == ["dtype casts add 20% of the step (autocast copies)"]


def test_a_precision_that_pays_off_still_lists_what_holds_it_back() -> None:
    profile = recorded(wall=100.0, matmul=40.0, elementwise=60.0, device_type="cuda")
    h100 = {"device_type": "cuda", "compute_capability": [9, 0], "tf32_for_fp32": False}
    texts = [c.text for c in explain("bf16-mixed", profile, None, h100)]
    assert texts == ["60% of the step is outside matmuls: the model is too small to gain"]


# --- in a run -------------------------------------------------------------------------------------------


def test_a_run_profiles_its_last_untimed_step_only_when_asked(user_models) -> None:
    base = {"model": "user_models:build_ok", "steps": 5, "timing_warmup_steps": 2, "batch_size": 4, "device": "cpu"}
    plain = train(RunConfig(**base), write=False)
    assert plain.profile is None
    result = train(RunConfig(**base, profile_step=True), write=False)
    assert result.ok and result.profile["step"] == 1 and result.metrics.timed_steps == 3  # steps 2, 3, 4
    assert result.metrics.comm_time_ms is None  # one process: no collectives to time, even in a profiled step
    assert result.profile["facts"] == machine_facts(probe("cpu"))
    assert StepProfile.from_dict(result.profile).busy_ms["matmul"] > 0
    assert result.profile["causes"] == []  # fp32 is the baseline: nothing to explain
    no_warmup = train(RunConfig(**{**base, "timing_warmup_steps": 0}, profile_step=True), write=False)
    assert no_warmup.profile["step"] == 0  # no untimed step: the first one
    bf16 = train(RunConfig(**base, precision="bf16-mixed", profile_step=True), write=False)
    expected = explain("bf16-mixed", StepProfile.from_dict(bf16.profile), None, bf16.profile["facts"])
    assert bf16.profile["causes"] == [c.text for c in expected]  # what the run alone can tell, in its JSON


@pytest.mark.slow
def test_on_this_cpu_bf16s_slowness_is_explained_from_real_profiles(tiny_config) -> None:
    runs = {p: train(tiny_config(precision=p, profile_step=True, steps=8), write=False) for p in ("fp32", "bf16-mixed")}
    profiles = {p: StepProfile.from_dict(r.profile) for p, r in runs.items()}
    causes = explain("bf16-mixed", profiles["bf16-mixed"], profiles["fp32"], runs["bf16-mixed"].profile["facts"])
    texts = [c.text for c in causes]
    emulated = "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"
    if cpu_isa() & {"avx512_bf16", "amx_bf16"}:
        assert emulated not in texts
    else:
        assert texts[0] == emulated
    assert any("pad vocabulary" in t for t in texts)  # the 65-character vocabulary
