"""Loss scaling on `torch.amp.GradScaler`: one call for scale -> backward -> unscale -> clip -> step -> update.

Everything this wrapper records (skipped steps, scale history, grad norms) stays on the device as
tensors until `flush()` reads it in one transfer, so the hot loop adds no host-device sync beyond
what GradScaler itself does (and a fused optimizer removes even that one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step, as device tensors (read them in batches, not every step)."""

    grad_norm: torch.Tensor  # total norm of the *unscaled* gradients, before clipping
    skipped: torch.Tensor  # bool: the scaler found inf/NaN and the optimizer did not step
    scale: torch.Tensor | None  # loss scale after `update()`, None without a scaler


def total_grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(torch.float32) for n in norms]), 2.0)


class AmpScaler:
    """A thin `GradScaler` wrapper in the manner of timm's NativeScaler, with skip accounting."""

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
        self.scaler = torch.amp.GradScaler(
            device_type,
            init_scale=init_scale,
            growth_factor=growth_factor,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )
        self._skipped_total: torch.Tensor | int = 0  # becomes a device tensor on the first step
        self._pending_scales: list[torch.Tensor] = []
        self._scale_history: list[float] = []

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
        self.scaler.step(optimizer)
        if self.enabled:
            # GradScaler's own decision: inf/NaN found while unscaling (device tensors, no sync). Not the
            # norm: finite grads above ~1e19 overflow the fp32 norm, yet GradScaler steps on them.
            found = self.scaler._found_inf_per_device(optimizer).values()
            skipped = torch.stack([f.to(grad_norm.device) for f in found]).sum() > 0
        self.scaler.update()
        if self.enabled:
            scale = self.scaler._scale.detach().clone()  # device tensor: no sync (get_scale() syncs)
            self._pending_scales.append(scale)
        else:
            skipped = torch.zeros((), dtype=torch.bool, device=grad_norm.device)
            scale = None
        self._skipped_total = self._skipped_total + skipped.to(torch.int64)
        return StepOutcome(grad_norm=grad_norm.detach(), skipped=skipped, scale=scale)

    def flush(self) -> None:
        """Move the pending scale readings to the host in one transfer."""
        if self._pending_scales:
            self._scale_history.extend(torch.stack(self._pending_scales).tolist())
            self._pending_scales.clear()

    @property
    def skipped_steps(self) -> int:
        return int(self._skipped_total)

    @property
    def scale_history(self) -> list[float]:
        self.flush()
        return list(self._scale_history)

    def get_scale(self) -> float | None:
        return get_loss_scale(self.scaler)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])
        self._skipped_total = int(state.get("skipped_steps", 0))


def _scaler_of(obj: Any) -> Any:
    if isinstance(obj, torch.amp.GradScaler):
        return obj
    if isinstance(obj, AmpScaler):
        return obj.scaler
    plugin = getattr(getattr(obj, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def get_loss_scale(obj: Any) -> float | None:
    """The current loss scale of a GradScaler, an AmpScaler or a Lightning trainer; else None.

    None also stands for a disabled scaler and for a NaN or infinite scale, which is no scale at all.
    """
    scaler = _scaler_of(obj)
    if not isinstance(scaler, torch.amp.GradScaler) or not scaler.is_enabled():
        return None
    scale = float(scaler.get_scale())
    return scale if math.isfinite(scale) else None
