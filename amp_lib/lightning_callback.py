"""`AmpWandbCallback`: AMP state (enabled, precision, loss scale, skipped steps) from a Lightning Trainer to W&B.

Lightning is optional (`pip install .[lightning]`): without it the class is still importable (it just
has no Trainer to be attached to), and without `wandb` or an active W&B run every hook is a no-op.
A hook never raises: tracking must not be the reason a training run dies. The one exception is a
torch whose GradScaler no longer has the internals amp_lib reads without a sync: that fails at
`setup`, loudly, instead of turning into a warning and silently missing data.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from amp_lib.precision import is_fp16
from amp_lib.results import finite_or_none
from amp_lib.scaler import check_gradscaler_internals, find_grad_scaler, get_loss_scale, scale_tensor

try:  # Lightning 2.x unified package first, then the standalone one; neither is required
    from lightning.pytorch import Callback as _Callback
except ImportError:  # pragma: no cover - exercised only where Lightning is absent
    try:
        from pytorch_lightning import Callback as _Callback  # type: ignore[no-redef]
    except ImportError:
        _Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

__all__ = ["AmpWandbCallback", "active_wandb_run"]


def active_wandb_run() -> Any:
    """The active W&B run, or None when wandb is not installed or no run is open."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


class AmpWandbCallback(_Callback):  # type: ignore[misc,valid-type]
    """Log `amp/enabled`, `amp/precision` and (fp16 with a scaler) `amp/loss_scale` at each train epoch end,
    plus `amp/loss_scale` and cumulative `amp/skipped_steps` every `log_every_n_steps` optimizer steps.

    `precision` is the flag the user gave the Trainer, in any spelling (`'16'`, `16`, `'16-mixed'`,
    `'fp16-mixed'`, `'16_true'`...). A loss scale is only logged when `enabled`, the precision is fp16 and
    the trainer really has an enabled GradScaler with a finite scale (Lightning runs `'16-mixed'` as bf16
    on a CPU, which has none). Rows carry `trainer/global_step`, the step key Lightning's WandbLogger uses.
    """

    def __init__(self, enabled: bool, precision: Any, log_every_n_steps: int = 50) -> None:
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(
                f"invalid log_every_n_steps {log_every_n_steps!r}; valid: an int >= 1, or 0 to log only at epoch end"
            )
        super().__init__()
        self.enabled = bool(enabled)
        self.precision = precision
        self.log_every_n_steps = log_every_n_steps
        self._skipped: Any = 0  # a device tensor once a step was seen: counted without a host sync
        self._scale_before: Any = None
        self._last_step: int | None = None
        self._warned = False

    @property
    def tracks_scale(self) -> bool:
        """Whether this callback is configured to report a loss scale at all."""
        return self.enabled and is_fp16(self.precision)

    # hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.tracks_scale:
            check_gradscaler_internals()  # outside the guard: a torch rename must not pass as a warning

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._guard(self._before_step, trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._guard(self.step_row, trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._guard(self.epoch_row, trainer)

    # work ----------------------------------------------------------------------------------------
    def _guard(self, fn: Any, trainer: Any) -> None:
        """Log the row `fn(trainer)` returns, if any; an error is a warning (once), never the run's end."""
        try:
            row = fn(trainer)
            if row:
                self._log(row)
        except Exception as exc:  # noqa: BLE001 - tracking must never break training
            if not self._warned:
                self._warned = True
                log.warning("AmpWandbCallback: logging failed and is skipped: %s: %s", type(exc).__name__, exc)

    def _scaler(self, trainer: Any) -> Any:
        if not self.tracks_scale:
            return None
        scaler = find_grad_scaler(trainer)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _before_step(self, trainer: Any) -> None:
        scaler = self._scaler(trainer)
        if scaler is None:
            return
        # A device tensor (get_scale() would sync); before the first step there is none yet, and
        # get_scale() returns the initial scale without a sync.
        self._scale_before = scale_tensor(scaler)
        if self._scale_before is None:
            self._scale_before = torch.tensor(float(scaler.get_scale()))

    def step_row(self, trainer: Any) -> dict[str, Any] | None:
        """After a batch: count a skipped optimizer step; the row to log every `log_every_n_steps` steps."""
        step = getattr(trainer, "global_step", None)
        if not isinstance(step, int):
            return None
        if step == self._last_step:  # gradient accumulation: no optimizer step happened
            return None
        self._last_step = step
        scaler = self._scaler(trainer)
        if scaler is None:
            return None
        self._count_skip(scaler)
        if not (self.log_every_n_steps and step > 0 and step % self.log_every_n_steps == 0):
            return None
        row: dict[str, Any] = {"amp/skipped_steps": int(self._skipped), "trainer/global_step": step}
        scale = finite_or_none(get_loss_scale(scaler))
        if scale is not None:
            row["amp/loss_scale"] = scale
        return row

    def _count_skip(self, scaler: Any) -> None:
        """GradScaler backs the scale off exactly when it skipped the step: count scale decreases on device.

        (The trainer's scaler has already cleared its per-step inf flags by now, so the decrease is the
        one record of the skip that survives the step.)
        """
        after, before = scale_tensor(scaler), self._scale_before
        if after is None or before is None:
            return
        self._skipped = self._skipped + (after < before.to(after.device)).to(torch.int64).sum()
        self._scale_before = None

    def epoch_row(self, trainer: Any) -> dict[str, Any]:
        """The row logged at the end of each train epoch."""
        row: dict[str, Any] = {
            "amp/enabled": int(self.enabled),
            "amp/precision": str(self.precision),
        }
        scaler = self._scaler(trainer)
        if scaler is not None:
            scale = finite_or_none(get_loss_scale(scaler))
            if scale is not None:
                row["amp/loss_scale"] = scale
            row["amp/skipped_steps"] = int(self._skipped)
        step = getattr(trainer, "global_step", None)
        if isinstance(step, int):
            row["trainer/global_step"] = step
        epoch = getattr(trainer, "current_epoch", None)
        if isinstance(epoch, int):
            row["epoch"] = epoch
        return row

    @staticmethod
    def _log(row: dict[str, Any]) -> None:
        run = active_wandb_run()
        if run is not None:
            run.log(row)
