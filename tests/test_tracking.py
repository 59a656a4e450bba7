"""amp_lib.tracking: W&B mode resolution, the pure row/summary helpers, and WandbTracker against real
offline W&B runs, every logged value read back from disk (tests/wandb_readback.py)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from factories import eval_curve, make_result
from scipy.stats import t as student_t
from wandb_readback import only_run_dir, read_run, read_summary

from amp_lib import tracking
from amp_lib.config import PROJECT, RunConfig
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.render import answer, format_ttq, reason
from amp_lib.report import build_report
from amp_lib.results import HistoryRow, RunResult
from amp_lib.tracking import (
    WANDB_MODES,
    WandbTracker,
    history_row_metrics,
    log_report_summary,
    report_summary,
    resolve_wandb_mode,
    result_summary,
)
from amp_lib.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def wandb_dir(wandb_env: Path) -> Path:
    """WANDB_DIR of this test (the autouse `wandb_env` fixture in conftest.py sets it up)."""
    return wandb_env / "wandb_dir"


def saved_json(config: RunConfig) -> dict[str, Any]:
    return json.loads(config.result_path.read_text())


def small_config() -> RunConfig:
    """A config for hand-driven trackers: on_start only reads it, nothing trains."""
    return RunConfig(device="cpu", steps=3, timing_warmup_steps=1)


def open_and_finish(tracker: WandbTracker) -> None:
    tracker.on_start(small_config(), resolve_precision("fp32", Capabilities()))
    tracker.finish(exit_code=0)


# --- mode resolution ----------------------------------------------------------------------------


def test_mode_defaults_to_offline_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode("") == "offline"
    monkeypatch.setenv("WANDB_MODE", "")  # set but empty: the same as unset
    assert resolve_wandb_mode(None) == "offline"


def test_mode_env_is_used_and_the_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
    assert resolve_wandb_mode(" Online ") == "online"
    assert resolve_wandb_mode("\tOffline\n") == "offline"
    assert WandbTracker().mode == "disabled"
    assert WandbTracker(mode="offline").mode == "offline"
    monkeypatch.setenv("WANDB_MODE", " DISABLED ")
    assert resolve_wandb_mode() == "disabled"


def test_invalid_mode_messages_name_the_source_the_value_and_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WANDB_MODES == ("offline", "online", "disabled")
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode("dryrun")
    assert str(info.value) == "invalid W&B mode 'dryrun'; valid values are: offline, online, disabled"
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode(3)  # type: ignore[arg-type]
    assert str(info.value) == "invalid W&B mode 3; valid values are: offline, online, disabled"
    with pytest.raises(ValueError, match=r"'dryrun'.*offline, online, disabled"):
        WandbTracker(mode="dryrun")  # the tracker checks its mode when built, not when the run opens
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError) as info:
        resolve_wandb_mode("")
    assert str(info.value) == "invalid W&B WANDB_MODE 'sometimes'; valid values are: offline, online, disabled"


# --- module surface -----------------------------------------------------------------------------


def test_tracking_does_not_export_the_lightning_callback() -> None:
    """The callback lives at amp_lib.lightning_callback only, and tracking has no module __getattr__."""
    assert not hasattr(tracking, "AmpWandbCallback")
    with pytest.raises(AttributeError) as info:
        tracking.no_such_name  # noqa: B018
    assert str(info.value) == "module 'amp_lib.tracking' has no attribute 'no_such_name'"


@pytest.mark.slow
def test_importing_tracking_imports_neither_lightning_nor_wandb() -> None:
    """In a fresh interpreter: importing amp_lib.tracking loads no Lightning (nor wandb: it opens with the run)."""
    script = textwrap.dedent(
        """
        import sys
        import amp_lib.tracking
        assert not hasattr(amp_lib.tracking, "AmpWandbCallback")
        print(sorted(m for m in ("lightning", "pytorch_lightning", "wandb") if m in sys.modules))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- history rows -> W&B keys (pure) ------------------------------------------------------------


def test_row_metrics_of_a_timed_row_with_a_scaler() -> None:
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
    quick = HistoryRow(step=2, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=0.5)
    assert history_row_metrics(quick, 10, False)["perf/tokens_per_s"] == 20000.0


