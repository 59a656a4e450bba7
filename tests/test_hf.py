"""`amp_lib.hf`: the Trainer callback, AMP state for accelerate loops, and the `gpt2_small` workbook model.

Everything runs real transformers, accelerate, torch and (offline) W&B on the CPU. Offline W&B runs
are read back from disk (`wandb_readback.read_run`), so what is checked is what W&B stored.

fp16 on a CPU: Accelerate creates no GradScaler there (its Accelerator makes one only for a GPU-like
device) and neither autocast, so a Trainer given `fp16=True` on a CPU silently trains in fp32. The
fp16 tests therefore hand the real Accelerator a real `torch.amp.GradScaler("cpu")` and switch on its
native autocast (`accelerator.scaler`, `accelerator.native_amp`) before it prepares the model and
optimizer: the state Accelerate builds by itself on a GPU. The run is then genuine fp16 autocast with
loss scaling through Accelerate's own code paths (`backward`, `clip_grad_norm_`, `AcceleratedOptimizer`).
A forced overflow is a loss multiplied by 1e30 on one micro-batch: its fp16 gradients overflow.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import tomllib
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import AutocastKwargs
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import WandbCallback
from transformers.trainer_callback import DefaultFlowCallback
from wandb_readback import only_run_dir, read_run, read_summary

from amp_lib import hf
from amp_lib.amp_state import PrecisionState
from amp_lib.config import RunConfig
from amp_lib.data import CharTokenizer, corpus
from amp_lib.hf import AccelerateAmpState, AmpTrainerCallback, add_amp_callback, gpt2_small, log_amp_state
from amp_lib.scaler import check_gradscaler_internals

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 40
INIT_SCALE = 2.0**16


# --- helpers: a tiny HF model, a Trainer, a forced overflow ---


def tiny_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16, bos_token_id=None, eos_token_id=None
    )
    return GPT2LMHeadModel(cfg)


def token_dataset(n: int = 64) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (n, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": x, "labels": x} for x in ids]


class OverflowOn:
    """A Trainer `compute_loss_func`: the causal-LM loss, times 1e30 on the given micro-batches (1-based)."""

    def __init__(self, *calls: int) -> None:
        self.calls, self.count = set(calls), 0

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        from transformers.loss.loss_utils import ForCausalLMLoss

        self.count += 1
        loss = ForCausalLMLoss(outputs.logits, labels, VOCAB, num_items_in_batch=num_items_in_batch)
        return loss * 1e30 if self.count in self.calls else loss


class ScaleWitness(TrainerCallback):
    """What the Trainer's GradScaler really held after each optimizer step (test-side, reads it directly)."""

    def __init__(self) -> None:
        self.scales: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.scales[state.global_step] = optimizer.scaler.get_scale()


def make_trainer(
    out: Path, *, report_to: list[str], callbacks: list[Any] | None = None, loss: Any = None, **kw: Any
) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to=report_to,
        **{"max_steps": 4, **kw},
    )
    return Trainer(
        model=tiny_lm(),
        args=args,
        train_dataset=token_dataset(),
        eval_dataset=token_dataset(4),
        callbacks=callbacks,
        compute_loss_func=loss,
    )


def cpu_args(**kw: Any) -> TrainingArguments:
    """TrainingArguments of a CPU run that reports nowhere: what the hook-level tests hand a callback."""
    return TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], **kw)


def placed_callback() -> AmpTrainerCallback:
    """A callback put first by `add_amp_callback` (on a bare callback list): it neither moves nor warns."""
    return add_amp_callback(SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[])))


def with_cpu_grad_scaler(trainer_or_accelerator: Any) -> Any:
    """Give the Accelerator a real CPU GradScaler and native fp16 autocast (see the module docstring)."""
    accelerator = getattr(trainer_or_accelerator, "accelerator", trainer_or_accelerator)
    assert accelerator.mixed_precision == "fp16" and accelerator.scaler is None  # what Accelerate does on a CPU
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    accelerator.native_amp = True
    return trainer_or_accelerator


