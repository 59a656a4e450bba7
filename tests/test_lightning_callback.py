"""amp_lib.lightning_callback.AmpWandbCallback: its arguments, the setup-time GradScaler check, the step
cadence and skip counting (plain trainers carrying a real `torch.amp.GradScaler`), and real Lightning
Trainers on the CPU logging into real offline W&B runs, read back from disk. No Lightning or W&B mocks."""

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
import torch
from wandb_readback import RunRecord, read_run, read_summary

from amp_lib import lightning_callback
from amp_lib.amp_state import PrecisionState
from amp_lib.lightning_callback import AmpWandbCallback, active_wandb_run, lightning_precision
from amp_lib.scaler import check_gradscaler_internals

lightning = pytest.importorskip("lightning")
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import DoublePrecision, HalfPrecision, MixedPrecision, Precision

REPO = Path(__file__).resolve().parents[1]
FP16_SPELLINGS: list[Any] = ["16", 16, "16-mixed", "fp16-mixed", "fp16", "16-true", "16_true", "fp16-true"]
NOT_FP16: list[Any] = ["32-true", 32, "bf16-mixed", "bf16", "tf32", "64-true", None]
FAILED = "logging failed"  # in the callback's one warning


@pytest.fixture
def wandb_dir(wandb_env: Path) -> Path:
    return wandb_env / "wandb_dir"


# --- plain trainers: just the attributes the callback reads, with a real GradScaler -------------


def trainer_with(scaler: Any, step: Any = 0, epoch: Any = 0) -> SimpleNamespace:
    return SimpleNamespace(
        strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)), global_step=step, current_epoch=epoch
    )


def live_scaler(init_scale: float = 1024.0) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    scaler.scale(torch.tensor(1.0))  # creates the on-device scale tensor, as the first training step does
    return scaler


def corrupt_scaler() -> torch.amp.GradScaler:
    """A real, enabled GradScaler whose scale is garbage: every read of it inside a hook fails."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler._scale = "not a tensor"  # type: ignore[assignment]
    return scaler


def optimizer_step(callback: AmpWandbCallback, trainer: SimpleNamespace, scale_after: float | None) -> Any:
    """One training batch: the hook before, the scaler backing off (or not), the global step advancing, the
    hook after; returns the row the callback logs for it (None: none this step)."""
    callback.on_train_batch_start(trainer, None, None, 0)
    if scale_after is not None:
        trainer.strategy.precision_plugin.scaler._scale.fill_(scale_after)
    trainer.global_step += 1
    return callback.step_row(trainer)


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if FAILED in r.getMessage()]


# --- a real Lightning Trainer -------------------------------------------------------------------


class TinyRegression(LightningModule):
    """Linear(8, 1) on MSE with plain SGD: a skipped optimizer step leaves the weights untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Witness(Callback):
    """Records, independently of AmpWandbCallback, the scaler's scale and whether each step was skipped."""

    def __init__(self) -> None:
        self.step_scale: dict[int, float] = {}
        self.step_skipped: dict[int, int] = {}  # cumulative skipped optimizer steps after each global step
        self.epoch_end: list[tuple[int, float | None, int]] = []  # (global_step, scale, cumulative skipped)
        self.batches = 0
        self._weights: torch.Tensor | None = None
        self._skipped = 0

    @staticmethod
    def _scale(trainer: Any) -> float | None:
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        self._weights = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        assert self._weights is not None
        self._skipped += int(torch.equal(now, self._weights))  # SGD moved nothing: GradScaler skipped the step
        self.step_skipped[trainer.global_step] = self._skipped
        scale = self._scale(trainer)
        if scale is not None:
            self.step_scale[trainer.global_step] = scale

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_end.append((trainer.global_step, self._scale(trainer), self._skipped))


def fit(
    callback: AmpWandbCallback, *, epochs: int = 2, seed: int = 0, witness: Witness | None = None, **trainer_kwargs: Any
) -> Witness:
    """Train TinyRegression for `epochs` x 4 batches on the CPU with `callback` (and a Witness after it)."""
    torch.manual_seed(seed)
    x = torch.randn(16, 8)
    y = x.sum(dim=1, keepdim=True) * 4.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    witness = witness or Witness()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[callback, witness],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        **trainer_kwargs,
    )
    trainer.fit(TinyRegression(), loader)
    return witness


