"""The fp16 headroom map: which layer overflows, and how many doublings of the loss scale each can take.

Opt-in per run (`RunConfig.headroom_every`). A forward hook on every leaf module records, as device
tensors (no host sync), whether its output is finite, and a tensor hook on that output does the same for
the gradient that flows back into it. On sampled steps (every `headroom_every` steps) they also record
the largest |activation| and |gradient| and the fractions of non-zero values below fp16's smallest
subnormal and smallest normal number. The recorder reads all of it when the training loop flushes its
history, and for a step the loss scaler skipped it names the first module, in execution order, whose
output (forward) or gradient (backward) became non-finite. With the map off no hook is registered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # ~3.39e38
FP16_SMALLEST_SUBNORMAL = 2.0**-24  # below it a value flushes to zero in fp16
FP16_SMALLEST_NORMAL = float(torch.finfo(torch.float16).tiny)  # 2**-14: below it fp16 loses precision
STATS = ("max_abs", "underflow_subnormal", "underflow_normal", "nonfinite")


def tensor_stats(x: torch.Tensor) -> torch.Tensor:
    """[max |x| over finite values, fraction of non-zero values below fp16's smallest subnormal, the same
    below its smallest normal, 1 if any inf/NaN] as one float32 device tensor (no sync)."""
    x = x.detach().float()
    finite = torch.isfinite(x)
    magnitude = torch.where(finite, x.abs(), torch.zeros_like(x))
    nonzero = (magnitude > 0).sum().clamp(min=1)
    return torch.stack(
        [
            magnitude.amax() if x.numel() else torch.zeros((), device=x.device),
            ((magnitude > 0) & (magnitude < FP16_SMALLEST_SUBNORMAL)).sum() / nonzero,
            ((magnitude > 0) & (magnitude < FP16_SMALLEST_NORMAL)).sum() / nonzero,
            (~finite).any().float(),
        ]
    ).float()


def headroom_doublings(max_abs: float | None, limit: float = FP16_MAX) -> float | None:
    """log2(limit / max|x|): how many doublings (of the loss scale, for gradients) a value can take."""
    if max_abs is None or not math.isfinite(max_abs):
        return None
    return math.inf if max_abs == 0 else math.log2(limit / max_abs)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)):
        return next((t for t in map(_first_tensor, output) if t is not None), None)
    return None


@dataclass
class _Step:
    """What the hooks saw during one step, as device tensors, in the order they fired."""

    sampled: bool
    forward: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (module, stats or finite flag)
    backward: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class HeadroomMap:
    """Hooks on every leaf module of `model`; `begin_step`/`end_step` around each optimizer step."""

    def __init__(self, model: torch.nn.Module, every: int) -> None:
        self.every = every
        self.names = [name or "(model)" for name, m in model.named_modules() if not list(m.children())]
        modules = {name or "(model)": m for name, m in model.named_modules()}
        self._handles = [modules[n].register_forward_hook(self._forward_hook(i)) for i, n in enumerate(self.names)]
        self._step: _Step | None = None
        self._pending: list[tuple[int, _Step]] = []  # (step, what it saw) until the next flush
        self.samples: list[dict[str, Any]] = []
        self.first_overflow: list[dict[str, Any]] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks ---------------------------------------------------------------------------------------
    def _forward_hook(self, index: int) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            step, out = self._step, _first_tensor(output)
            if step is None or out is None:
                return
            step.forward.append((index, self._measure(out, step.sampled)))
            if out.requires_grad:
                out.register_hook(self._backward_hook(index, step))

        return hook

    def _backward_hook(self, index: int, step: _Step) -> Any:
        def hook(grad: torch.Tensor) -> None:
            step.backward.append((index, self._measure(grad, step.sampled)))

        return hook

    @staticmethod
    def _measure(x: torch.Tensor, sampled: bool) -> torch.Tensor:
        return tensor_stats(x) if sampled else (~torch.isfinite(x.detach())).any()

    # -- steps ---------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._step = _Step(sampled=step % self.every == 0)

    def end_step(self, step: int) -> None:
        if self._step is not None:
            self._pending.append((step, self._step))
        self._step = None

    def flush(self, skipped: Sequence[bool], loss_scales: Sequence[float | None]) -> None:
        """Read the pending steps (the training loop's flush already syncs): sampled steps become map
        columns, and a step the scaler skipped is sampled too and names its first non-finite module."""
        for (step, seen), was_skipped, scale in zip(self._pending, skipped, loss_scales):
            if seen.sampled or was_skipped:
                self._read(step, seen, was_skipped, scale)
        self._pending = []

    def _read(self, step: int, seen: _Step, skipped: bool, scale: float | None) -> None:
        def rows(events: list[tuple[int, torch.Tensor]]) -> list[tuple[int, list[float]]]:
            if not events:
                return []
            values = torch.stack([t.reshape(-1).float() for _, t in events]).tolist()
            return [(i, v) for (i, _), v in zip(events, values)]

        forward, backward = rows(seen.forward), rows(seen.backward)
        if skipped:
            culprit = next(((i, "forward") for i, v in forward if v[-1]), None) or next(
                ((i, "backward") for i, v in backward if v[-1]), None
            )
            if culprit is not None:
                self.first_overflow.append(
                    {"step": step, "module": self.names[culprit[0]], "phase": culprit[1], "loss_scale": scale}
                )
        if seen.sampled:
            unscale = scale or 1.0  # gradients flow back multiplied by the loss scale
            act = {i: v for i, v in forward}
            grad = {i: v for i, v in backward}
            self.samples.append(
                {
                    "step": step,
                    "loss_scale": scale,
                    "activation": {self.names[i]: dict(zip(STATS, v)) for i, v in act.items()},
                    "gradient": {
                        self.names[i]: {**dict(zip(STATS, v)), "max_abs": v[0] / unscale, "max_abs_scaled": v[0]}
                        for i, v in grad.items()
                    },
                }
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "modules": self.names,
            "samples": self.samples,
            "first_overflow": self.first_overflow,
        }


class HeadroomProbe:
    """The headroom map as one of the training loop's probes: its hooks see every step between `begin_step`
    and `end_step`; at each flush it reads what they saw with the loss scale each step's backward ran with (the
    scale before that step's update, starting from `init_scale`)."""

    def __init__(self, model: torch.nn.Module, every: int, init_scale: float | None) -> None:
        self.map, self._scale = HeadroomMap(model, every), init_scale

    def begin_step(self, step: int) -> None:
        self.map.begin_step(step)

    def end_step(self, step: int) -> None:
        self.map.end_step(step)

    def flush(self, rows: Sequence[Any]) -> None:
        used = []
        for row in rows:
            used.append(self._scale)
            self._scale = row.loss_scale
        self.map.flush([row.skipped for row in rows], used)

    def close(self) -> None:
        self.map.remove()

    def record(self) -> dict[str, Any]:
        """What the result keeps: `HeadroomMap.to_dict`."""
        return self.map.to_dict()


def headroom_table(headroom: dict[str, Any]) -> list[dict[str, Any]]:
    """Per module, over the sampled steps: the largest |activation| and |unscaled gradient|, fp16 and
    bf16 headroom in doublings, and the worst underflow fractions — what the notebook's heatmap and the
    report show. Modules in execution order."""
    out = []
    for name in headroom.get("modules", []):
        act = [s["activation"][name] for s in headroom.get("samples", []) if name in s["activation"]]
        grad = [s["gradient"][name] for s in headroom.get("samples", []) if name in s["gradient"]]
        scaled = [g.get("max_abs_scaled", g["max_abs"]) for g in grad]
        act_max = max((a["max_abs"] for a in act), default=None)
        act_bad, grad_bad = any(a["nonfinite"] for a in act), any(g["nonfinite"] for g in grad)
        out.append(
            {
                "module": name,
                "max_activation": math.inf if act_bad else act_max,
                "max_gradient": math.inf if grad_bad else max((g["max_abs"] for g in grad), default=None),
                # an inf/NaN seen: no headroom left at all (-inf), whatever the finite values were
                "fp16_headroom_activation": -math.inf if act_bad else headroom_doublings(act_max),
                "bf16_headroom_activation": -math.inf if act_bad else headroom_doublings(act_max, BF16_MAX),
                "fp16_headroom_gradient": -math.inf if grad_bad else headroom_doublings(max(scaled, default=None)),
                "underflow_subnormal": max((x["underflow_subnormal"] for x in act + grad), default=None),
                "underflow_normal": max((x["underflow_normal"] for x in act + grad), default=None),
                "nonfinite": any(x["nonfinite"] for x in act + grad),
            }
        )
    return out


def way_out(first_overflow: dict[str, Any], bf16_available: bool) -> str:
    """The suggested way out of an fp16 overflow, in words."""
    module, phase = first_overflow["module"], first_overflow["phase"]
    steps = []
    if bf16_available:
        steps.append("train in bf16-mixed (same exponent range as fp32, no loss scaling needed)")
    steps.append(
        f"keep `{module}` in fp32: run it inside `torch.autocast(device_type, enabled=False)` with its input cast "
        "to float32"
    )
    if phase == "backward":
        steps.append(f"start from a lower loss scale (init_scale below {first_overflow.get('loss_scale') or 2**16:g})")
    return f"`{module}` overflowed fp16 first ({phase}, step {first_overflow['step']}): " + "; or ".join(steps)