def fresh_accelerator(**kwargs: Any) -> Accelerator:
    """An Accelerator on the CPU with its own settings: reset accelerate's process-wide state first, as
    `TrainingArguments` does for each Trainer."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kwargs)


def training_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in log_history if "loss" in row]


def amp_keys(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    return {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix + "amp/")}


# --- the Trainer callback: keys in the Trainer's log stream ---


@pytest.mark.slow
def test_bf16_trainer_rows_carry_precision_but_nothing_about_a_scale_and_eval_rows_nothing(tmp_path: Path) -> None:
    """bf16 on a CPU: real autocast, no GradScaler. With report_to=[] the keys land in log_history."""
    callback = AmpTrainerCallback()
    trainer = make_trainer(tmp_path, report_to=[], callbacks=[callback], bf16=True)
    assert trainer.callback_handler.callbacks[0] is callback  # moved ahead of the Trainer's own callbacks
    assert sum(isinstance(cb, AmpTrainerCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    trainer.evaluate()
    history = trainer.state.log_history
    rows = training_rows(history)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert amp_keys(row) == {"amp/enabled": 1, "amp/precision": "bf16-mixed"}
    summary = next(row for row in history if "train_runtime" in row)
    assert amp_keys(summary) == {"amp/enabled": 1, "amp/precision": "bf16-mixed"}
    assert "eval_loss" in history[-1] and amp_keys(history[-1]) == {}


@pytest.mark.slow
def test_fp32_trainer_reports_amp_disabled(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, report_to=[], callbacks=[AmpTrainerCallback()], max_steps=2)
    trainer.train()
    for row in training_rows(trainer.state.log_history):
        assert amp_keys(row) == {"amp/enabled": 0, "amp/precision": "fp32"}


@pytest.mark.slow
def test_fp16_on_a_cpu_logs_the_fp32_that_ran_and_why_in_log_history_and_wandb(
    tmp_path: Path, wandb_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """fp16=True on a CPU as the Trainer runs it, without help: Accelerate makes no autocast and no GradScaler,
    so the run is fp32 (its losses are those of an fp32 run, to the bit). The rows say so: `amp/precision`
    fp32, `amp/requested` fp16-mixed, and the reason in the first row; W&B stores the same."""
    import wandb

    trainer = make_trainer(tmp_path / "fp16", report_to=["wandb"], callbacks=[AmpTrainerCallback()], fp16=True)
    assert trainer.accelerator.scaler is None and not trainer.accelerator.native_amp
    with caplog.at_level(logging.WARNING, logger="amp_lib.hf"):
        trainer.train()
    wandb.finish()
    fp32 = make_trainer(tmp_path / "fp32", report_to=[])
    fp32.train()
    losses = [row["loss"] for row in training_rows(trainer.state.log_history)]
    assert losses == [row["loss"] for row in training_rows(fp32.state.log_history)]  # fp32 is what ran

    reason = "Accelerate runs fp16 on a CPU in fp32: no autocast and no GradScaler"
    rows = [amp_keys(row) for row in trainer.state.log_history if "eval_loss" not in row]
    assert len(rows) == 5  # four steps and the train summary
    expected = {"amp/enabled": 0, "amp/precision": "fp32", "amp/requested": "fp16-mixed"}
    assert rows == [{**expected, "amp/fallback_reason": reason}] + [expected] * 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "amp_lib.hf"]
    assert warnings == [f"AmpTrainerCallback: fp16-mixed was asked for, but the Trainer trains in fp32: {reason}"]

    run_dir = only_run_dir(wandb_env / "wandb_dir")
    stored = read_run(run_dir).rows_with("train/amp/precision")
    assert [int(row["train/global_step"]) for row in stored] == [1, 2, 3, 4, 4]  # the steps, the train summary
    for row in stored:
        assert (row["train/amp/enabled"], row["train/amp/precision"]) == (0, "fp32")
        assert row["train/amp/requested"] == "fp16-mixed"
    assert [row.get("train/amp/fallback_reason") for row in stored] == [reason, None, None, None, None]
    summary = read_summary(run_dir)["summary"]  # where a W&B user sees it: the run's summary keeps it
    assert (summary["train/amp/precision"], summary["train/amp/fallback_reason"]) == ("fp32", reason)


@pytest.mark.slow
def test_fp16_overflow_reaches_wandb_as_one_more_skip_and_a_halved_scale(tmp_path: Path, wandb_env: Path) -> None:
    """A real Trainer with its real WandbCallback (offline): the callback, added after the Trainer was
    built (so it starts behind the reporter), moves ahead of it at train(); the row W&B stored for each
    step has the scale the GradScaler really had, and the overflow on step 3 is one skip and a halving."""
    import wandb

    witness = ScaleWitness()
    trainer = with_cpu_grad_scaler(
        make_trainer(tmp_path, report_to=["wandb"], callbacks=[witness], loss=OverflowOn(3), fp16=True, max_steps=5)
    )
    callback = AmpTrainerCallback()
    trainer.add_callback(callback)
    names = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert names.index(WandbCallback) < names.index(AmpTrainerCallback)  # where the Trainer put it
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback
    wandb.finish()

    record = read_run(only_run_dir(wandb_env / "wandb_dir"))
    rows = {int(row["train/global_step"]): row for row in record.rows_with("train/amp/precision")}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert witness.scales == {1: INIT_SCALE, 2: INIT_SCALE, 3: INIT_SCALE / 2, 4: INIT_SCALE / 2, 5: INIT_SCALE / 2}
    for step, row in rows.items():
        assert row["train/amp/enabled"] == 1 and row["train/amp/precision"] == "fp16-mixed"
        assert row["train/amp/loss_scale"] == witness.scales[step]
    assert [rows[s]["train/amp/skipped_steps"] for s in sorted(rows)] == [0, 0, 1, 1, 1]
    # and the Trainer's own record agrees with W&B
    logged = {row["step"]: amp_keys(row) for row in training_rows(trainer.state.log_history)}
    assert logged[3] == {
        "amp/enabled": 1,
        "amp/precision": "fp16-mixed",
        "amp/loss_scale": INIT_SCALE / 2,
        "amp/skipped_steps": 1,
    }


@pytest.mark.slow
def test_skips_are_counted_per_optimizer_step_with_fused_adamw_and_gradient_accumulation(tmp_path: Path) -> None:
    """Fused AdamW: GradScaler always calls the optimizer's step (the kernel skips the update), so
    Accelerate's step_was_skipped says no skip (accelerate #4242); the scale's decrease still does.
    With 2 micro-batches per step, overflows in both halves of step 2 are one skipped step."""
    witness = ScaleWitness()
    trainer = with_cpu_grad_scaler(
        make_trainer(
            tmp_path,
            report_to=[],
            callbacks=[witness],
            loss=OverflowOn(1, 3, 4, 9),  # step 1 (its first), step 2 (both micro-batches), step 5 (its first)
            fp16=True,
            optim="adamw_torch_fused",
            gradient_accumulation_steps=2,
            max_steps=6,
        )
    )
    callback = add_amp_callback(trainer)
    assert add_amp_callback(trainer, callback) is callback  # twice: still one, still first
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is callback and sum(isinstance(cb, AmpTrainerCallback) for cb in callbacks) == 1
    assert any(isinstance(cb, DefaultFlowCallback) for cb in callbacks)
    trainer.train()
    assert getattr(trainer.optimizer.optimizer, "defaults", {}).get("fused") is True
    rows = {row["step"]: amp_keys(row) for row in training_rows(trainer.state.log_history)}
    assert [rows[s]["amp/skipped_steps"] for s in range(1, 7)] == [1, 2, 2, 2, 3, 3]
    assert [rows[s]["amp/loss_scale"] for s in range(1, 7)] == [witness.scales[s] for s in range(1, 7)]
    assert witness.scales[6] == INIT_SCALE / 8 and callback.skipped_steps == 3


def test_add_amp_callback_replaces_an_amp_callback_the_trainer_already_has(tmp_path: Path) -> None:
    earlier = AmpTrainerCallback()
    trainer = make_trainer(tmp_path, report_to=[], callbacks=[earlier])
    callback = add_amp_callback(trainer)
    amp_callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AmpTrainerCallback)]
    assert callback is not earlier and amp_callbacks == [callback]
    assert trainer.callback_handler.callbacks[0] is callback


class DeeplyCalledCallback(AmpTrainerCallback):
    """A subclass whose `on_init_end` reaches AmpTrainerCallback's through many frames, as a decorator or
    a tracer (a profiler, mutmut's trampolines) puts frames between the Trainer and the hook."""

    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        def down(depth: int) -> None:
            if depth:
                return down(depth - 1)
            return super(DeeplyCalledCallback, self).on_init_end(*args, **kwargs)

        return down(20)


def test_the_callback_moves_ahead_of_the_reporters_however_deep_its_hook_is_called(tmp_path: Path) -> None:
    callback = DeeplyCalledCallback()
    trainer = make_trainer(tmp_path, report_to=[], callbacks=[callback])
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is callback and any(isinstance(cb, DefaultFlowCallback) for cb in callbacks[1:])


# --- the callback never raises; only a renamed GradScaler fails, at train begin ---


def test_hooks_swallow_errors_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    """Junk where the Trainer passes its objects is no error (nothing to read); a GradScaler that fails
    when read is one, and every hook swallows it, warning once."""

    class UnreadableScaler(torch.amp.GradScaler):
        def get_scale(self) -> float:
            raise RuntimeError("scale is gone")

    class NoScaler:
        @property
        def scaler(self) -> Any:
            raise RuntimeError("not prepared yet")

    callback = AmpTrainerCallback()
    state = SimpleNamespace(global_step=1, log_history=[])
    args = cpu_args(fp16=True)
    broken = SimpleNamespace(scaler=UnreadableScaler("cpu"))
    with caplog.at_level(logging.WARNING, logger="amp_lib.hf"):
        logs: dict[str, Any] = {"loss": 1.0}
        assert callback.on_log(args, object(), None, logs=logs, optimizer=NoScaler()) is None
        assert logs == {"loss": 1.0, "amp/enabled": 1, "amp/precision": "fp16-mixed"}
        assert callback.on_step_end(args, None, None, optimizer=NoScaler()) is None  # no state, no scaler
        assert caplog.records == []
        assert callback.on_step_begin(args, state, None, optimizer=broken) is None
        assert callback.on_step_end(args, None, None, optimizer=broken) is None
        assert callback.on_log(args, state, None, logs={"loss": 1.0}, optimizer=broken) is None
        assert callback.on_log(args, state, None, logs=None) is None
    messages = [r.getMessage() for r in caplog.records if r.name == "amp_lib.hf"]
    assert messages == ["AmpTrainerCallback: logging failed and is skipped: RuntimeError: scale is gone"]


def test_a_callback_that_cannot_move_ahead_of_the_reporters_says_how_to_add_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    args = cpu_args()
    with caplog.at_level(logging.WARNING, logger="amp_lib.hf"):
        AmpTrainerCallback().on_train_begin(args, SimpleNamespace(global_step=0), None)  # no Trainer calls it
    assert [r.getMessage() for r in caplog.records] == [
        (
            "AmpTrainerCallback could not move ahead of the Trainer's reporting callbacks, which will miss "
            "the amp/* keys; add it with amp_lib.hf.add_amp_callback(trainer)"
        )
    ]


def test_a_trainer_whose_arguments_name_no_precision_takes_accelerates(caplog: pytest.LogCaptureFixture) -> None:
    """`accelerate launch --mixed_precision` (or $ACCELERATE_MIXED_PRECISION) sets the precision on the
    Accelerator, not in TrainingArguments: the callback reads it from the optimizer's accelerator state."""
    args = cpu_args()

    def optimizer(mixed_precision: str) -> Any:
        return SimpleNamespace(accelerator_state=SimpleNamespace(mixed_precision=mixed_precision))

    callback = placed_callback()
    logs: dict[str, Any] = {"loss": 1.0}
    callback.on_log(args, SimpleNamespace(global_step=1, log_history=[]), None, logs=logs, optimizer=optimizer("bf16"))
    assert logs == {"loss": 1.0, "amp/enabled": 1, "amp/precision": "bf16-mixed"}
    with caplog.at_level(logging.WARNING, logger="amp_lib.hf"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), None, optimizer=optimizer("fp16"))
    assert [r.getMessage() for r in caplog.records] == [
        "AmpTrainerCallback: fp16 runs without a GradScaler, so no loss scale is logged"
    ]


