"""Precision names, hardware capabilities and their resolution into a `PrecisionPlan` with behaviour.

Capabilities are plain data so that every fallback branch can be exercised on a CPU-only machine
without patching torch; `resolve_device()` and `probe()` are the only functions that look at the
running hardware. The plan, like a Lightning precision plugin, is an object that knows how to run
a model in its precision: the autocast context, the model's dtype (and fp8/compile), the inputs'
dtype and the TF32 switch, so the training loop and the benchmark share one interpretation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from amp_lib.fp8 import FP8_ALIASES, FP8_RECIPES, Fp8Recipe, LayerPlan, MixedMfu, mixed_mfu, parse_fp8_layers
from amp_lib.scaler import AmpScaler

# torchao's fp8 recipes are precisions of their own; `fp8-mixed` (and `fp8`) name the default one.
CANONICAL: tuple[str, ...] = (
    "fp32",
    "tf32",
    "fp16-mixed",
    "bf16-mixed",
    "fp16-true",
    "bf16-true",
    *FP8_RECIPES,
)

# Lightning strings and ints, Hugging Face words, and "16_true" (an older spelling of these utilities).
ALIASES: dict[str | int, str] = {
    "fp32": "fp32",
    "32-true": "fp32",
    "32": "fp32",
    32: "fp32",
    "no": "fp32",
    "float32": "fp32",
    "float16": "fp16-mixed",
    "half": "fp16-mixed",
    "bfloat16": "bf16-mixed",
    "tf32": "tf32",
    "fp16-mixed": "fp16-mixed",
    "16-mixed": "fp16-mixed",
    "16": "fp16-mixed",
    16: "fp16-mixed",
    "fp16": "fp16-mixed",
    "bf16-mixed": "bf16-mixed",
    "bf16": "bf16-mixed",
    "fp16-true": "fp16-true",
    "16-true": "fp16-true",
    "16_true": "fp16-true",
    "bf16-true": "bf16-true",
    **FP8_ALIASES,
}

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# How a run spreads over processes: one device, DDP (replicas, gradients all-reduced) or FSDP2 (`fully_shard`
# per transformer block and the root: parameters, gradients and optimizer state sharded).
PARALLELISMS: tuple[str, ...] = ("none", "ddp", "fsdp")
PARALLELISM_ALIASES: dict[str, str] = {"none": "none", "single": "none", "ddp": "ddp", "fsdp": "fsdp", "fsdp2": "fsdp"}
# The dtype FSDP reduces gradients in: fp32 (torchtitan's choice) or the compute dtype (Lightning's for
# bf16-mixed, half the bytes on the wire).
REDUCE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REDUCE_ALIASES: dict[str, str] = {
    "fp32": "fp32",
    "float32": "fp32",
    "32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "16": "fp16",
}
# Dense peak TFLOP/s by (GPU name fragment, precision family), for the MFU estimate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"fp32": 67.0, "tf32": 494.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "H200": {"fp32": 67.0, "tf32": 494.0, "fp16": 989.0, "bf16": 989.0, "fp8": 1979.0},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "fp16": 121.0, "bf16": 121.0, "fp8": 242.0},
}


class PrecisionUnavailableError(ValueError):
    """Raised by `resolve_precision(..., strict=True)` instead of falling back."""


def valid_precision_names() -> list[str]:
    """Every accepted spelling, canonical names first, as they would be typed."""
    others = [repr(k) if isinstance(k, int) else k for k in ALIASES if k not in CANONICAL]
    return list(dict.fromkeys([*CANONICAL, *others]))  # "32" and 32 read the same: list once


def parse_precision(value: Any) -> str:
    """Return the canonical name for any accepted spelling; raise `ValueError` otherwise."""
    key: str | int | None = None
    if isinstance(value, str):
        key = value.strip().lower()
    elif isinstance(value, int) and not isinstance(value, bool):
        key = value
    if key is None or key not in ALIASES:
        raise ValueError(f"invalid precision {value!r}; valid values are: {', '.join(valid_precision_names())}")
    return ALIASES[key]


def parse_parallelism(value: Any) -> str:
    """The canonical parallelism (none, ddp, fsdp) for any accepted spelling; `ValueError` otherwise."""
    key = value.strip().lower() if isinstance(value, str) else None
    if key not in PARALLELISM_ALIASES:
        raise ValueError(f"invalid parallelism {value!r}; valid values are: {', '.join(PARALLELISMS)} (or fsdp2)")
    return PARALLELISM_ALIASES[key]


def parse_reduce_dtype(value: Any) -> str:
    """The canonical gradient-reduction dtype (fp32, bf16, fp16) for any accepted spelling; `ValueError` otherwise."""
    key = str(value).strip().lower().removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if key not in REDUCE_ALIASES:
        raise ValueError(
            f"invalid reduce_dtype {value!r}; valid values are: {', '.join(REDUCE_DTYPES)} (or float32, bfloat16, float16)"
        )
    return REDUCE_ALIASES[key]


def compute_dtype_name(precision: str) -> str:
    """The dtype a canonical precision computes its matmuls in: fp32 for fp32/tf32, bf16 for fp8's
    surrounding autocast, else its own half type."""
    family = precision.split("-")[0]
    return {"tf32": "fp32", "fp8": "bf16"}.get(family, family)


def reduce_dtype_problem(precision: Any, reduce_dtype: str) -> str | None:
    """Why gradients cannot be reduced in `reduce_dtype` under `precision` (FSDP reduces in fp32 or the
    precision's compute dtype), or None: the one statement of the rule, for the config and the plan alike."""
    compute = compute_dtype_name(parse_precision(precision))
    if reduce_dtype in ("fp32", compute):
        return None
    return f"reduce_dtype={reduce_dtype!r} does not fit precision {precision!r}; valid: 'fp32' or its compute dtype {compute!r}"


def parallel_label(precision: str, parallelism: str = "none", reduce_dtype: str | None = None) -> str:
    """How a report row names a precision run under a parallelism: `fsdp bf16-mixed (reduce fp32)`, `ddp
    fp16-mixed`, `fsdp fp32`, `bf16-mixed`. The reduce dtype is named where FSDP had a choice (a half compute dtype)."""
    if parallelism == "none":
        return precision
    choice = parallelism == "fsdp" and reduce_dtype is not None and compute_dtype_name(precision) != "fp32"
    return f"{parallelism} {precision}" + (f" (reduce {reduce_dtype})" if choice else "")


def is_fp16(value: Any) -> bool:
    """True for every fp16 spelling ('16', 16, '16-mixed', 'fp16-mixed', '16_true', ...)."""
    try:
        return parse_precision(value).startswith("fp16")
    except ValueError:
        return False


def compute_effective_precision(
    requested_precision: Any, use_amp: bool | None, cuda_available: bool, use_gpu: bool
) -> Any:
    """The Lightning precision flag that a legacy `use_amp` switch implies (for older training scripts)."""
    parse_precision(requested_precision)
    if use_amp is None:
        return requested_precision
    if use_amp and cuda_available and use_gpu:
        return "16"
    return "32"


@dataclass(frozen=True)
class Capabilities:
    """What the device can do, as plain data (so tests can describe hardware they don't have)."""

    device_type: str = "cpu"
    cuda_available: bool = False
    device_name: str = "cpu"
    compute_capability: tuple[int, int] | None = None
    bf16_supported: bool = True
    fp16_fast: bool = False
    fp8_backend: bool = False  # torchao's float8 training is importable

    def __post_init__(self) -> None:
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"invalid device_type {self.device_type!r}; valid: 'cpu', 'cuda'")
        if self.device_type == "cuda" and not self.cuda_available:
            raise ValueError("device_type 'cuda' needs cuda_available=True")

    def cc_at_least(self, major: int, minor: int) -> bool:
        return self.compute_capability is not None and tuple(self.compute_capability) >= (major, minor)

    @property
    def fp8_hardware(self) -> bool:
        """Whether the device has fp8 GEMMs (a GPU of compute capability 8.9+: Ada, Hopper and newer)."""
        return self.device_type == "cuda" and self.cc_at_least(8, 9)