def test_row_metrics_drop_nonfinite_values_and_untimed_steps() -> None:
    row = HistoryRow(step=3, loss=1.5, loss_scale=math.inf, grad_norm=math.nan, step_time_ms=None, skipped_steps=2)
    assert history_row_metrics(row, 128, use_loss_scaler=True) == {"train/loss": 1.5, "amp/skipped_steps": 2}
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


# --- result -> W&B summary (pure) ---------------------------------------------------------------


def test_result_summary_flattens_the_result_json() -> None:
    result = make_result("fp32", status="diverged", error="loss became nan", skipped=3, final_scale=None)
    summary = result_summary(result)
    d = result.to_dict()
    assert set(summary) == {"status", "error", "schema_version"} | {f"metrics/{k}" for k in d["metrics"]} | {
        f"plan/{k}" for k in d["plan"]
    }
    assert summary["status"] == "diverged" and summary["error"] == "loss became nan"
    assert summary["schema_version"] == result.schema_version
    assert summary["plan/effective"] == "fp32" and summary["plan/fallback_reason"] is None
    assert summary["metrics/skipped_steps"] == 3 and summary["metrics/items_per_s"] == 1000.0
    assert summary["metrics/final_loss_scale"] is None


def test_result_summary_names_the_first_layer_to_overflow_and_the_profiled_shares() -> None:
    overflow = [{"step": 4, "module": "blocks.0.mlp", "phase": "backward", "loss_scale": 8.0}] * 3
    profile = {"step": 1, "wall_ms": 10.0, "busy_ms": {"matmul": 6.0, "optimizer": 1.0}}
    summary = result_summary(make_result("fp16-mixed", headroom={"first_overflow": overflow}, profile=profile))
    assert {k: v for k, v in summary.items() if k.startswith(("headroom/", "profile/"))} == {
        "headroom/first_overflow_module": "blocks.0.mlp", "headroom/first_overflow_step": 4,
        "headroom/first_overflow_phase": "backward", "headroom/overflowing_steps": 3,
        "profile/matmul_share": 0.6, "profile/optimizer_share": 0.1, "profile/idle_share": pytest.approx(0.3),
    }  # fmt: skip
    assert not [k for k in result_summary(make_result("fp32")) if k.startswith(("headroom/", "profile/"))]


def test_result_summary_names_the_earliest_overflow_and_no_idle_share_without_a_wall_time() -> None:
    overflow = [
        {"step": 2, "module": "blocks.1.attn", "phase": "forward", "loss_scale": 16.0},
        {"step": 5, "module": "blocks.0.mlp", "phase": "backward", "loss_scale": 8.0},
    ]
    profile = {"step": 1, "wall_ms": 0.0, "busy_ms": {"matmul": 0.0}}
    summary = result_summary(make_result("fp16-mixed", headroom={"first_overflow": overflow}, profile=profile))
    assert (summary["headroom/first_overflow_module"], summary["headroom/first_overflow_step"]) == ("blocks.1.attn", 2)
    assert summary["headroom/first_overflow_phase"] == "forward" and summary["headroom/overflowing_steps"] == 2
    assert summary["profile/idle_share"] is None and summary["profile/matmul_share"] == 0.0


# --- sweep report -> W&B summary ----------------------------------------------------------------


def sweep_report(**config: Any):
    """fp32 and bf16-mixed over three seeds with eval curves (bf16 matches and is faster), fp16 diverged."""
    runs = [make_result("fp32", s, tps=1000.0, evals=eval_curve(3.0, 2.5, 2.0 + 0.01 * s), **config) for s in range(3)]
    runs += [make_result("bf16-mixed", s, tps=t, evals=eval_curve(3.0, 2.02, 2.0 + 0.01 * s, step_s=0.05), **config)
             for s, t in enumerate([2000.0, 2100.0, 1900.0])]  # fmt: skip
    runs.append(make_result("fp16-mixed", 0, status="diverged", error="nan", tps=None, eval_loss=None, **config))
    return build_report(runs)