@pytest.mark.parametrize(
    ("precision", "optimizer"),
    [
        ({"fp16": True}, SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))),  # fp16 with its GradScaler
        ({"bf16": True}, None),  # bf16 needs none
        ({}, None),  # fp32
    ],
)
def test_train_begin_warns_of_nothing_when_the_scaler_is_where_the_precision_needs_it(
    precision: dict[str, bool], optimizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    args = cpu_args(**precision)
    callback = placed_callback()
    with caplog.at_level(logging.WARNING, logger="amp_lib.hf"):
        callback.on_train_begin(args, SimpleNamespace(global_step=0), None, optimizer=optimizer)
    assert caplog.records == []


@pytest.mark.parametrize(
    ("history_row", "logs", "updated"),
    [
        ({"loss": 1.0, "step": 4}, {"loss": 1.0}, True),  # the row Trainer.log appended for these logs
        ({"loss": 1.0, "step": 4}, {"loss": 1.0, "step": 4}, True),  # logs that carry the step themselves
        ({"loss": 1.0, "step": 3}, {"loss": 1.0}, False),  # an earlier step's row
        ({"grad_norm": 1.0, "step": 4}, {"loss": 1.0}, False),  # another row of this step
    ],
)
def test_the_keys_go_into_the_history_row_of_these_logs_and_no_other(
    history_row: dict[str, Any], logs: dict[str, Any], updated: bool
) -> None:
    args = cpu_args(bf16=True)
    state = SimpleNamespace(global_step=4, log_history=[dict(history_row)])
    AmpTrainerCallback().on_log(args, state, None, logs=dict(logs))
    amp = {"amp/enabled": 1, "amp/precision": "bf16-mixed"}
    assert state.log_history == [{**history_row, **amp} if updated else history_row]


def test_a_renamed_gradscaler_fails_train_begin_loudly_but_only_where_a_scale_is_tracked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stand-in replaces amp_lib's own check (as in the Lightning tests), nothing in torch."""
    check_gradscaler_internals.cache_clear()
    AmpTrainerCallback().on_train_begin(cpu_args(fp16=True), None, None)
    assert check_gradscaler_internals.cache_info().misses == 1  # it ran, and this torch passes

    def renamed() -> None:
        raise RuntimeError("torch 9.9 renamed GradScaler's _scale")

    monkeypatch.setattr(hf, "check_gradscaler_internals", renamed)
    bf16 = cpu_args(bf16=True)
    assert AmpTrainerCallback().on_train_begin(bf16, None, None) is None  # no scale: not checked
    fp16 = cpu_args(fp16=True)
    with pytest.raises(RuntimeError, match="renamed GradScaler's _scale"):
        AmpTrainerCallback().on_train_begin(fp16, None, None)


# --- precision names ---


def test_trainer_and_accelerate_precisions_are_canonical() -> None:
    assert hf.trainer_precision(cpu_args()) == "fp32"
    assert hf.trainer_precision(cpu_args(fp16=True)) == "fp16-mixed"
    assert hf.trainer_precision(cpu_args(bf16=True)) == "bf16-mixed"
    # TrainingArguments refuses tf32 without an Ampere GPU: the attributes it would have, as plain data
    tf32 = SimpleNamespace(fp16=False, bf16=False, tf32=True)
    assert hf.trainer_precision(tf32) == "tf32"
    # Accelerate's fp8 (its torchao backend) is torchao's default recipe, tensorwise: the canonical name of "fp8"
    assert hf.trainer_precision(cpu_args(), SimpleNamespace(mixed_precision="fp8")) == "fp8-tensorwise"
    assert hf.trainer_precision(cpu_args(), SimpleNamespace(mixed_precision="no")) == "fp32"
    for no_mixed in ("no", " NO ", ""):  # Accelerate's "no" (any case) or nothing: the arguments decide
        assert hf.trainer_precision(tf32, SimpleNamespace(mixed_precision=no_mixed)) == "tf32"
    assert hf.trainer_precision(cpu_args(bf16=True), SimpleNamespace(mixed_precision="fp16")) == "bf16-mixed"


def test_the_accelerator_says_what_really_runs_on_this_cpu() -> None:
    """Real Accelerators on the CPU: bf16 autocast runs; fp16 gets no autocast and no GradScaler, so fp32 runs;
    with the GradScaler and autocast Accelerate builds on a GPU (handed in), fp16 runs."""
    no_reason = "Accelerate runs fp16 on a CPU in fp32: no autocast and no GradScaler"
    assert hf.accelerator_precision(fresh_accelerator(mixed_precision="no")) == PrecisionState("fp32", "fp32")
    bf16 = fresh_accelerator(mixed_precision="bf16")
    assert hf.accelerator_precision(bf16) == PrecisionState("bf16-mixed", "bf16-mixed")
    # what a Trainer asked for, where the Accelerator runs another precision
    assert hf.accelerator_precision(bf16, "fp16-mixed") == PrecisionState(
        "fp16-mixed", "bf16-mixed", "the Accelerator runs mixed_precision='bf16'"
    )
    assert hf.accelerator_precision(fresh_accelerator(mixed_precision="fp16")) == PrecisionState(
        "fp16-mixed", "fp32", no_reason
    )
    helped = with_cpu_grad_scaler(fresh_accelerator(mixed_precision="fp16"))
    assert hf.accelerator_precision(helped) == PrecisionState("fp16-mixed", "fp16-mixed")
    off = fresh_accelerator(mixed_precision="bf16", kwargs_handlers=[AutocastKwargs(enabled=False)])
    assert hf.accelerator_precision(off) == PrecisionState(
        "bf16-mixed", "fp32", "the Accelerator's AutocastKwargs(enabled=False) turn its autocast off"
    )
    # TF32 is a torch switch Accelerate leaves alone: asked for with mixed_precision "no", it is what runs
    assert hf.accelerator_precision(fresh_accelerator(mixed_precision="no"), "tf32") == PrecisionState("tf32", "tf32")


def test_the_callback_reads_the_precision_from_the_trainer_it_was_given_or_found(tmp_path: Path) -> None:
    """Found on the stack when the Trainer first calls it, or given by add_amp_callback: either way the
    Trainer's Accelerator decides. Called by hand, with no Trainer, it reports what the arguments ask."""
    fallback = PrecisionState(
        "fp16-mixed", "fp32", "Accelerate runs fp16 on a CPU in fp32: no autocast and no GradScaler"
    )
    found = AmpTrainerCallback()
    trainer = make_trainer(tmp_path / "a", report_to=[], callbacks=[found], fp16=True)
    assert found.precision(trainer.args) == fallback
    other = make_trainer(tmp_path / "b", report_to=[], fp16=True)
    given = add_amp_callback(other)
    assert given.precision(other.args) == fallback
    assert AmpTrainerCallback().precision(trainer.args) == PrecisionState("fp16-mixed", "fp16-mixed")


# --- plain accelerate loops ---


def _accelerate_loop(accelerator: Accelerator, overflow_steps: set[int], steps: int, each_step: Any) -> None:
    model = tiny_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = token_dataset(steps * 2)
    for step in range(1, steps + 1):
        batch = torch.stack([d["input_ids"] for d in data[2 * step - 2 : 2 * step]])
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss * 1e30 if step in overflow_steps else loss)
        optimizer.step()
        optimizer.zero_grad()
        each_step(step)