def fp16_plugin(init_scale: float = 2.0**15) -> MixedPrecision:
    """Real fp16 autocast with a real GradScaler on the CPU; the large scale overflows and backs off,
    and growth every second good step makes it move (or hold) from step to step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def epoch_rows(record: RunRecord) -> list[dict[str, Any]]:
    return record.rows_with("amp/enabled")


def step_rows(record: RunRecord) -> list[dict[str, Any]]:
    return [row for row in record.history if "amp/enabled" not in row]


def logged_rows(run_dir: Path) -> list[dict[str, Any]]:
    """History rows without W&B's own `_` keys."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_run(run_dir).history]


# --- the precision the trainer runs --------------------------------------------------------------


def plugin_trainer(plugin: Any) -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(precision_plugin=plugin), global_step=0, current_epoch=0)


def test_the_precision_is_read_from_the_trainers_precision_plugin() -> None:
    """Lightning's real precision plugins, where a Trainer keeps them: their `precision` is what runs."""
    bf16_cpu = plugin_trainer(MixedPrecision("bf16-mixed", "cpu"))
    assert lightning_precision(bf16_cpu, "bf16-mixed") == PrecisionState("bf16-mixed", "bf16-mixed")
    assert lightning_precision(bf16_cpu, "fp16-mixed") == PrecisionState(
        "fp16-mixed",
        "bf16-mixed",
        "Lightning runs precision='16-mixed' on a CPU as 'bf16-mixed': it has no fp16 AMP for a CPU",
    )
    assert lightning_precision(plugin_trainer(Precision()), "fp16-mixed") == PrecisionState(
        "fp16-mixed", "fp32", "the Trainer's precision plugin (Precision) runs precision='32-true'"
    )
    double = lightning_precision(plugin_trainer(DoublePrecision()), "fp32")  # no canonical name: Lightning's own
    assert (double.effective, double.enabled) == ("64-true", False)
    assert lightning_precision(plugin_trainer(HalfPrecision("16-true")), "fp16-true") == PrecisionState(
        "fp16-true", "fp16-true"
    )
    for unreadable in (None, SimpleNamespace(), trainer_with(live_scaler())):  # nothing to read: what was asked
        assert lightning_precision(unreadable, "fp16-mixed") == PrecisionState("fp16-mixed", "fp16-mixed")


# --- construction -------------------------------------------------------------------------------


def test_arguments_and_defaults() -> None:
    cb = AmpWandbCallback(1, "16")
    assert cb.enabled is True and cb.precision == "16" and cb.log_every_n_steps == 50 and cb.requested == "fp16-mixed"
    assert AmpWandbCallback(0, "16", 0).enabled is False and AmpWandbCallback(0, "16").requested == "fp32"
    assert AmpWandbCallback(True, "bf16").requested == "bf16-mixed"
    assert AmpWandbCallback(True, 16, log_every_n_steps=0).log_every_n_steps == 0  # 0: epoch end only
    with pytest.raises(ValueError) as info:
        AmpWandbCallback(True, 16, log_every_n_steps=-1)
    assert str(info.value) == "invalid log_every_n_steps -1; valid: an int >= 1, or 0 to log only at epoch end"


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_invalid_log_every_n_steps_names_the_value(bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"invalid log_every_n_steps {bad!r}.*int >= 1"):
        AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=bad)


def test_every_spelling_is_requested_by_its_canonical_name() -> None:
    assert [AmpWandbCallback(True, p).requested for p in FP16_SPELLINGS] == ["fp16-mixed"] * 5 + ["fp16-true"] * 3
    assert [AmpWandbCallback(True, p).requested for p in NOT_FP16] == [
        "fp32", "fp32", "bf16-mixed", "bf16-mixed", "tf32", "64-true", "None"
    ]  # fmt: skip


