"""fp8 training with torchao: the recipes as precisions, which linears run in fp8 and why, the conversion,
and the MFU of a run whose GEMMs ran in two dtypes.

An `Fp8Recipe` is decided once (precision, layer selection, emulation) and knows how to plan and convert a
model, as torchtitan's float8 converter does. The layer plan is a typed record with one decision per
`nn.Linear` (its fqn, K = in_features, N = out_features, fp8 or not, and why) that serialises to plain JSON.

`fp8-mixed` is an alias of `fp8-tensorwise`: it is what `fp8-mixed` ran before the recipes had names (so
earlier results stay comparable), the default of torchao's `Float8LinearConfig()` and of torchtitan (whose
`recipe_name` defaults to None, i.e. tensorwise), and torchao's fastest recipe. `fp8-rowwise` and
`fp8-rowwise-gw-hp` trade speed for accuracy and are asked for by name.

torchao's `Float8Linear.forward` casts its input to the autocast dtype only under CUDA autocast
(`torch.is_autocast_enabled()` reads the CUDA state). Under CPU autocast the input stays fp32 while the
output comes back bf16, and `rowwise_with_gw_hp`, whose grad-weight GEMM runs in high precision on the saved
input and the incoming gradient, then fails in backward ("expected m1 and m2 to have the same dtype"). On a
GPU under bf16 autocast (or with bf16 parameters, as torchtitan's FSDP runs it) the two agree and the recipe
runs. `convert` adds the same cast for the autocast of the input's own device, so every recipe runs, and
emulated fp8 on a CPU rounds its inputs as a GPU run does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torchao.float8 import Float8LinearConfig

# Canonical fp8 precision -> torchao's recipe name (`Float8LinearConfig.from_recipe_name`).
FP8_RECIPES: dict[str, str] = {
    "fp8-tensorwise": "tensorwise",
    "fp8-rowwise": "rowwise",
    "fp8-rowwise-gw-hp": "rowwise_with_gw_hp",
}
DEFAULT_FP8 = "fp8-tensorwise"  # what fp8-mixed means (see the module docstring for why)
FP8_ALIASES: dict[str, str] = {"fp8-mixed": DEFAULT_FP8, "fp8": DEFAULT_FP8, **{name: name for name in FP8_RECIPES}}
# torchao has no auto rule for rowwise_with_gw_hp (its filter raises NotImplementedError): its forward and
# grad-input GEMMs are rowwise ones, so the rowwise rule decides, and the plan says so.
AUTO_RULE: dict[str, str] = {"tensorwise": "tensorwise", "rowwise": "rowwise", "rowwise_with_gw_hp": "rowwise"}
LAYER_BASES: tuple[str, ...] = ("auto", "all")
GEMMS: tuple[str, ...] = ("output", "grad_input", "grad_weight")  # the three GEMMs of a linear's training step
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
_LAYERS_HELP = (
    "'auto' (torchao's rule for the recipe), 'all' (every linear whose dims are multiples of 16), or a comma list "
    "of module-name patterns to keep in high precision (e.g. 'lm_head,blocks.0.*'; '+' separates them too, as a "
    "sweep's -p needs), optionally after 'auto'"
)


def parse_fp8_precision(value: Any) -> str:
    """The canonical fp8 precision (`fp8-tensorwise`, `fp8-rowwise`, `fp8-rowwise-gw-hp`) for a name or alias."""
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in FP8_ALIASES:
        valid = ", ".join([*FP8_RECIPES, *(a for a in FP8_ALIASES if a not in FP8_RECIPES)])
        raise ValueError(f"invalid fp8 precision {value!r}; valid values are: {valid}")
    return FP8_ALIASES[key]


@dataclass(frozen=True)
class LayerSelection:
    """Which linears may run in fp8: `base` ('auto' or 'all') minus those `keep_high` patterns name."""

    base: str = "auto"
    keep_high: tuple[str, ...] = ()

    def __str__(self) -> str:
        """The canonical spelling: 'auto', 'all', 'auto,lm_head', 'lm_head,blocks.0.*' ('all' implied)."""
        if self.base == "all" and self.keep_high:
            return ",".join(self.keep_high)
        return ",".join((self.base, *self.keep_high))

    def matching(self, fqn: str) -> str | None:
        """The first pattern that names `fqn` or a module it is inside (so 'blocks.0' keeps all of block 0)."""
        return next((p for p in self.keep_high if _names(p, fqn)), None)


def _names(pattern: str, fqn: str) -> bool:
    """Whether a glob pattern names the module `fqn` or one it is inside."""
    parts = fqn.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[: i + 1]), pattern) for i in range(len(parts)))


def parse_fp8_layers(text: Any) -> LayerSelection:
    """`fp8_layers` as a `LayerSelection` (items separated by ',' or '+'); a clear `ValueError` for anything else."""
    if isinstance(text, LayerSelection):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid fp8_layers {text!r}; valid: {_LAYERS_HELP}")
    items = [item.strip() for item in re.split(r"[,+]", text)]  # "+": a sweep's -p splits its values at commas
    bases = [item.lower() for item in items if item.lower() in LAYER_BASES]
    patterns = [item for item in items if item.lower() not in LAYER_BASES]
    if len(bases) > 1:
        raise ValueError(f"invalid fp8_layers {text!r}: name one of 'auto' or 'all', not both; valid: {_LAYERS_HELP}")
    bad = [p for p in patterns if not _PATTERN.fullmatch(p)]
    if bad:
        raise ValueError(f"invalid fp8_layers {text!r}: bad pattern {bad[0]!r}; valid: {_LAYERS_HELP}")
    return LayerSelection(bases[0] if bases else "all", tuple(dict.fromkeys(patterns)))


@dataclass(frozen=True)
class LinearDecision:
    """One `nn.Linear`: its name, K (in_features) and N (out_features), whether it runs in fp8, and why."""

    fqn: str
    in_features: int
    out_features: int
    fp8: bool
    reason: str


@dataclass(frozen=True)
class LayerPlan:
    """Every linear's decision for one recipe and layer selection, as the result file carries it."""

    precision: str  # fp8-tensorwise, fp8-rowwise or fp8-rowwise-gw-hp
    torchao_recipe: str
    fp8_layers: str  # the canonical selection
    emulate: bool
    fp8_gemms: tuple[str, ...]  # which of a converted linear's three GEMMs run in fp8 under this recipe
    decisions: tuple[LinearDecision, ...]
    auto_rule: str | None = None  # the torchao rule 'auto' applied (None: not auto)
    # Rows of each linear's GEMM in one forward on one device (the tokens of a micro-batch): torchao's auto
    # thresholds were set on an H100 at large row counts, so this says how far this run is from them.
    tokens_per_step: int | None = None

    @property
    def fp8_fqns(self) -> tuple[str, ...]:
        return tuple(d.fqn for d in self.decisions if d.fp8)

    @property
    def high_precision_fqns(self) -> tuple[str, ...]:
        return tuple(d.fqn for d in self.decisions if not d.fp8)

    @property
    def fp8_flops_per_row(self) -> float:
        """Training FLOPs per input row (token or sample) spent in fp8 GEMMs: 2·K·N for each of the recipe's
        fp8 GEMMs of each converted linear (a linear applied several times per row counts once)."""
        return float(sum(2 * d.in_features * d.out_features for d in self.decisions if d.fp8) * len(self.fp8_gemms))

    @property
    def summary(self) -> str:
        """One line for a log or a report: '3 of 9 linears in fp8 (fp8-rowwise, auto by torchao's rowwise rule; ...)'."""
        how = f"auto by torchao's {self.auto_rule} rule" if self.auto_rule else f"fp8_layers={self.fp8_layers}"
        tokens = f"; {self.tokens_per_step} tokens per step" if self.tokens_per_step else ""
        emulated = ", emulated" if self.emulate else ""
        return (
            f"{len(self.fp8_fqns)} of {len(self.decisions)} linears in fp8 ({self.precision}{emulated}, {how}{tokens})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fp8_gemms"] = list(self.fp8_gemms)
        d["decisions"] = [dataclasses.asdict(x) for x in self.decisions]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        return cls(
            **{
                **d,
                "fp8_gemms": tuple(d["fp8_gemms"]),
                "decisions": tuple(LinearDecision(**x) for x in d["decisions"]),
            }
        )