@pytest.mark.slow
def test_log_amp_state_every_step_returns_and_logs_the_keys_to_wandb(wandb_env: Path) -> None:
    accelerator = with_cpu_grad_scaler(fresh_accelerator(mixed_precision="fp16", log_with="wandb"))
    accelerator.init_trackers("amp-hf-test")
    returned: dict[int, dict[str, Any]] = {}
    scales: dict[int, float] = {}

    def each_step(step: int) -> None:
        returned[step] = log_amp_state(accelerator, step)
        scales[step] = accelerator.scaler.get_scale()

    _accelerate_loop(accelerator, {2}, 4, each_step)
    accelerator.end_training()
    assert [returned[s]["amp/skipped_steps"] for s in range(1, 5)] == [0, 1, 1, 1]
    assert [returned[s]["amp/loss_scale"] for s in range(1, 5)] == [
        INIT_SCALE,
        INIT_SCALE / 2,
        INIT_SCALE / 2,
        INIT_SCALE / 2,
    ]
    assert [returned[s]["amp/loss_scale"] for s in range(1, 5)] == [scales[s] for s in range(1, 5)]
    assert {returned[1]["amp/enabled"], returned[1]["amp/precision"]} == {1, "fp16-mixed"}

    record = read_run(only_run_dir(wandb_env / "wandb_dir"))
    stored = {row["_step"]: amp_keys(row) for row in record.rows_with("amp/loss_scale")}
    assert stored == returned


