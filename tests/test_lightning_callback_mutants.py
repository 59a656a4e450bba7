"""AmpWandbCallback details pinned down: argument checks, the step cadence, skip counting against a real
GradScaler whose scale backs off, and the one-time warning. Trainers are plain objects carrying a real
`torch.amp.GradScaler` (no Lightning or W&B mocks); logged rows are read back from an offline run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import wandb
from wandb_readback import read_run

from amp_lib.lightning_callback import AmpWandbCallback, _attr, active_wandb_run, trainer_scaler


def trainer_with(scaler: Any, step: Any = 0, epoch: Any = 0) -> SimpleNamespace:
    return SimpleNamespace(
        strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)), global_step=step, current_epoch=epoch
    )


def live_scaler(init_scale: float = 1024.0) -> torch.amp.GradScaler:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    scaler.scale(torch.tensor(1.0))  # creates the on-device scale tensor, as the first training step does
    return scaler


def optimizer_step(callback: AmpWandbCallback, trainer: SimpleNamespace, scale_after: float | None) -> None:
    """One training batch: the hook before, the scaler backing off (or not), the global step advancing, the hook after."""
    callback.on_train_batch_start(trainer, None, None, 0)
    if scale_after is not None:
        trainer.strategy.precision_plugin.scaler._scale.fill_(scale_after)
    trainer.global_step += 1
    callback.on_train_batch_end(trainer, None, None, None, 0)


def test_arguments_and_defaults() -> None:
    cb = AmpWandbCallback(1, "16")
    assert cb.enabled is True and cb.precision == "16" and cb.log_every_n_steps == 50 and cb.tracks_scale
    assert AmpWandbCallback(0, "16", 0).enabled is False and not AmpWandbCallback(0, "16").tracks_scale
    assert not AmpWandbCallback(True, "bf16").tracks_scale
    assert AmpWandbCallback(True, 16, log_every_n_steps=0).log_every_n_steps == 0  # 0: epoch end only
    with pytest.raises(ValueError) as info:
        AmpWandbCallback(True, 16, log_every_n_steps=-1)
    assert str(info.value) == "invalid log_every_n_steps -1; valid: an int >= 1, or 0 to log only at epoch end"


def test_scaler_lookup_on_plain_objects() -> None:
    scaler = live_scaler()
    assert trainer_scaler(trainer_with(scaler)) is scaler
    assert trainer_scaler(SimpleNamespace(strategy=None)) is None
    assert _attr(SimpleNamespace(a=1), "a") == 1 and _attr(SimpleNamespace(), "a") is None
    assert AmpWandbCallback(True, "16")._scaler(trainer_with(scaler)) is scaler
    assert AmpWandbCallback(True, "16")._scaler(trainer_with(torch.amp.GradScaler("cpu", enabled=False))) is None
    assert AmpWandbCallback(False, "16")._scaler(trainer_with(scaler)) is None


def test_active_run_is_the_open_wandb_run(wandb_env: Path) -> None:
    assert active_wandb_run() is None
    with wandb.init(project="amp-test", dir=wandb_env) as run:
        assert active_wandb_run() is run
    assert active_wandb_run() is None


def test_steps_are_logged_every_n_with_the_skips_counted_from_scale_backoffs(wandb_env: Path) -> None:
    every3 = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=3)
    never = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=0)
    t3, t0 = trainer_with(live_scaler()), trainer_with(live_scaler(), epoch=4)
    with wandb.init(project="amp-test", dir=wandb_env) as run:
        # scale after each step: a back-off (skip), same, same (logged at step 3: 1 skip), back-off, same,
        # growth (logged at 6: 2 skips, scale 512); growth never counts as a skip
        for scale in (512.0, 512.0, 512.0, 256.0, 256.0, 512.0):
            optimizer_step(every3, t3, scale)
            optimizer_step(never, t0, scale)
        never.on_train_epoch_end(t0, None)
        run_dir = Path(run.settings.sync_dir)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_run(run_dir).history]
    assert rows == [
        {"amp/skipped_steps": 1, "trainer/global_step": 3, "amp/loss_scale": 512},
        {"amp/skipped_steps": 2, "trainer/global_step": 6, "amp/loss_scale": 512},
        {"amp/enabled": 1, "amp/precision": "16-mixed", "amp/loss_scale": 512, "amp/skipped_steps": 2,
         "trainer/global_step": 6, "epoch": 4},
    ]  # fmt: skip


def test_a_step_without_a_before_hook_compares_with_the_initial_scale(wandb_env: Path) -> None:
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    trainer = trainer_with(live_scaler(1024.0), step=0)
    with wandb.init(project="amp-test", dir=wandb_env) as run:
        trainer.strategy.precision_plugin.scaler._scale.fill_(512.0)
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, None, None, None, 0)  # no on_train_batch_start: before = init scale
        cb.on_train_batch_end(trainer, None, None, None, 0)  # same global step (accumulation): not counted again
        trainer.global_step = 2
        cb.on_train_batch_end(trainer, None, None, None, 0)  # 512 vs the init scale again: counted
        run_dir = Path(run.settings.sync_dir)
    rows = read_run(run_dir).history
    assert [(r["trainer/global_step"], r["amp/skipped_steps"], r["amp/loss_scale"]) for r in rows] == [
        (1, 1, 512),
        (2, 2, 512),
    ]


def test_step_zero_and_non_int_steps_are_not_logged(wandb_env: Path) -> None:
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_env) as run:
        cb.on_train_batch_end(trainer_with(live_scaler(), step=0), None, None, None, 0)
        cb.on_train_batch_end(trainer_with(live_scaler(), step=None), None, None, None, 0)
        cb.on_train_epoch_end(trainer_with(live_scaler(), step=None, epoch="0"), None)
        run_dir = Path(run.settings.sync_dir)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in read_run(run_dir).history]
    assert rows == [{"amp/enabled": 1, "amp/precision": "16", "amp/loss_scale": 1024, "amp/skipped_steps": 0}]


def test_a_failing_hook_warns_once_with_the_error(caplog: pytest.LogCaptureFixture) -> None:
    broken = SimpleNamespace(is_enabled=lambda: True, _scale="not a tensor", _init_scale=1.0)
    trainer = trainer_with(broken, step=1)
    cb = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="amp_lib.lightning_callback"):
        cb.on_train_batch_start(trainer, None, None, 0)  # "not a tensor".detach() fails
        trainer.global_step = 2
        cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_epoch_end(trainer, None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "AmpWandbCallback: logging failed and is skipped: AttributeError: 'str' object has no attribute 'detach'"
    ]
    assert caplog.records[0].name == "amp_lib.lightning_callback"