def gemm_rows(inputs: Any) -> int | None:
    """The rows a model's linears multiply for one batch of `inputs`: B·T for token ids (B, T), every dim but the
    features for a float tensor (B, C) or (B, T, C); None for anything else."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        return None
    return inputs.numel() // inputs.shape[-1] if inputs.is_floating_point() else inputs.numel()


def fp8_gemms(config: Float8LinearConfig) -> tuple[str, ...]:
    """The GEMMs a torchao config runs in fp8: an operand cast with scaling DISABLED stays in high precision
    (rowwise_with_gw_hp's grad-weight GEMM)."""
    from torchao.float8 import ScalingType

    operand = {
        "output": config.cast_config_input,
        "grad_input": config.cast_config_grad_output,
        "grad_weight": config.cast_config_input_for_grad_weight,
    }
    return tuple(g for g in GEMMS if operand[g].scaling_type is not ScalingType.DISABLED)


@dataclass(frozen=True)
class Fp8Recipe:
    """An fp8 recipe decided once: the precision, which linears, and whether the GEMMs are emulated (torchao's
    `emulate=True`: the recipe's casts and scales, the matmul in fp32, so a machine without fp8 hardware can
    forecast fp8's loss; its timings say nothing about fp8's speed)."""

    precision: str = DEFAULT_FP8
    layers: LayerSelection = LayerSelection()
    emulate: bool = False

    @classmethod
    def from_values(cls, precision: Any = DEFAULT_FP8, fp8_layers: Any = "auto", emulate: bool = False) -> Fp8Recipe:
        """Parse and validate a run's values (`ValueError` naming the bad one)."""
        if not isinstance(emulate, bool):
            raise ValueError(f"emulate_fp8={emulate!r} must be True or False")  # noqa: TRY004 (a config value)
        return cls(parse_fp8_precision(precision), parse_fp8_layers(fp8_layers), emulate)

    @property
    def torchao_recipe(self) -> str:
        return FP8_RECIPES[self.precision]

    def config(self) -> Float8LinearConfig:
        """torchao's config for the recipe, with the emulate flag."""
        from torchao.float8 import Float8LinearConfig

        base = Float8LinearConfig.from_recipe_name(self.torchao_recipe)
        return dataclasses.replace(base, emulate=self.emulate) if self.emulate else base

    def plan(self, model: nn.Module, tokens_per_step: int | None = None) -> LayerPlan:
        """Each `nn.Linear`'s decision. 'auto' asks torchao's own filter (`_auto_filter_for_recipe`); a pattern
        that names no linear is a `ValueError` (a typo would otherwise run everything in fp8)."""
        linears = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear)]
        unused = [p for p in self.layers.keep_high if not any(_names(p, fqn) for fqn, _ in linears)]
        if unused:
            names = ", ".join(fqn or "(root)" for fqn, _ in linears) or "none"
            raise ValueError(
                f"fp8_layers pattern {unused[0]!r} names no linear layer of the model; its linears: {names}"
            )
        auto = None
        rule = AUTO_RULE[self.torchao_recipe] if self.layers.base == "auto" else None
        if rule is not None:
            from torchao.float8 import _auto_filter_for_recipe

            auto = _auto_filter_for_recipe(rule, filter_fqns=[])
        decisions = tuple(self._decide(fqn, m, auto, rule) for fqn, m in linears)
        return LayerPlan(
            precision=self.precision,
            torchao_recipe=self.torchao_recipe,
            fp8_layers=str(self.layers),
            emulate=self.emulate,
            fp8_gemms=fp8_gemms(self.config()),
            decisions=decisions,
            auto_rule=rule,
            tokens_per_step=tokens_per_step,
        )

    def _decide(self, fqn: str, module: nn.Linear, auto: Any, rule: str | None) -> LinearDecision:
        k, n = module.in_features, module.out_features
        if rule is not None and rule != self.torchao_recipe:
            rule = f"{rule}, its rule for {self.torchao_recipe} too"
        pattern = self.layers.matching(fqn)
        if pattern is not None:
            fp8, reason = False, f"kept in high precision by pattern {pattern!r}"
        elif k % 16 or n % 16:
            fp8, reason = False, f"dims not multiples of 16 (K={k}, N={n}): fp8 GEMMs need both to be"
        elif auto is None:
            fp8, reason = True, "eligible: dims multiples of 16"
        elif auto(module, fqn):
            fp8, reason = True, f"auto: K={k}, N={n} pass torchao's thresholds for {rule} (measured on an H100)"
        else:
            fp8, reason = False, f"auto: K={k}, N={n} below torchao's thresholds for {rule} (measured on an H100)"
        return LinearDecision(fqn, k, n, fp8, reason)

    def convert(self, model: nn.Module, tokens_per_step: int | None = None) -> tuple[nn.Module, LayerPlan]:
        """Swap the planned linears for torchao's `Float8Linear` (in place; a root linear is replaced) and
        return the model with its plan. Convert before DDP/FSDP wrapping and compile, as torchao does."""
        from torchao.float8 import convert_to_float8_training

        plan = self.plan(model, tokens_per_step)
        chosen = set(plan.fp8_fqns)
        if chosen:
            model = convert_to_float8_training(
                model, module_filter_fn=lambda _m, fqn: fqn in chosen, config=self.config()
            )
            for fqn, module in model.named_modules():
                if fqn in chosen:
                    module.register_forward_pre_hook(_input_in_autocast_dtype)
        return model, plan