def test_accelerate_state_counts_every_skip_between_logs_without_a_scaler_logs_no_scale() -> None:
    accelerator = with_cpu_grad_scaler(fresh_accelerator(mixed_precision="fp16"))
    amp = AccelerateAmpState(accelerator)  # reads the scale before the first step: a skip there counts too
    _accelerate_loop(accelerator, {1, 3}, 4, lambda step: amp.after_step())
    assert amp.log(4) == {
        "amp/enabled": 1,
        "amp/precision": "fp16-mixed",
        "amp/loss_scale": INIT_SCALE / 4,
        "amp/skipped_steps": 2,
    }

    assert log_amp_state(fresh_accelerator(mixed_precision="bf16"), 1) == {
        "amp/enabled": 1,
        "amp/precision": "bf16-mixed",
    }
    assert AccelerateAmpState(fresh_accelerator(mixed_precision="no")).state() == {
        "amp/enabled": 0,
        "amp/precision": "fp32",
    }
    unhelped = AccelerateAmpState(fresh_accelerator(mixed_precision="fp16"))  # on a CPU: no autocast, no scaler
    expected = {"amp/enabled": 0, "amp/precision": "fp32", "amp/requested": "fp16-mixed"}
    reason = "Accelerate runs fp16 on a CPU in fp32: no autocast and no GradScaler"
    assert [unhelped.log(1), unhelped.log(2)] == [{**expected, "amp/fallback_reason": reason}, expected]


