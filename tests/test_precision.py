"""Precision names, the seed's `compute_effective_precision`, and resolution against described hardware."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from amp_lib.precision import (
    ALIASES,
    CANONICAL,
    Capabilities,
    PrecisionPlan,
    PrecisionUnavailableError,
    _cpu_flags,
    compute_effective_precision,
    is_fp16,
    native_precisions,
    parse_precision,
    probe,
    resolve_precision,
    valid_precision_names,
)

# Hardware described as data: nothing here needs the hardware itself.
CPU_SLOW_FP16 = Capabilities(device_type="cpu", device_name="AVX2", bf16_supported=True, fp16_fast=False)
CPU_NO_BF16 = Capabilities(device_type="cpu", device_name="old-cpu", bf16_supported=False, fp16_fast=False)
CPU_FAST_FP16 = Capabilities(device_type="cpu", device_name="AMX", bf16_supported=True, fp16_fast=True)
TURING = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="Tesla T4",
    compute_capability=(7, 5),
    bf16_supported=False,
    fp16_fast=True,
)
AMPERE = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="NVIDIA A100",
    compute_capability=(8, 0),
    bf16_supported=True,
    fp16_fast=True,
)
ADA = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="NVIDIA L4",
    compute_capability=(8, 9),
    bf16_supported=True,
    fp16_fast=True,
    fp8_backend=True,
)
HOPPER_NO_TORCHAO = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="NVIDIA H100",
    compute_capability=(9, 0),
    bf16_supported=True,
    fp16_fast=True,
    fp8_backend=False,
)
HOPPER = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="NVIDIA H100",
    compute_capability=(9, 0),
    bf16_supported=True,
    fp16_fast=True,
    fp8_backend=True,
)

# What DESIGN.md promises, written out independently of ALIASES so a dropped alias is caught.
DOCUMENTED_ALIASES = {
    "32-true": "fp32",
    "32": "fp32",
    32: "fp32",
    "16-mixed": "fp16-mixed",
    "16": "fp16-mixed",
    16: "fp16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "16-true": "fp16-true",
    "bf16-true": "bf16-true",
    "no": "fp32",
    "fp16": "fp16-mixed",
    "16_true": "fp16-true",
}


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", list(ALIASES), ids=repr)
def test_every_alias_maps_to_its_canonical_name(alias):
    canonical = parse_precision(alias)
    assert canonical == ALIASES[alias]
    assert canonical in CANONICAL
    assert parse_precision(canonical) == canonical  # canonical names are fixed points


@pytest.mark.parametrize("alias,expected", list(DOCUMENTED_ALIASES.items()), ids=repr)
def test_documented_aliases(alias, expected):
    assert parse_precision(alias) == expected


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_names_parse_to_themselves(name):
    assert parse_precision(name) == name


def test_string_aliases_are_case_and_space_insensitive():
    assert parse_precision("  BF16-Mixed ") == "bf16-mixed"
    assert parse_precision("FP16") == "fp16-mixed"


@pytest.mark.parametrize("bad", ["8", "int8", "invalid", "", None, 17, True, False, 16.0, 32.0, "fp64", [16]], ids=repr)
def test_invalid_precision_names_the_value_and_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        parse_precision(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in CANONICAL:
        assert name in message
    assert "16-mixed" in message and "32-true" in message and "16_true" in message
    assert f"valid values are: {', '.join(CANONICAL)}, " in message  # readable: comma-separated, canonical first


def test_valid_precision_names_lists_canonical_first_then_every_alias():
    names = valid_precision_names()
    for name in names:  # every name the error message offers is one the parser takes
        assert parse_precision(name) in CANONICAL
    assert names[: len(CANONICAL)] == list(CANONICAL)
    for alias in ALIASES:
        assert (repr(alias) if isinstance(alias, int) else alias) in names
    assert len(names) == len(set(names)), "each spelling is listed once"


@pytest.mark.parametrize(
    "value", ["16", 16, "16-mixed", "fp16-mixed", "fp16", "16-true", "16_true", "fp16-true"], ids=repr
)
def test_is_fp16_true_for_every_fp16_spelling(value):
    assert is_fp16(value)


@pytest.mark.parametrize("value", ["32", 32, "bf16", "bf16-true", "tf32", "fp8", "garbage", None, 16.0], ids=repr)
def test_is_fp16_false_otherwise(value):
    assert not is_fp16(value)


# --- the seed's compute_effective_precision: all 16 combinations --------------------------------


def _expected_effective(requested, use_amp, cuda_available, use_gpu):
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"


SEED_CASES = list(itertools.product(["16", "32"], [True, False], [True, False], [True, False]))


@pytest.mark.parametrize(
    "requested,use_amp,cuda_available,use_gpu",
    SEED_CASES,
    ids=[f"req={r}-amp={a}-cuda={c}-gpu={g}" for r, a, c, g in SEED_CASES],
)
def test_compute_effective_precision_all_combinations(requested, use_amp, cuda_available, use_gpu):
    assert len(SEED_CASES) == 16
    expected = _expected_effective(requested, use_amp, cuda_available, use_gpu)
    got = compute_effective_precision(requested, use_amp, cuda_available, use_gpu)
    assert got == expected, (
        f"compute_effective_precision({requested!r}, use_amp={use_amp}, cuda_available={cuda_available}, "
        f"use_gpu={use_gpu}) returned {got!r}, expected {expected!r}"
    )


@pytest.mark.parametrize("requested", ["16", 16, "32", "bf16-mixed", "16_true"], ids=repr)
@pytest.mark.parametrize("cuda_available,use_gpu", list(itertools.product([True, False], repeat=2)))
def test_compute_effective_precision_use_amp_none_returns_request_unchanged(requested, cuda_available, use_gpu):
    got = compute_effective_precision(requested, None, cuda_available, use_gpu)
    assert got == requested and type(got) is type(requested)


@pytest.mark.parametrize("bad", ["8", "invalid", None, 17], ids=repr)
@pytest.mark.parametrize("use_amp", [None, True, False])
def test_compute_effective_precision_rejects_invalid_request(bad, use_amp):
    with pytest.raises(ValueError, match="invalid precision"):
        compute_effective_precision(bad, use_amp, True, True)


# --- capabilities -------------------------------------------------------------------------------


def test_capabilities_validate_device_type():
    with pytest.raises(ValueError, match=r"^invalid device_type 'tpu'; valid: 'cpu', 'cuda'$"):
        Capabilities(device_type="tpu")
    with pytest.raises(ValueError, match=r"^device_type 'cuda' needs cuda_available=True$"):
        Capabilities(device_type="cuda", cuda_available=False)


def test_cc_at_least():
    assert AMPERE.cc_at_least(8, 0) and not AMPERE.cc_at_least(8, 9)
    assert TURING.cc_at_least(7, 0) and not TURING.cc_at_least(8, 0)
    assert not CPU_SLOW_FP16.cc_at_least(0, 0)  # no compute capability at all


def test_probe_cpu_describes_this_machine():
    caps = probe("cpu")
    assert caps.device_type == "cpu"
    assert caps.compute_capability is None
    assert caps.bf16_supported
    assert caps.cuda_available == torch.cuda.is_available()
    assert probe("auto").device_type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_probe_cpu_fields_are_typed_plain_data():
    caps = probe("cpu")
    assert caps.device_name == torch.backends.cpu.get_cpu_capability()  # e.g. "AVX2", "AVX512"
    assert type(caps.fp16_fast) is bool and type(caps.fp8_backend) is bool
    # fast fp16 on a CPU means AVX512-FP16 or AMX-FP16 in the CPU's flags, nothing else
    assert caps.fp16_fast is bool(_cpu_flags() & {"avx512_fp16", "amx_fp16"})
    assert caps.fp8_backend is (importlib.util.find_spec("torchao") is not None)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_flags_are_the_flag_words_of_proc_cpuinfo():
    flags = _cpu_flags()
    assert flags, "a Linux CPU lists its feature flags"
    assert all(":" not in f and f == f.lower() for f in flags)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        assert {"sse2", "avx"} <= flags  # an x86 CPU with AVX kernels lists both


def test_probe_rejects_bad_devices():
    with pytest.raises(ValueError, match="invalid device 'meta'"):
        probe("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' requested but CUDA is not available"):
            probe("cuda:1")


# --- resolution: each fallback branch -----------------------------------------------------------


@pytest.mark.parametrize(
    "requested,caps,effective,reason_has",
    [
        ("fp16-mixed", CPU_SLOW_FP16, "bf16-mixed", "no fast fp16"),
        ("16", CPU_SLOW_FP16, "bf16-mixed", "no fast fp16"),
        ("fp16-mixed", CPU_NO_BF16, "fp32", "neither fast fp16 nor bf16"),
        ("fp16-true", CPU_SLOW_FP16, "bf16-true", "no fast fp16"),
        ("16_true", CPU_SLOW_FP16, "bf16-true", "no fast fp16"),
        ("bf16-mixed", TURING, "fp16-mixed", "does not support bf16"),
        ("bf16-true", TURING, "fp16-true", "does not support bf16"),
        ("bf16-mixed", CPU_NO_BF16, "fp32", "does not support bf16"),
        ("tf32", TURING, "fp32", "compute capability 8.0"),
        ("tf32", CPU_SLOW_FP16, "fp32", "Ampere"),
        ("fp8-mixed", AMPERE, "bf16-mixed", "8.9"),
        ("fp8", CPU_SLOW_FP16, "bf16-mixed", "8.9"),
        ("fp8-mixed", HOPPER_NO_TORCHAO, "bf16-mixed", "torchao"),
    ],
    ids=lambda v: v.device_name if isinstance(v, Capabilities) else str(v),
)
def test_resolve_falls_back_with_reason(requested, caps, effective, reason_has):
    plan = resolve_precision(requested, caps)
    assert plan.effective == effective
    assert plan.requested == str(requested)
    assert plan.fell_back
    assert reason_has in plan.fallback_reason
    assert plan.device_type == caps.device_type and plan.device_name == caps.device_name


def test_chained_fallback_fp8_on_turing_keeps_both_reasons():
    plan = resolve_precision("fp8-mixed", TURING)
    assert plan.effective == "fp16-mixed"
    first, _, second = plan.fallback_reason.partition("; then ")
    assert first.startswith("fp8 needs") and second.startswith("Tesla T4 does not")
    assert "8.9" in first
    assert "does not support bf16" in second and "Tesla T4" in second
    assert plan.use_loss_scaler  # the chain ends in fp16-mixed, which needs the scaler


@pytest.mark.parametrize(
    "requested,caps,reason",
    [
        ("tf32", TURING, "tf32 needs an Ampere or newer GPU (compute capability 8.0+); running on cuda (Tesla T4)"),
        (
            "fp8-mixed",
            AMPERE,
            "fp8 needs a GPU with compute capability 8.9+ (Ada/Hopper); running on cuda (NVIDIA A100)",
        ),
        ("fp8-mixed", HOPPER_NO_TORCHAO, "fp8 training needs torchao (pip install torchao); it is not installed"),
        ("fp16-mixed", CPU_NO_BF16, "this CPU has neither fast fp16 nor bf16; using fp32"),
        ("bf16-mixed", CPU_NO_BF16, "cpu (old-cpu) does not support bf16; using fp32"),
    ],
    ids=lambda v: v.device_name if isinstance(v, Capabilities) else str(v)[:20],
)
def test_fallback_reasons_name_the_device_and_the_way_out(requested, caps, reason):
    # the reason is shown to the user as is (report, W&B): it says where it ran and what to do
    assert resolve_precision(requested, caps).fallback_reason == reason


def test_chained_fallback_fp8_on_cpu_without_bf16_ends_in_fp32():
    plan = resolve_precision("fp8", CPU_NO_BF16)
    assert plan.effective == "fp32"
    assert plan.fallback_reason.count("; then ") == 1


@pytest.mark.parametrize(
    "requested,caps",
    [
        ("fp32", CPU_SLOW_FP16),
        ("bf16-mixed", CPU_SLOW_FP16),
        ("bf16-true", CPU_SLOW_FP16),
        ("fp16-mixed", CPU_FAST_FP16),
        ("fp16-mixed", TURING),
        ("fp16-true", TURING),
        ("tf32", AMPERE),
        ("bf16-mixed", AMPERE),
        ("fp8-mixed", ADA),
        ("fp8-mixed", HOPPER),
    ],
    ids=lambda v: v.device_name if isinstance(v, Capabilities) else str(v),
)
def test_resolve_keeps_what_the_hardware_runs(requested, caps):
    plan = resolve_precision(requested, caps)
    assert plan.effective == parse_precision(requested)
    assert plan.fallback_reason is None and not plan.fell_back
    # strict has nothing to refuse
    assert resolve_precision(requested, caps, strict=True) == plan


@pytest.mark.parametrize(
    "requested,caps,reason_has",
    [
        ("fp16-mixed", CPU_SLOW_FP16, "no fast fp16"),
        ("bf16-mixed", TURING, "does not support bf16"),
        ("tf32", TURING, "compute capability 8.0"),
        ("fp8-mixed", HOPPER_NO_TORCHAO, "torchao"),
        ("fp8-mixed", TURING, "8.9"),
    ],
    ids=lambda v: v.device_name if isinstance(v, Capabilities) else str(v),
)
def test_strict_raises_naming_the_reason(requested, caps, reason_has):
    with pytest.raises(PrecisionUnavailableError) as info:
        resolve_precision(requested, caps, strict=True)
    assert reason_has in str(info.value)
    assert repr(requested) in str(info.value)
    assert isinstance(info.value, ValueError)  # callers catching ValueError see it too


def test_allow_slow_keeps_fp16_on_a_slow_cpu():
    assert resolve_precision("fp16-mixed", CPU_SLOW_FP16, allow_slow=True).effective == "fp16-mixed"
    assert resolve_precision("fp16-true", CPU_SLOW_FP16, allow_slow=True).effective == "fp16-true"
    plan = resolve_precision("fp16-mixed", CPU_SLOW_FP16, allow_slow=True, strict=True)
    assert plan.effective == "fp16-mixed" and plan.fallback_reason is None


def test_allow_slow_does_not_rescue_what_cannot_run():
    assert resolve_precision("fp8", CPU_SLOW_FP16, allow_slow=True).effective == "bf16-mixed"
    assert resolve_precision("tf32", CPU_SLOW_FP16, allow_slow=True).effective == "fp32"


def test_resolve_invalid_name_raises_before_looking_at_hardware():
    with pytest.raises(ValueError, match="invalid precision"):
        resolve_precision("int8", AMPERE)


def test_resolve_without_caps_probes_this_machine():
    plan = resolve_precision("fp32")
    assert plan.effective == "fp32"
    assert plan.device_type == probe().device_type


# --- plan fields --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,autocast,param,scaler",
    [
        ("fp32", None, torch.float32, False),
        ("tf32", None, torch.float32, False),
        ("fp16-mixed", torch.float16, torch.float32, True),
        ("bf16-mixed", torch.bfloat16, torch.float32, False),
        ("fp16-true", None, torch.float16, False),
        ("bf16-true", None, torch.bfloat16, False),
        ("fp8-mixed", torch.bfloat16, torch.float32, False),
    ],
)
def test_plan_fields(name, autocast, param, scaler):
    caps = HOPPER if name != "fp16-mixed" else TURING
    plan = resolve_precision(name, caps)
    assert plan.effective == name
    assert plan.autocast_dtype == autocast
    assert plan.param_dtype == param
    assert plan.use_loss_scaler is scaler


def test_plan_to_dict_is_plain_data():
    plan = resolve_precision("fp16-mixed", CPU_SLOW_FP16)
    d = plan.to_dict()
    assert d["requested"] == "fp16-mixed" and d["effective"] == "bf16-mixed"
    assert d["autocast_dtype"] == "bfloat16" and d["param_dtype"] == "float32"
    assert d["fallback_reason"] == plan.fallback_reason
    assert isinstance(plan, PrecisionPlan)
    fp32 = resolve_precision("32", CPU_SLOW_FP16).to_dict()
    assert fp32["autocast_dtype"] is None and fp32["param_dtype"] == "float32" and fp32["requested"] == "32"


# --- native precisions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caps,expected",
    [
        (CPU_SLOW_FP16, ["fp32", "bf16-mixed"]),
        (CPU_FAST_FP16, ["fp32", "fp16-mixed", "bf16-mixed"]),
        (CPU_NO_BF16, ["fp32"]),
        (TURING, ["fp32", "fp16-mixed"]),
        (AMPERE, ["fp32", "tf32", "fp16-mixed", "bf16-mixed"]),
    ],
    ids=lambda v: v.device_name if isinstance(v, Capabilities) else None,
)
def test_native_precisions(caps, expected):
    native = native_precisions(caps)
    assert native == expected
    for name in native:  # consistent with resolution: each native precision resolves to itself
        assert resolve_precision(name, caps).effective == name


def test_native_precisions_of_this_machine_all_resolve_to_themselves():
    native = native_precisions()
    assert "fp32" in native
    for name in native:
        assert resolve_precision(name).effective == name