CPUINFO = Path("/proc/cpuinfo")


def _cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The feature flags of the first CPU in `cpuinfo` (a parameter so a test can describe another CPU)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The torch device a config's `device` names ("auto": CUDA when available, else CPU)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", str(device)):
        raise ValueError(f"invalid device {str(device)!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; valid here: 'auto', 'cpu'")
    return dev


HALF_PRECISION_ISA = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16", "amx_tile", "avx512f", "avx2")


def cpu_isa() -> frozenset[str]:
    """The CPU instruction sets that decide half-precision speed, as /proc/cpuinfo lists them."""
    return frozenset(_cpu_flags() & set(HALF_PRECISION_ISA))


def probe(device: str | torch.device | None = None, *, cpuinfo: Path = CPUINFO) -> Capabilities:
    """Read the capabilities of `device` (default: CUDA when available, else CPU); a CPU's flags come from
    `cpuinfo`, as measure.PeakMemory takes its /proc, so a test can stand in a CPU with AMX-FP16."""
    dev = resolve_device(device)
    fp8_backend = importlib.util.find_spec("torchao") is not None
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return Capabilities(
            device_type="cuda",
            cuda_available=True,
            device_name=torch.cuda.get_device_name(index),
            compute_capability=tuple(torch.cuda.get_device_capability(index)),
            bf16_supported=torch.cuda.is_bf16_supported(),
            fp16_fast=True,
            fp8_backend=fp8_backend,
        )
    flags = _cpu_flags(cpuinfo)
    return Capabilities(
        device_type="cpu",
        cuda_available=torch.cuda.is_available(),
        device_name=torch.backends.cpu.get_cpu_capability(),
        bf16_supported=True,  # CPU autocast runs bf16 everywhere (fast with avx512_bf16 / AMX)
        fp16_fast=bool(flags & {"avx512_fp16", "amx_fp16"}),
        fp8_backend=fp8_backend,
    )