def test_report_summary_holds_the_answer_verdicts_intervals_and_time_to_quality() -> None:
    report = sweep_report()
    summary = report_summary(report)
    bf16 = report.groups[2]
    assert summary["report/answer"] == answer(report) and summary["report/answer"].startswith("Use bf16-mixed")
    assert summary["report/tolerance"] == 0.02
    assert summary["report/recommendation"] == "bf16-mixed"
    assert summary["report/recommendation_reason"] == reason(report.recommendations[0])
    assert summary["report/fp32_noise_std"] == pytest.approx(0.01) and summary["report/tolerance_abs"] == pytest.approx(
        0.0402
    )
    assert summary["report/fp32_noise_ci_half_width"] == pytest.approx(report.noise[0].half_width)
    assert (
        summary["report/bf16-mixed/verdict"] == "matches fp32"
        and summary["report/bf16-mixed/speed_verdict"] == "faster"
    )
    assert (summary["report/bf16-mixed/loss_diff_low"], summary["report/bf16-mixed/loss_diff_high"]) == (
        bf16.loss_diff.low, bf16.loss_diff.high,
    )  # fmt: skip
    logs = [math.log(t / 1000.0) for t in (2000.0, 2100.0, 1900.0)]  # paired by seed, on the log scale
    # Holm over fp32's two comparisons (bf16, and fp16 that diverged): the smallest p-value at 1 - 0.05/2
    half = student_t.ppf(1 - 0.05 / 4, 2) * statistics.stdev(logs) / math.sqrt(3)
    assert summary["report/bf16-mixed/speedup"] == pytest.approx(math.exp(statistics.fmean(logs)))
    assert summary["report/bf16-mixed/speedup_low"] == pytest.approx(math.exp(statistics.fmean(logs) - half), rel=1e-4)
    assert (
        summary["report/bf16-mixed/ttq_time_s"] == pytest.approx(1.0) and summary["report/bf16-mixed/ttq_steps"] == 20
    )
    assert (
        summary["report/bf16-mixed/ttq_speedup"] == pytest.approx(3.0) and summary["report/bf16-mixed/ttq_reached"] == 3
    )
    assert (
        summary["report/fp16-mixed/verdict"] == "diverged/failed" and summary["report/fp16-mixed/status"] == "diverged"
    )
    # nothing missing is written: no interval, no speed-up, no time to quality for the diverged run
    assert {k for k in summary if k.startswith("report/fp16-mixed/")} == {
        "report/fp16-mixed/verdict", "report/fp16-mixed/status", "report/fp16-mixed/speed_verdict",
        "report/fp16-mixed/speed_reason", "report/fp16-mixed/eligible", "report/fp16-mixed/seeds_used",
        "report/fp16-mixed/speed_source",
    }  # fmt: skip
    assert summary["report/fp16-mixed/eligible"] is False and summary["report/bf16-mixed/eligible"] is True
    assert all(v is not None for v in summary.values())
    assert "report/fp32/loss_diff" not in summary and summary["report/fp32/verdict"] == "baseline"


def test_report_summary_keys_name_the_setting_when_there_are_several() -> None:
    runs = [*sweep_report(lr=1).results, *sweep_report(lr=2).results]
    summary = report_summary(build_report(runs))
    assert (
        summary["report/gpt-tiny lr=1/recommendation"] == summary["report/gpt-tiny lr=2/recommendation"] == "bf16-mixed"
    )
    assert summary["report/gpt-tiny lr=2/bf16-mixed/verdict"] == "matches fp32"
    assert not any(k.startswith("report/bf16-mixed/") for k in summary)
    for setting in ("gpt-tiny lr=1", "gpt-tiny lr=2"):  # the reason and the fp32 noise floor are per setting too
        assert summary[f"report/{setting}/recommendation_reason"].startswith("matches fp32")
        assert summary[f"report/{setting}/fp32_best_eval_loss"] == pytest.approx(2.01)
        assert summary[f"report/{setting}/fp32_noise_std"] == pytest.approx(0.01)
        assert summary[f"report/{setting}/fp32_noise_ci_half_width"] > 0
        assert summary[f"report/{setting}/tolerance_abs"] == pytest.approx(0.0402)
    assert set(summary) - {"report/answer", "report/tolerance"} <= {
        k for k in summary if k.startswith(("report/gpt-tiny lr=1/", "report/gpt-tiny lr=2/"))
    }


