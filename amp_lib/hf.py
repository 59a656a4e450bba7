"""Hugging Face: AMP state from a `transformers.Trainer` or a plain `accelerate` loop, and an HF model for the workbook.

- `AmpTrainerCallback` adds `amp/enabled`, `amp/precision`, `amp/loss_scale` and `amp/skipped_steps` to
  the Trainer's own log rows, so every reporter configured with `report_to` (W&B, TensorBoard, ...)
  receives them, and so does `trainer.state.log_history`. W&B and TensorBoard prefix Trainer keys with
  `train/`, as they do `loss`: the keys appear there as `train/amp/loss_scale` and so on.
- `AccelerateAmpState` / `log_amp_state(accelerator, step)` return (and `accelerator.log`) the same keys
  from a hand-written accelerate loop.
- `gpt2_small` is a workbook model: `RunConfig(model="amp_lib.hf:gpt2_small")` trains a randomly
  initialised `GPT2LMHeadModel` (gpt-small's size, no downloads) on the built-in text.

Skipped steps are counted the way `amp_lib.lightning_callback` counts them: GradScaler backs its scale
off exactly when it skips a step, so a decrease of the scale tensor, compared on the device, is a skip.
That needs no host-device sync on the steps that don't log, and it is right where Accelerate's
`step_was_skipped` is not: with a fused optimizer (`optim="adamw_torch_fused"`) GradScaler always calls
the optimizer's `step` and lets the kernel skip the update, so Accelerate reports no skip at all
(accelerate #4242).

`transformers` and `accelerate` are an optional extra: `pip install 'amp-workbook[hf]'`. This module
imports without them; what needs them says which extra to install.
"""

from __future__ import annotations

import importlib
import logging
import sys
import weakref
from typing import Any

import torch

from amp_lib.config import RunConfig
from amp_lib.models import GPT_SIZES, Workload, lm_loss, text_batches
from amp_lib.precision import parse_precision, resolve_device
from amp_lib.results import finite_or_none
from amp_lib.scaler import attr_or_none, check_gradscaler_internals, find_grad_scaler, get_loss_scale, scale_tensor

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # the [hf] extra is not installed: the module still imports
    _TrainerCallback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

__all__ = [
    "AccelerateAmpState",
    "AmpTrainerCallback",
    "accelerate_precision",
    "add_amp_callback",
    "find_hf_scaler",
    "gpt2_small",
    "log_amp_state",
    "trainer_precision",
]

INSTALL_HINT = "pip install 'amp-workbook[hf]'"
# Logs of evaluation and prediction metrics: AMP state belongs to the training rows.
_EVAL_PREFIXES = ("eval_", "test_")


def require(module: str) -> Any:
    """Import an optional Hugging Face dependency, or raise ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed; amp_lib.hf needs the [hf] extra: {INSTALL_HINT}") from exc


# --- precision and scaler ---


def trainer_precision(args: Any, accelerator_state: Any = None) -> str:
    """The canonical precision of a Trainer run: `fp16`/`bf16` of its TrainingArguments, else Accelerate's
    `mixed_precision` ("no", "fp16", "bf16", "fp8"; e.g. from $ACCELERATE_MIXED_PRECISION), else `tf32`, else fp32."""
    if args.fp16:
        return "fp16-mixed"
    if args.bf16:
        return "bf16-mixed"
    mixed = getattr(accelerator_state, "mixed_precision", None)
    if isinstance(mixed, str) and mixed.strip().lower() not in ("", "no"):
        return parse_precision(mixed)
    return "tf32" if args.tf32 else "fp32"


def accelerate_precision(accelerator: Any) -> str:
    """The canonical name of an Accelerator's `mixed_precision` ("no" is fp32, "fp8" fp8-mixed)."""
    return parse_precision(accelerator.mixed_precision)


def amp_enabled(precision: str) -> bool:
    """Whether a canonical precision computes in reduced precision (fp32 and tf32 do not)."""
    return precision not in ("fp32", "tf32")


def find_hf_scaler(obj: Any) -> torch.amp.GradScaler | None:
    """The enabled GradScaler of an Accelerator or an AcceleratedOptimizer (both keep it as `.scaler`),
    or of a GradScaler itself; None wherever there is none (bf16, fp32, fp16 on a CPU)."""
    scaler = find_grad_scaler(obj)
    if scaler is None:
        scaler = find_grad_scaler(attr_or_none(obj, "scaler"))
    return scaler if scaler is not None and scaler.is_enabled() else None


class SkipCounter:
    """Skipped optimizer steps, counted on the device as decreases of the loss scale (no host sync).

    `prime(scaler)` records the scale before the first step it should see; `observe(scaler)` after each
    optimizer step compares the scale with the last one recorded. `count` syncs: read it only to log.
    """

    def __init__(self) -> None:
        self.skipped: Any = 0  # a device tensor once a step was observed
        # The last scale seen: a device tensor, or the host float GradScaler starts from (before its
        # first step it has no scale tensor yet, and get_scale() returns the initial scale without a sync).
        self._last: torch.Tensor | float | None = None

    def prime(self, scaler: torch.amp.GradScaler) -> None:
        if self._last is None:
            tensor = scale_tensor(scaler)
            self._last = tensor if tensor is not None else float(scaler.get_scale())

    def observe(self, scaler: torch.amp.GradScaler) -> None:
        now = scale_tensor(scaler)
        if now is None:
            return
        if self._last is not None:  # a float compares on the device as a kernel argument: no copy, no sync
            self.skipped = self.skipped + (now < self._last).to(torch.int64)
        self._last = now

    @property
    def count(self) -> int:
        return int(self.skipped)