def test_is_a_lightning_callback() -> None:
    assert isinstance(AmpWandbCallback(True, "16-mixed"), Callback)


# --- setup: the GradScaler internals check ------------------------------------------------------


def test_setup_runs_the_gradscaler_check_when_tracking_a_scale_and_it_passes_on_this_torch() -> None:
    check_gradscaler_internals.cache_clear()  # it is cached: count the calls from here
    AmpWandbCallback(True, "bf16-mixed").setup(None, None, "fit")
    AmpWandbCallback(False, "16-mixed").setup(None, None, "fit")
    assert check_gradscaler_internals.cache_info().misses == 0  # no scale tracked: nothing to check
    assert AmpWandbCallback(True, "16-mixed").setup(None, None, "fit") is None  # this torch passes
    assert check_gradscaler_internals.cache_info().misses == 1


def test_a_failed_gradscaler_check_raises_from_setup_where_a_hook_error_is_only_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A torch that renamed GradScaler's internals fails setup loudly; every other hook error (what
    `_guard` handles) is logged once and training goes on. The stand-in replaces amp_lib's own check,
    not anything in torch."""
    message = "torch 9.9 renamed GradScaler's _scale: amp_lib.scaler needs updating"

    def renamed() -> None:
        raise RuntimeError(message)

    monkeypatch.setattr(lightning_callback, "check_gradscaler_internals", renamed)
    with caplog.at_level(logging.WARNING, logger="amp_lib.lightning_callback"):
        with pytest.raises(RuntimeError) as info:
            AmpWandbCallback(True, "16-mixed").setup(None, None, "fit")
        assert str(info.value) == message
        assert AmpWandbCallback(True, "bf16-mixed").setup(None, None, "fit") is None  # no scale: not checked
        assert caplog.records == []  # raised, not logged
        guarded = AmpWandbCallback(True, "16-mixed")
        guarded._guard(lambda trainer: renamed(), None)  # the same error inside a batch hook: swallowed
    assert failures(caplog) == [f"AmpWandbCallback: logging failed and is skipped: RuntimeError: {message}"]


@pytest.mark.slow
def test_a_failed_gradscaler_check_stops_a_real_fit_before_the_first_step(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def renamed() -> None:
        raise RuntimeError("torch 9.9 renamed GradScaler's _scale")

    monkeypatch.setattr(lightning_callback, "check_gradscaler_internals", renamed)
    witness = Witness()
    with pytest.raises(RuntimeError, match="renamed GradScaler's _scale"):
        fit(AmpWandbCallback(True, "16-mixed", log_every_n_steps=1), witness=witness, plugins=[fp16_plugin()])
    assert witness.batches == 0 and witness.epoch_end == []
    assert failures(caplog) == []


# --- the scaler the callback reads --------------------------------------------------------------


def test_only_an_enabled_gradscaler_of_an_fp16_callback_is_read() -> None:
    scaler = live_scaler()

    class Exploding:
        @property
        def strategy(self) -> Any:
            raise RuntimeError("strategy is not attached yet")

    assert AmpWandbCallback(True, "16")._scaler(trainer_with(scaler)) is scaler
    assert AmpWandbCallback(True, "16")._scaler(trainer_with(torch.amp.GradScaler("cpu", enabled=False))) is None
    assert AmpWandbCallback(True, "16")._scaler(trainer_with(object())) is None
    assert AmpWandbCallback(True, "16")._scaler(SimpleNamespace(strategy=None)) is None
    assert AmpWandbCallback(True, "16")._scaler(Exploding()) is None
    assert AmpWandbCallback(False, "16")._scaler(trainer_with(scaler)) is None
    assert AmpWandbCallback(True, "bf16-mixed")._scaler(trainer_with(scaler)) is None


# --- hook errors: logged once, never raised -----------------------------------------------------


def test_a_failing_hook_warns_once_with_the_error(caplog: pytest.LogCaptureFixture) -> None:
    trainer = trainer_with(corrupt_scaler(), step=1)
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="amp_lib.lightning_callback"):
        for step in (2, 3, 4):
            cb.on_train_batch_start(trainer, None, None, 0)  # "not a tensor".detach() fails
            trainer.global_step = step
            cb.on_train_batch_end(trainer, None, None, None, 0)
            cb.on_train_epoch_end(trainer, None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "AmpWandbCallback: logging failed and is skipped: AttributeError: 'str' object has no attribute 'detach'"
    ]
    assert caplog.records[0].name == "amp_lib.lightning_callback"


def test_a_trainer_without_a_global_step_is_passed_over_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Not every object a hook is handed has Lightning's attributes yet (a trainer being set up, a stand-in):
    # the step is not counted and nothing is reported as failing.
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="amp_lib.lightning_callback"):
        cb.on_train_batch_end(SimpleNamespace(), None, None, None, 0)
    assert failures(caplog) == []


@pytest.mark.parametrize("hook", ["on_train_batch_start", "on_train_batch_end", "on_train_epoch_end"])
def test_each_hook_catches_its_own_error(hook: str, caplog: pytest.LogCaptureFixture) -> None:
    trainer = trainer_with(corrupt_scaler(), step=1)
    cb = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
    args = {
        "on_train_batch_start": (trainer, None, None, 0),
        "on_train_batch_end": (trainer, None, None, None, 0),
        "on_train_epoch_end": (trainer, None),
    }[hook]
    with caplog.at_level(logging.WARNING, logger="amp_lib.lightning_callback"):
        getattr(cb, hook)(*args)
    (message,) = failures(caplog)
    assert message.startswith("AmpWandbCallback: logging failed and is skipped: AttributeError: 'str' object")


# --- step cadence and skip counting (plain trainers, real GradScaler, offline W&B) --------------


@pytest.mark.slow
def test_active_run_is_the_open_wandb_run(wandb_dir: Path) -> None:
    import wandb

    assert active_wandb_run() is None
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        assert active_wandb_run() is run
    assert active_wandb_run() is None


def test_steps_are_logged_every_n_with_the_skips_counted_from_scale_backoffs() -> None:
    every3 = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=3)
    never = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=0)
    t3, t0 = trainer_with(live_scaler()), trainer_with(live_scaler(), epoch=4)
    rows = []
    # scale after each step: a back-off (skip), same, same (logged at step 3: 1 skip), back-off, same,
    # growth (logged at 6: 2 skips, scale 512); growth never counts as a skip
    for scale in (512.0, 512.0, 512.0, 256.0, 256.0, 512.0):
        rows.append(optimizer_step(every3, t3, scale))
        assert optimizer_step(never, t0, scale) is None
    assert rows == [
        None, None, {"amp/skipped_steps": 1, "trainer/global_step": 3, "amp/loss_scale": 512},
        None, None, {"amp/skipped_steps": 2, "trainer/global_step": 6, "amp/loss_scale": 512},
    ]  # fmt: skip
    assert never.epoch_row(t0) == {
        "amp/enabled": 1, "amp/precision": "fp16-mixed", "amp/loss_scale": 512, "amp/skipped_steps": 2,
        "trainer/global_step": 6, "epoch": 4,
    }  # fmt: skip


def test_the_first_step_compares_with_the_initial_scale_and_each_later_one_with_the_step_before() -> None:
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)  # no scale tensor yet
    trainer = trainer_with(scaler, step=0)
    cb.on_train_batch_start(trainer, None, None, 0)  # before the first step: before = the initial scale
    scaler.scale(torch.tensor(1.0))  # the first step creates the scale tensor...
    scaler._scale.fill_(512.0)  # ...and backs it off
    trainer.global_step = 1
    rows = [cb.step_row(trainer)]  # 512 < 1024: counted
    rows.append(cb.step_row(trainer))  # same global step (gradient accumulation): no second row
    scaler._scale.fill_(256.0)
    trainer.global_step = 2
    rows.append(cb.step_row(trainer))  # no before hook for this step: 256 < 512 after step 1, still a skip
    assert rows == [
        {"amp/skipped_steps": 1, "trainer/global_step": 1, "amp/loss_scale": 512},
        None,
        {"amp/skipped_steps": 2, "trainer/global_step": 2, "amp/loss_scale": 256},
    ]
    # A callback attached mid-batch (its first hook an after-step one) has no scale to compare with either.
    late = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    assert late.step_row(trainer) == {"amp/skipped_steps": 0, "trainer/global_step": 2, "amp/loss_scale": 256}


def test_the_epoch_row_says_whether_amp_is_on_and_the_scale_only_for_fp16() -> None:
    trainer = trainer_with(live_scaler(), step=7, epoch=2)  # no precision plugin to read: what was asked is logged
    assert AmpWandbCallback(True, "16").epoch_row(trainer) == {
        "amp/enabled": 1, "amp/precision": "fp16-mixed", "amp/loss_scale": 1024, "amp/skipped_steps": 0,
        "trainer/global_step": 7, "epoch": 2,
    }  # fmt: skip
    assert AmpWandbCallback(True, 16).epoch_row(trainer)["amp/precision"] == "fp16-mixed"  # any spelling: canonical
    row = {"amp/enabled": 1, "amp/precision": "bf16-mixed", "trainer/global_step": 7, "epoch": 2}
    assert AmpWandbCallback(True, "bf16-mixed").epoch_row(trainer) == row
    assert AmpWandbCallback(False, "16").epoch_row(trainer) == {**row, "amp/enabled": 0, "amp/precision": "fp32"}


@pytest.mark.slow
def test_step_zero_and_non_int_steps_are_not_logged(wandb_dir: Path) -> None:
    import wandb

    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        cb.on_train_batch_end(trainer_with(live_scaler(), step=0), None, None, None, 0)
        cb.on_train_batch_end(trainer_with(live_scaler(), step=None), None, None, None, 0)
        cb.on_train_epoch_end(trainer_with(live_scaler(), step=None, epoch="0"), None)
        run_dir = Path(run.settings.sync_dir)
    assert logged_rows(run_dir) == [
        {"amp/enabled": 1, "amp/precision": "fp16-mixed", "amp/loss_scale": 1024, "amp/skipped_steps": 0}
    ]


@pytest.mark.slow
def test_every_fp16_spelling_logs_the_scale_and_others_do_not(wandb_dir: Path) -> None:
    import wandb

    trainer = trainer_with(torch.amp.GradScaler("cpu", init_scale=4096.0), step=7, epoch=3)
    spellings = FP16_SPELLINGS + NOT_FP16
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        for precision in spellings:
            AmpWandbCallback(enabled=True, precision=precision).on_train_epoch_end(trainer, None)
        run_dir = Path(run.settings.sync_dir)
    rows = read_run(run_dir).history
    assert [row["amp/precision"] for row in rows] == [AmpWandbCallback(True, p).requested for p in spellings]
    assert [row.get("amp/loss_scale") for row in rows] == [4096.0] * len(FP16_SPELLINGS) + [None] * len(NOT_FP16)
    assert {(row["trainer/global_step"], row["epoch"]) for row in rows} == {(7, 3)}


def odd_trainers() -> list[Any]:
    nan_scaler = torch.amp.GradScaler("cpu", init_scale=math.nan)
    inf_scaler = torch.amp.GradScaler("cpu", init_scale=math.inf)
    off_scaler = torch.amp.GradScaler("cpu", enabled=False)

    class Exploding:
        @property
        def strategy(self) -> Any:
            raise RuntimeError("strategy is not attached yet")

    return [
        SimpleNamespace(),  # no strategy
        SimpleNamespace(strategy=SimpleNamespace()),  # no precision_plugin
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace())),  # no scaler
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None))),
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))),
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=off_scaler)), global_step=1),
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=nan_scaler)), global_step=1),
        SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=inf_scaler)), global_step=1),
        Exploding(),
        SimpleNamespace(global_step="7", current_epoch=None),
    ]


@pytest.mark.slow
def test_trainers_without_a_usable_scaler_log_no_scale_and_never_raise(
    wandb_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    trainers = odd_trainers()
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        for trainer in trainers:
            callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
            callback.on_train_batch_start(trainer, None, None, 0)
            callback.on_train_batch_end(trainer, None, None, None, 0)
            callback.on_train_epoch_end(trainer, None)
        run_dir = Path(run.settings.sync_dir)
    record = read_run(run_dir)
    assert [(r["amp/enabled"], r["amp/precision"]) for r in epoch_rows(record)] == [(1, "fp16-mixed")] * len(trainers)
    assert "amp/loss_scale" not in record.metric_keys()  # a NaN or infinite scale is no scale
    # the NaN and inf scalers are enabled GradScalers: their step rows carry the skip count, but no scale
    assert [(r["trainer/global_step"], r["amp/skipped_steps"]) for r in step_rows(record)] == [(1, 0), (1, 0)]
    assert failures(caplog) == []  # handled, not swallowed


# --- real Trainer, real W&B ---------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_with_scaler_logs_the_scalers_scale_and_skips(wandb_dir: Path) -> None:
    import wandb

    precision = 16  # the int spelling; every other spelling is checked above without a Trainer
    callback = AmpWandbCallback(enabled=True, precision=precision, log_every_n_steps=2)
    check_gradscaler_internals.cache_clear()
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, plugins=[fp16_plugin()])
        run_dir = Path(run.settings.sync_dir)
    assert check_gradscaler_internals.cache_info().misses == 1  # Lightning ran the callback's setup
    record = read_run(run_dir)

    assert len(set(witness.step_scale.values())) > 1 and witness._skipped > 0  # the scaler really worked
    epochs = epoch_rows(record)
    assert len(epochs) == 2
    for row, (step, scale, skipped) in zip(epochs, witness.epoch_end, strict=True):
        assert {k for k in row if not k.startswith("_")} == {
            "amp/enabled", "amp/precision", "amp/loss_scale", "amp/skipped_steps", "trainer/global_step", "epoch"
        }  # fmt: skip
        assert row["amp/enabled"] == 1
        assert row["amp/precision"] == "fp16-mixed"
        assert row["trainer/global_step"] == step
        assert row["amp/loss_scale"] == scale
        assert row["amp/skipped_steps"] == skipped
    assert [row["epoch"] for row in epochs] == [0, 1]

    steps = step_rows(record)
    assert [row["trainer/global_step"] for row in steps] == [2, 4, 6, 8]
    for row in steps:
        step = row["trainer/global_step"]
        assert row["amp/loss_scale"] == witness.step_scale[step]
        assert row["amp/skipped_steps"] == witness.step_skipped[step]
        assert {k for k in row if not k.startswith("_")} == {
            "amp/loss_scale",
            "amp/skipped_steps",
            "trainer/global_step",
        }


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "enabled", "name"), [("32-true", 0, "fp32"), ("bf16-mixed", 1, "bf16-mixed")])
def test_without_fp16_no_scale_is_logged(wandb_dir: Path, precision: str, enabled: int, name: str) -> None:
    import wandb

    callback = AmpWandbCallback(enabled=True, precision=precision, log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, precision=precision)
        run_dir = Path(run.settings.sync_dir)
    record = read_run(run_dir)
    assert witness.step_scale == {}
    assert [(row["amp/enabled"], row["amp/precision"]) for row in epoch_rows(record)] == [(enabled, name)] * 2
    assert "amp/requested" not in record.metric_keys()  # ran as asked
    assert "amp/loss_scale" not in record.metric_keys()
    assert "amp/skipped_steps" not in record.metric_keys()
    assert step_rows(record) == []


@pytest.mark.slow
def test_lightning_16_mixed_on_cpu_runs_bf16_and_the_log_says_so(wandb_dir: Path) -> None:
    """Lightning runs precision="16-mixed" on a CPU as bf16-mixed (no GradScaler): the rows W&B stored say
    bf16-mixed, name the fp16-mixed asked for, and the first one why; the run's summary keeps the reason."""
    import wandb

    callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        with pytest.warns(UserWarning, match="bf16"):
            fit(callback, epochs=2, precision="16-mixed")  # Lightning switches to bf16-mixed on a CPU
        run_dir = Path(run.settings.sync_dir)
    record = read_run(run_dir)
    reason = "Lightning runs precision='16-mixed' on a CPU as 'bf16-mixed': it has no fp16 AMP for a CPU"
    rows = [{k: v for k, v in r.items() if k.startswith("amp/")} for r in epoch_rows(record)]
    expected = {"amp/enabled": 1, "amp/precision": "bf16-mixed", "amp/requested": "fp16-mixed"}
    assert rows == [{**expected, "amp/fallback_reason": reason}, expected]
    assert "amp/loss_scale" not in record.metric_keys() and step_rows(record) == []
    summary = read_summary(run_dir)["summary"]
    assert (summary["amp/precision"], summary["amp/fallback_reason"]) == ("bf16-mixed", reason)


