"""Loss scaling on `torch.amp.GradScaler`: one call for scale -> backward -> unscale -> clip -> step -> update.

`AmpScaler.step` returns what happened as device tensors (`StepOutcome`); the training loop's
recorder reads them in batches, so the hot loop adds no host-device sync beyond what GradScaler
itself does (and a fused optimizer removes even that one).

GradScaler has no public API for two things this module needs without a sync: the device tensor of
the current scale, and whether the last `unscale_` found inf/NaN. Each private attribute is read in
exactly one function below (`scale_tensor`, `found_inf`), and `check_gradscaler_internals` fails
loudly, naming the torch version, if a torch release renames them.

Under DDP gradients are all-reduced before `unscale_`, so every rank finds the same inf/NaN. Under FSDP2 they
are DTensor shards: torch's DTensor dispatch of `_amp_foreach_non_finite_check_and_unscale_` all-reduces the
found-inf flag over the mesh (`found_inf_reduce_handler`), so the plain `GradScaler` skips on every rank alike
(FSDP1's `ShardedGradScaler` does the same by hand, for FSDP1's flat parameters).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

# A loss scale this small means fp16 overflowed on every step: training has stopped.
COLLAPSED_SCALE = 2.0**-24


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step, as device tensors (read them in batches, not every step)."""

    grad_norm: torch.Tensor  # total norm of the *unscaled* gradients, before clipping
    skipped: torch.Tensor  # bool: the scaler found inf/NaN and the optimizer did not step
    scale: torch.Tensor | None  # loss scale after `update()`, None without a scaler


@functools.cache
def check_gradscaler_internals() -> None:
    """Raise if this torch's GradScaler lacks the private attributes `scale_tensor`/`found_inf` read."""
    probe = torch.amp.GradScaler("cpu", enabled=True)
    missing = [name for name in ("_scale", "_found_inf_per_device") if not hasattr(probe, name)]
    if missing:
        raise RuntimeError(
            f"torch {torch.__version__} renamed GradScaler's {', '.join(missing)}: amp_lib.scaler needs updating"
        )


def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The current scale as a device tensor (no sync; `get_scale()` syncs), None before the first step
    and for a disabled scaler (which has no scale tensor at all)."""
    if not scaler.is_enabled():
        return None
    scale = scaler._scale
    return None if scale is None else scale.detach().clone()


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """GradScaler's own skip decision for this step (inf/NaN found while unscaling), as a bool tensor.

    Not the gradient norm: finite gradients above ~1e19 overflow an fp32 norm, yet GradScaler steps.
    """
    flags = list(scaler._found_inf_per_device(optimizer).values())
    return torch.stack([f.reshape(()).to(flags[0].device) for f in flags]).sum() > 0


def total_grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), 2.0)


class AmpScaler:
    """A thin `GradScaler` wrapper in the manner of timm's NativeScaler, reporting each step's outcome."""

    def __init__(
        self,
        device_type: str = "cuda",
        enabled: bool = True,
        *,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        check_gradscaler_internals()
        self.scaler = torch.amp.GradScaler(
            device_type,
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def step(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        max_grad_norm: float | None = None,
        *,
        update: bool = True,
    ) -> StepOutcome | None:
        """Backward the (scaled) loss; when `update`, unscale, clip, step and update the scale.

        Pass `update=False` for all but the last micro-batch of gradient accumulation.
        """
        self.scaler.scale(loss).backward()
        if not update:
            return None
        self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if max_grad_norm is not None and max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            grad_norm = total_grad_norm(params)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor of partial norms; the whole norm, as on one device
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(optimizer)
        if self.enabled:
            skipped = found_inf(self.scaler, optimizer).to(grad_norm.device)  # read before update() clears it
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=grad_norm.device)
        self.scaler.update()
        return StepOutcome(grad_norm=grad_norm.detach(), skipped=skipped, scale=scale_tensor(self.scaler))

    def get_scale(self) -> float | None:
        """The current loss scale (a sync); None when disabled or when it is not finite."""
        scale = float(self.scaler.get_scale()) if self.enabled else math.nan
        return scale if math.isfinite(scale) else None

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state)