def _amp_row(precision: str, scaler: torch.amp.GradScaler | None, counter: SkipCounter) -> dict[str, Any]:
    row: dict[str, Any] = {"amp/enabled": int(amp_enabled(precision)), "amp/precision": precision}
    if scaler is not None:
        scale = finite_or_none(get_loss_scale(scaler))
        if scale is not None:
            row["amp/loss_scale"] = scale
        row["amp/skipped_steps"] = counter.count
    return row


# --- transformers.Trainer ---


class AmpTrainerCallback(_TrainerCallback):  # type: ignore[misc,valid-type]
    """Adds AMP state to each training log row of a `transformers.Trainer`.

    `amp/enabled` (0/1) and `amp/precision` (canonical name) always; with an enabled GradScaler also
    `amp/loss_scale` (when finite) and `amp/skipped_steps` (cumulative over this `train()` call, per
    optimizer step, so gradient accumulation counts once per update). Evaluation rows are left alone.

    The keys are added to the `logs` dict the Trainer hands every callback, and to the row it already
    appended to `state.log_history`. A reporter only sees them if this callback runs before it, while
    the Trainer puts user callbacks after its reporters: the callback therefore moves itself to the
    front of the Trainer's callback list when the Trainer first calls it (at the end of `__init__`, or
    at `train()` for one added later). `add_amp_callback(trainer)` does the same explicitly.

    A hook never raises: tracking must not be the reason a fine-tune dies (a failure is logged once as
    a warning). The exception is a torch whose GradScaler lacks the internals read without a sync: that
    fails at `on_train_begin`, loudly.
    """

    def __init__(self) -> None:
        if _TrainerCallback is object:
            require("transformers")
        super().__init__()
        self.counter = SkipCounter()  # over the current train() call
        self._placed = False
        self._warned = False

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps so far in this `train()` call (reading it syncs with the device)."""
        return self.counter.count

    # hooks: the Trainer calls each with (args, state, control, model=, optimizer=, ...)
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard(self._move_to_front)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.counter = SkipCounter()
        self._guard(self._move_to_front)
        if not self._placed:
            log.warning(
                "AmpTrainerCallback could not move ahead of the Trainer's reporting callbacks, which will miss "
                "the amp/* keys; add it with amp_lib.hf.add_amp_callback(trainer)"
            )
        precision = self._guard(trainer_precision, args, attr_or_none(kwargs.get("optimizer"), "accelerator_state"))
        scaler = self._guard(find_hf_scaler, kwargs.get("optimizer"))
        if scaler is None and isinstance(precision, str) and precision.startswith("fp16"):
            log.warning(
                "AmpTrainerCallback: fp16 is on but the Trainer has no GradScaler, so no loss scale is logged "
                "(on a CPU, Accelerate creates none and runs fp16=True in fp32)"
            )
        if scaler is not None or (isinstance(precision, str) and precision.startswith("fp16")):
            check_gradscaler_internals()  # outside the guard: a torch rename must not pass as a warning

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard(self._before_step, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._guard(self._after_step, kwargs.get("optimizer"))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self._guard(self._add_keys, args, state, logs, kwargs.get("optimizer"))

    # work
    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never break training
            self._warn_once(f"AmpTrainerCallback: logging failed and is skipped: {type(exc).__name__}: {exc}")
            return None

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(message)

    def _move_to_front(self) -> None:
        """Find the CallbackHandler calling this hook (a frame up the stack) and move self to its front.

        Safe while the handler iterates its list: moving the current item from index k to 0 leaves the
        items after k at the indices the iteration has still to visit. The whole stack is searched, not a
        fixed number of frames: a subclass, a decorator or a tracer can put any number of frames between.
        """
        if self._placed:
            return
        from transformers.trainer_callback import CallbackHandler

        frame = sys._getframe(1)
        while frame is not None:
            handler = frame.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(cb is self for cb in handler.callbacks):
                _put_first(handler.callbacks, self)
                self._placed = True
                return
            frame = frame.f_back

    def _before_step(self, optimizer: Any) -> None:
        scaler = find_hf_scaler(optimizer)
        if scaler is not None:
            self.counter.prime(scaler)

    def _after_step(self, optimizer: Any) -> None:
        """Count a skip; a second look at the same step counts nothing (the scale has not moved since)."""
        scaler = find_hf_scaler(optimizer)
        if scaler is not None:
            self.counter.observe(scaler)

    def _add_keys(self, args: Any, state: Any, logs: dict[str, Any] | None, optimizer: Any) -> None:
        if not isinstance(logs, dict) or any(str(k).startswith(_EVAL_PREFIXES) for k in logs):
            return
        logged = set(logs)
        precision = trainer_precision(args, attr_or_none(optimizer, "accelerator_state"))
        row = _amp_row(precision, find_hf_scaler(optimizer), self.counter)
        logs.update(row)
        # Trainer.log appended {**logs, "step": global_step} to log_history before calling on_log.
        history = getattr(state, "log_history", None)
        if history and isinstance(history[-1], dict):
            last = history[-1]
            if last.get("step") == state.global_step and logged <= set(last):
                last.update(row)


def _put_first(callbacks: list[Any], callback: Any) -> None:
    for i, cb in enumerate(callbacks):
        if cb is callback:
            del callbacks[i]
            break
    callbacks.insert(0, callback)


def add_amp_callback(trainer: Any, callback: AmpTrainerCallback | None = None) -> AmpTrainerCallback:
    """Put an `AmpTrainerCallback` first in `trainer`'s callbacks (before its reporters) and return it.

    Any other AmpTrainerCallback already there is removed, so calling this twice adds one callback.
    """
    callback = callback if callback is not None else AmpTrainerCallback()
    callbacks = trainer.callback_handler.callbacks
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, AmpTrainerCallback) or cb is callback]
    _put_first(callbacks, callback)
    callback._placed = True  # placed by hand: nothing to move, and nothing to warn about at train()
    return callback


# --- plain accelerate loops ---


class AccelerateAmpState:
    """AMP state of a hand-written accelerate loop: call `after_step()` after every `optimizer.step()`
    (on the device, no sync) and `log(step)` when you log (it syncs, once).

        amp = AccelerateAmpState(accelerator)       # after accelerator.prepare(...)
        for step, batch in enumerate(loader):
            ...
            optimizer.step(); amp.after_step()
            if step % 50 == 0:
                amp.log(step)                        # returns the keys; accelerator.log(...) them if trackers are set up
    """

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.counter = SkipCounter()
        scaler = find_hf_scaler(accelerator)
        if scaler is not None:
            check_gradscaler_internals()
            self.counter.prime(scaler)

    @property
    def precision(self) -> str:
        return accelerate_precision(self.accelerator)

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps seen by `after_step()` (reading it syncs with the device)."""
        return self.counter.count

    def after_step(self) -> None:
        scaler = find_hf_scaler(self.accelerator)
        if scaler is not None:
            self.counter.observe(scaler)

    def state(self) -> dict[str, Any]:
        """`amp/enabled`, `amp/precision`, and with an enabled scaler `amp/loss_scale` (if finite) and
        `amp/skipped_steps` (cumulative)."""
        return _amp_row(self.precision, find_hf_scaler(self.accelerator), self.counter)

    def log(self, step: int | None = None) -> dict[str, Any]:
        row = self.state()
        if self.accelerator.trackers:
            self.accelerator.log(row, step=step)
        return row


