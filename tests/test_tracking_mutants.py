"""WandbTracker details pinned down exactly: mode resolution messages, value cleaning, constructor defaults,
and what one hand-driven offline run stores (name, tags, job type, notes, rows), read back from disk."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from wandb_readback import read_run, read_summary

from amp_lib import tracking
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import HistoryRow
from amp_lib.tracking import DEFAULT_PROJECT, WandbTracker, finite_or_none, history_row_metrics, resolve_wandb_mode
from amp_lib.train import RunConfig


def test_mode_messages_name_the_source_and_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode("dryrun")
    assert str(info.value) == "invalid W&B mode 'dryrun'; valid values are: offline, online, disabled"
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode(3)  # type: ignore[arg-type]
    assert str(info.value) == "invalid W&B mode 3; valid values are: offline, online, disabled"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode("")
    assert str(info.value) == "invalid W&B WANDB_MODE 'sometimes'; valid values are: offline, online, disabled"
    monkeypatch.setenv("WANDB_MODE", " DISABLED ")
    assert resolve_wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "")
    assert resolve_wandb_mode(None) == "offline"
    assert resolve_wandb_mode("\tOffline\n") == "offline"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1.5", 1.5), ("nan", None), ([], None), (False, None), (torch.tensor(2.5), 2.5), (-0.0, 0.0), (1e308, 1e308)],
)
def test_finite_or_none_more_inputs(value: Any, expected: float | None) -> None:
    got = finite_or_none(value)
    assert got == expected and (got is None or type(got) is float)


def test_row_metrics_edges() -> None:
    untimed = HistoryRow(step=1, loss=None, loss_scale=2.0, grad_norm=math.inf, step_time_ms=0.0, skipped_steps=1)
    got = history_row_metrics(untimed, 64, use_loss_scaler=True)
    assert set(got) == {"train/loss", "amp/skipped_steps", "amp/loss_scale"} and math.isnan(got["train/loss"])
    assert got["amp/loss_scale"] == 2.0 and got["amp/skipped_steps"] == 1
    negative = HistoryRow(step=1, loss=0.0, loss_scale=None, grad_norm=0.0, step_time_ms=-1.0)
    assert history_row_metrics(negative, 64, True) == {
        "train/loss": 0.0,
        "amp/skipped_steps": 0,
        "train/grad_norm": 0.0,
    }
    quick = HistoryRow(step=2, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=0.5)
    assert history_row_metrics(quick, 10, False)["perf/tokens_per_s"] == 20000.0


def test_the_lightning_callback_is_reexported_lazily() -> None:
    from amp_lib.lightning_callback import AmpWandbCallback

    assert tracking.AmpWandbCallback is AmpWandbCallback
    with pytest.raises(AttributeError) as info:
        tracking.no_such_name  # noqa: B018
    assert str(info.value) == "module 'amp_lib.tracking' has no attribute 'no_such_name'"


def test_constructor_normalises_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = WandbTracker(project="", group="", dir=Path("some") / "dir", name="n", tags=("a", "b"), job_type="jt")
    assert (t.mode, t.project, t.group, t.dir, t.name, t.tags, t.job_type) == (
        "offline", DEFAULT_PROJECT, None, str(Path("some/dir")), "n", ["a", "b"], "jt"
    )  # fmt: skip
    assert (t.run, t.run_id, t.run_dir) == (None, None, None)
    d = WandbTracker("disabled", "p", "g")
    assert (d.mode, d.project, d.group, d.dir, d.name, d.tags, d.job_type) == (
        "disabled",
        "p",
        "g",
        None,
        None,
        [],
        None,
    )


def test_disabled_run_still_creates_its_folder_and_records_no_run_dir(wandb_env: Path, tmp_path: Path) -> None:
    target = tmp_path / "new" / "nested"
    t = WandbTracker(mode="disabled", dir=target)
    t.on_start(RunConfig(device="cpu", steps=3, warmup_steps=1), resolve_precision("fp32", Capabilities()))
    assert target.is_dir() and t.run is not None and t.run_dir is None
    t.on_log([HistoryRow(step=0, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=None)], 1)
    with t:
        pass
    assert t.run is None and not (target / "wandb").exists()


def test_a_hand_driven_run_stores_name_tags_job_type_and_rows(wandb_env: Path, tmp_path: Path) -> None:
    t = WandbTracker(mode="offline", dir=tmp_path / "runs", name="custom", tags=("a", "b"), job_type="jt", group="g")
    plan = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)  # a scaler, and no fallback
    t.on_start(RunConfig(device="cpu", steps=3, warmup_steps=1), plan)
    assert t.run_id and t.run_dir is not None and t.run_dir.parent == tmp_path / "runs" / "wandb"
    assert t.run_dir.name.endswith(t.run_id)
    t.on_log(
        [
            HistoryRow(step=0, loss=2.0, loss_scale=8.0, grad_norm=None, step_time_ms=None, skipped_steps=1),
            HistoryRow(step=2, loss=1.0, loss_scale=16.0, grad_norm=None, step_time_ms=None, skipped_steps=1),
        ],
        10,
    )
    with t:  # leaving without an exception finishes the run as successful
        pass
    record = read_run(t.run_dir)
    assert record.run["tags"] == ["a", "b"] and record.run["job_type"] == "jt" and record.exit_code == 0
    assert record.run["run_group"] == "g"
    assert [(r["_step"], r["amp/loss_scale"], r["train/loss"]) for r in record.history] == [(0, 8, 2), (2, 16, 1)]
    summary = read_summary(t.run_dir)
    assert (summary["name"], summary["notes"], summary["state"]) == ("custom", "", "finished")
    assert summary["config"]["plan"]["use_loss_scaler"] is True


def _open_and_finish(tracker: WandbTracker) -> None:
    tracker.on_start(RunConfig(device="cpu", steps=3, warmup_steps=1), resolve_precision("fp32", Capabilities()))
    tracker.finish(exit_code=0)


def test_wandb_dir_is_read_per_run_not_once_per_process(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wandb itself reads $WANDB_DIR once per process; a sweep that moves it between runs must still be obeyed."""
    first, second = tmp_path / "first", tmp_path / "second" / "not-yet-there"
    monkeypatch.setenv("WANDB_DIR", str(first))
    a = WandbTracker(mode="offline")
    _open_and_finish(a)
    monkeypatch.setenv("WANDB_DIR", str(second))
    b = WandbTracker(mode="offline")
    _open_and_finish(b)
    assert a.run_dir is not None and a.run_dir.parent == first / "wandb"
    assert b.run_dir is not None and b.run_dir.parent == second / "wandb"


