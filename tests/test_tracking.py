"""WandbTracker against real offline W&B runs: every logged value is read back from disk and checked."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from wandb_readback import only_run_dir, read_run, read_summary

from amp_lib.precision import PrecisionPlan, resolve_precision
from amp_lib.results import HistoryRow, RunResult
from amp_lib.tracking import (
    DEFAULT_PROJECT,
    WANDB_MODES,
    WandbTracker,
    finite_or_none,
    history_row_metrics,
    resolve_wandb_mode,
    result_summary,
)
from amp_lib.train import RunConfig, train
from amp_lib.workbook import DEMO_CONFIG


@pytest.fixture
def wandb_dir(wandb_env: Path) -> Path:
    """WANDB_DIR of this test (the autouse `wandb_env` fixture in conftest.py sets it up)."""
    return wandb_env / "wandb_dir"


def tiny(tmp_path: Path, **overrides: Any) -> RunConfig:
    values: dict[str, Any] = {**DEMO_CONFIG, "device": "cpu", "seed": 0, **overrides}
    return RunConfig(out_dir=str(tmp_path / "results"), **values)


def saved_json(config: RunConfig) -> dict[str, Any]:
    return json.loads(config.result_path.read_text())


# --- mode resolution ----------------------------------------------------------------------------


def test_mode_defaults_to_offline_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode("") == "offline"


def test_mode_env_is_used_and_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    assert resolve_wandb_mode(" Online ") == "online"
    assert WandbTracker().mode == "disabled"
    assert WandbTracker(mode="offline").mode == "offline"


def test_invalid_mode_names_the_value_and_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'dryrun'.*offline, online, disabled"):
        WandbTracker(mode="dryrun")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match=r"WANDB_MODE 'sometimes'"):
        resolve_wandb_mode()
    assert set(WANDB_MODES) == {"offline", "online", "disabled"}


# --- pure helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2.0, 2.0),
        (3, 3.0),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (None, None),
        (True, None),
        ("x", None),
    ],
)
def test_finite_or_none(value: Any, expected: float | None) -> None:
    assert finite_or_none(value) == expected


def test_row_metrics_drop_nonfinite_scale_and_untimed_steps() -> None:
    row = HistoryRow(step=3, loss=1.5, loss_scale=math.inf, grad_norm=math.nan, step_time_ms=None, skipped_steps=2)
    assert history_row_metrics(row, 128, use_loss_scaler=True) == {"train/loss": 1.5, "amp/skipped_steps": 2}
    timed = HistoryRow(step=4, loss=1.0, loss_scale=1024.0, grad_norm=0.5, step_time_ms=20.0, skipped_steps=0)
    assert history_row_metrics(timed, 128, use_loss_scaler=True) == {
        "train/loss": 1.0,
        "amp/skipped_steps": 0,
        "train/grad_norm": 0.5,
        "amp/loss_scale": 1024.0,
        "perf/step_time_ms": 20.0,
        "perf/tokens_per_s": 6400.0,
    }
    assert "amp/loss_scale" not in history_row_metrics(timed, 128, use_loss_scaler=False)


# --- real offline runs --------------------------------------------------------------------------


def assert_history_matches(
    record_history: list[dict[str, Any]], result: RunResult, items_per_step: int, fp16: bool
) -> None:
    """Each result history row appears once in W&B, at its own step, with exactly these values."""
    logged = {row["_step"]: row for row in record_history}
    assert sorted(logged) == [row.step for row in result.history]
    for row in result.history:
        got = logged[row.step]
        expected_keys = {"train/loss", "amp/skipped_steps"}
        assert got["train/loss"] == pytest.approx(row.loss, rel=1e-12)
        if row.grad_norm is not None and math.isfinite(row.grad_norm):  # an overflowed step has none
            expected_keys.add("train/grad_norm")
            assert got["train/grad_norm"] == pytest.approx(row.grad_norm, rel=1e-12)
        assert got["amp/skipped_steps"] == row.skipped_steps
        if fp16:
            expected_keys.add("amp/loss_scale")
            assert got["amp/loss_scale"] == row.loss_scale
        if row.step_time_ms is not None:
            expected_keys |= {"perf/step_time_ms", "perf/tokens_per_s"}
            assert got["perf/step_time_ms"] == pytest.approx(row.step_time_ms, rel=1e-12)
            assert got["perf/tokens_per_s"] == pytest.approx(items_per_step / (row.step_time_ms / 1e3), rel=1e-12)
        assert {k for k in got if not k.startswith("_")} == expected_keys


def assert_summary_matches(summary: dict[str, Any], result_json: dict[str, Any]) -> None:
    """Every non-null value of the result JSON's status, metrics and plan is in the W&B summary, equal."""
    assert summary["status"] == result_json["status"]
    assert summary["schema_version"] == result_json["schema_version"]
    for section in ("metrics", "plan"):
        for key, value in result_json[section].items():
            if value is None:
                assert summary.get(f"{section}/{key}") is None, key
            elif isinstance(value, float):
                assert summary[f"{section}/{key}"] == pytest.approx(value, rel=1e-12), key
            else:
                assert summary[f"{section}/{key}"] == value, key