def _input_in_autocast_dtype(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Cast a Float8Linear's input to the autocast dtype of its device, as torchao itself does under CUDA
    autocast only (see the module docstring): without it `rowwise_with_gw_hp` fails under CPU autocast."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            if x.dtype != dtype:
                return (x.to(dtype), *args[1:])
    return None


# -- MFU of a mixed run ------------------------------------------------------------------------------------

MFU_LABELS: dict[str, str] = {
    "mfu_vs_bf16_peak": "MFU against the bf16 dense peak",
    "mfu_vs_mixed_peak": "MFU against the mixed peak (fp8 peak for the GEMMs that ran in fp8, bf16 for the rest)",
}


def mixed_peak_tflops(flops_by_dtype: Mapping[str, float], peak_tflops: Mapping[str, float]) -> float:
    """The peak a run could reach if each dtype's FLOPs ran at that dtype's dense peak: Σ FLOPs / Σ (FLOPs_i / peak_i)."""
    missing = [d for d, f in flops_by_dtype.items() if f > 0 and not peak_tflops.get(d)]
    if missing:
        raise ValueError(f"no peak TFLOP/s for {missing[0]!r}; peaks given for: {', '.join(peak_tflops) or 'none'}")
    total = sum(flops_by_dtype.values())
    if total <= 0:
        raise ValueError(f"no FLOPs to weigh: {dict(flops_by_dtype)}")
    return total / sum(f / peak_tflops[d] for d, f in flops_by_dtype.items() if f > 0)


@dataclass(frozen=True)
class MixedMfu:
    """An fp8 run's model FLOPs utilisation, stated against both peaks (`MFU_LABELS`)."""

    mfu_vs_bf16_peak: float
    mfu_vs_mixed_peak: float
    mixed_peak_tflops: float
    fp8_flop_share: float  # of the training FLOPs per item, the part in fp8 GEMMs

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def mixed_mfu(
    items_per_s: float,
    flops_per_item: float,
    fp8_flops_per_item: float,
    peak_tflops: Mapping[str, float],
    devices: int = 1,
) -> MixedMfu:
    """MFU of an fp8 run per device: achieved FLOP/s over the bf16 dense peak, and over the mixed peak of the
    GEMMs that ran in fp8 (`LayerPlan.fp8_flops_per_row` per item) and in bf16 (the rest of `flops_per_item`)."""
    if not 0 <= fp8_flops_per_item <= flops_per_item:
        raise ValueError(
            f"fp8 FLOPs per item {fp8_flops_per_item:g} must lie in [0, flops_per_item={flops_per_item:g}]"
        )
    if not (peak_tflops.get("bf16") and peak_tflops.get("fp8")):
        raise ValueError(f"mixed MFU needs the bf16 and fp8 peaks; given: {dict(peak_tflops)}")
    split = {"fp8": fp8_flops_per_item, "bf16": flops_per_item - fp8_flops_per_item}
    mixed = mixed_peak_tflops(split, peak_tflops)
    achieved_tflops = items_per_s * flops_per_item / devices / 1e12
    return MixedMfu(
        mfu_vs_bf16_peak=achieved_tflops / peak_tflops["bf16"],
        mfu_vs_mixed_peak=achieved_tflops / mixed,
        mixed_peak_tflops=mixed,
        fp8_flop_share=fp8_flops_per_item / flops_per_item,
    )
