"""Precision names, the seed's `compute_effective_precision`, devices, resolution against described
hardware, and what a `PrecisionPlan` does: autocast, parameter and input dtypes, TF32, peak FLOPs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from amp_lib.precision import (
    ALIASES,
    CANONICAL,
    PEAK_TFLOPS,
    Capabilities,
    PrecisionPlan,
    PrecisionUnavailableError,
    _cpu_flags,
    compute_dtype_name,
    compute_effective_precision,
    is_fp16,
    native_precisions,
    parallel_label,
    parse_parallelism,
    parse_precision,
    parse_reduce_dtype,
    probe,
    resolve_device,
    resolve_precision,
    valid_precision_names,
)

CUDA = torch.cuda.is_available()
TORCHAO = importlib.util.find_spec("torchao") is not None

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


# Written out: the dtype each canonical precision computes its matmuls in (fp8's surrounding autocast is bf16).
COMPUTE_DTYPE = {"fp32": "fp32", "tf32": "fp32", "fp16-mixed": "fp16", "bf16-mixed": "bf16", "fp16-true": "fp16",
                 "bf16-true": "bf16", "fp8-tensorwise": "bf16", "fp8-rowwise": "bf16", "fp8-rowwise-gw-hp": "bf16"}  # fmt: skip


def test_compute_dtype_name_of_every_canonical_precision():
    assert {name: compute_dtype_name(name) for name in CANONICAL} == COMPUTE_DTYPE


@pytest.mark.parametrize(
    "value,expected",
    [("none", "none"), ("single", "none"), (" DDP ", "ddp"), ("fsdp", "fsdp"), ("FSDP2", "fsdp")],
)
def test_parallelism_spellings_parse_to_the_canonical_name(value, expected):
    assert parse_parallelism(value) == expected


@pytest.mark.parametrize(
    "value,expected",
    [("fp32", "fp32"), ("float32", "fp32"), ("32", "fp32"), (" BF16 ", "bf16"), ("bfloat16", "bf16"),
     ("half", "fp16"), ("16", "fp16"), ("torch.float16", "fp16"), (torch.float32, "fp32"),
     (torch.bfloat16, "bf16"), (torch.float16, "fp16")],
    ids=repr,
)  # fmt: skip
def test_reduce_dtype_spellings_and_torch_dtypes_parse_to_the_config_name(value, expected):
    assert parse_reduce_dtype(value) == expected


@pytest.mark.parametrize("bad", ["zero3", "", None, 2, ["ddp"]], ids=repr)
def test_invalid_parallelism_names_the_value_and_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        parse_parallelism(bad)
    assert str(info.value) == f"invalid parallelism {bad!r}; valid values are: none, ddp, fsdp (or fsdp2)"


@pytest.mark.parametrize("bad", ["int8", "fp64", None, 16, 32, torch.float64, torch.int8], ids=repr)
def test_invalid_reduce_dtype_names_the_value_and_the_valid_ones(bad):
    # ints are no reduce dtype (16 and 32 read as precisions elsewhere): only names and torch dtypes are
    with pytest.raises(ValueError) as info:
        parse_reduce_dtype(bad)
    assert str(info.value) == (
        f"invalid reduce_dtype {bad!r}; valid values are: fp32, bf16, fp16 (or float32, bfloat16, float16)"
    )


@pytest.mark.parametrize(
    "args,label",
    [
        (("bf16-mixed",), "bf16-mixed"),  # one device, the default
        (("bf16-mixed", "none", "fp32"), "bf16-mixed"),
        (("fp16-mixed", "ddp"), "ddp fp16-mixed"),
        (("fp16-mixed", "ddp", "fp16"), "ddp fp16-mixed"),  # DDP has no choice to name
        (("bf16-mixed", "fsdp", "fp32"), "fsdp bf16-mixed (reduce fp32)"),
        (("fp8-mixed", "fsdp", "bf16"), "fsdp fp8-mixed (reduce bf16)"),
        (("bf16-true", "fsdp", "bf16"), "fsdp bf16-true (reduce bf16)"),
        (("fp32", "fsdp", "fp32"), "fsdp fp32"),  # fp32 computes in fp32: no choice either
        (("tf32", "fsdp", "fp32"), "fsdp tf32"),
        (("bf16-mixed", "fsdp"), "fsdp bf16-mixed"),  # reduce dtype unknown (an old result)
    ],
)
def test_parallel_label_names_the_reduce_dtype_only_where_fsdp_had_a_choice(args, label):
    assert parallel_label(*args) == label


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


# --- devices: resolve_device is the one parser, and probe uses it --------------------------------

BAD_DEVICES = ["gpu", "meta", "tpu", "cuda:x", "cuda:", "cpu:0", "CPU", " cpu", "", torch.device("meta")]


def test_resolve_device():
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert isinstance(resolve_device("cpu"), torch.device)
    auto = torch.device("cuda" if CUDA else "cpu")
    assert resolve_device("auto") == resolve_device(None) == resolve_device() == auto


@pytest.mark.parametrize("bad", BAD_DEVICES, ids=repr)
def test_resolve_device_rejects_other_names_quoting_the_value_and_the_choices(bad):
    with pytest.raises(ValueError) as info:
        resolve_device(bad)
    assert str(info.value) == f"invalid device {str(bad)!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'"


@pytest.mark.skipif(CUDA, reason="checks the refusal of CUDA where there is none")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1", torch.device("cuda")], ids=str)
def test_cuda_without_cuda_is_refused_naming_what_is_valid_here(device):
    message = f"device {str(device)!r} requested but CUDA is not available; valid here: 'auto', 'cpu'"
    with pytest.raises(ValueError) as info:
        resolve_device(device)
    assert str(info.value) == message
    with pytest.raises(ValueError) as info:
        probe(device)
    assert str(info.value) == message


@pytest.mark.parametrize("bad", ["gpu", "meta", "cuda:x", torch.device("meta")], ids=repr)
def test_probe_parses_its_device_with_resolve_device(bad):
    with pytest.raises(ValueError) as expected:
        resolve_device(bad)
    with pytest.raises(ValueError) as got:
        probe(bad)
    assert str(got.value) == str(expected.value)


def test_probe_defaults_to_the_auto_device():
    assert probe().device_type == probe(None).device_type == probe("auto").device_type == resolve_device().type
    assert probe(torch.device("cpu")) == probe("cpu")


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


def cpuinfo(tmp_path: Path, *flags: str) -> Path:
    """A /proc/cpuinfo of two processors whose flags are `flags` (the first processor's line is read)."""
    lines = [f"processor\t: {n}\nmodel name\t: Test CPU @ 2.0GHz\nflags\t\t: {' '.join(flags)}\n" for n in (0, 1)]
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize(
    "flags,fast",
    [
        (("fpu", "sse2", "avx2", "avx512f", "avx512_fp16"), True),  # Sapphire Rapids
        (("fpu", "avx2", "amx_tile", "amx_fp16"), True),  # Granite Rapids
        (("fpu", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), False),  # bf16 only
        (("fpu", "sse2", "avx2"), False),
    ],
    ids=lambda v: v[-1] if isinstance(v, tuple) else None,
)
def test_probe_calls_a_cpu_fast_at_fp16_exactly_when_it_lists_avx512_fp16_or_amx_fp16(tmp_path, flags, fast):
    caps = probe("cpu", cpuinfo=cpuinfo(tmp_path, *flags))
    assert caps.fp16_fast is fast
    assert _cpu_flags(cpuinfo(tmp_path, *flags)) == set(flags)
    # the rest does not depend on the flags: what torch says about this machine
    assert (caps.device_type, caps.compute_capability, caps.bf16_supported) == ("cpu", None, True)
    assert caps.device_name == torch.backends.cpu.get_cpu_capability()
    assert caps.fp8_backend is (importlib.util.find_spec("torchao") is not None)
    # and the resolution follows: fp16 runs as asked on a fast CPU, as bf16 elsewhere
    assert resolve_precision("fp16-mixed", caps).effective == ("fp16-mixed" if fast else "bf16-mixed")


def test_a_cpu_without_a_flags_line_or_cpuinfo_has_no_flags_and_no_fast_fp16(tmp_path):
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd fphp asimdhp\n")  # an ARM CPU says "Features"
    for path in (arm, tmp_path / "missing"):
        assert _cpu_flags(path) == set()
        assert probe("cpu", cpuinfo=path).fp16_fast is False


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_cpu_flags_are_the_flag_words_of_proc_cpuinfo():
    flags = _cpu_flags()
    assert flags, "a Linux CPU lists its feature flags"
    assert all(":" not in f and f == f.lower() for f in flags)
    if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        assert {"sse2", "avx"} <= flags  # an x86 CPU with AVX kernels lists both


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
            ("fp8 needs a GPU with compute capability 8.9+ (Ada/Hopper); running on cuda (NVIDIA A100) "
            "(emulate_fp8=True forecasts its loss in emulation)"),
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


# --- fp8 recipes: the hardware, emulation and the layer selection ----------------------------------

CPU_WITH_TORCHAO = replace(CPU_SLOW_FP16, fp8_backend=True)
AMPERE_WITH_TORCHAO = replace(AMPERE, fp8_backend=True)
RECIPES = ["fp8-tensorwise", "fp8-rowwise", "fp8-rowwise-gw-hp"]


@pytest.mark.parametrize("alias", ["fp8-mixed", "fp8", "FP8-Mixed"])
def test_fp8_mixed_and_fp8_are_aliases_of_the_default_recipe(alias):
    assert parse_precision(alias) == "fp8-tensorwise"
    assert [n for n in CANONICAL if n.startswith("fp8")] == RECIPES
    assert "fp8-mixed" in valid_precision_names() and "fp8-mixed" not in CANONICAL


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_runs_as_itself_on_fp8_hardware_with_its_layer_selection(recipe):
    plan = resolve_precision(recipe, HOPPER, fp8_layers="lm_head, blocks.0.*", strict=True)
    assert (plan.effective, plan.emulated, plan.fallback_reason) == (recipe, False, None)
    assert plan.fp8_layers == "lm_head,blocks.0.*"  # canonical
    assert plan.fp8_recipe.precision == recipe and plan.fp8_recipe.emulate is False
    assert plan.peak_tflops == 1979.0 and plan.emulation_note is None
    # emulation is a way out where the hardware lacks fp8, not a second way to run it where it has it
    assert resolve_precision(recipe, HOPPER, emulate_fp8=True) == resolve_precision(recipe, HOPPER)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("caps", [CPU_WITH_TORCHAO, AMPERE_WITH_TORCHAO], ids=lambda c: c.device_name)
def test_without_fp8_hardware_a_recipe_falls_back_to_bf16_saying_how_to_emulate_it(recipe, caps):
    plan = resolve_precision(recipe, caps)
    assert plan.effective == "bf16-mixed" and plan.fp8_layers is None and not plan.emulated
    assert plan.fallback_reason.startswith("fp8 needs a GPU with compute capability 8.9+")
    assert "emulate_fp8=True forecasts its loss in emulation" in plan.fallback_reason
    with pytest.raises(PrecisionUnavailableError, match="8.9"):
        resolve_precision(recipe, caps, strict=True)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("caps", [CPU_WITH_TORCHAO, AMPERE_WITH_TORCHAO], ids=lambda c: c.device_name)
def test_with_emulate_fp8_a_recipe_runs_emulated_where_the_hardware_lacks_fp8(recipe, caps):
    plan = resolve_precision(recipe, caps, emulate_fp8=True, strict=True)
    assert (plan.effective, plan.emulated, plan.fallback_reason) == (recipe, True, None)
    assert plan.fp8_recipe.emulate is True and plan.fp8_layers == "auto"
    assert plan.autocast_dtype == torch.bfloat16 and plan.param_dtype == torch.float32
    assert plan.peak_tflops is None  # an emulated run's speed says nothing: no MFU either
    assert plan.emulation_note == (
        f"{recipe} emulated on {caps.device_type} ({caps.device_name}), which has no fp8 GEMMs: its loss forecasts "
        "fp8's, its speed says nothing about fp8's"
    )
    assert PrecisionPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan  # as a launcher hands it on


def test_emulation_still_needs_torchao():
    plan = resolve_precision("fp8-rowwise", CPU_SLOW_FP16, emulate_fp8=True)
    assert plan.effective == "bf16-mixed" and not plan.emulated
    assert plan.fallback_reason == "fp8 training needs torchao (pip install torchao); it is not installed"


def test_fp8_options_leave_every_other_precision_as_it_was():
    for name in ("fp32", "bf16-mixed", "bf16-true"):
        plan = resolve_precision(name, CPU_WITH_TORCHAO, emulate_fp8=True, fp8_layers="all")
        assert plan == resolve_precision(name, CPU_WITH_TORCHAO)
        assert plan.fp8_layers is None and plan.fp8_recipe is None and not plan.emulated


def test_a_bad_fp8_layers_value_is_refused_naming_it():
    with pytest.raises(ValueError, match="invalid fp8_layers 'auto,all'"):
        resolve_precision("fp8-rowwise", HOPPER, fp8_layers="auto,all")


@pytest.mark.slow  # importing torchao takes seconds
@pytest.mark.skipif(not TORCHAO, reason="needs torchao (the fp8 extra)")
def test_an_fp8_runs_mfu_is_stated_against_the_bf16_and_the_mixed_peak_and_not_when_emulated():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    plan = resolve_precision("fp8-rowwise", HOPPER, fp8_layers="all")
    layers = plan.fp8_recipe.plan(model)
    flops = 2 * layers.fp8_flops_per_row  # half the FLOPs of an item in fp8 GEMMs
    mfu = plan.mixed_mfu(layers, items_per_s=1e9, flops_per_item=flops)
    achieved = 1e9 * flops / 1e12
    assert mfu.mfu_vs_bf16_peak == pytest.approx(achieved / 989.0)
    assert mfu.fp8_flop_share == pytest.approx(0.5)
    assert mfu.mfu_vs_mixed_peak == pytest.approx(achieved / (2 / (1 / 1979.0 + 1 / 989.0)))
    emulated = resolve_precision("fp8-rowwise", CPU_WITH_TORCHAO, emulate_fp8=True)
    assert emulated.mixed_mfu(layers, 1e9, flops) is None
    assert resolve_precision("bf16-mixed", HOPPER).mixed_mfu(None, 1e9, flops) is None
    assert replace(plan, device_name="NVIDIA A100").mixed_mfu(layers, 1e9, flops) is None  # no fp8 peak known


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
        ("fp8-tensorwise", torch.bfloat16, torch.float32, False),
        ("fp8-rowwise", torch.bfloat16, torch.float32, False),
        ("fp8-rowwise-gw-hp", torch.bfloat16, torch.float32, False),
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
    assert fp32["gather_dtype"] is None and fp32["reduce_dtype"] is None and fp32["parallelism"] == "none"


@pytest.mark.parametrize(
    "precision,parallelism,reduce,gather,reduced",
    [
        ("bf16-mixed", "fsdp", "fp32", "bfloat16", "fp32"),
        ("fp16-mixed", "fsdp", "fp16", "float16", "fp16"),
        ("bf16-true", "fsdp", "bf16", None, "bf16"),
        ("fp32", "fsdp", "fp32", None, "fp32"),
        ("bf16-true", "ddp", "fp32", None, "bf16"),
    ],
)
def test_plan_to_dict_names_the_gather_and_reduce_dtypes_as_plain_strings(
    precision, parallelism, reduce, gather, reduced
):
    plan = resolve_precision(precision, Capabilities(fp16_fast=True), parallelism=parallelism, reduce_dtype=reduce)
    d = plan.to_dict()
    assert (d["parallelism"], d["gather_dtype"], d["reduce_dtype"]) == (parallelism, gather, reduced)
    assert json.loads(json.dumps(d)) == d  # what the result JSON holds


# --- the plan's behaviour: autocast -------------------------------------------------------------

# Written out independently of the plan's fields: what each precision runs its matmuls and parameters in.
AUTOCAST_DTYPE = {"fp16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "fp8-tensorwise": torch.bfloat16,
                  "fp8-rowwise": torch.bfloat16, "fp8-rowwise-gw-hp": torch.bfloat16}  # fmt: skip
PARAM_DTYPE = {"fp16-true": torch.float16, "bf16-true": torch.bfloat16}
FAMILY = {"fp32": "fp32", "tf32": "tf32", "fp16-mixed": "fp16", "bf16-mixed": "bf16", "fp16-true": "fp16",
          "bf16-true": "bf16", "fp8-tensorwise": "fp8", "fp8-rowwise": "fp8", "fp8-rowwise-gw-hp": "fp8"}  # fmt: skip


def native_plan(name: str) -> PrecisionPlan:
    """`name` as an H100 runs it (every precision is native there)."""
    plan = resolve_precision(name, HOPPER)
    assert plan.effective == name
    return plan


def cpu_plan(name: str) -> PrecisionPlan:
    """The H100's plan for `name`, pointed at this CPU, so its autocast really runs here."""
    return replace(native_plan(name), device_type="cpu", device_name=CPU_FAST_FP16.device_name)


@pytest.mark.parametrize("name", CANONICAL)
def test_autocast_is_on_in_the_plans_dtype_for_mixed_precisions_only(name):
    plan = cpu_plan(name)
    x = torch.ones(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autocast to float32 is unsupported" warning: disabled means disabled
        with plan.autocast():
            on, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
            out = x @ x
    assert on is (name in AUTOCAST_DTYPE)  # the mixed precisions, and fp8's recipes inside bf16 autocast
    if on:
        assert dtype == AUTOCAST_DTYPE[name]
    assert out.dtype == AUTOCAST_DTYPE.get(name, torch.float32)
    assert not torch.is_autocast_enabled("cpu")  # and off again after


def test_autocast_targets_the_plans_device_type():
    for name in CANONICAL:
        plan = native_plan(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a CUDA autocast made where there is no CUDA warns (and disables itself)
            context = plan.autocast()
        assert context.device == "cuda"
        assert context.fast_dtype == AUTOCAST_DTYPE.get(name, torch.float32)
    assert resolve_precision("bf16-mixed", CPU_SLOW_FP16).autocast().device == "cpu"


# --- the plan's behaviour: inputs ---------------------------------------------------------------


@pytest.mark.parametrize("name", CANONICAL)
def test_convert_input_casts_float_tensors_to_the_parameter_dtype(name):
    plan = native_plan(name)
    param_dtype = PARAM_DTYPE.get(name, torch.float32)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.tensor([[1.5, -2.0]], dtype=dtype)
        out = plan.convert_input(x)
        assert out.dtype == param_dtype
        assert torch.equal(out.double(), x.double())  # the values survive (these are exact in every dtype)
        if dtype == param_dtype:
            assert out is x  # no copy when the dtype is already right


@pytest.mark.parametrize("name", ["fp32", "bf16-true", "fp16-true", "fp16-mixed"])
def test_convert_input_passes_integer_tensors_and_non_tensors_through(name):
    plan = native_plan(name)
    tokens = torch.tensor([[3, 1, 2]])
    for x in (tokens, tokens.int(), torch.tensor([True]), torch.tensor([7], dtype=torch.uint8)):
        assert plan.convert_input(x) is x
    float_pair = (torch.ones(2), torch.ones(2))  # a container is not looked into
    for x in (float_pair, [1.5], {"x": torch.ones(1)}, 1.5, None, "text"):
        assert plan.convert_input(x) is x


# --- the plan's behaviour: the model ------------------------------------------------------------


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("name", [n for n in CANONICAL if not n.startswith("fp8")])
def test_prepare_model_puts_the_model_on_the_device_in_the_parameter_dtype(name):
    model = small_model()
    prepared = native_plan(name).prepare_model(model, torch.device("meta"))  # meta: a device this machine has
    assert prepared is model  # moved in place, not wrapped
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {PARAM_DTYPE.get(name, torch.float32)}
    bn = model[1]
    assert bn.running_mean.device.type == "meta" and bn.running_mean.dtype == PARAM_DTYPE.get(name, torch.float32)
    assert bn.num_batches_tracked.dtype == torch.long  # integer buffers keep their dtype


def test_prepare_model_does_not_compile_unless_asked():
    model = torch.nn.Linear(4, 4)
    plan = resolve_precision("bf16-true", CPU_SLOW_FP16)
    assert plan.prepare_model(model, torch.device("cpu")) is model  # the default: no compile
    assert plan.prepare_model(model, torch.device("cpu"), compile=False) is model



@pytest.mark.skipif(TORCHAO, reason="checks the failure where torchao is missing")
def test_an_fp8_plan_does_not_train_silently_without_fp8_where_torchao_is_missing():
    with pytest.raises(ModuleNotFoundError, match="torchao"):
        native_plan("fp8-tensorwise").prepare_model(torch.nn.Linear(16, 16), torch.device("cpu"))


@pytest.mark.slow  # importing torchao takes seconds
@pytest.mark.skipif(not TORCHAO, reason="needs torchao (the fp8 extra)")
def test_an_fp8_plan_swaps_the_linears_whose_sizes_are_multiples_of_16_for_float8_ones():
    from torchao.float8.float8_linear import Float8Linear

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    plan = resolve_precision("fp8-tensorwise", HOPPER, fp8_layers="all")
    prepared, layers = plan.prepare(model, torch.device("cpu"), tokens_per_step=64)
    assert isinstance(prepared[0], Float8Linear)
    assert type(prepared[2]) is torch.nn.Linear  # 8 outputs: fp8 matmuls want multiples of 16
    assert {p.dtype for p in prepared.parameters()} == {torch.float32}  # master weights stay fp32
    assert layers.fp8_fqns == ("0",) and layers.high_precision_fqns == ("2",) and layers.tokens_per_step == 64
    assert "dims not multiples of 16" in layers.decisions[1].reason


@pytest.mark.slow  # importing torch._dynamo takes seconds
def test_prepare_model_compiles_when_asked():
    model = torch.nn.Linear(4, 4)
    plan = resolve_precision("bf16-true", CPU_SLOW_FP16)
    compiled = plan.prepare_model(model, torch.device("cpu"), compile=True)  # lazy: nothing compiles until called
    assert compiled is not model and compiled._orig_mod is model
    assert model.weight.dtype == torch.bfloat16  # converted before it was wrapped


# --- the plan's behaviour: TF32 -----------------------------------------------------------------

FLAG_STATES = [(False, False), (True, True), (True, False), (False, True)]


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def set_tf32_flags(flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def saved_tf32_flags():
    saved = tf32_flags()
    yield
    set_tf32_flags(saved)


@pytest.mark.parametrize("name", CANONICAL)
def test_tf32_scope_turns_tf32_on_exactly_for_tf32_and_restores_both_flags(saved_tf32_flags, name):
    plan = native_plan(name)
    for before in FLAG_STATES:
        set_tf32_flags(before)
        with plan.tf32_scope():
            assert tf32_flags() == (name == "tf32", name == "tf32"), before
        assert tf32_flags() == before


def test_tf32_scope_restores_the_flags_even_on_an_exception(saved_tf32_flags):
    for name in ("tf32", "fp32"):
        for before in FLAG_STATES:
            set_tf32_flags(before)
            with pytest.raises(RuntimeError, match="inside"), native_plan(name).tf32_scope():
                assert tf32_flags() == (name == "tf32", name == "tf32")
                raise RuntimeError("inside")
            assert tf32_flags() == before


def test_tf32_falls_back_to_fp32_so_the_scope_leaves_tf32_off(saved_tf32_flags):
    set_tf32_flags((True, True))
    with resolve_precision("tf32", TURING).tf32_scope():
        assert tf32_flags() == (False, False)


# --- the plan's behaviour: peak FLOPs -----------------------------------------------------------


def test_family_is_the_precision_without_its_mode():
    assert set(FAMILY) == set(CANONICAL)
    for name in CANONICAL:
        assert native_plan(name).family == FAMILY[name]


def test_peak_tflops_by_gpu_name_and_family():
    h100 = replace(HOPPER, device_name="NVIDIA H100 80GB HBM3")
    # NVIDIA's dense (no sparsity) peaks, written out: the table and the plan both give them
    for name, peak in [("fp32", 67.0), ("tf32", 494.0), ("bf16-mixed", 989.0), ("fp16-mixed", 989.0),
                       ("bf16-true", 989.0), ("fp16-true", 989.0), ("fp8-rowwise", 1979.0)]:  # fmt: skip
        plan = resolve_precision(name, h100)
        assert plan.peak_tflops == peak == PEAK_TFLOPS["H100"][FAMILY[name]]
    a100 = replace(AMPERE, device_name="NVIDIA A100-SXM4-40GB")
    assert resolve_precision("bf16", a100).peak_tflops == PEAK_TFLOPS["A100"]["bf16"] == 312.0
    assert resolve_precision("tf32", a100).peak_tflops == 156.0
    assert resolve_precision("bf16", ADA).peak_tflops == PEAK_TFLOPS["L4"]["bf16"] == 121.0  # "NVIDIA L4"
    assert resolve_precision("fp8", replace(HOPPER, device_name="NVIDIA H200")).peak_tflops == 1979.0
    assert resolve_precision("bf16", Capabilities()).peak_tflops is None  # a CPU
    assert resolve_precision("fp16", TURING).peak_tflops is None  # a GPU the table does not know
    # a known GPU without a figure for the family: none rather than another family's
    assert replace(native_plan("fp8-tensorwise"), device_name="NVIDIA A100-PCIE-40GB").peak_tflops is None


@pytest.mark.parametrize("device_name", ["NVIDIA L40S", "NVIDIA L40", "NVIDIA RTX A1000", "NVIDIA H1000"])
def test_peak_tflops_does_not_mistake_a_longer_model_number_for_a_known_one(device_name):
    assert replace(native_plan("bf16-mixed"), device_name=device_name).peak_tflops is None


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


# --- on a real GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_probe_reads_the_real_gpu():
    caps = probe("cuda")
    assert caps.device_type == "cuda" and caps.compute_capability == torch.cuda.get_device_capability()
    assert caps.device_name == torch.cuda.get_device_name()
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda", 0)
    assert probe("cuda:0") == probe("auto") == caps
    if caps.cc_at_least(8, 0):
        assert {"fp32", "tf32", "fp16-mixed", "bf16-mixed"} <= set(native_precisions(caps))


@pytest.mark.gpu
def test_a_cuda_plan_runs_its_model_and_matmuls_on_the_gpu_in_its_dtypes():
    caps = probe("cuda")
    for name in ("fp32", "fp16-mixed", "bf16-mixed", "bf16-true"):
        plan = resolve_precision(name, caps)
        model = plan.prepare_model(torch.nn.Linear(8, 8), torch.device("cuda"))
        assert model.weight.is_cuda and model.weight.dtype == plan.param_dtype
        with plan.autocast():
            out = model(plan.convert_input(torch.ones(2, 8, device="cuda")))
        assert out.dtype == (plan.autocast_dtype or plan.param_dtype), name


@pytest.mark.gpu
def test_tf32_is_on_during_a_tf32_run_and_restored_after(tiny_config, saved_tf32_flags):
    from amp_lib.train import train

    class Flags:  # a RunObserver: on_log runs inside the training loop
        def __init__(self):
            self.seen = []

        def on_start(self, config, plan): ...

        def on_log(self, rows, items_per_step):
            self.seen.append(tf32_flags())

        def on_eval(self, row): ...

        def on_end(self, result): ...

    set_tf32_flags((False, True))
    observer = Flags()
    result = train(
        tiny_config(precision="tf32", device="cuda", steps=3, timing_warmup_steps=1, log_every=1), [observer]
    )
    assert result.status == "ok", result.error
    on = result.plan.effective == "tf32"  # an Ampere or newer GPU
    assert observer.seen == [(on, on)] * 3
    assert tf32_flags() == (False, True)


# --- under DDP and FSDP2: what parameters are gathered in and gradients reduced in -------------------


def test_ddp_reduces_gradients_in_their_own_dtype() -> None:
    caps = Capabilities(fp16_fast=True)
    assert resolve_precision("bf16-mixed", caps, parallelism="ddp").reduce_dtype == torch.float32
    plan = resolve_precision("bf16-true", caps, parallelism="ddp")
    assert (plan.reduce_dtype, plan.gather_dtype, plan.label) == (torch.bfloat16, None, "ddp bf16-true")
    single = resolve_precision("bf16-mixed", caps)
    assert (single.parallelism, single.reduce_dtype, single.label) == ("none", None, "bf16-mixed")


@pytest.mark.parametrize(
    "precision,reduce,gather,reduced,label",
    [
        ("fp32", "fp32", None, torch.float32, "fsdp fp32"),
        ("bf16-mixed", "fp32", torch.bfloat16, torch.float32, "fsdp bf16-mixed (reduce fp32)"),
        ("bf16-mixed", "bf16", torch.bfloat16, torch.bfloat16, "fsdp bf16-mixed (reduce bf16)"),
        ("fp16-mixed", "fp16", torch.float16, torch.float16, "fsdp fp16-mixed (reduce fp16)"),
        ("bf16-true", "fp32", None, torch.float32, "fsdp bf16-true (reduce fp32)"),
    ],
)
def test_fsdp_gathers_mixed_parameters_in_the_compute_dtype_and_reduces_in_the_chosen_one(
    precision: str, reduce: str, gather: torch.dtype | None, reduced: torch.dtype, label: str
) -> None:
    plan = resolve_precision(precision, Capabilities(fp16_fast=True), parallelism="fsdp", reduce_dtype=reduce)
    assert (plan.gather_dtype, plan.reduce_dtype, plan.label) == (gather, reduced, label)
    assert plan.param_dtype == resolve_precision(precision, Capabilities(fp16_fast=True)).param_dtype  # fp32 master
    assert plan.to_dict()["reduce_dtype"] == reduce and plan.fallback_reason is None


def test_a_reduce_dtype_follows_a_fallback_with_the_reason_and_a_misfit_is_refused() -> None:
    plan = resolve_precision("fp16-mixed", Capabilities(fp16_fast=False), parallelism="fsdp", reduce_dtype="fp16")
    assert plan.effective == "bf16-mixed" and plan.reduce_dtype == torch.bfloat16
    assert plan.fallback_reason.endswith(
        "; then gradients reduced in bf16 (not fp16): the precision runs as bf16-mixed"
    )
    with pytest.raises(ValueError, match="reduce_dtype='bf16' does not fit precision 'fp16-mixed'"):
        resolve_precision("fp16-mixed", Capabilities(fp16_fast=True), parallelism="fsdp", reduce_dtype="bf16")
    plain = resolve_precision("fp16-mixed", Capabilities(fp16_fast=True)).with_parallelism("fsdp", "fp16")
    assert plain.with_parallelism("none").label == "fp16-mixed" and plain.with_parallelism("none").reduce_dtype is None


def test_fsdp_gathers_fp8_parameters_in_bf16() -> None:
    # torchao's float8 linears cast to fp8 themselves; everything else computes in bf16
    plan = resolve_precision("fp8-mixed", HOPPER, parallelism="fsdp", reduce_dtype="bf16")
    assert (plan.gather_dtype, plan.reduce_dtype, plan.label) == (
        torch.bfloat16,
        torch.bfloat16,
        "fsdp fp8-tensorwise (reduce bf16)",
    )
    assert resolve_precision("fp8-mixed", HOPPER, parallelism="fsdp").gather_dtype == torch.bfloat16


@pytest.mark.parametrize("parallelism", ["none", "ddp"])
def test_leaving_fsdp_drops_its_gather_dtype(parallelism: str) -> None:
    fsdp = resolve_precision("bf16-mixed", Capabilities(), parallelism="fsdp", reduce_dtype="bf16")
    plan = fsdp.with_parallelism(parallelism)
    assert plan.gather_dtype is None and plan.parallelism == parallelism
    assert plan.reduce_dtype == (torch.float32 if parallelism == "ddp" else None)  # DDP: the fp32 parameters'
    assert plan == resolve_precision("bf16-mixed", Capabilities(), parallelism=parallelism)


def test_a_reduce_dtype_follows_the_precision_of_a_hand_made_plan_with_the_note_alone() -> None:
    # a plan built by hand (train(..., plan=...)) that runs bf16 for an fp16 request without saying why
    plan = replace(resolve_precision("fp16-mixed", CPU_SLOW_FP16), fallback_reason=None)
    fsdp = plan.with_parallelism("fsdp", "fp16")
    assert fsdp.reduce_dtype == torch.bfloat16
    assert fsdp.fallback_reason == "gradients reduced in bf16 (not fp16): the precision runs as bf16-mixed"