def test_report_summary_gives_each_intervals_mean_and_bounds_not_the_one_seed_point() -> None:
    """Unpaired seeds and uneven fp32 throughput make the interval means differ from the plain point figures."""
    runs = [
        make_result("fp32", s, tps=t, mem=100.0, evals=eval_curve(3.0, 2.5, 2.0 + 0.01 * s))
        for s, t in enumerate([1000.0, 1500.0, 800.0])
    ]
    runs += [make_result("bf16-mixed", s, tps=t, mem=60.0, evals=eval_curve(3.0, 2.02, 2.0 + 0.03 * s, step_s=0.05))
             for s, t in enumerate([2000.0, 2400.0, 1900.0, 2600.0])]  # fmt: skip
    report = build_report(runs)
    bf16 = next(c for c in report.groups if c.requested == "bf16-mixed")
    assert bf16.loss_diff.mean != pytest.approx(bf16.point_diff)  # the seeds' paired mean, not all runs' means
    summary = report_summary(report)
    got = {k.removeprefix("report/bf16-mixed/"): v for k, v in summary.items() if k.startswith("report/bf16-mixed/")}
    assert got["best_eval_loss"] == pytest.approx(2.015)  # per seed min(2.02, 2.0 + 0.03 * seed)
    assert (got["loss_diff"], got["loss_diff_low"], got["loss_diff_high"]) == (
        bf16.loss_diff.mean, bf16.loss_diff.low, bf16.loss_diff.high
    )  # fmt: skip
    assert (got["speedup"], got["speedup_low"], got["speedup_high"]) == (
        bf16.speedup.mean, bf16.speedup.low, bf16.speedup.high
    )  # fmt: skip
    assert got["speedup_high"] > got["speedup"] > got["speedup_low"]
    assert got["ttq"] == format_ttq(bf16.ttq) and got["ttq"].endswith("steps")
    assert got["peak_memory_mb"] == 60.0 and summary["report/fp32/peak_memory_mb"] == 100.0


def test_report_summary_without_an_fp32_baseline_recommends_none() -> None:
    summary = report_summary(build_report([make_result("bf16-mixed", s) for s in (0, 1)]))
    assert summary["report/recommendation"] == "none"
    assert summary["report/recommendation_reason"]


