"""amp_lib.fp8: torchao's fp8 recipes as precisions, the layer plan (which linears run in fp8 and why), the
conversion, emulated fp8 training on this CPU, and the MFU of a mixed run. Real torchao throughout."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torchao.float8 import Float8LinearConfig, ScalingGranularity, ScalingType, _auto_filter_for_recipe
from torchao.float8.float8_linear import Float8Linear

from amp_lib.fp8 import (
    DEFAULT_FP8,
    FP8_RECIPES,
    MFU_LABELS,
    Fp8Recipe,
    LayerPlan,
    LayerSelection,
    mixed_mfu,
    mixed_peak_tflops,
    parse_fp8_layers,
    parse_fp8_precision,
)
from amp_lib.models import GPT, GPTConfig, lm_loss


def small_gpt(vocab: int = 64) -> GPT:
    """gpt-tiny's shape with a 64-token vocabulary: every linear (lm_head too) has dims that are multiples of 16."""
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=vocab, block_size=32))


BLOCK_LINEARS = ("qkv", "proj", "mlp.0", "mlp.2")
ALL_LINEARS = tuple(f"blocks.{b}.{n}" for b in (0, 1) for n in BLOCK_LINEARS) + ("lm_head",)


# --- recipe names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("fp8-tensorwise", "fp8-tensorwise"),
        ("FP8-Rowwise", "fp8-rowwise"),
        (" fp8-rowwise-gw-hp ", "fp8-rowwise-gw-hp"),
        ("fp8-mixed", DEFAULT_FP8),
        ("fp8", DEFAULT_FP8),
    ],
)
def test_fp8_precision_names_and_aliases_resolve_to_a_recipe(spelling, canonical):
    assert parse_fp8_precision(spelling) == canonical


def test_fp8_mixed_is_an_alias_of_tensorwise_what_it_ran_before():
    """fp8-mixed used torchao's default config: the alias keeps that meaning (and the results comparable)."""
    assert DEFAULT_FP8 == "fp8-tensorwise"
    assert Fp8Recipe.from_values("fp8-mixed").config() == Float8LinearConfig()


@pytest.mark.parametrize("bad", ["fp8-blockwise", "bf16-mixed", "", None, 8])
def test_an_unknown_fp8_precision_is_one_value_error_listing_the_recipes(bad):
    with pytest.raises(ValueError, match=r"invalid fp8 precision .*fp8-tensorwise, fp8-rowwise, fp8-rowwise-gw-hp"):
        parse_fp8_precision(bad)


@pytest.mark.parametrize("precision", list(FP8_RECIPES))
@pytest.mark.parametrize("emulate", [False, True])
def test_each_recipe_is_torchaos_named_recipe_with_the_emulate_flag(precision, emulate):
    config = Fp8Recipe.from_values(precision, emulate=emulate).config()
    expected = Float8LinearConfig.from_recipe_name(FP8_RECIPES[precision])
    assert config.emulate is emulate
    assert config.cast_config_input == expected.cast_config_input
    assert config.cast_config_input_for_grad_weight == expected.cast_config_input_for_grad_weight
    assert config.cast_config_grad_output == expected.cast_config_grad_output
    assert config.round_scales_to_power_of_2 == expected.round_scales_to_power_of_2


def test_emulate_must_be_a_bool():
    with pytest.raises(ValueError, match="emulate_fp8='yes' must be True or False"):
        Fp8Recipe.from_values("fp8-rowwise", emulate="yes")


# --- fp8_layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "base", "patterns", "canonical"),
    [
        ("auto", "auto", (), "auto"),
        (" ALL ", "all", (), "all"),
        ("lm_head,blocks.0.*", "all", ("lm_head", "blocks.0.*"), "lm_head,blocks.0.*"),
        ("all, lm_head", "all", ("lm_head",), "lm_head"),
        ("auto,lm_head,lm_head", "auto", ("lm_head",), "auto,lm_head"),
    ],
)
def test_fp8_layers_parses_to_a_base_rule_and_patterns_kept_in_high_precision(text, base, patterns, canonical):
    selection = parse_fp8_layers(text)
    assert (selection.base, selection.keep_high, str(selection)) == (base, patterns, canonical)
    assert parse_fp8_layers(str(selection)) == selection


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("", "invalid fp8_layers ''"),
        ("auto,all", "not both"),
        ("lm head", "bad pattern 'lm head'"),
        ("lm_head,,blocks.0", "bad pattern ''"),
        (None, "invalid fp8_layers None"),
    ],
)
def test_a_bad_fp8_layers_value_is_one_value_error_naming_it_and_the_valid_forms(bad, why):
    with pytest.raises(ValueError, match=r"valid: 'auto' .*'all' .*module-name patterns") as info:
        parse_fp8_layers(bad)
    assert why in str(info.value)
    assert "\n" not in str(info.value)


