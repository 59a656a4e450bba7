"""Hugging Face: AMP state from a `transformers.Trainer` or a plain `accelerate` loop, and an HF model for the workbook.

- `AmpTrainerCallback` adds `amp/enabled`, `amp/precision`, `amp/loss_scale` and `amp/skipped_steps` to
  the Trainer's own log rows, so every reporter configured with `report_to` (W&B, TensorBoard, ...)
  receives them, and so does `trainer.state.log_history`. W&B and TensorBoard prefix Trainer keys with
  `train/`, as they do `loss`: the keys appear there as `train/amp/loss_scale` and so on.
- `AccelerateAmpState` / `log_amp_state(accelerator, step)` return (and `accelerator.log`) the same keys
  from a hand-written accelerate loop.
- `gpt2_small` is a workbook model: `RunConfig(model="amp_lib.hf:gpt2_small")` trains a randomly
  initialised `GPT2LMHeadModel` (gpt-small's size, no downloads) on the built-in text.

`amp/precision` is the precision the Accelerator really runs (`accelerator_precision`), not the one asked
for: Accelerate wraps the model's forward in `torch.autocast` only where it sets `native_amp`, and makes a
GradScaler only for fp16 off the CPU, so `fp16=True` on a CPU trains in fp32. Where the two differ the rows
also carry `amp/requested`, and the first one `amp/fallback_reason`. Skipped steps are counted as
`amp_lib.amp_state.SkipCounter` counts them, the way the Lightning callback does.

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

from amp_lib.amp_state import AmpRunLog, HookGuard, PrecisionState, active_grad_scaler, attr_or_none
from amp_lib.config import RunConfig
from amp_lib.models import GPT_SIZES, Workload, lm_loss, text_batches
from amp_lib.precision import is_fp16, parse_precision, resolve_device
from amp_lib.scaler import check_gradscaler_internals

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # the [hf] extra is not installed: the module still imports
    _TrainerCallback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

__all__ = [
    "AccelerateAmpState",
    "AmpTrainerCallback",
    "accelerator_precision",
    "add_amp_callback",
    "gpt2_small",
    "log_amp_state",
    "trainer_precision",
]

INSTALL_HINT = "pip install 'amp-workbook[hf]'"
# Logs of evaluation and prediction metrics: AMP state belongs to the training rows.
_EVAL_PREFIXES = ("eval_", "test_")
# Accelerate's distributed types whose backend applies the precision itself, not through Accelerate's autocast.
_BACKEND_PRECISION = ("DEEPSPEED", "MEGATRON_LM", "XLA")


def require(module: str) -> Any:
    """Import an optional Hugging Face dependency, or raise ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is not installed; amp_lib.hf needs the [hf] extra: {INSTALL_HINT}") from exc


# --- precision ---


def trainer_precision(args: Any, accelerator_state: Any = None) -> str:
    """The canonical precision a Trainer run asks for: `fp16`/`bf16` of its TrainingArguments, else Accelerate's
    `mixed_precision` ("no", "fp16", "bf16", "fp8"; e.g. from $ACCELERATE_MIXED_PRECISION), else `tf32`, else fp32."""
    if args.fp16:
        return "fp16-mixed"
    if args.bf16:
        return "bf16-mixed"
    mixed = getattr(accelerator_state, "mixed_precision", None)
    if isinstance(mixed, str) and mixed.strip().lower() not in ("", "no"):
        return parse_precision(mixed)
    return "tf32" if args.tf32 else "fp32"