@dataclass(frozen=True)
class PrecisionPlan:
    """What a run will actually do, and why it differs from the request if it does."""

    requested: str
    effective: str
    device_type: str
    device_name: str
    autocast_dtype: torch.dtype | None
    param_dtype: torch.dtype
    use_loss_scaler: bool
    fallback_reason: str | None = None
    parallelism: str = "none"  # none, ddp or fsdp
    # FSDP2's MixedPrecisionPolicy: the dtype parameters are all-gathered and computed in (None: their own).
    gather_dtype: torch.dtype | None = None
    # The dtype gradients are reduced across ranks in (None on one device): DDP reduces them in their own dtype.
    reduce_dtype: torch.dtype | None = None
    # fp8 plans only: which linears may run in fp8 (a config's `fp8_layers`, canonical), and whether the recipe
    # runs emulated (no fp8 hardware here: its loss forecasts fp8's, its timings say nothing about fp8's speed).
    fp8_layers: str | None = None
    emulated: bool = False

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    @property
    def emulation_note(self) -> str | None:
        """What a reader must know about an emulated fp8 plan, in one line (None when it is not emulated)."""
        if not self.emulated:
            return None
        return (
            f"{self.effective} emulated on {self.device_type} ({self.device_name}), which has no fp8 GEMMs: "
            "its loss forecasts fp8's, its speed says nothing about fp8's"
        )

    @property
    def family(self) -> str:
        """fp32, tf32, fp16, bf16 or fp8: what decides the peak FLOPs."""
        return self.effective.split("-")[0]

    @property
    def peak_table(self) -> dict[str, float]:
        """The device's dense peak TFLOP/s by precision family, where the table knows the device ({} elsewhere).

        A fragment must not run on into more digits: an "L40S" is no "L4", an "RTX A1000" no "A100".
        """
        for fragment, table in PEAK_TFLOPS.items():
            if re.search(rf"{re.escape(fragment)}(?!\d)", self.device_name):
                return table
        return {}

    @property
    def peak_tflops(self) -> float | None:
        """The device's dense peak TFLOP/s in this precision (None where unknown, and for emulated fp8)."""
        return None if self.emulated else self.peak_table.get(self.family)

    def mixed_mfu(
        self, layers: LayerPlan | None, items_per_s: float, flops_per_item: float | None, devices: int = 1
    ) -> MixedMfu | None:
        """An fp8 run's MFU against the bf16 dense peak and against the mixed peak of the GEMMs that ran in fp8
        and in bf16 (an item is one row of the linears' GEMMs: a token, or a sample); None for the other plans,
        an emulated one, or a device whose peaks the table does not know."""
        peaks = self.peak_table
        if layers is None or self.emulated or not flops_per_item or not (peaks.get("bf16") and peaks.get("fp8")):
            return None
        return mixed_mfu(items_per_s, flops_per_item, min(layers.fp8_flops_per_row, flops_per_item), peaks, devices)

    @property
    def fp8_recipe(self) -> Fp8Recipe | None:
        """The torchao recipe an fp8 plan converts its model with; None for the other precisions."""
        if self.family != "fp8":
            return None
        return Fp8Recipe.from_values(self.effective, self.fp8_layers or "auto", self.emulated)

    def scaler(self, init_scale: float = 2.0**16, growth_interval: int = 2000) -> AmpScaler:
        """The loss scaler this plan runs with: enabled exactly when it needs one (fp16 mixed precision);
        a disabled one steps the optimizer as plainly as a loop without a scaler."""
        return AmpScaler(
            self.device_type, enabled=self.use_loss_scaler, init_scale=init_scale, growth_interval=growth_interval
        )

    def autocast(self) -> torch.autocast:
        """The forward context: autocast to the plan's dtype, or a disabled autocast."""
        dtype = self.autocast_dtype or torch.float32
        return torch.autocast(self.device_type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def with_parallelism(self, parallelism: str, reduce_dtype: str = "fp32") -> PrecisionPlan:
        """This plan run under `parallelism`: DDP reduces gradients in the parameters' dtype; FSDP2 gathers the
        parameters of a mixed precision in its compute dtype and reduces in `reduce_dtype` (fp32 or the compute
        dtype). A reduce dtype that stops matching after a fallback (fp16 -> bf16) follows it, with the reason.
        Where nothing changes, the plan itself comes back: a plan handed to `train()` stays that object."""
        planned = self._under(parse_parallelism(parallelism), parse_reduce_dtype(reduce_dtype))
        return self if planned == self else planned

    def _under(self, parallelism: str, reduce_name: str) -> PrecisionPlan:
        if parallelism == "none":
            return replace(self, parallelism="none", gather_dtype=None, reduce_dtype=None)
        if parallelism == "ddp":
            return replace(self, parallelism="ddp", gather_dtype=None, reduce_dtype=self.param_dtype)
        reason = self.fallback_reason
        compute = compute_dtype_name(self.effective)
        if reduce_name not in ("fp32", compute):
            if (problem := reduce_dtype_problem(self.requested, reduce_name)) is not None:
                raise ValueError(problem)
            note = f"gradients reduced in {compute} (not {reduce_name}): the precision runs as {self.effective}"
            reason, reduce_name = (f"{reason}; then {note}" if reason else note), compute
        # A mixed precision's autocast dtype (None for fp32 and the "true" ones): fp8's is bf16, as torchao's
        # float8 linears cast to fp8 themselves and the rest runs in bf16.
        return replace(
            self,
            parallelism="fsdp",
            gather_dtype=self.autocast_dtype,
            reduce_dtype=REDUCE_DTYPES[reduce_name],
            fallback_reason=reason,
        )

    @property
    def label(self) -> str:
        """The precision as a report row names it: `fsdp bf16-mixed (reduce fp32)`, `ddp fp16-mixed`, `fp32`."""
        if self.parallelism == "none":
            return self.effective
        return parallel_label(self.effective, self.parallelism, _dtype_name(self.reduce_dtype))

    def prepare(
        self,
        model: torch.nn.Module,
        device: torch.device,
        compile: bool = False,
        parallel: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        *,
        tokens_per_step: int | None = None,
    ) -> tuple[torch.nn.Module, LayerPlan | None]:
        """The model on `device` in the parameter dtype, and an fp8 plan's layer plan (None otherwise): its recipe
        swaps the linears `fp8_layers` selects for torchao's Float8Linear (`tokens_per_step`, the rows of one
        micro-batch's GEMMs, is shown next to the auto rule); `parallel` wraps it for DDP/FSDP (after fp8, before
        compile: torchao's and PyTorch's order); `compile` wraps it in torch.compile."""
        model = model.to(device=device, dtype=self.param_dtype)
        layers = None
        if (recipe := self.fp8_recipe) is not None:
            model, layers = recipe.convert(model, tokens_per_step)  # torchao: the fp8 extra
        if parallel is not None:
            model = parallel(model)
        return (torch.compile(model) if compile else model), layers

    def prepare_model(
        self,
        model: torch.nn.Module,
        device: torch.device,
        compile: bool = False,
        parallel: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> torch.nn.Module:
        """`prepare`'s model, without the layer plan."""
        return self.prepare(model, device, compile, parallel)[0]

    def convert_input(self, x: Any) -> Any:
        """Float inputs in the parameters' dtype: a 'true' precision runs the whole model in half, as
        Lightning's HalfPrecision does; token ids and anything else pass through (no copy when equal)."""
        return x.to(self.param_dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    @contextlib.contextmanager
    def tf32_scope(self) -> Iterator[None]:
        """TF32 tensor-core matmuls and convolutions on exactly when the plan is tf32, restored after."""
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.effective == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["autocast_dtype"] = str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None
        d["param_dtype"] = str(self.param_dtype).removeprefix("torch.")
        d["gather_dtype"] = str(self.gather_dtype).removeprefix("torch.") if self.gather_dtype else None
        d["reduce_dtype"] = _dtype_name(self.reduce_dtype)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionPlan:
        """The plan `to_dict` wrote (how a launcher hands its plan to torchrun's workers); other keys are ignored."""
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in d.items() if k in names}
        for key in ("autocast_dtype", "param_dtype", "gather_dtype"):
            values[key] = getattr(torch, values[key]) if values.get(key) else None
        values["reduce_dtype"] = REDUCE_DTYPES[values["reduce_dtype"]] if values.get("reduce_dtype") else None
        return cls(**values)


_REDUCE_NAMES: dict[torch.dtype, str] = {d: name for name, d in REDUCE_DTYPES.items()}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    """fp32 / bf16 / fp16 for the dtypes gradients are reduced in (the config's spelling), None for none."""
    return _REDUCE_NAMES.get(dtype)


def _plan(requested: Any, effective: str, caps: Capabilities, reason: str | None, fp8_layers: Any) -> PrecisionPlan:
    family, _, mode = effective.partition("-")
    half = HALF_DTYPES.get(family)
    fp8 = family == "fp8"
    if fp8:
        half = torch.bfloat16  # fp8 matmuls inside bf16 autocast (torchao float8 training)
    return PrecisionPlan(
        requested=str(requested),
        effective=effective,
        device_type=caps.device_type,
        device_name=caps.device_name,
        autocast_dtype=half if mode == "mixed" or fp8 else None,
        param_dtype=half if mode == "true" else torch.float32,
        use_loss_scaler=effective == "fp16-mixed",
        fallback_reason=reason,
        fp8_layers=str(parse_fp8_layers(fp8_layers)) if fp8 else None,
        emulated=fp8 and not caps.fp8_hardware,  # reached only with emulate_fp8 (`_fallback`)
    )


def _fallback(
    name: str, caps: Capabilities, allow_slow: bool = False, emulate_fp8: bool = False
) -> tuple[str, str] | None:
    """The precision to use instead of `name` on `caps`, with the reason; None if `name` runs (an fp8 recipe
    without fp8 hardware runs with `emulate_fp8`, emulated)."""
    family, _, mode = name.partition("-")
    where = f"{caps.device_type} ({caps.device_name})"
    if name == "tf32" and not (caps.device_type == "cuda" and caps.cc_at_least(8, 0)):
        return "fp32", f"tf32 needs an Ampere or newer GPU (compute capability 8.0+); running on {where}"
    if family == "fp8":
        if not caps.fp8_hardware and not emulate_fp8:
            return "bf16-mixed", (
                f"fp8 needs a GPU with compute capability 8.9+ (Ada/Hopper); running on {where} "
                "(emulate_fp8=True forecasts its loss in emulation)"
            )
        if not caps.fp8_backend:
            return "bf16-mixed", "fp8 training needs torchao (pip install torchao); it is not installed"
    if family == "fp16" and caps.device_type == "cpu" and not caps.fp16_fast and not allow_slow:
        if caps.bf16_supported:
            return (
                f"bf16-{mode}",
                f"this CPU has no fast fp16 (avx512_fp16/amx_fp16): fp16 autocast would be far slower than fp32; using bf16-{mode}",
            )
        return "fp32", "this CPU has neither fast fp16 nor bf16; using fp32"
    if family == "bf16" and not caps.bf16_supported:
        if caps.device_type == "cuda":
            return f"fp16-{mode}", f"{caps.device_name} does not support bf16; using fp16-{mode}"
        return "fp32", f"{where} does not support bf16; using fp32"
    return None


def resolve_precision(
    requested: Any,
    caps: Capabilities | None = None,
    *,
    strict: bool = False,
    allow_slow: bool = False,
    parallelism: str = "none",
    reduce_dtype: str = "fp32",
    emulate_fp8: bool = False,
    fp8_layers: Any = "auto",
) -> PrecisionPlan:
    """Resolve a requested precision against the hardware; fallbacks carry their reason.

    `allow_slow` runs fp16 on a CPU without fast fp16 anyway (correct, just slow): useful to study
    loss-scale dynamics on a laptop. Precisions the hardware cannot run at all still fall back.
    `parallelism` and `reduce_dtype` (a config's) add the gradient-reduction dtypes (`with_parallelism`).
    `emulate_fp8` runs an fp8 recipe emulated where the device has no fp8 GEMMs (instead of falling back to
    bf16-mixed), for its loss only; `fp8_layers` selects the linears an fp8 plan converts.
    """
    name = parse_precision(requested)
    caps = caps if caps is not None else probe()
    reasons: list[str] = []
    effective = name
    while (step := _fallback(effective, caps, allow_slow, emulate_fp8)) is not None:
        if strict:
            why = re.sub(r"; (using|then) [\w-]+$", "", step[1])  # it raises: nothing is used instead
            raise PrecisionUnavailableError(f"precision {requested!r} is unavailable: {why}")
        effective, reason = step
        reasons.append(reason)
    return _plan(requested, effective, caps, "; then ".join(reasons) or None, fp8_layers).with_parallelism(
        parallelism, reduce_dtype
    )


def native_precisions(caps: Capabilities | None = None) -> list[str]:
    """The precisions this device runs without falling back (the default sweep)."""
    caps = caps if caps is not None else probe()
    candidates = ["fp32", "tf32", "fp16-mixed", "bf16-mixed"]
    return [p for p in candidates if _fallback(p, caps) is None]