@pytest.mark.gpu
def test_counting_skips_forces_no_host_sync_on_cuda(tmp_path: Path) -> None:
    """On a GPU, Accelerate makes the GradScaler itself; the per-step hooks run under sync_debug_mode "error"."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="fp16")
    assert accelerator.scaler is not None
    model = tiny_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    callback, amp = AmpTrainerCallback(), AccelerateAmpState(accelerator)
    state = SimpleNamespace(global_step=0, log_history=[])
    batch = torch.randint(0, VOCAB, (2, 16), device=accelerator.device)
    for step in (1, 2, 3):
        callback.on_step_begin(None, state, None, optimizer=optimizer)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss * 1e30 if step == 2 else loss)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            callback.on_step_end(None, state, None, optimizer=optimizer)
            amp.after_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert callback.skipped_steps == 1 and amp.skipped_steps == 1


# --- the workbook model: amp_lib.hf:gpt2_small ---


@pytest.mark.slow
def test_gpt2_small_is_a_random_init_hf_gpt_small_on_the_built_in_text() -> None:
    config = RunConfig(
        model="amp_lib.hf:gpt2_small", device="cpu", steps=3, timing_warmup_steps=1, batch_size=2, seq_len=32
    )
    torch.manual_seed(0)
    workload = gpt2_small(config)
    model = workload.model
    assert isinstance(model, GPT2LMHeadModel)
    cfg = model.config
    vocab = CharTokenizer.for_text(corpus()).vocab_size
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.n_positions) == (6, 6, 384, vocab, 1024)
    assert len(workload.train_batches) == 3 and len(workload.eval_batches) == 4
    x, y = workload.train_batches[0]
    assert x.shape == y.shape == (2, 32) and int(x.max()) < vocab
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    model.eval()
    with torch.no_grad():
        loss = workload.loss_fn(model(x), y)
    assert abs(loss.item() - math.log(vocab)) < 0.5  # a random init predicts about uniformly
    with torch.no_grad():
        evaluated = model(x)
        model.train()  # no dropout: training computes what evaluation does, in every precision alike
        assert torch.equal(model(x).logits, evaluated.logits)
    assert evaluated.past_key_values is None  # no key/value cache held beside the training step
    assert cfg.bos_token_id is None and cfg.eos_token_id is None  # none outside the character vocabulary
    assert (workload.items_per_batch, workload.item_unit) == (64, "tokens")
    n_params = sum(p.numel() for p in model.parameters())
    # nanoGPT's 6N + 12·L·H·Q·T per token, N without the position embeddings (1024 positions x 384)
    assert workload.flops_per_item == 6 * (n_params - 1024 * 384) + 12 * 6 * 6 * 64 * 32
    longer = gpt2_small(RunConfig(model="amp_lib.hf:gpt2_small", device="cpu", seq_len=2048))
    assert longer.model.config.n_positions == 2048


@pytest.mark.slow
def test_gpt2_small_trains_through_the_model_hook(tmp_path: Path) -> None:
    from amp_lib.train import train

    config = RunConfig(
        model="amp_lib.hf:gpt2_small", precision="bf16-mixed", device="cpu", steps=3, timing_warmup_steps=1,
        batch_size=2, seq_len=16, log_every=1, out_dir=str(tmp_path),
    )  # fmt: skip
    result = train(config, write=False)
    assert result.status == "ok", result.error
    assert result.metrics.eval_loss is not None and math.isfinite(result.metrics.eval_loss)


@pytest.mark.slow
def test_without_transformers_the_errors_name_the_hf_extra() -> None:
    """In a child process where `import transformers` fails (None in sys.modules: Python's own way to
    block an import): amp_lib.hf imports, and what needs transformers says which extra to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["transformers"] = None
        import amp_lib.hf as hf
        from amp_lib.config import RunConfig
        for make in (lambda: hf.gpt2_small(RunConfig(model="amp_lib.hf:gpt2_small", device="cpu")), hf.AmpTrainerCallback):
            try:
                make()
            except ImportError as exc:
                print("ImportError:", exc)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.splitlines()
        == [
            "ImportError: transformers is not installed; amp_lib.hf needs the [hf] extra: pip install 'amp-workbook[hf]'"
        ]
        * 2
    )