def test_fp16_run_logs_every_row_scale_and_skips_and_summary_matches_result_json(
    wandb_dir: Path, tmp_path: Path
) -> None:
    # A big initial scale with growth every step: fp16 overflows, backs off, grows again, so the
    # scale and the skip count change from row to row and a wrong-step or wrong-value bug shows.
    config = tiny(tmp_path, precision="16-mixed", allow_slow=True, init_scale=2.0**20, growth_interval=1)
    tracker = WandbTracker(mode="offline", project="amp-test", group="sweep-a", dir=wandb_dir)
    result = train(config, observers=[tracker])
    assert result.status == "ok"
    assert tracker.run is None  # finished in on_end
    assert tracker.run_dir is not None and tracker.run_dir.parent.parent == wandb_dir
    assert tracker.run_dir == only_run_dir(wandb_dir)

    scales = [row.loss_scale for row in result.history]
    assert len(set(scales)) > 1 and result.metrics.skipped_steps > 0  # the run really exercised the scaler

    record = read_run(tracker.run_dir)
    assert record.exit_code == 0
    assert record.run["project"] == "amp-test"
    assert record.run["run_group"] == "sweep-a"
    assert record.run["run_id"] == tracker.run_id
    assert_history_matches(record.history, result, config.batch_size * config.seq_len, fp16=True)
    assert [r["amp/loss_scale"] for r in record.history] == scales
    assert [r["amp/skipped_steps"] for r in record.history] == [r.skipped_steps for r in result.history]

    plan = resolve_precision("16-mixed", allow_slow=True)
    assert record.config == {**config.to_dict(), "plan": plan.to_dict()}

    summary = read_summary(tracker.run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["name"] == config.name
    assert summary["config"]["plan"]["effective"] == "fp16-mixed"
    assert_summary_matches(summary["summary"], saved_json(config))
    assert summary["summary"]["metrics/skipped_steps"] == result.metrics.skipped_steps > 0
    assert summary["summary"]["metrics/final_loss_scale"] == scales[-1]


def test_fp32_run_has_no_loss_scale_anywhere(wandb_dir: Path, tmp_path: Path) -> None:
    config = tiny(tmp_path, precision="32-true", steps=5, warmup_steps=1)
    tracker = WandbTracker(project="amp-test")  # mode from $WANDB_MODE (offline), default dir = $WANDB_DIR
    result = train(config, observers=[tracker])
    assert result.status == "ok"
    assert tracker.run_dir is not None and tracker.run_dir.is_relative_to(os.environ["WANDB_DIR"])
    record = read_run(tracker.run_dir)
    assert "amp/loss_scale" not in record.metric_keys()
    assert_history_matches(record.history, result, config.batch_size * config.seq_len, fp16=False)
    assert record.config["plan"]["use_loss_scaler"] is False
    summary = read_summary(tracker.run_dir)
    assert_summary_matches(summary["summary"], saved_json(config))
    assert "metrics/final_loss_scale" not in summary["summary"]


def test_fallback_reason_is_in_run_config_and_notes(wandb_dir: Path, tmp_path: Path) -> None:
    config = tiny(tmp_path, precision="tf32", steps=2, warmup_steps=1)  # no TF32 on a CPU: falls back to fp32
    tracker = WandbTracker(dir=wandb_dir)
    result = train(config, observers=[tracker])
    reason = result.plan["fallback_reason"]
    assert reason and "tf32" in reason
    assert tracker.run_dir is not None
    summary = read_summary(tracker.run_dir)
    assert summary["project"] == DEFAULT_PROJECT
    assert summary["config"]["plan"]["fallback_reason"] == reason
    assert summary["config"]["plan"]["requested"] == "tf32"
    assert summary["config"]["plan"]["effective"] == "fp32"
    assert reason in summary["notes"]
    assert summary["summary"]["plan/fallback_reason"] == reason


def test_failed_run_is_marked_failed_with_its_error(wandb_dir: Path, tmp_path: Path) -> None:
    config = tiny(tmp_path, model="amp_lib_no_such_module:build", steps=3, warmup_steps=1)
    tracker = WandbTracker(dir=wandb_dir)
    result = train(config, observers=[tracker])
    assert result.status == "failed"
    assert tracker.run_dir is not None
    record = read_run(tracker.run_dir)
    assert record.exit_code == 1
    assert record.history == []
    summary = read_summary(tracker.run_dir)
    assert summary["state"] == "failed"
    assert summary["summary"]["status"] == "failed"
    assert summary["summary"]["error"] == result.error


def test_context_manager_marks_an_interrupted_run_failed(wandb_dir: Path, tmp_path: Path) -> None:
    config = tiny(tmp_path)
    plan = resolve_precision("fp32")
    with pytest.raises(RuntimeError, match="boom"), WandbTracker(dir=wandb_dir) as tracker:
        tracker.on_start(config, plan)
        tracker.on_log([HistoryRow(step=0, loss=2.0, loss_scale=None, grad_norm=1.0, step_time_ms=None)], 128)
        raise RuntimeError("boom")
    assert tracker.run is None
    assert tracker.run_dir is not None
    record = read_run(tracker.run_dir)
    assert record.exit_code == 1
    assert record.history[0]["train/loss"] == 2.0 and record.history[0]["_step"] == 0


def test_reused_tracker_opens_one_run_per_training_run(wandb_dir: Path, tmp_path: Path) -> None:
    tracker = WandbTracker(dir=wandb_dir, group="g")
    dirs = []
    for seed in (1, 2):
        config = tiny(tmp_path, steps=2, warmup_steps=1, seed=seed)
        assert train(config, observers=[tracker]).status == "ok"
        assert tracker.run_dir is not None
        dirs.append(tracker.run_dir)
    assert dirs[0] != dirs[1]
    assert [read_run(d).config["seed"] for d in dirs] == [1, 2]


def test_disabled_mode_writes_nothing(wandb_dir: Path, tmp_path: Path) -> None:
    config = tiny(tmp_path, steps=2, warmup_steps=1)
    tracker = WandbTracker(mode="disabled", dir=wandb_dir)
    result = train(config, observers=[tracker])
    assert result.status == "ok"
    assert tracker.run_dir is None and tracker.run is None
    assert not (wandb_dir / "wandb").exists()


def test_observer_calls_without_a_started_run_are_no_ops() -> None:
    tracker = WandbTracker(mode="disabled")
    tracker.on_log([HistoryRow(step=0, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=None)], 1)
    tracker.on_end(RunResult(config={}, plan={}))
    tracker.finish()
    assert tracker.run is None


def test_result_summary_flattens_the_result_json() -> None:
    plan: PrecisionPlan = resolve_precision("fp32")
    result = RunResult(config={"precision": "fp32"}, plan=plan.to_dict(), status="diverged", error="loss became nan")
    summary = result_summary(result)
    assert summary["status"] == "diverged" and summary["error"] == "loss became nan"
    assert summary["plan/effective"] == "fp32" and summary["metrics/skipped_steps"] == 0
    assert set(summary) == {"status", "error", "schema_version"} | {
        f"metrics/{k}" for k in result.to_dict()["metrics"]
    } | {f"plan/{k}" for k in plan.to_dict()}