def test_without_dir_or_wandb_dir_wandb_picks_its_default(
    wandb_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.chdir(tmp_path)  # wandb's default is ./wandb: keep it out of the repo
    t = WandbTracker(mode="offline")
    _open_and_finish(t)
    assert t.run_id and t.run_dir is not None and t.run_dir.name.endswith(t.run_id) and t.run is None


def test_a_run_the_user_has_open_is_left_alone(wandb_env: Path, tmp_path: Path) -> None:
    """The tracker's run is a new one: it neither logs into nor finishes the user's own open run."""
    import wandb

    user_run = wandb.init(project="mine", mode="offline", dir=tmp_path / "user")
    try:
        t = WandbTracker(mode="offline", dir=tmp_path / "tracker")
        t.on_start(RunConfig(device="cpu", steps=3, warmup_steps=1), resolve_precision("fp32", Capabilities()))
        assert t.run is not user_run and t.run_id != user_run.id
        t.finish(exit_code=0)
        assert wandb.run is user_run
        user_run.log({"still/open": 1.0})  # a finished run would refuse this
    finally:
        user_run.finish()
    assert t.run_dir is not None and t.run_dir.parent == tmp_path / "tracker" / "wandb"


def test_no_loss_scale_is_logged_for_a_plan_without_a_scaler(wandb_env: Path, tmp_path: Path) -> None:
    """A row may carry a loss scale (a disabled GradScaler still reports 1.0); only a scaler's run logs it."""
    t = WandbTracker(mode="offline", dir=tmp_path)
    t.on_start(RunConfig(device="cpu", steps=3, warmup_steps=1), resolve_precision("bf16-mixed", Capabilities()))
    t.on_log([HistoryRow(step=0, loss=1.0, loss_scale=1.0, grad_norm=0.5, step_time_ms=None)], 1)
    t.finish(exit_code=0)
    assert t.run_dir is not None
    record = read_run(t.run_dir)
    assert [r["train/loss"] for r in record.history] == [1]
    assert "amp/loss_scale" not in record.metric_keys() and "train/grad_norm" in record.metric_keys()
