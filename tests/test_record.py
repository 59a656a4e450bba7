"""amp_lib.record: a run's history kept as device tensors and turned into host rows once per log interval, the
metrics of a finished or a cut-short run, and divergence read off the rows. Real torch on this CPU."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from amp_lib.measure import StepTimer
from amp_lib.record import Diverged, Recorder, check_divergence
from amp_lib.results import EvalRow, HistoryRow, Metrics
from amp_lib.scaler import COLLAPSED_SCALE, StepOutcome

# --- divergence ----------------------------------------------------------------------------------


def test_a_non_finite_loss_on_a_step_the_scaler_did_not_skip_is_divergence():
    row = HistoryRow(step=4, loss=math.nan, loss_scale=1024.0, grad_norm=0.0, step_time_ms=None)
    with pytest.raises(Diverged, match="loss became nan at step 4"):
        check_divergence([row], use_scaler=True)
    check_divergence([replace(row, skipped=True, skipped_steps=1)], use_scaler=True)  # GradScaler's skip: fine
    with pytest.raises(Diverged):
        check_divergence([replace(row, skipped=True, skipped_steps=1)], use_scaler=False)


def test_a_collapsed_scale_only_counts_with_a_scaler():
    row = HistoryRow(step=2, loss=1.0, loss_scale=COLLAPSED_SCALE / 4, grad_norm=0.0, step_time_ms=None)
    with pytest.raises(Diverged) as info:
        check_divergence([replace(row, step=1, loss_scale=1.0), row], use_scaler=True)
    assert str(info.value) == f"loss scale collapsed to {COLLAPSED_SCALE / 4:g} at step 2: fp16 overflows on every step"
    check_divergence([row], use_scaler=False)
    check_divergence([replace(row, loss=math.inf, skipped=True, loss_scale=None)], use_scaler=True)
    check_divergence(
        [replace(row, loss_scale=COLLAPSED_SCALE)], use_scaler=True
    )  # the threshold itself is not collapsed


# --- the recorder --------------------------------------------------------------------------------


def ticking_timer(step_s: float = 0.25) -> StepTimer:
    """A CPU StepTimer whose clock moves `step_s` seconds per reading: every timed step lasts step_s."""
    clock = iter(i * step_s for i in range(1000))
    return StepTimer(torch.device("cpu"), clock=lambda: next(clock))


def outcome(grad_norm: float, skipped: bool = False, scale: float | None = None) -> StepOutcome:
    return StepOutcome(
        grad_norm=torch.tensor(grad_norm),
        skipped=torch.tensor(skipped),
        scale=None if scale is None else torch.tensor(scale),
    )


def record(recorder: Recorder, step: int, loss: float, out: StepOutcome, timed: bool = True) -> None:
    if timed:
        recorder.timer.start()
        recorder.timer.stop()
    recorder.record(step, torch.tensor(loss), out, timed)


def test_a_recorder_with_no_steps_has_empty_metrics():
    recorder = Recorder(ticking_timer(), item_unit="rows")
    assert recorder.flush() == [] and recorder.history == [] and recorder.timed_ms == []
    assert recorder.metrics() == Metrics(throughput_unit="rows", skipped_steps=0)
    assert Recorder(ticking_timer()).item_unit == "tokens"


def test_flush_turns_the_pending_steps_into_history_rows_once():
    recorder = Recorder(ticking_timer(0.25))
    record(recorder, 0, 3.0, outcome(1.5), timed=False)
    record(recorder, 1, 2.5, outcome(0.5))
    rows = recorder.flush()
    assert rows == [
        HistoryRow(step=0, loss=3.0, loss_scale=None, grad_norm=1.5, step_time_ms=None, skipped=False, skipped_steps=0),
        HistoryRow(
            step=1, loss=2.5, loss_scale=None, grad_norm=0.5, step_time_ms=250.0, skipped=False, skipped_steps=0
        ),
    ]
    assert recorder.history == rows and recorder.timed_ms == [250.0]
    assert recorder.flush() == [] and recorder.history == rows  # flushed steps are not flushed again


def test_skips_accumulate_across_flushes_and_scales_are_read_per_step():
    recorder = Recorder(ticking_timer(0.5))
    record(recorder, 0, 4.0, outcome(math.inf, skipped=True, scale=512.0))
    record(recorder, 1, 3.0, outcome(2.0, scale=512.0))
    first = recorder.flush()
    record(recorder, 2, 2.0, outcome(math.nan, skipped=True, scale=256.0))
    second = recorder.flush()
    assert [(r.skipped, r.skipped_steps, r.loss_scale) for r in first + second] == [
        (True, 1, 512.0),
        (False, 1, 512.0),
        (True, 2, 256.0),
    ]
    assert math.isinf(first[0].grad_norm) and math.isnan(second[0].grad_norm)
    assert [type(r.loss) for r in recorder.history] == [float] * 3
    assert recorder.timed_ms == [500.0] * 3


def test_the_metrics_of_a_run_cut_short_come_from_the_flushed_history():
    recorder = Recorder(ticking_timer(), item_unit="samples")
    record(recorder, 0, 3.0, outcome(1.0, scale=1024.0))
    record(recorder, 1, 2.0, outcome(1.0, skipped=True, scale=512.0))
    record(recorder, 2, 1.5, outcome(1.0, scale=2048.0))
    recorder.flush()
    record(recorder, 3, 0.1, outcome(1.0, skipped=True, scale=1.0))  # recorded, never flushed: the run stopped
    assert recorder.metrics() == Metrics(
        throughput_unit="samples",
        final_train_loss=1.5,
        skipped_steps=1,
        final_loss_scale=2048.0,
        min_loss_scale=512.0,
    )


def test_metrics_without_a_scaler_have_no_loss_scales():
    recorder = Recorder(ticking_timer())
    record(recorder, 0, 2.0, outcome(1.0))
    record(recorder, 1, math.nan, outcome(1.0))
    recorder.flush()
    m = recorder.metrics()
    assert m.final_train_loss is None and m.skipped_steps == 0  # NaN is no loss: None, cleaned where it is made
    assert m.final_loss_scale is None and m.min_loss_scale is None
    assert (m.items_per_s, m.step_time_ms_median, m.eval_loss, m.timed_steps) == (None, None, None, 0)


def test_a_new_recorder_holds_no_instrument_reading_and_averages_over_no_ranks():
    recorder = Recorder(ticking_timer())
    assert (recorder.headroom, recorder.profile, recorder.fp8_layers, recorder.memory, recorder.energy) == (None,) * 5
    assert recorder.machine == {} and recorder.over_ranks is False and recorder.evals == []


def test_scheduled_learning_rates_are_recorded_per_step_and_a_constant_one_otherwise():
    scheduled = Recorder(ticking_timer(), constant_lr=1.0)
    for step, lr in enumerate((1e-4, 2e-4, 3e-4)):
        scheduled.record(step, torch.tensor(2.0), outcome(1.0), False, torch.tensor(lr))
    assert [row.lr for row in scheduled.flush()] == pytest.approx([1e-4, 2e-4, 3e-4])
    constant = Recorder(ticking_timer(), constant_lr=6e-4)
    record(constant, 0, 2.0, outcome(1.0), timed=False)
    record(constant, 1, 1.9, outcome(1.0), timed=False)
    assert [row.lr for row in constant.flush()] == [6e-4, 6e-4]


def test_over_several_ranks_the_logged_loss_is_averaged_and_in_one_process_it_is_the_loss_itself():
    recorder = Recorder(ticking_timer())
    recorder.over_ranks = True  # the collective is a no-op without a process group of several ranks
    record(recorder, 0, 2.5, outcome(1.0), timed=False)
    assert [row.loss for row in recorder.flush()] == [2.5]


def test_skips_and_the_metrics_count_every_flush_and_the_best_eval_leaves_out_evals_without_a_loss():
    recorder = Recorder(ticking_timer())
    for step in range(6):  # three flushes of two steps, the last of each skipped
        record(recorder, step, 3.0 - step / 10, outcome(1.0, skipped=step % 2 == 1, scale=2.0**10), timed=False)
        if step % 2:
            recorder.flush()
    assert [row.skipped_steps for row in recorder.history] == [0, 1, 1, 2, 2, 3]
    recorder.evals = [EvalRow(2, 2.4, 1.0), EvalRow(4, None, 2.0), EvalRow(6, 2.6, 3.0)]
    metrics = recorder.metrics()
    assert (metrics.skipped_steps, metrics.best_eval_loss, metrics.final_train_loss) == (3, 2.4, pytest.approx(2.5))