@pytest.mark.slow
def test_a_reports_verdicts_are_read_back_from_an_offline_run_summary(tmp_path: Path) -> None:
    import wandb

    report = sweep_report()
    run = wandb.init(mode="offline", dir=str(tmp_path), project="amp-test", name="sweep-report", reinit="create_new")
    run_dir = Path(run.settings.sync_dir)
    written = log_report_summary(report, run)
    run.finish()
    assert written == report_summary(report)
    stored = read_summary(run_dir)["summary"]
    for key, value in written.items():
        assert stored[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert stored["report/bf16-mixed/verdict"] == "matches fp32" and stored["report/recommendation"] == "bf16-mixed"


# --- tracker construction and no-ops ------------------------------------------------------------


def test_constructor_normalises_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = WandbTracker(project="", group="", dir=Path("some") / "dir", name="n", tags=("a", "b"), job_type="jt")
    assert (t.mode, t.project, t.group, t.dir, t.name, t.tags, t.job_type) == (
        "offline", PROJECT, None, str(Path("some/dir")), "n", ["a", "b"], "jt"
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


def test_observer_calls_without_a_started_run_are_no_ops() -> None:
    tracker = WandbTracker(mode="disabled")
    tracker.on_log([HistoryRow(step=0, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=None)], 1)
    tracker.on_end(make_result())
    tracker.finish()
    with tracker:
        pass
    assert tracker.run is None and tracker.run_id is None and tracker.run_dir is None


# --- train() into real offline runs -------------------------------------------------------------


def assert_history_matches(
    record_history: list[dict[str, Any]], result: RunResult, items_per_step: int, fp16: bool
) -> None:
    """Each result history row appears once in W&B, at its own step, with exactly these values; each eval as
    `eval/loss` at the step it was taken after."""
    logged = {row["_step"]: row for row in record_history}
    evals = {e.step: e.loss for e in result.evals}
    assert sorted(logged) == sorted({row.step for row in result.history} | set(evals))
    assert {s: logged[s]["eval/loss"] for s in evals} == pytest.approx(evals, rel=1e-12)
    for row in result.history:
        got = {k: v for k, v in logged[row.step].items() if k != "eval/loss"}
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


@pytest.mark.slow
def test_fp16_run_logs_every_row_scale_and_skips_and_summary_matches_result_json(
    wandb_dir: Path, tiny_config: Any
) -> None:
    # A big initial scale with growth every step: fp16 overflows, backs off, grows again, so the
    # scale and the skip count change from row to row and a wrong-step or wrong-value bug shows.
    config = tiny_config(precision="16-mixed", allow_slow=True, init_scale=2.0**20, growth_interval=1)
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
    rows = [r for r in record.history if "train/loss" in r]  # the eval after the last step has a row of its own
    assert [r["amp/loss_scale"] for r in rows] == scales
    assert [r["amp/skipped_steps"] for r in rows] == [r.skipped_steps for r in result.history]

    plan = resolve_precision(config.precision, allow_slow=True)  # the config's canonical name: fp16-mixed
    assert record.config == {**config.to_dict(), "plan": plan.to_dict()}

    summary = read_summary(tracker.run_dir)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["name"] == config.name
    assert summary["config"]["plan"]["effective"] == "fp16-mixed"
    assert_summary_matches(summary["summary"], saved_json(config))
    assert summary["summary"]["metrics/skipped_steps"] == result.metrics.skipped_steps > 0
    assert summary["summary"]["metrics/final_loss_scale"] == scales[-1]


@pytest.mark.slow
def test_fp32_run_has_no_loss_scale_anywhere(wandb_dir: Path, tiny_config: Any) -> None:
    config = tiny_config(precision="32-true", steps=5, timing_warmup_steps=1)
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


@pytest.mark.slow
def test_fallback_reason_is_in_run_config_and_notes(wandb_dir: Path, tiny_config: Any) -> None:
    config = tiny_config(precision="tf32", steps=2, timing_warmup_steps=1)  # no TF32 on a CPU: falls back to fp32
    tracker = WandbTracker(dir=wandb_dir)
    result = train(config, observers=[tracker])
    reason = result.plan.fallback_reason
    assert reason and "tf32" in reason
    assert tracker.run_dir is not None
    summary = read_summary(tracker.run_dir)
    assert summary["project"] == PROJECT
    assert summary["config"]["plan"]["fallback_reason"] == reason
    assert summary["config"]["plan"]["requested"] == "tf32"
    assert summary["config"]["plan"]["effective"] == "fp32"
    assert reason in summary["notes"]
    assert summary["summary"]["plan/fallback_reason"] == reason


@pytest.mark.slow
def test_failed_run_is_marked_failed_with_its_error(wandb_dir: Path, tiny_config: Any) -> None:
    config = tiny_config(model="amp_lib_no_such_module:build", steps=3, timing_warmup_steps=1)
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


@pytest.mark.slow
def test_reused_tracker_opens_one_run_per_training_run(wandb_dir: Path, tiny_config: Any) -> None:
    tracker = WandbTracker(dir=wandb_dir, group="g")
    dirs = []
    for seed in (1, 2):
        config = tiny_config(steps=2, timing_warmup_steps=1, seed=seed)
        assert train(config, observers=[tracker]).status == "ok"
        assert tracker.run_dir is not None
        dirs.append(tracker.run_dir)
    assert dirs[0] != dirs[1]
    assert [read_run(d).config["seed"] for d in dirs] == [1, 2]


@pytest.mark.slow
def test_disabled_mode_writes_nothing(wandb_dir: Path, tiny_config: Any) -> None:
    config = tiny_config(steps=2, timing_warmup_steps=1)
    tracker = WandbTracker(mode="disabled", dir=wandb_dir)
    result = train(config, observers=[tracker])
    assert result.status == "ok"
    assert tracker.run_dir is None and tracker.run is None
    assert not (wandb_dir / "wandb").exists()


# --- hand-driven runs: what one run stores, and its lifecycle -----------------------------------


@pytest.mark.slow
def test_a_hand_driven_run_stores_name_tags_job_type_and_rows(tmp_path: Path) -> None:
    t = WandbTracker(mode="offline", dir=tmp_path / "runs", name="custom", tags=("a", "b"), job_type="jt", group="g")
    plan = resolve_precision("fp16-mixed", Capabilities(), allow_slow=True)  # a scaler, and no fallback
    t.on_start(small_config(), plan)
    assert t.run_id and t.run_dir is not None and t.run_dir.parent == tmp_path / "runs" / "wandb"
    assert t.run_dir.name.endswith(t.run_id)
    t.on_log(
        [
            HistoryRow(step=0, loss=2.0, loss_scale=8.0, grad_norm=None, step_time_ms=None, skipped_steps=1),
            HistoryRow(step=2, loss=1.0, loss_scale=16.0, grad_norm=None, step_time_ms=None, skipped_steps=1),
            # an overflowed step: the non-finite scale and norm are left out of the row, not logged as inf/NaN
            HistoryRow(step=4, loss=0.5, loss_scale=math.inf, grad_norm=math.nan, step_time_ms=None, skipped_steps=2),
        ],
        10,
    )
    with t:  # leaving without an exception finishes the run as successful
        pass
    record = read_run(t.run_dir)
    assert record.run["tags"] == ["a", "b"] and record.run["job_type"] == "jt" and record.exit_code == 0
    assert record.run["run_group"] == "g"
    assert [(r["_step"], r.get("amp/loss_scale"), r["train/loss"], r["amp/skipped_steps"]) for r in record.history] == [
        (0, 8, 2, 1),
        (2, 16, 1, 1),
        (4, None, 0.5, 2),
    ]
    assert "train/grad_norm" not in record.metric_keys()
    summary = read_summary(t.run_dir)
    assert (summary["name"], summary["notes"], summary["state"]) == ("custom", "", "finished")
    assert summary["config"]["plan"]["use_loss_scaler"] is True


@pytest.mark.slow
def test_no_loss_scale_is_logged_for_a_plan_without_a_scaler(tmp_path: Path) -> None:
    """A row may carry a loss scale (a disabled GradScaler still reports 1.0); only a scaler's run logs it."""
    t = WandbTracker(mode="offline", dir=tmp_path)
    t.on_start(small_config(), resolve_precision("bf16-mixed", Capabilities()))
    t.on_log([HistoryRow(step=0, loss=1.0, loss_scale=1.0, grad_norm=0.5, step_time_ms=None)], 1)
    t.finish(exit_code=0)
    assert t.run_dir is not None
    record = read_run(t.run_dir)
    assert [r["train/loss"] for r in record.history] == [1]
    assert "amp/loss_scale" not in record.metric_keys() and "train/grad_norm" in record.metric_keys()


@pytest.mark.slow
def test_context_manager_marks_an_interrupted_run_failed(wandb_dir: Path, tiny_config: Any) -> None:
    with pytest.raises(RuntimeError, match="boom"), WandbTracker(dir=wandb_dir) as tracker:
        tracker.on_start(tiny_config(), resolve_precision("fp32"))
        tracker.on_log([HistoryRow(step=0, loss=2.0, loss_scale=None, grad_norm=1.0, step_time_ms=None)], 128)
        raise RuntimeError("boom")
    assert tracker.run is None
    assert tracker.run_dir is not None
    record = read_run(tracker.run_dir)
    assert record.exit_code == 1
    assert record.history[0]["train/loss"] == 2.0 and record.history[0]["_step"] == 0


@pytest.mark.slow
def test_disabled_run_still_creates_its_folder_and_records_no_run_dir(tmp_path: Path) -> None:
    target = tmp_path / "new" / "nested"
    t = WandbTracker(mode="disabled", dir=target)
    t.on_start(small_config(), resolve_precision("fp32", Capabilities()))
    assert target.is_dir() and t.run is not None and t.run_dir is None
    t.on_log([HistoryRow(step=0, loss=1.0, loss_scale=None, grad_norm=None, step_time_ms=None)], 1)
    with t:
        pass
    assert t.run is None and not (target / "wandb").exists()


# --- where runs go, and whose run it is ---------------------------------------------------------


@pytest.mark.slow
def test_wandb_dir_is_read_per_run_not_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb itself reads $WANDB_DIR once per process; a sweep that moves it between runs must still be obeyed."""
    first, second = tmp_path / "first", tmp_path / "second" / "not-yet-there"
    monkeypatch.setenv("WANDB_DIR", str(first))
    a = WandbTracker(mode="offline")
    open_and_finish(a)
    monkeypatch.setenv("WANDB_DIR", str(second))
    b = WandbTracker(mode="offline")
    open_and_finish(b)
    assert a.run_dir is not None and a.run_dir.parent == first / "wandb"
    assert b.run_dir is not None and b.run_dir.parent == second / "wandb"


@pytest.mark.slow
def test_without_dir_or_wandb_dir_wandb_picks_its_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.chdir(tmp_path)  # wandb's default is ./wandb: keep it out of the repo
    t = WandbTracker(mode="offline")
    open_and_finish(t)
    assert t.run_id and t.run_dir is not None and t.run_dir.name.endswith(t.run_id) and t.run is None
    assert t.run_dir.resolve().is_relative_to(tmp_path.resolve())  # under ./wandb of the working folder


@pytest.mark.slow
def test_a_run_the_user_has_open_is_left_alone(tmp_path: Path) -> None:
    """The tracker's run is a new one: it neither logs into nor finishes the user's own open run."""
    import wandb

    user_run = wandb.init(project="mine", mode="offline", dir=tmp_path / "user")
    try:
        t = WandbTracker(mode="offline", dir=tmp_path / "tracker")
        t.on_start(small_config(), resolve_precision("fp32", Capabilities()))
        assert t.run is not user_run and t.run_id != user_run.id
        t.finish(exit_code=0)
        assert wandb.run is user_run
        user_run.log({"still/open": 1.0})  # a finished run would refuse this
    finally:
        user_run.finish()
    assert t.run_dir is not None and t.run_dir.parent == tmp_path / "tracker" / "wandb"


def test_report_summary_carries_why_a_precision_does_not_pay() -> None:
    facts = {"device_type": "cpu", "cpu_isa": ["avx2"]}
    profile = {"step": 1, "wall_ms": 10.0, "busy_ms": {"matmul": 9.0}, "facts": facts}
    runs = [make_result("fp32", s, profile=profile) for s in (0, 1)]
    runs += [make_result("bf16-mixed", s, tps=100.0, profile=profile) for s in (0, 1)]
    summary = report_summary(build_report(runs))
    assert summary["report/bf16-mixed/why"] == (
        "this CPU has no bf16 instructions (avx512_bf16/amx_bf16): bf16 matmuls are emulated"
    )
    assert "report/fp32/why" not in summary
    launch_bound = {"step": 1, "wall_ms": 10.0, "busy_ms": {"matmul": 1.0}, "facts": facts}
    runs = [make_result("fp32", s, profile=launch_bound) for s in (0, 1)]
    runs += [make_result("bf16-mixed", s, tps=100.0, profile=launch_bound) for s in (0, 1)]
    causes = report_summary(build_report(runs))["report/bf16-mixed/why"].split("; ")
    starts = ("this CPU has no bf16 instructions", "launch-bound: ", "90% of the step is outside matmuls")
    assert len(causes) == 3 and all(c.startswith(w) for c, w in zip(causes, starts, strict=True))


@pytest.mark.slow
def test_a_sweeps_verdicts_go_to_a_wandb_run_of_their_own_read_back_from_disk(tmp_path: Path) -> None:
    from amp_lib.tracking import record_report

    report = sweep_report()
    run_dir = record_report(report, mode="offline", group="sw", name="sw-report", dir=tmp_path)
    assert run_dir is not None and run_dir.is_relative_to(tmp_path)
    back = read_summary(run_dir)
    summary = back["summary"]
    assert summary["report/answer"] == answer(report)
    assert summary["report/bf16-mixed/verdict"] == "matches fp32"
    assert summary["report/fp16-mixed/verdict"] == "diverged/failed"
    assert record_report(report, mode="disabled") is None
