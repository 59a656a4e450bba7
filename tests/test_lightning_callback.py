"""AmpWandbCallback on a real Lightning Trainer (CPU) into a real offline W&B run, read back from disk."""

from __future__ import annotations

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
import wandb
from wandb_readback import RunRecord, read_run

from amp_lib.tracking import AmpWandbCallback

lightning = pytest.importorskip("lightning")
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import MixedPrecision

REPO = Path(__file__).resolve().parents[1]
FP16_SPELLINGS: list[Any] = ["16", 16, "16-mixed", "fp16-mixed", "fp16", "16-true", "16_true", "fp16-true"]
NOT_FP16: list[Any] = ["32-true", 32, "bf16-mixed", "bf16", "tf32", "64-true", None]


@pytest.fixture
def wandb_dir(wandb_env: Path) -> Path:
    return wandb_env / "wandb_dir"


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
        self._weights: torch.Tensor | None = None
        self._skipped = 0

    @staticmethod
    def _scale(trainer: Any) -> float | None:
        scaler = getattr(trainer.strategy.precision_plugin, "scaler", None)
        return None if scaler is None else float(scaler.get_scale())

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
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


def fit(callback: AmpWandbCallback, *, epochs: int = 2, seed: int = 0, **trainer_kwargs: Any) -> Witness:
    """Train TinyRegression for `epochs` x 4 batches on the CPU with `callback` (and a Witness after it)."""
    torch.manual_seed(seed)
    x = torch.randn(16, 8)
    y = x.sum(dim=1, keepdim=True) * 4.0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    witness = Witness()
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


def logged(run_dir: Path) -> RunRecord:
    return read_run(run_dir)


def epoch_rows(record: RunRecord) -> list[dict[str, Any]]:
    return record.rows_with("amp/enabled")


def step_rows(record: RunRecord) -> list[dict[str, Any]]:
    return [row for row in record.history if "amp/enabled" not in row]


# --- real Trainer, real W&B ---------------------------------------------------------------------


def test_fp16_with_scaler_logs_the_scalers_scale_and_skips(wandb_dir: Path) -> None:
    precision = 16  # the int spelling; every other spelling is checked below without a Trainer
    callback = AmpWandbCallback(enabled=True, precision=precision, log_every_n_steps=2)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, plugins=[fp16_plugin()])
        run_dir = Path(run.settings.sync_dir)
    record = logged(run_dir)

    assert len(set(witness.step_scale.values())) > 1 and witness._skipped > 0  # the scaler really worked
    epochs = epoch_rows(record)
    assert len(epochs) == 2
    for row, (step, scale, skipped) in zip(epochs, witness.epoch_end):
        assert {k for k in row if not k.startswith("_")} == {
            "amp/enabled", "amp/precision", "amp/loss_scale", "amp/skipped_steps", "trainer/global_step", "epoch"
        }  # fmt: skip
        assert row["amp/enabled"] == 1
        assert row["amp/precision"] == str(precision)
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


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_without_fp16_no_scale_is_logged(wandb_dir: Path, precision: str) -> None:
    callback = AmpWandbCallback(enabled=True, precision=precision, log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, precision=precision)
        run_dir = Path(run.settings.sync_dir)
    record = logged(run_dir)
    assert witness.step_scale == {}
    assert [(row["amp/enabled"], row["amp/precision"]) for row in epoch_rows(record)] == [(1, precision)] * 2
    assert "amp/loss_scale" not in record.metric_keys()
    assert "amp/skipped_steps" not in record.metric_keys()
    assert step_rows(record) == []


def test_lightning_16_mixed_on_cpu_runs_bf16_so_there_is_no_scale(wandb_dir: Path) -> None:
    callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        with pytest.warns(UserWarning, match="bf16"):
            fit(callback, epochs=1, precision="16-mixed")  # Lightning switches to bf16-mixed on a CPU
        run_dir = Path(run.settings.sync_dir)
    record = logged(run_dir)
    assert [(r["amp/enabled"], r["amp/precision"]) for r in epoch_rows(record)] == [(1, "16-mixed")]
    assert "amp/loss_scale" not in record.metric_keys()