_STATES: weakref.WeakKeyDictionary[Any, AccelerateAmpState] = weakref.WeakKeyDictionary()


def log_amp_state(accelerator: Any, step: int | None = None) -> dict[str, Any]:
    """One call for an accelerate loop: the AMP keys now, also sent with `accelerator.log` when trackers
    are set up. Call it after every optimizer step: it counts a skip as a decrease of the scale since its
    previous call for this accelerator (and reads the scale, a sync, each time). To log less often than
    you step, keep an `AccelerateAmpState` and call its `after_step()` every step instead."""
    state = _STATES.get(accelerator)
    if state is None:
        state = _STATES[accelerator] = AccelerateAmpState(accelerator)
    state.after_step()
    return state.log(step)


# --- the workbook model ---


def hf_lm_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a Hugging Face causal LM's output (`.logits`) against the next tokens."""
    return lm_loss(output.logits, targets)


def gpt2_small(config: RunConfig) -> Workload:
    """`model="amp_lib.hf:gpt2_small"`: a Hugging Face `GPT2LMHeadModel` from a `GPT2Config` the size of
    gpt-small (6 layers, 6 heads, 384 wide; random init, nothing downloaded), on the built-in text with
    the character vocabulary, the same windows and split as the built-in GPT models. Dropout is off, as
    in the built-in models, so precisions are compared on the same computation."""
    transformers = require("transformers")
    size = GPT_SIZES["gpt-small"]
    device = resolve_device(config.device)
    train, evals, vocab_size = text_batches(config, device)
    hf_config = transformers.GPT2Config(
        n_layer=size.n_layer,
        n_head=size.n_head,
        n_embd=size.n_embd,
        n_positions=max(size.block_size, config.seq_len),
        vocab_size=vocab_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(hf_config)
    # nanoGPT's 6N + 12·L·H·Q·T training flops per token, N without the position embeddings
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    attention = 12 * size.n_layer * size.n_head * (size.n_embd // size.n_head) * config.seq_len
    return Workload(
        model=model,
        train_batches=train,
        eval_batches=evals,
        loss_fn=hf_lm_loss,
        items_per_batch=config.batch_size * config.seq_len,
        item_unit="tokens",
        flops_per_item=float(6 * n + attention),
    )
