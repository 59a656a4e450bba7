"""AMP state as the training callbacks log it (`amp_lib.hf`, `amp_lib.lightning_callback`): one reader for both.

- `find_grad_scaler` / `active_grad_scaler` / `get_loss_scale`: the GradScaler of whatever holds one, and its scale.
- `PrecisionState`: the precision asked for and the one that really ran (canonical names), and why they differ.
- `SkipCounter`: skipped optimizer steps, counted on the device as decreases of the loss-scale tensor.
- `AmpRunLog`: one training run's `amp/*` keys, the fallback reason in its first row only.
- `HookGuard`: runs a hook's work so that an error is one warning, never the end of training.

GradScaler backs its scale off exactly when it skips a step, so a decrease of the scale tensor, compared
on the device, is a skip: no host-device sync on the steps that don't log. That is also right where
Accelerate's `step_was_skipped` is not: with a fused optimizer GradScaler always calls the optimizer's
`step` and lets the kernel skip the update (accelerate #4242).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from amp_lib.precision import parse_precision
from amp_lib.results import finite_or_none
from amp_lib.scaler import scale_tensor

__all__ = [
    "AmpRunLog",
    "HookGuard",
    "PrecisionState",
    "SkipCounter",
    "active_grad_scaler",
    "amp_enabled",
    "attr_or_none",
    "canonical_name",
    "find_grad_scaler",
    "get_loss_scale",
]

# Names that compute in full precision: the canonical two, and Lightning's double precision (no canonical name).
FULL_PRECISION = frozenset({"fp32", "tf32", "64-true", "64"})


# --- finding the GradScaler ---


def attr_or_none(obj: Any, name: str) -> Any:
    """getattr that also swallows errors raised by properties (e.g. a Lightning strategy not yet attached)."""
    try:
        return getattr(obj, name)
    except Exception:  # noqa: BLE001 - AttributeError or any other: no such attribute
        return None


def find_grad_scaler(obj: Any) -> torch.amp.GradScaler | None:
    """The GradScaler of a GradScaler; of anything holding one as `.scaler` (an AmpScaler, an Accelerator, an
    AcceleratedOptimizer, a Lightning precision plugin or trainer); or at a Lightning trainer's
    `strategy.precision_plugin.scaler`. None wherever there is none."""
    if isinstance(obj, torch.amp.GradScaler):
        return obj
    held = attr_or_none(obj, "scaler")
    if isinstance(held, torch.amp.GradScaler):
        return held
    held = attr_or_none(attr_or_none(attr_or_none(obj, "strategy"), "precision_plugin"), "scaler")
    return held if isinstance(held, torch.amp.GradScaler) else None


def active_grad_scaler(obj: Any) -> torch.amp.GradScaler | None:
    """`find_grad_scaler`, but only an enabled GradScaler: a disabled one scales nothing."""
    scaler = find_grad_scaler(obj)
    return scaler if scaler is not None and scaler.is_enabled() else None


def get_loss_scale(obj: Any) -> float | None:
    """The current loss scale of whatever `find_grad_scaler` finds a GradScaler in (a sync); else None.

    None also stands for a disabled scaler and for a NaN or infinite scale, which is no scale at all.
    """
    scaler = active_grad_scaler(obj)
    return None if scaler is None else finite_or_none(scaler.get_scale())


# --- which precision ran ---


def canonical_name(value: Any) -> str:
    """The canonical precision name of any accepted spelling; a name with none (Lightning's `'64-true'`,
    `'transformer-engine'`) as the string it is."""
    try:
        return parse_precision(value)
    except ValueError:
        return str(value)


def amp_enabled(name: str) -> bool:
    """Whether a precision name computes in reduced precision (fp32, tf32 and fp64 do not)."""
    return name not in FULL_PRECISION


@dataclass(frozen=True)
class PrecisionState:
    """The precision a run asked for and the one that really ran (canonical names), and why they differ."""

    requested: str
    effective: str
    reason: str | None = None  # why `effective` is not `requested`; None where they agree

    @property
    def enabled(self) -> bool:
        """Whether the precision that ran computes in reduced precision."""
        return amp_enabled(self.effective)

    @property
    def fell_back(self) -> bool:
        return self.requested != self.effective


# --- skipped steps and log rows ---


class SkipCounter:
    """Skipped optimizer steps, counted on the device as decreases of the loss scale (no host sync).

    `prime(scaler)` records the scale before the first step it should see (later calls change nothing);
    `observe(scaler)` after each optimizer step compares the scale with the last one recorded, so looking
    twice at the same step counts nothing. Both take None (no enabled scaler) as nothing to do. `count`
    syncs: read it only to log.
    """

    def __init__(self) -> None:
        self.skipped: Any = 0  # a device tensor once a step was observed
        # The last scale seen: a device tensor, or the host float GradScaler starts from (before its
        # first step it has no scale tensor yet, and get_scale() returns the initial scale without a sync).
        self._last: torch.Tensor | float | None = None

    def prime(self, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None and self._last is None:
            tensor = scale_tensor(scaler)
            self._last = tensor if tensor is not None else float(scaler.get_scale())

    def observe(self, scaler: torch.amp.GradScaler | None) -> None:
        now = None if scaler is None else scale_tensor(scaler)
        if now is None:
            return
        if self._last is not None:  # a float compares on the device as a kernel argument: no copy, no sync
            self.skipped = self.skipped + (now < self._last).to(torch.int64)
        self._last = now

    @property
    def count(self) -> int:
        return int(self.skipped)


class AmpRunLog:
    """The `amp/*` keys of one training run, and its skipped steps (`skips`, a `SkipCounter`)."""

    def __init__(self) -> None:
        self.skips = SkipCounter()
        self._reason_sent = False

    def row(self, precision: PrecisionState, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """`amp/enabled` (0/1) and `amp/precision` of the precision that ran; where it is not the one asked
        for, `amp/requested` too, and `amp/fallback_reason` in the first such row of the run; with an
        enabled GradScaler the `scale_row` keys. Reading the scale syncs: call it only to log."""
        scale = self.scale_row(scaler)  # first: if reading the scale fails, the reason is still to be sent
        row: dict[str, Any] = {"amp/enabled": int(precision.enabled), "amp/precision": precision.effective}
        if precision.fell_back:
            row["amp/requested"] = precision.requested
            if precision.reason and not self._reason_sent:
                row["amp/fallback_reason"] = precision.reason
                self._reason_sent = True
        return {**row, **scale}

    def scale_row(self, scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
        """`amp/skipped_steps` (cumulative) and `amp/loss_scale` (when finite) of an enabled GradScaler; {} without one."""
        if scaler is None or not scaler.is_enabled():
            return {}
        row: dict[str, Any] = {"amp/skipped_steps": self.skips.count}
        scale = get_loss_scale(scaler)
        if scale is not None:
            row["amp/loss_scale"] = scale
        return row


class HookGuard:
    """Runs a callback's work so that an error is a warning (the first one only), never the end of training."""

    def __init__(self, logger: logging.Logger, owner: str) -> None:
        self.logger = logger
        self.owner = owner
        self.warned = False

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)`, or None after warning (once) of the error it raised."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never break training
            if not self.warned:
                self.warned = True
                self.logger.warning("%s: logging failed and is skipped: %s: %s", self.owner, type(exc).__name__, exc)
            return None