def test_disabled_logs_enabled_zero_and_no_scale_even_with_a_scaler(wandb_dir: Path) -> None:
    callback = AmpWandbCallback(enabled=False, precision="16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, plugins=[fp16_plugin()])
        run_dir = Path(run.settings.sync_dir)
    record = logged(run_dir)
    assert witness.step_scale  # a scaler was in use, yet the callback was told AMP is off
    assert [(r["amp/enabled"], r["amp/precision"]) for r in epoch_rows(record)] == [(0, "16-mixed")] * 2
    assert "amp/loss_scale" not in record.metric_keys() and "amp/skipped_steps" not in record.metric_keys()
    assert step_rows(record) == []


def test_gradient_accumulation_logs_per_optimizer_step(wandb_dir: Path) -> None:
    callback = AmpWandbCallback(enabled=True, precision="fp16-mixed", log_every_n_steps=1)
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        witness = fit(callback, epochs=2, plugins=[fp16_plugin()], accumulate_grad_batches=2)
        run_dir = Path(run.settings.sync_dir)
    steps = step_rows(logged(run_dir))
    assert [row["trainer/global_step"] for row in steps] == [1, 2, 3, 4]
    assert [row["amp/loss_scale"] for row in steps] == [witness.step_scale[s] for s in (1, 2, 3, 4)]


def test_no_active_run_is_a_silent_no_op(wandb_dir: Path) -> None:
    assert wandb.run is None
    callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
    witness = fit(callback, epochs=1, plugins=[fp16_plugin()])
    assert len(witness.epoch_end) == 1
    assert not (wandb_dir / "wandb").exists()


# --- plain objects lacking attributes (not Lightning mocks) ---------------------------------------


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


def test_trainers_without_a_usable_scaler_log_no_scale_and_never_raise(
    wandb_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainers = odd_trainers()
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        for trainer in trainers:
            callback = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
            callback.on_train_batch_start(trainer, None, None, 0)
            callback.on_train_batch_end(trainer, None, None, None, 0)
            callback.on_train_epoch_end(trainer, None)
        run_dir = Path(run.settings.sync_dir)
    record = logged(run_dir)
    assert [(r["amp/enabled"], r["amp/precision"]) for r in epoch_rows(record)] == [(1, "16-mixed")] * len(trainers)
    assert "amp/loss_scale" not in record.metric_keys()
    # the NaN and inf scalers are enabled GradScalers: their step rows carry the skip count, but no scale
    assert [(r["trainer/global_step"], r["amp/skipped_steps"]) for r in step_rows(record)] == [(1, 0), (1, 0)]
    assert not [r for r in caplog.records if "logging failed" in r.getMessage()]  # handled, not swallowed


def test_an_error_inside_a_hook_is_logged_once_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    # Duck-typed scaler whose scale tensor is garbage: counting skips fails inside the hook.
    broken = SimpleNamespace(is_enabled=lambda: True, _scale="not a tensor", _init_scale=1.0)
    trainer = SimpleNamespace(strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=broken)), global_step=1)
    callback = AmpWandbCallback(enabled=True, precision="16", log_every_n_steps=1)
    for _ in range(3):
        callback.on_train_batch_end(trainer, None, None, None, 0)
        trainer.global_step += 1
    failures = [r for r in caplog.records if "logging failed" in r.getMessage()]
    assert len(failures) == 1 and "TypeError" in failures[0].getMessage()


def test_every_fp16_spelling_logs_the_scale_and_others_do_not(wandb_dir: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)), global_step=7, current_epoch=3
    )
    spellings = FP16_SPELLINGS + NOT_FP16
    with wandb.init(project="amp-test", dir=wandb_dir) as run:
        for precision in spellings:
            AmpWandbCallback(enabled=True, precision=precision).on_train_epoch_end(trainer, None)
        run_dir = Path(run.settings.sync_dir)
    rows = logged(run_dir).history
    assert [row["amp/precision"] for row in rows] == [str(p) for p in spellings]
    assert [row.get("amp/loss_scale") for row in rows] == [4096.0] * len(FP16_SPELLINGS) + [None] * len(NOT_FP16)
    assert {(row["trainer/global_step"], row["epoch"]) for row in rows} == {(7, 3)}


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True, None])
def test_invalid_log_every_n_steps_names_the_value(bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"invalid log_every_n_steps {bad!r}.*int >= 1"):
        AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=bad)


def test_is_a_lightning_callback() -> None:
    assert isinstance(AmpWandbCallback(True, "16-mixed"), Callback)


# --- optional dependencies ------------------------------------------------------------------------


def test_amp_lib_works_without_lightning_and_without_wandb(tmp_path: Path) -> None:
    """In a fresh interpreter where importing lightning, pytorch_lightning and wandb fails (as if not
    installed), amp_lib.tracking imports, the callback builds, and its hooks are silent no-ops."""
    blockers = tmp_path / "blockers"
    for name in ("lightning", "pytorch_lightning", "wandb"):
        (blockers / name).mkdir(parents=True)
        (blockers / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    script = textwrap.dedent(
        """
        import sys
        from types import SimpleNamespace
        import amp_lib, amp_lib.tracking
        assert "lightning" not in sys.modules, "importing amp_lib.tracking must not import lightning"
        from amp_lib.tracking import AmpWandbCallback
        from amp_lib.lightning_callback import active_wandb_run
        assert AmpWandbCallback.__mro__[1] is object
        assert active_wandb_run() is None
        cb = AmpWandbCallback(enabled=True, precision="16-mixed", log_every_n_steps=1)
        trainer = SimpleNamespace(global_step=1)
        cb.on_train_batch_start(trainer, None, None, 0)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        cb.on_train_epoch_end(trainer, None)
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blockers), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_importing_tracking_does_not_import_lightning() -> None:
    script = "import sys, amp_lib.tracking; print('lightning' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