# --- the layer plan -------------------------------------------------------------------------------


def test_all_puts_every_linear_with_dims_multiple_of_16_in_fp8_and_says_why_not_for_the_others():
    model = small_gpt(vocab=65)  # lm_head is 64 -> 65
    plan = Fp8Recipe.from_values("fp8-rowwise", "all", emulate=True).plan(model)
    assert plan.fp8_fqns == ALL_LINEARS[:-1]
    (head,) = [d for d in plan.decisions if d.fqn == "lm_head"]
    assert (head.fp8, head.in_features, head.out_features) == (False, 64, 65)
    assert head.reason == "dims not multiples of 16 (K=64, N=65): fp8 GEMMs need both to be"


def test_fp8_layers_keeps_exactly_the_named_modules_in_high_precision_after_conversion():
    recipe = Fp8Recipe.from_values("fp8-tensorwise", "lm_head,blocks.0.*", emulate=True)
    model, plan = recipe.convert(small_gpt())
    kept = {f"blocks.0.{n}" for n in BLOCK_LINEARS} | {"lm_head"}
    assert set(plan.high_precision_fqns) == kept
    linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {fqn for fqn, m in linears.items() if not isinstance(m, Float8Linear)} == kept
    assert {fqn for fqn, m in linears.items() if isinstance(m, Float8Linear)} == set(ALL_LINEARS) - kept
    reasons = {d.fqn: d.reason for d in plan.decisions}
    assert reasons["lm_head"] == "kept in high precision by pattern 'lm_head'"
    assert reasons["blocks.0.qkv"] == "kept in high precision by pattern 'blocks.0.*'"
    assert model.lm_head.weight is model.wte.weight  # weight tying survives


def test_a_pattern_naming_a_module_keeps_every_linear_inside_it():
    plan = Fp8Recipe.from_values("fp8-rowwise", "blocks.1", emulate=True).plan(small_gpt())
    assert set(plan.high_precision_fqns) == {f"blocks.1.{n}" for n in BLOCK_LINEARS}


def test_a_pattern_that_names_no_linear_is_a_value_error_listing_the_linears():
    with pytest.raises(ValueError, match=r"pattern 'lm_haed' names no linear layer .*its linears: blocks\.0\.qkv, "):
        Fp8Recipe.from_values("fp8-rowwise", "lm_head,lm_haed").plan(small_gpt())


# (K, N) shapes on both sides of torchao's thresholds for each recipe.
SHAPES = [(64, 64), (100, 4096), (1024, 2048), (1024, 8192), (2048, 4096), (4096, 1024), (4096, 4096), (8192, 1024)]


@pytest.mark.parametrize("precision", list(FP8_RECIPES))
def test_auto_decides_as_torchaos_own_filter_on_a_table_of_shapes(precision):
    with torch.device("meta"):  # shapes only: no memory for an 8192 x 1024 weight
        model = nn.ModuleDict({f"l{k}x{n}": nn.Linear(k, n) for k, n in SHAPES})
    plan = Fp8Recipe.from_values(precision, "auto").plan(model, tokens_per_step=4096)
    # torchao has no rule of its own for rowwise_with_gw_hp: its rowwise rule decides
    rule = {"fp8-rowwise-gw-hp": "rowwise"}.get(precision, FP8_RECIPES[precision])
    torchao_filter = _auto_filter_for_recipe(rule, filter_fqns=[])
    decided = {d.fqn: d.fp8 for d in plan.decisions}
    assert decided == {fqn: torchao_filter(m, fqn) for fqn, m in model.items()}
    assert len(set(decided.values())) == 2, "the table must have shapes on both sides of the thresholds"
    assert plan.auto_rule == rule and plan.tokens_per_step == 4096
    assert "4096 tokens per step" in plan.summary
    below = next(d for d in plan.decisions if not d.fp8 and d.in_features % 16 == 0)
    assert below.reason.startswith(f"auto: K={below.in_features}, N={below.out_features} below torchao's thresholds")