def test_the_extra_the_errors_name_installs_transformers_and_accelerate() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extra = hf.INSTALL_HINT.split("[")[1].split("]")[0]
    names = {req.split(">")[0].split("=")[0] for req in extras[extra]}
    assert names == {"transformers", "accelerate"}
    assert names <= {req.split(">")[0].split("=")[0] for req in extras["dev"]}  # `make test` installs them


# --- a sweep over the HF model ---


@pytest.mark.notebook
def test_a_two_precision_sweep_over_the_hf_model_reports_both_rows(tmp_path: Path) -> None:
    from amp_lib.sweep.cli import sweep

    params = [
        "model=amp_lib.hf:gpt2_small", "device=cpu", "steps=3", "timing_warmup_steps=1", "batch_size=2",
        "seq_len=16", "log_every=1", "eval_batches=1", "wandb_mode=disabled",
    ]  # fmt: skip
    result = sweep(tmp_path / "sweep", ["fp32", "bf16-mixed"], [0], params)
    assert result.exit_code == 0, [o for o in result.outcomes]
    assert result.report is not None
    rows = {row.requested: row for row in result.report.table}
    assert set(rows) == {"fp32", "bf16-mixed"}
    for row in rows.values():
        assert row.status == "ok" and row.throughput_unit == "tokens" and row.eval_loss is not None