@pytest.mark.slow
def test_disabled_but_running_fp16_logs_what_ran_and_what_was_asked(wandb_dir: Path) -> None:
    """enabled=False asks for no AMP; a Trainer given a real fp16 plugin runs it anyway, with its GradScaler:
    the rows say fp16-mixed ran (with its scale and skips), that fp32 was asked for, and why."""
    import wandb

    callback = AmpWandbCallback(enabled=False, precision="16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, plugins=[fp16_plugin()])
        run_dir = Path(run.settings.sync_dir)
    record = read_run(run_dir)
    assert witness.step_scale  # a scaler was in use, though the callback was told AMP is off
    epochs = epoch_rows(record)
    assert [(r["amp/enabled"], r["amp/precision"], r["amp/requested"]) for r in epochs] == [
        (1, "fp16-mixed", "fp32")
    ] * 2
    assert [r.get("amp/fallback_reason") for r in epochs] == [
        "the Trainer's precision plugin (MixedPrecision) runs precision='16-mixed'",
        None,
    ]
    assert [r["amp/loss_scale"] for r in epochs] == [scale for _, scale, _ in witness.epoch_end]
    assert [r["trainer/global_step"] for r in step_rows(record)] == list(range(1, 9))


@pytest.mark.slow
def test_gradient_accumulation_logs_per_optimizer_step(wandb_dir: Path) -> None:
    import wandb

    callback = AmpWandbCallback(enabled=True, precision="fp16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, epochs=2, plugins=[fp16_plugin()], accumulate_grad_batches=2)
        run_dir = Path(run.settings.sync_dir)
    steps = step_rows(read_run(run_dir))
    assert [row["trainer/global_step"] for row in steps] == [1, 2, 3, 4]
    assert [row["amp/loss_scale"] for row in steps] == [witness.step_scale[s] for s in (1, 2, 3, 4)]


@pytest.mark.slow
def test_no_active_run_is_a_silent_no_op(wandb_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    assert wandb.run is None
    callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
    witness = fit(callback, epochs=1, plugins=[fp16_plugin()])
    assert len(witness.epoch_end) == 1
    assert not (wandb_dir / "wandb").exists()
    assert failures(caplog) == []


# --- optional dependencies ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_callback_works_without_lightning_and_without_wandb(tmp_path: Path) -> None:
    """In a fresh interpreter where importing lightning, pytorch_lightning and wandb fails (as if not
    installed), amp_lib.tracking and amp_lib.lightning_callback import, the callback builds, and its
    hooks (setup included) are silent no-ops."""
    blockers = tmp_path / "blockers"
    for name in ("lightning", "pytorch_lightning", "wandb"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    script = textwrap.dedent(
        """
        from types import SimpleNamespace
        import amp_lib.tracking
        from amp_lib.lightning_callback import AmpWandbCallback, active_wandb_run
        assert AmpWandbCallback.__mro__[1] is object
        assert active_wandb_run() is None
        cb = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
        trainer = SimpleNamespace(global_step=1)
        cb.setup(trainer, None, "fit")
        cb.on_train_batch_start(trainer, None, None, 0)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_epoch_end(trainer, None)
        print("ok", cb.guard.warned)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blockers), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok False"