def test_the_plan_serialises_to_plain_json_and_back():
    plan = Fp8Recipe.from_values("fp8-rowwise-gw-hp", "auto,lm_head", emulate=True).plan(small_gpt(), 512)
    text = json.dumps(plan.to_dict())
    assert LayerPlan.from_dict(json.loads(text)) == plan
    row = json.loads(text)["decisions"][0]
    assert set(row) == {"fqn", "in_features", "out_features", "fp8", "reason"}


def test_fp8_flops_count_the_gemms_the_recipe_runs_in_fp8():
    """gw-hp keeps the grad-weight GEMM in high precision: two of three GEMMs of each linear are fp8."""
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 32), nn.Linear(32, 8))
    flops = {}
    for precision in FP8_RECIPES:
        plan = Fp8Recipe.from_values(precision, "all").plan(model)
        flops[precision] = plan.fp8_flops_per_row
    linear = 2 * (64 * 128 + 128 * 32)  # the 32 -> 8 linear is not eligible
    assert flops == {"fp8-tensorwise": 3 * linear, "fp8-rowwise": 3 * linear, "fp8-rowwise-gw-hp": 2 * linear}


# --- emulated fp8 training on this CPU ------------------------------------------------------------


def train_steps(model: nn.Module, steps: int = 6, device: str = "cpu") -> list[float]:
    """`steps` AdamW steps on one fixed batch under bf16 autocast, fp32 parameters (the amp_lib fp8 plan)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 32), generator=gen).to(device)
    y = torch.randint(0, 64, (4, 32), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = lm_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


EXPECTED_SCALING = {
    # recipe: (input and weight granularity for the forward GEMM, grad-weight input scaling type)
    "fp8-tensorwise": (ScalingGranularity.TENSORWISE, ScalingType.DYNAMIC),
    "fp8-rowwise": (ScalingGranularity.AXISWISE, ScalingType.DYNAMIC),
    "fp8-rowwise-gw-hp": (ScalingGranularity.AXISWISE, ScalingType.DISABLED),
}


@pytest.mark.parametrize("precision", list(FP8_RECIPES))
def test_each_recipe_emulated_trains_under_bf16_autocast_with_fp32_parameters(precision):
    model, plan = Fp8Recipe.from_values(precision, "all", emulate=True).convert(small_gpt())
    assert plan.fp8_fqns == ALL_LINEARS
    granularity, grad_weight_scaling = EXPECTED_SCALING[precision]
    for fqn in ALL_LINEARS:
        module = model.get_submodule(fqn)
        assert type(module) is Float8Linear
        assert module.config.emulate is True
        assert module.config.cast_config_input.scaling_granularity is granularity
        assert module.config.cast_config_weight.scaling_granularity is granularity
        assert module.config.cast_config_input_for_grad_weight.scaling_type is grad_weight_scaling
    losses = train_steps(model)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_torchao_alone_fails_rowwise_gw_hp_under_cpu_autocast_which_convert_fixes():
    """torchao's Float8Linear casts its input only under CUDA autocast: on a CPU the grad-weight GEMM of
    rowwise_with_gw_hp meets a bf16 gradient and an fp32 input. When torchao fixes that, this test says so."""
    from torchao.float8 import convert_to_float8_training

    config = Fp8Recipe.from_values("fp8-rowwise-gw-hp", emulate=True).config()
    bare = convert_to_float8_training(small_gpt(), config=config)
    with pytest.raises(RuntimeError, match="expected m1 and m2 to have the same dtype"):
        train_steps(bare, steps=1)
    model, _ = Fp8Recipe.from_values("fp8-rowwise-gw-hp", "all", emulate=True).convert(small_gpt())
    assert math.isfinite(train_steps(model, steps=1)[0])


@pytest.mark.parametrize("precision", list(FP8_RECIPES))
def test_emulated_linears_compute_with_fp8_rounding(precision):
    """The converted linear's output differs from the bf16 one by fp8's rounding: e4m3 keeps 3 mantissa bits."""
    torch.manual_seed(0)
    reference = nn.Linear(256, 256)
    x = torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x).float()
    model, _ = Fp8Recipe.from_values(precision, "all", emulate=True).convert(nn.Sequential(reference))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x).float()
    relative = ((got - expected).norm() / expected.norm()).item()
    assert 5e-3 < relative < 0.1, relative


# --- MFU of a mixed run ---------------------------------------------------------------------------


def test_the_mixed_peak_weighs_each_dtypes_flops_by_its_own_peak():
    # 3 FLOPs at 2000 TFLOP/s and 1 at 1000: 4 FLOPs in 3/2000 + 1/1000 = 2.5e-3 units -> 1600
    assert mixed_peak_tflops({"fp8": 3.0, "bf16": 1.0}, {"fp8": 2000.0, "bf16": 1000.0}) == pytest.approx(1600.0)
    assert mixed_peak_tflops({"fp8": 0.0, "bf16": 5.0}, {"bf16": 989.0}) == pytest.approx(989.0)


def test_an_fp8_runs_mfu_is_stated_against_both_peaks_and_labelled():
    peaks = {"bf16": 989.0, "fp8": 1979.0}
    mfu = mixed_mfu(items_per_s=1e5, flops_per_item=1e9, fp8_flops_per_item=6e8, peak_tflops=peaks)
    achieved = 1e5 * 1e9 / 1e12  # 100 TFLOP/s
    assert mfu.mfu_vs_bf16_peak == pytest.approx(achieved / 989.0)
    assert mfu.mixed_peak_tflops == pytest.approx(1e9 / (6e8 / 1979.0 + 4e8 / 989.0))
    assert mfu.mfu_vs_mixed_peak == pytest.approx(achieved / mfu.mixed_peak_tflops)
    assert mfu.mfu_vs_bf16_peak > mfu.mfu_vs_mixed_peak  # the mixed peak is higher
    assert mfu.fp8_flop_share == pytest.approx(0.6)
    assert set(MFU_LABELS) <= set(mfu.to_dict())
    two = mixed_mfu(1e5, 1e9, 6e8, peaks, devices=2)
    assert two.mfu_vs_bf16_peak == pytest.approx(mfu.mfu_vs_bf16_peak / 2)


@pytest.mark.parametrize(
    ("fp8_flops", "peaks", "match"),
    [
        (2e9, {"bf16": 989.0, "fp8": 1979.0}, "must lie in"),
        (5e8, {"bf16": 989.0}, "needs the bf16 and fp8 peaks"),
    ],
)
def test_mixed_mfu_refuses_impossible_inputs(fp8_flops, peaks, match):
    with pytest.raises(ValueError, match=match):
        mixed_mfu(1e5, 1e9, fp8_flops, peaks)


def test_layer_selection_default_is_auto():
    assert LayerSelection() == parse_fp8_layers("auto")
    assert Fp8Recipe().layers.base == "auto"


# --- on a real GPU ------------------------------------------------------------------------------------


def needs_fp8_gpu() -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 GEMMs need compute capability 8.9+ (Ada, Hopper)")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", list(FP8_RECIPES))
def test_on_a_gpu_each_recipe_trains_with_fp8_gemms(precision):
    needs_fp8_gpu()
    model, plan = Fp8Recipe.from_values(precision, "all").convert(small_gpt().cuda())
    assert plan.fp8_fqns == ALL_LINEARS and not plan.emulate
    losses = train_steps(model, device="cuda")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.2, losses


@pytest.mark.gpu
def test_on_a_gpu_torchao_alone_runs_rowwise_gw_hp_under_bf16_autocast_with_fp32_parameters():
    """Under CUDA autocast torchao casts the input itself: the failure it has under CPU autocast is CPU-only."""
    from torchao.float8 import convert_to_float8_training

    needs_fp8_gpu()
    bare = convert_to_float8_training(
        small_gpt().cuda(), config=Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")
    )
    assert math.isfinite(train_steps(bare, steps=2, device="cuda")[-1])
