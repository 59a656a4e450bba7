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

from amp_lib.amp_state import AmpRunLog, HookGuard, PrecisionState, active_grad_scaler, attr_or_none, canonical_name
from amp_lib.precision import is_fp16
from amp_lib.scaler import check_gradscaler_internals

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


def lightning_precision(trainer: Any, requested: str) -> PrecisionState:
    """`requested` against what the trainer's precision plugin runs (`trainer.precision`, read from
    `trainer.strategy.precision_plugin`). A trainer without one to read (not set up, a stand-in) reports
    `requested`: nothing better is known."""
    plugin = attr_or_none(attr_or_none(trainer, "strategy"), "precision_plugin")
    flag = attr_or_none(plugin, "precision")
    if not isinstance(flag, (str, int)) or isinstance(flag, bool):
        return PrecisionState(requested, requested)
    effective = canonical_name(flag)
    if effective == requested:
        return PrecisionState(requested, effective)
    if requested == "fp16-mixed" and effective == "bf16-mixed" and attr_or_none(plugin, "device") == "cpu":
        reason = "Lightning runs precision='16-mixed' on a CPU as 'bf16-mixed': it has no fp16 AMP for a CPU"
    else:
        reason = f"the Trainer's precision plugin ({type(plugin).__name__}) runs precision={flag!r}"
    return PrecisionState(requested, effective, reason)


class AmpWandbCallback(_Callback):  # type: ignore[misc,valid-type]
    """Log `amp/enabled`, `amp/precision` and (fp16 with a scaler) `amp/loss_scale` at each train epoch end,
    plus `amp/loss_scale` and cumulative `amp/skipped_steps` every `log_every_n_steps` optimizer steps.

    `enabled` and `precision` say what the run asked for: `precision` is the flag the user gave the
    Trainer, in any spelling (`'16'`, `16`, `'16-mixed'`, `'fp16-mixed'`, `'16_true'`...), and
    `enabled=False` asks for no AMP (fp32). The rows say what the Trainer really runs (its precision
    plugin), by canonical name: Lightning runs `'16-mixed'` as bf16-mixed on a CPU, without a
    GradScaler. Where the two differ the epoch rows also carry `amp/requested`, and the first one
    `amp/fallback_reason`. A loss scale is logged where fp16 runs with an enabled GradScaler whose scale
    is finite. Rows carry `trainer/global_step`, the step key Lightning's WandbLogger uses.
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
        self.amp = AmpRunLog()
        self.guard = HookGuard(log, "AmpWandbCallback")
        self._last_step: int | None = None

    @property
    def requested(self) -> str:
        """The precision asked for, by canonical name: `precision`, or fp32 when not `enabled`."""
        return canonical_name(self.precision) if self.enabled else "fp32"

    def precision_state(self, trainer: Any) -> PrecisionState:
        """What was asked for against what `trainer` runs."""
        return lightning_precision(trainer, self.requested)

    # hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if is_fp16(self.precision_state(trainer).effective):
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
        self.guard(self._log_row, fn, trainer)

    def _log_row(self, fn: Any, trainer: Any) -> None:
        row = fn(trainer)
        run = active_wandb_run() if row else None
        if run is not None:
            run.log(row)

    def _scaler(self, trainer: Any, precision: PrecisionState | None = None) -> Any:
        """The trainer's enabled GradScaler where fp16 runs; None elsewhere."""
        precision = precision if precision is not None else self.precision_state(trainer)
        return active_grad_scaler(trainer) if is_fp16(precision.effective) else None

    def _before_step(self, trainer: Any) -> None:
        self.amp.skips.prime(self._scaler(trainer))

    def step_row(self, trainer: Any) -> dict[str, Any] | None:
        """After a batch: count a skipped optimizer step; the row to log every `log_every_n_steps` steps.

        (The trainer's scaler has already cleared its per-step inf flags by now: the scale's decrease is
        the one record of a skip that survives the step.)
        """
        step = getattr(trainer, "global_step", None)
        if not isinstance(step, int):
            return None
        if step == self._last_step:  # gradient accumulation: no optimizer step happened
            return None
        self._last_step = step
        scaler = self._scaler(trainer)
        if scaler is None:
            return None
        self.amp.skips.observe(scaler)
        if not (self.log_every_n_steps and step > 0 and step % self.log_every_n_steps == 0):
            return None
        return {**self.amp.scale_row(scaler), "trainer/global_step": step}

    def epoch_row(self, trainer: Any) -> dict[str, Any]:
        """The row logged at the end of each train epoch."""
        precision = self.precision_state(trainer)
        row = self.amp.row(precision, self._scaler(trainer, precision))
        step = getattr(trainer, "global_step", None)
        if isinstance(step, int):
            row["trainer/global_step"] = step
        epoch = getattr(trainer, "current_epoch", None)
        if isinstance(epoch, int):
            row["epoch"] = epoch
        return row