def accelerator_precision(accelerator: Any, requested: str | None = None) -> PrecisionState:
    """What an Accelerator really trains in, against `requested` (default: its own `mixed_precision`).

    Accelerate's `mixed_precision` is what was asked for. What runs is its autocast: `prepare` wraps the
    model's forward in `torch.autocast` only where the Accelerator set `native_amp` (and the autocast
    handler does not turn it off). For fp16 on a CPU it sets neither that nor a GradScaler: fp32 runs.
    DeepSpeed, Megatron-LM and XLA apply the precision themselves: what was asked is what runs there.
    """
    mixed = accelerator.mixed_precision
    asked = parse_precision(mixed)
    requested = asked if requested is None else requested
    effective, reason = asked, None
    backend = attr_or_none(accelerator, "distributed_type")
    if asked != "fp32" and getattr(backend, "value", backend) not in _BACKEND_PRECISION:
        if not attr_or_none(accelerator, "native_amp"):
            device = attr_or_none(attr_or_none(accelerator, "device"), "type")
            where = "a CPU" if device == "cpu" else str(device)
            no_scaler = (
                " and no GradScaler" if asked == "fp16-mixed" and active_grad_scaler(accelerator) is None else ""
            )
            effective, reason = "fp32", f"Accelerate runs {mixed} on {where} in fp32: no autocast{no_scaler}"
        elif attr_or_none(attr_or_none(accelerator, "autocast_handler"), "enabled") is False:
            effective, reason = "fp32", "the Accelerator's AutocastKwargs(enabled=False) turn its autocast off"
    if requested == "tf32" and effective == "fp32" and reason is None:
        effective = "tf32"  # TF32 is a torch switch the Trainer sets; Accelerate neither sets nor clears it
    if effective != requested and reason is None:
        reason = f"the Accelerator runs mixed_precision={mixed!r}"
    return PrecisionState(requested, effective, reason if effective != requested else None)


# --- transformers.Trainer ---


