"""amp_lib.explore, the data behind explore.ipynb's widgets: the choices a sweep offers, a selection of
them, and the curves, bars and verdicts of that selection."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from factories import eval_curve, history, make_result

from amp_lib import explore
from amp_lib.explore import VIEWS, Bar, Explorer, Selection
from amp_lib.report import BASELINE_VERDICT, NO_BASELINE

SPLIT = {"param_memory_mb": 10.0, "grad_memory_mb": 10.0, "optimizer_memory_mb": 20.0}


def sweep() -> list:
    """Two settings (batch 4 and 8); in the first, fp32 and fp16-mixed with seeds 0 and 1, listed fp16 first."""
    results = []
    for seed in (1, 0):
        results.append(
            make_result(
                "fp16-mixed",
                seed,
                rows=history(4, scaled=True, skip_at=2),
                evals=eval_curve(2.1 + seed, 2.0 + seed),
                metrics={"step_time_ms_median": 10.0, **SPLIT},
                tps=800.0,
                mem=90.0,
                batch_size=4,
            )
        )
        results.append(
            make_result(
                "fp32",
                seed,
                rows=history(4),
                evals=eval_curve(2.0 + seed, 1.9 + seed),
                metrics={"step_time_ms_median": 10.0},
                batch_size=4,
            )
        )
    results.append(make_result("bf16-mixed", 0, rows=history(3), batch_size=8))
    return results


# --- choices ------------------------------------------------------------------------------------


def test_the_choices_are_the_settings_then_their_precisions_fp32_first_and_their_seeds_sorted() -> None:
    ex = Explorer.of(sweep())
    assert ex.settings == ("gpt-tiny batch_size=4", "gpt-tiny batch_size=8")
    assert ex.precisions("gpt-tiny batch_size=4") == ("fp32", "fp16-mixed")
    assert ex.seeds("gpt-tiny batch_size=4") == (0, 1)
    assert ex.precisions("gpt-tiny batch_size=8") == ("bf16-mixed",) and ex.seeds("gpt-tiny batch_size=8") == (0,)
    assert ex.default_selection() == Selection("gpt-tiny batch_size=4", ("fp32", "fp16-mixed"), (0, 1), "train loss")
    assert ex.default_selection("gpt-tiny batch_size=8").precisions == ("bf16-mixed",)


def test_the_seeds_offered_are_every_seed_of_the_setting_in_numeric_order() -> None:
    ex = Explorer.of([make_result("fp32", 1), make_result("fp32", 8), make_result("fp16-mixed", 0)])
    assert ex.seeds(ex.settings[0]) == (0, 1, 8)  # fp16-mixed's seed 0 too, though fp32 never ran it


def test_a_run_without_a_seed_is_offered_after_the_seeded_ones() -> None:
    ex = Explorer.of([make_result("fp32", None), make_result("fp32", 3)])
    assert ex.seeds(ex.settings[0]) == (3, None)
    assert [r.label for r in ex.runs] == ["fp32 s3", "fp32"]


def test_a_bad_choice_is_named_with_the_valid_ones() -> None:
    ex = Explorer.of(sweep())
    good = ex.default_selection()
    with pytest.raises(
        ValueError, match=r"unknown setting 'mlp'; valid: 'gpt-tiny batch_size=4', 'gpt-tiny batch_size=8'"
    ):
        ex.selected(replace(good, setting="mlp"))
    with pytest.raises(ValueError, match=r"unknown precision 'bf16-mixed' for setting .*; valid: fp32, fp16-mixed$"):
        ex.selected(replace(good, precisions=("bf16-mixed",)))
    with pytest.raises(ValueError, match=r"unknown seed 7 .*; valid: 0, 1$"):
        ex.figure_data(replace(good, seeds=(7,)))
    with pytest.raises(ValueError, match=r"unknown view 'loss' .*; valid: train loss, eval loss, loss scale"):
        ex.verdicts(replace(good, view="loss"))
    with pytest.raises(ValueError, match=r"unknown view 'speed'; valid: train loss, eval loss"):
        explore.with_view(good, "speed")
    assert explore.with_view(good, "memory") == replace(good, view="memory")


# --- selection -> runs and verdicts -------------------------------------------------------------


def test_the_selection_keeps_the_chosen_precisions_and_seeds_of_one_setting_in_report_order() -> None:
    ex = Explorer.of(sweep())
    everything = ex.selected(ex.default_selection())
    assert [r.label for r in everything] == ["fp32 s0", "fp32 s1", "fp16-mixed s0", "fp16-mixed s1"]
    some = ex.selected(Selection("gpt-tiny batch_size=4", ("fp16-mixed",), (1,)))
    assert [(r.precision, r.seed, r.result.config["seed"]) for r in some] == [("fp16-mixed", 1, 1)]
    assert ex.selected(Selection("gpt-tiny batch_size=4", (), (0, 1))) == ()


def test_verdicts_judge_the_selected_precisions_against_fp32_of_the_same_seeds_even_when_fp32_is_not_drawn() -> None:
    ex = Explorer.of(sweep())
    (fp16,) = ex.verdicts(Selection("gpt-tiny batch_size=4", ("fp16-mixed",), (0, 1)))[0]
    assert fp16.requested == "fp16-mixed" and fp16.verdict != NO_BASELINE
    assert fp16.point_diff == pytest.approx(0.1)  # best evals 2.0 and 3.0 against fp32's 1.9 and 2.9
    both, noise = ex.verdicts(ex.default_selection())
    assert [c.requested for c in both] == ["fp32", "fp16-mixed"] and both[0].verdict == BASELINE_VERDICT
    (floor,) = noise  # fp32's seed-to-seed spread on this setting (labelled within the selection: "gpt-tiny")
    assert floor.best_eval_loss.n == 2 and floor.setting == both[0].setting
    one_seed = ex.verdicts(Selection("gpt-tiny batch_size=4", ("fp16-mixed",), (1,)))[0]
    assert one_seed[0].best_eval_loss.n == 1  # the seed chosen, not all of them
    assert ex.verdicts(Selection("gpt-tiny batch_size=4", (), (0,))) == ((), ())
    assert ex.verdicts(Selection("gpt-tiny batch_size=4", ("fp32",), ())) == ((), ())


def test_the_tolerance_reaches_the_verdicts() -> None:
    strict, loose = Explorer.of(sweep(), tolerance=0.001), Explorer.of(sweep(), tolerance=0.5)
    selection = strict.default_selection()
    assert strict.verdicts(selection)[0][1].verdict != loose.verdicts(selection)[0][1].verdict


# --- selection -> figure data -------------------------------------------------------------------


def test_train_and_eval_loss_views_are_one_line_per_selected_run() -> None:
    ex = Explorer.of(sweep())
    data = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp32", "fp16-mixed"), (0,), "train loss"))
    assert (data.view, data.ylabel, data.note, data.bars, data.log_y) == ("train loss", "train loss", "", (), False)
    assert [(line.label, line.precision, line.seed) for line in data.lines] == [
        ("fp32 s0", "fp32", 0),
        ("fp16-mixed s0", "fp16-mixed", 0),
    ]
    assert data.lines[0].x == (0, 1, 2, 3) and data.lines[0].y == tuple(r.loss for r in history(4))
    evals = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp32",), (1,), "eval loss"))
    (line,) = evals.lines
    assert (line.x, line.y, evals.ylabel) == ((10, 20), (3.0, 2.9), "eval loss")


def test_a_run_that_did_not_finish_is_labelled_with_its_status_and_missing_losses_are_left_out() -> None:
    rows = history(3)
    rows = (rows[0], replace(rows[1], loss=None), rows[2])
    ex = Explorer.of([make_result("fp16-mixed", 0, status="diverged", rows=rows)])
    (line,) = ex.figure_data(ex.default_selection()).lines
    assert (line.label, line.ok, line.x) == ("fp16-mixed s0 [diverged]", False, (0, 2))


def test_a_run_that_fell_back_is_labelled_by_its_request_and_coloured_by_the_precision_it_ran() -> None:
    ran_bf16 = make_result("fp16-mixed", 0, effective="bf16-mixed", reason="no fast fp16", rows=history(3))
    ex = Explorer.of([ran_bf16])
    (line,) = ex.figure_data(ex.default_selection()).lines
    (bar,) = ex.figure_data(explore.with_view(ex.default_selection(), "memory")).bars
    assert (line.label, line.precision) == (bar.label, bar.precision) == ("fp16-mixed s0", "bf16-mixed")


def test_the_loss_scale_view_marks_skipped_steps_and_leaves_out_runs_without_a_scaler() -> None:
    ex = Explorer.of(sweep())
    data = ex.figure_data(replace(ex.default_selection(), view="loss scale"))
    assert [line.label for line in data.lines] == ["fp16-mixed s0", "fp16-mixed s1"]
    # rows hold the scale after each step (2**16, 2**16, 2**15 skipped, 2**15); a step ran with the one before
    assert data.lines[0].y == (65536.0, 65536.0, 65536.0, 32768.0)
    assert data.lines[0].marks == ((2, 65536.0),) and data.log_y and data.note == ""
    fp32_only = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp32",), (0, 1), "loss scale"))
    assert fp32_only.lines == () and not fp32_only.log_y
    assert (
        fp32_only.note
        == "no fp16-mixed run in this selection: no loss scale to show (only fp16-mixed uses a loss scaler)"
    )
    failed = Explorer.of([make_result("fp16-mixed", 0, status="oom", plan={"use_loss_scaler": True})])
    assert failed.figure_data(replace(failed.default_selection(), view="loss scale")).note == (
        "no loss scale recorded: the selected fp16-mixed runs ended before their first logged step"
    )


def test_a_skip_is_marked_at_the_scale_the_step_ran_with_from_the_first_step_on() -> None:
    rows = history(4, scaled=True)
    started_high = (
        replace(rows[0], loss_scale=2.0**19, skipped=True),
        *(replace(r, loss_scale=2.0**19) for r in rows[1:]),
    )
    assert explore.scales_in_use(started_high) == ((0, 2.0**20, True), (1, 2.0**19, False), (2, 2.0**19, False),
                                                   (3, 2.0**19, False))  # fmt: skip
    gap = (rows[0], replace(rows[2], loss_scale=2.0**15, skipped=True))  # a row missing: undone by the backoff
    assert explore.scales_in_use(gap) == ((0, 2.0**16, False), (2, 2.0**16, True))
    assert explore.scales_in_use(history(3)) == ()  # no scaler


def test_the_throughput_view_is_items_per_timed_step() -> None:
    ex = Explorer.of(sweep())
    data = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp16-mixed",), (0,), "throughput"))
    (line,) = data.lines
    # 800 tokens/s at a 10 ms median step: 8 tokens per step; each history step took 10 ms
    assert line.x == (0, 1, 2, 3) and line.y == pytest.approx((800.0,) * 4)
    assert data.ylabel == "throughput (tokens/s) per timed step"
    untimed = Explorer.of([make_result("fp32", 0, rows=history(3))])  # no median step time recorded
    assert untimed.figure_data(replace(untimed.default_selection(), view="throughput")).note == (
        "no timed step recorded: the selected runs ended before their timed steps"
    )
    timed = {"rows": history(3), "metrics": {"step_time_ms_median": 10.0}}
    mixed = Explorer.of(
        [
            make_result("fp32", 0, rows=history(3)),
            make_result("fp16-mixed", 0, **timed),
            make_result("bf16-mixed", 0, unit="samples", **timed),
        ]
    )
    data = mixed.figure_data(replace(mixed.default_selection(), view="throughput"))
    assert [line.label for line in data.lines] == ["fp16-mixed s0", "bf16-mixed s0"]  # the untimed fp32 left out
    assert data.ylabel == "throughput (samples/s and tokens/s) per timed step"


def test_the_memory_view_is_a_bar_per_run_split_into_its_parts_when_they_were_recorded() -> None:
    ex = Explorer.of(sweep())
    data = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp32", "fp16-mixed"), (0,), "memory"))
    assert data.lines == () and data.ylabel == "peak memory (MB)"
    fp32, fp16 = data.bars
    assert fp32 == Bar("fp32 s0", "fp32", 0, 100.0, ())  # no split recorded: the peak alone
    assert fp16.parts == (("parameters", 10.0), ("gradients", 10.0), ("optimizer", 20.0), ("rest", 50.0))
    cpu = Explorer.of([make_result("fp32", 0, metrics={"peak_memory_kind": "cpu_rss"})])
    assert cpu.figure_data(replace(cpu.default_selection(), view="memory")).ylabel.endswith("CPU: whole process")
    none = Explorer.of([make_result("fp32", 0, mem=None)])
    assert none.figure_data(replace(none.default_selection(), view="memory")).note == "no peak memory recorded"
    tight = Explorer.of([make_result("fp32", 0, mem=None), make_result("fp16-mixed", 0, mem=30.0, metrics=SPLIT)])
    (bar,) = tight.figure_data(replace(tight.default_selection(), view="memory")).bars  # fp32 recorded none
    assert bar.label == "fp16-mixed s0" and bar.parts[-1] == ("rest", 0.0)  # tensors over the peak: no negative rest


# Each view's axis label, and its note when the selected runs recorded nothing to draw.
VIEW_TEXT = {
    "train loss": ("train loss", "no train loss recorded: the selected runs ended before their first logged step"),
    "eval loss": ("eval loss", "no eval recorded: the selected runs ended before their first eval"),
    "loss scale": (
        "loss scale the step ran with (x = skipped)",
        "no loss scale recorded: the selected fp16-mixed runs ended before their first logged step",
    ),
    "throughput": (
        "throughput (tokens/s) per timed step",
        "no timed step recorded: the selected runs ended before their timed steps",
    ),
    "memory": ("peak memory (MB)", "no peak memory recorded"),
}


@pytest.mark.parametrize("view", VIEWS)
def test_each_view_names_itself_and_its_axis_and_says_why_when_there_is_nothing_to_draw(view: str) -> None:
    ylabel, empty_note = VIEW_TEXT[view]
    ex = Explorer.of(sweep())
    drawn = ex.figure_data(Selection("gpt-tiny batch_size=4", ("fp16-mixed",), (0,), view))
    assert (drawn.view, drawn.ylabel, drawn.note) == (view, ylabel, "") and len(drawn.lines + drawn.bars) == 1
    for nothing in (
        Selection("gpt-tiny batch_size=4", (), (0, 1), view),
        Selection("gpt-tiny batch_size=4", ("fp32",), (), view),
    ):
        empty = ex.figure_data(nothing)  # nothing selected: that is the reason, whatever the view
        assert (empty.view, empty.note, empty.lines, empty.bars) == (view, explore.NOTHING_SELECTED, (), ())
    assert explore.NOTHING_SELECTED == "no run selected: select at least one precision and one seed"
    died = make_result("fp16-mixed", 0, status="oom", rows=(), mem=None, tps=None, plan={"use_loss_scaler": True})
    gone = Explorer.of([died])
    assert gone.figure_data(replace(gone.default_selection(), view=view)).note == empty_note


# --- loading a folder ---------------------------------------------------------------------------


def test_load_reads_a_folder_of_results_and_refuses_an_empty_one(tmp_path: Path) -> None:
    for result in sweep():
        result.save(tmp_path / "results" / f"{result.config['run_name']}-{result.config['batch_size']}.json")
    (tmp_path / "results" / "broken.json").write_text("{")
    ex = explore.load(tmp_path, tolerance=0.1)
    assert len(ex.runs) == 5 and ex.tolerance == 0.1 and len(ex.problems) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"no result JSON files in {str(tmp_path / 'empty')!r}")):
        explore.load(tmp_path / "empty")
