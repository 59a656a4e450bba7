"""The optimizer and the precision of its state: fused AdamW with fp32 state, or torchao's AdamW with bf16,
8-bit, 4-bit or fp8 state; which combinations cannot run, and how many bytes the state really holds.

torchao's optimizers keep a state tensor of at least 4096 values (and a multiple of the block size) as a tensor
subclass of codes plus one fp32 scale per block (8-bit and fp8: blocks of 256, 4-bit: 128, two codes to a
byte); smaller tensors stay plain, in the parameter's dtype. Each compiles its per-parameter step with
`torch.compile` (a C++ compiler on a CPU, triton on a GPU; the first step of each parameter shape compiles).
With bf16 parameters they round the update stochastically (torchao's `bf16_stochastic_round`), so updates
smaller than bf16's spacing are not lost; `adamw-bf16` is exactly that with bf16 state.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-bf16", "adamw-8bit", "adamw-4bit", "adamw-fp8")
OPTIMIZER_ALIASES: dict[str, str] = {
    **{name: name for name in OPTIMIZERS},
    "adamw-fp32": "adamw",
    "adamw8bit": "adamw-8bit",
    "adamw4bit": "adamw-4bit",
    "adamwfp8": "adamw-fp8",
}
_TORCHAO_CLASS: dict[str, str] = {
    "adamw-bf16": "_AdamW",
    "adamw-8bit": "AdamW8bit",
    "adamw-4bit": "AdamW4bit",
    "adamw-fp8": "AdamWFp8",
}
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_optimizer(value: Any) -> str:
    """The canonical optimizer name for an accepted spelling; `ValueError` naming the valid ones otherwise."""
    key = value.strip().lower().replace("_", "-") if isinstance(value, str) else None
    if key not in OPTIMIZER_ALIASES:
        raise ValueError(f"invalid optimizer {value!r}; valid values are: {', '.join(OPTIMIZERS)}")
    return OPTIMIZER_ALIASES[key]


def baseline_optimizer(optimizers: Iterable[str]) -> str:
    """The optimizer a report's baseline (fp32) trains with among those a setting's runs used: adamw (fp32
    state) where it ran, else the first in `OPTIMIZERS` order (a sweep of adamw-8bit alone compares its
    precisions with fp32 adamw-8bit)."""
    used = set(optimizers)
    if not used or "adamw" in used:
        return "adamw"
    return min(used, key=lambda o: (OPTIMIZERS.index(o) if o in OPTIMIZERS else len(OPTIMIZERS), o))


def _dtype(value: torch.dtype | str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"invalid parameter dtype {value!r}; valid: fp32, bf16, fp16 (or a torch.dtype)")
    return _DTYPE_NAMES[key]


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def compiler_available(device_type: str) -> bool:
    """Whether torch.compile can build kernels here: a C++ compiler for a CPU (`$CXX`, c++, g++ or clang++),
    triton for a GPU."""
    if device_type == "cuda":
        return importlib.util.find_spec("triton") is not None
    candidates = [os.environ.get("CXX", ""), "c++", "g++", "clang++"]
    return any(c and shutil.which(c) for c in candidates)


def optimizer_problem(
    name: str,
    param_dtype: torch.dtype | str = torch.float32,
    device_type: str | torch.device = "cpu",
    *,
    has_torchao: bool | None = None,
    can_compile: bool | None = None,
) -> str | None:
    """Why `name` cannot run with parameters of `param_dtype` on `device_type`, or None when it can. The machine
    facts (`has_torchao`, `can_compile`) are probed when not given, so a sweep can ask about another machine."""
    name = parse_optimizer(name)
    dtype = _dtype(param_dtype)
    device_type = str(getattr(device_type, "type", device_type)).split(":")[0]  # a torch.device or 'cuda:1' too
    if name == "adamw":
        return None
    if has_torchao is None:
        has_torchao = importlib.util.find_spec("torchao") is not None
    if not has_torchao:
        return f"optimizer {name!r} needs torchao (pip install torchao, the fp8 extra); it is not installed"
    if name == "adamw-bf16" and dtype != torch.bfloat16:
        return (
            f"optimizer 'adamw-bf16' keeps bf16 parameters and state (stochastic rounding): it needs bf16 "
            f"parameters (precision bf16-true); this run's parameters are {_short(dtype)}"
        )
    if can_compile is None:
        can_compile = compiler_available(device_type)
    if not can_compile:
        needs = "triton" if device_type == "cuda" else "a C++ compiler (set CXX, or install g++)"
        return f"optimizer {name!r}: torchao compiles its step with torch.compile, which needs {needs} on {device_type}"
    return None


def make_optimizer(
    model: torch.nn.Module,
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device,
    name: str = "adamw",
    *,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The named optimizer over the model's trainable parameters; `lr` may be a device tensor a schedule updates
    in place (every choice reads it each step). `adamw` is fused AdamW where the device has it (fused AdamW
    takes GradScaler's inf check without a sync), else the for-loop one. A combination `optimizer_problem`
    refuses is a `ValueError` with its reason."""
    name = parse_optimizer(name)
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = {p.dtype for p in params}
    # The dtype that decides: bf16 only when every parameter is bf16 (adamw-bf16 needs all of them to be).
    dtype = next(iter(sorted(dtypes - {torch.bfloat16}, key=str)), torch.bfloat16 if dtypes else torch.float32)
    problem = optimizer_problem(name, dtype, device.type)
    if problem:
        raise ValueError(problem)
    hyper: dict[str, Any] = {"lr": lr, "betas": betas, "weight_decay": weight_decay, "eps": eps}
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, **hyper, fused=device.type in ("cuda", "cpu"))
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, **hyper, foreach=False)  # takes a tensor lr too
    import torchao.optim

    cls = getattr(torchao.optim, _TORCHAO_CLASS[name])
    return cls(params, **hyper, bf16_stochastic_round=torch.bfloat16 in dtypes)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the distinct storages under `tensors`: a DTensor's local shard, a wrapper subclass's inner
    tensors (torchao's codes, block scales and lookup table), each storage once however many tensors view it."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        for leaf in _leaves(t):
            storage = leaf.untyped_storage()
            seen.setdefault((str(leaf.device), storage.data_ptr()), storage.nbytes())
    return sum(seen.values())


def _leaves(t: torch.Tensor) -> Iterable[torch.Tensor]:
    """The plain tensors that hold `t`'s memory."""
    if hasattr(t, "to_local"):  # DTensor: this rank's shard
        yield from _leaves(t.to_local())
    elif hasattr(t, "__tensor_flatten__"):  # a wrapper subclass: its inner tensors
        for attr in t.__tensor_flatten__()[0]:
            yield from _leaves(getattr(t, attr))
    else:
        yield t


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer state's bytes as memory holds them: torchao's 8-bit, 4-bit and fp8 moments count their
    codes and block scales (not `numel x element_size` of the fp32 they pose as); DTensor states their shard."""
    return tensor_bytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