class AmpTrainerCallback(_TrainerCallback):  # type: ignore[misc,valid-type]
    """Adds AMP state to each training log row of a `transformers.Trainer`.

    `amp/enabled` (0/1) and `amp/precision` (canonical name) of the precision the Trainer's Accelerator
    really runs; where that is not the precision asked for, `amp/requested` too and, in the first row of
    each `train()`, `amp/fallback_reason`. With an enabled GradScaler also `amp/loss_scale` (when finite)
    and `amp/skipped_steps` (cumulative over this `train()` call, per optimizer step, so gradient
    accumulation counts once per update). Evaluation rows are left alone.

    The keys are added to the `logs` dict the Trainer hands every callback, and to the row it already
    appended to `state.log_history`. A reporter only sees them if this callback runs before it, while
    the Trainer puts user callbacks after its reporters: the callback therefore moves itself to the
    front of the Trainer's callback list when the Trainer first calls it (at the end of `__init__`, or
    at `train()` for one added later). `add_amp_callback(trainer)` does the same explicitly. Either way
    the callback learns its Trainer, whose Accelerator says what runs; hooks called by hand, with no
    Trainer, report the precision asked for.

    A hook never raises: tracking must not be the reason a fine-tune dies (a failure is logged once as
    a warning). The exception is a torch whose GradScaler lacks the internals read without a sync: that
    fails at `on_train_begin`, loudly.
    """

    def __init__(self) -> None:
        if _TrainerCallback is object:
            require("transformers")
        super().__init__()
        self.amp = AmpRunLog()  # over the current train() call
        self.guard = HookGuard(log, "AmpTrainerCallback")
        self._placed = False
        self._trainer: weakref.ref[Any] | None = None

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps so far in this `train()` call (reading it syncs with the device)."""
        return self.amp.skips.count

    # hooks: the Trainer calls each with (args, state, control, model=, optimizer=, ...)
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard(self._attach)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.amp = AmpRunLog()
        self.guard(self._attach)
        if not self._placed:
            log.warning(
                "AmpTrainerCallback could not move ahead of the Trainer's reporting callbacks, which will miss "
                "the amp/* keys; add it with amp_lib.hf.add_amp_callback(trainer)"
            )
        precision = self.guard(self.precision, args, kwargs.get("optimizer"))
        scaler = self.guard(active_grad_scaler, kwargs.get("optimizer"))
        fp16 = isinstance(precision, PrecisionState) and is_fp16(precision.effective)
        if isinstance(precision, PrecisionState) and precision.fell_back:
            log.warning(
                "AmpTrainerCallback: %s was asked for, but the Trainer trains in %s: %s",
                precision.requested,
                precision.effective,
                precision.reason,
            )
        elif fp16 and scaler is None:
            log.warning("AmpTrainerCallback: fp16 runs without a GradScaler, so no loss scale is logged")
        if scaler is not None or fp16:
            check_gradscaler_internals()  # outside the guard: a torch rename must not pass as a warning

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard(self._before_step, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.guard(self._after_step, kwargs.get("optimizer"))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.guard(self._add_keys, args, state, logs, kwargs.get("optimizer"))

    # work
    def precision(self, args: Any, optimizer: Any = None) -> PrecisionState:
        """What `args` ask for, against what the Trainer's Accelerator runs (no Trainer known: what they ask)."""
        accelerator = attr_or_none(self._trainer() if self._trainer is not None else None, "accelerator")
        if accelerator is None:
            requested = trainer_precision(args, attr_or_none(optimizer, "accelerator_state"))
            return PrecisionState(requested, requested)
        return accelerator_precision(accelerator, trainer_precision(args, accelerator))

    def _attach(self) -> None:
        """Find the CallbackHandler calling this hook (a frame up the stack), move self to its front, and
        remember the Trainer that called it (the frame above whose `callback_handler` it is).

        Safe while the handler iterates its list: moving the current item from index k to 0 leaves the
        items after k at the indices the iteration has still to visit. The whole stack is searched, not a
        fixed number of frames: a subclass, a decorator or a tracer can put any number of frames between.
        """
        if self._placed and self._trainer is not None:
            return
        from transformers.trainer_callback import CallbackHandler

        frame = sys._getframe(1)
        handler = None
        while frame is not None:
            owner = frame.f_locals.get("self")
            if handler is None and isinstance(owner, CallbackHandler) and any(cb is self for cb in owner.callbacks):
                handler = owner
                if not self._placed:
                    _put_first(handler.callbacks, self)
                    self._placed = True
            elif handler is not None and attr_or_none(owner, "callback_handler") is handler:
                self._trainer = _weak(owner)
                return
            frame = frame.f_back

    def _before_step(self, optimizer: Any) -> None:
        self.amp.skips.prime(active_grad_scaler(optimizer))

    def _after_step(self, optimizer: Any) -> None:
        """Count a skip; a second look at the same step counts nothing (the scale has not moved since)."""
        self.amp.skips.observe(active_grad_scaler(optimizer))

    def _add_keys(self, args: Any, state: Any, logs: dict[str, Any] | None, optimizer: Any) -> None:
        if not isinstance(logs, dict) or any(str(k).startswith(_EVAL_PREFIXES) for k in logs):
            return
        logged = set(logs)
        row = self.amp.row(self.precision(args, optimizer), active_grad_scaler(optimizer))
        logs.update(row)
        # Trainer.log appended {**logs, "step": global_step} to log_history before calling on_log.
        history = getattr(state, "log_history", None)
        if history and isinstance(history[-1], dict):
            last = history[-1]
            if last.get("step") == state.global_step and logged <= set(last):
                last.update(row)


def _weak(obj: Any) -> weakref.ref[Any] | None:
    """A weak reference to `obj`, None for an object that takes none (no Trainer: a stand-in)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


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
    callback._trainer = _weak(trainer)
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
        self.amp = AmpRunLog()
        scaler = active_grad_scaler(accelerator)
        if scaler is not None:
            check_gradscaler_internals()
            self.amp.skips.prime(scaler)

    @property
    def precision(self) -> PrecisionState:
        """The Accelerator's `mixed_precision` against what it really runs (`accelerator_precision`)."""
        return accelerator_precision(self.accelerator)

    @property
    def skipped_steps(self) -> int:
        """Skipped optimizer steps seen by `after_step()` (reading it syncs with the device)."""
        return self.amp.skips.count

    def after_step(self) -> None:
        self.amp.skips.observe(active_grad_scaler(self.accelerator))

    def state(self) -> dict[str, Any]:
        """The `amp/*` keys of `AmpRunLog.row`: the precision that runs, and with an enabled scaler
        `amp/loss_scale` (if finite) and `amp/skipped_steps` (cumulative)."""
        return self.amp.row(self.precision, active_grad_scaler(self.accelerator))

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
