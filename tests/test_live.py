"""amp_lib.live, the live figure of train.ipynb: which log flushes redraw it (throttling), the frames it
shows, and its last frame, which is the figure the notebook saves."""

from __future__ import annotations

import atexit
import builtins
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from factories import eval_curve, history, make_result
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from traitlets.config import Config

from amp_lib.config import RunConfig
from amp_lib.live import DisplayHandleSink, LiveFigure, LiveFrame
from amp_lib.plots import figure_png, run_figure
from amp_lib.precision import Capabilities, resolve_precision
from amp_lib.results import RunResult
from amp_lib.train import train

PNG = b"\x89PNG\r\n\x1a\n"


class Clock:
    """Time that moves only when told: `advance` between calls, and `draw_s` per frame shown."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Frames(list):
    """Keeps the frames shown; each takes `draw_s` of the clock's time, as a slow display would."""

    def __init__(self, clock: Clock, draw_s: float = 0.0) -> None:
        super().__init__()
        self.clock, self.draw_s = clock, draw_s

    def __call__(self, frame: LiveFrame) -> None:
        self.clock.now += self.draw_s
        self.append(frame)


def started(min_interval_s: float = 0.5, budget: float = 0.1, draw_s: float = 0.0, steps: int = 8) -> tuple:
    clock = Clock()
    frames = Frames(clock, draw_s)
    live = LiveFigure(min_interval_s, budget, show=frames, clock=clock)
    config = RunConfig(run_name="live", steps=steps, device="cpu")
    live.on_start(config, resolve_precision("fp16-mixed", Capabilities(), allow_slow=True))
    return live, frames, clock


# --- throttling ---------------------------------------------------------------------------------


def test_a_log_flush_redraws_only_after_the_minimum_interval() -> None:
    live, frames, clock = started(min_interval_s=0.5)
    rows = history(8, scaled=True, skip_at=3)
    assert [f.caption for f in frames] == ["training · updated 1 time · step 0/8"]  # the axes, before any step
    live.on_log(rows[:2], 1)  # at once: too soon
    clock.now += 0.3
    live.on_log(rows[2:4], 1)  # 0.3 s after the first frame: still too soon
    assert len(frames) == 1 and live.step == 4
    clock.now += 0.2
    live.on_log(rows[4:6], 1)  # 0.5 s: redraw, with every row so far
    assert [f.caption for f in frames][-1] == "training · updated 2 times · step 6/8"
    live.on_log([], 1)  # nothing new: no redraw however late
    clock.now += 10
    live.on_log([], 1)
    assert len(frames) == 2


def test_by_default_the_figure_redraws_at_most_every_half_second_through_a_display(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    live = LiveFigure(clock=clock)  # what train.ipynb uses; outside IPython its display prints each caption
    live.on_start(RunConfig(run_name="live", steps=8, device="cpu"), resolve_precision("fp32", Capabilities()))
    rows = history(8)
    clock.now += 0.4
    live.on_log(rows[:4], 1)  # too soon
    clock.now += 0.1
    live.on_log(rows[4:], 1)
    assert capsys.readouterr().out.splitlines() == [
        "training · updated 1 time · step 0/8",
        "training · updated 2 times · step 8/8",
    ]


def test_slow_drawing_stretches_the_interval_so_it_takes_at_most_the_budget() -> None:
    live, frames, clock = started(min_interval_s=0.1, budget=0.2, draw_s=1.0)  # each frame takes 1 s
    rows = history(8)
    clock.now += 3.9  # a 1 s draw within a 20% budget needs 4 s of training before the next
    live.on_log(rows[:1], 1)
    assert len(frames) == 1
    clock.now += 0.1
    live.on_log(rows[1:2], 1)
    assert len(frames) == 2


def test_frames_are_titled_training_until_the_final_one_which_is_the_saved_figure() -> None:
    live, frames, _ = started(min_interval_s=60.0)
    config, plan = live.config, live.plan
    assert config is not None and plan is not None
    empty = RunResult(config=config.to_dict(), plan=plan.to_dict())  # "ok" until it ends, but not finished yet
    assert frames[0].png == figure_png(run_figure(empty, steps=8, state="training"))
    rows = history(8, scaled=True, skip_at=3)
    live.on_log(rows, 1)  # too soon to redraw
    result = make_result("fp16-mixed", rows=rows, evals=eval_curve(2.0, every=4), status="diverged", steps=8)
    live.on_end(result)
    assert [f.caption for f in frames] == [
        "training · updated 1 time · step 0/8",
        "finished: diverged · updated 2 times · step 8/8 · eval loss 2.0000 at step 4",
    ]
    assert frames[-1].png == figure_png(run_figure(result, steps=config.steps))


def test_flushes_and_evals_before_the_run_starts_draw_nothing() -> None:
    clock = Clock()
    frames = Frames(clock)
    live = LiveFigure(0.0, show=frames, clock=clock)
    live.on_log(history(2), 1)
    live.on_eval(eval_curve(2.0)[0])
    assert frames == []
    live.on_start(RunConfig(run_name="live", steps=8, device="cpu"), resolve_precision("fp32", Capabilities()))
    assert [f.caption for f in frames] == ["training · updated 1 time · step 0/8"]


@pytest.mark.parametrize("records_steps", [True, False], ids=["steps-in-config", "no-steps-recorded"])
def test_a_finished_result_given_alone_is_drawn_as_its_final_frame(records_steps: bool) -> None:
    """A saved result shown without a live run: its x axis spans its planned steps, or fits its rows when the
    config does not say how many were planned."""
    clock = Clock()
    frames = Frames(clock)
    result = make_result("fp16-mixed", rows=history(6, scaled=True), status="ok", steps=8)
    if not records_steps:
        result = replace(result, config={k: v for k, v in result.config.items() if k != "steps"})
    LiveFigure(show=frames, clock=clock).on_end(result)
    planned = 8 if records_steps else 6  # the steps it recorded
    assert [f.caption for f in frames] == [f"finished: ok · updated 1 time · step 6/{planned}"]
    if not records_steps:  # (with steps, the saved figure: test_frames_are_titled_training_until_the_final_one...)
        assert frames[0].png == figure_png(run_figure(result, steps=6))


def test_a_restarted_observer_begins_a_new_count_and_history() -> None:
    live, _, _ = started()
    live.on_log(history(4), 1)
    live.on_eval(eval_curve(2.0)[0])
    live.on_start(live.config, live.plan)
    assert (live.frames, live.rows, live.evals, live.step) == (1, [], [], 0)


def test_an_eval_is_drawn_as_it_is_measured_even_right_after_a_frame() -> None:
    with_eval, frames, _ = started(min_interval_s=60.0)  # a log flush now would be throttled
    without, others, _ = started(min_interval_s=60.0)
    for live in (with_eval, without):
        live.on_log(history(4), 1)  # too soon: no frame
    (row,) = eval_curve(2.5, every=4)
    with_eval.on_eval(row)
    assert with_eval.evals == [row] and (len(frames), len(others)) == (2, 1)
    assert frames[-1].caption == "training · updated 2 times · step 4/8 · eval loss 2.5000 at step 4"
    assert frames[-1].last_eval == (4, 2.5)
    drawn = RunResult(
        config=with_eval.config.to_dict(), plan=with_eval.plan.to_dict(), history=history(4), evals=(row,)
    )
    assert frames[-1].png == figure_png(run_figure(drawn, steps=8, state="training"))  # the rows so far and the dot
    without.on_eval(replace(row, loss=None))  # a non-finite eval: drawn, and no loss to quote
    assert others[-1].last_eval is None and others[-1].caption == "training · updated 2 times · step 4/8"


@pytest.mark.parametrize(("min_interval_s", "budget"), [(-1, 0.1), (0.5, 0), (0.5, 1.5)])
def test_bad_throttle_settings_are_refused_with_the_values(min_interval_s: float, budget: float) -> None:
    bad = rf"min_interval_s must be >= 0 and budget in \(0, 1\]; got {min_interval_s}, {budget}$"
    with pytest.raises(ValueError, match=bad):
        LiveFigure(min_interval_s, budget)


def test_an_unthrottled_figure_is_allowed() -> None:
    live = LiveFigure(0.0, 1.0)  # redraw at every flush, drawing may take all the time
    assert (live.min_interval_s, live.budget) == (0.0, 1.0)


# --- what a frame shows -------------------------------------------------------------------------


def test_a_frame_is_html_with_the_png_and_its_caption() -> None:
    frame = LiveFrame(png=PNG + b"x", updates=3, step=12, steps=30)
    bundle = frame._repr_mimebundle_()
    assert bundle["text/plain"] == str(frame) == "training · updated 3 times · step 12/30"
    assert 'src="data:image/png;base64,iVBORw0KGgp4"' in bundle["text/html"]
    assert '<div class="amp-live-caption">training · updated 3 times · step 12/30</div>' in bundle["text/html"]
    assert "png" not in repr(frame).split("updates")[0].replace("LiveFrame(", "")  # no bytes in the repr
    assert LiveFrame(PNG, 1, 30, 30, "ok").caption == "finished: ok · updated 1 time · step 30/30"


def test_outside_ipython_the_display_sink_prints_each_caption(capsys: pytest.CaptureFixture[str]) -> None:
    sink = DisplayHandleSink()
    sink(LiveFrame(PNG, 1, 0, 4))
    sink(LiveFrame(PNG, 2, 4, 4, "ok"))
    assert capsys.readouterr().out.splitlines() == [
        "training · updated 1 time · step 0/4",
        "finished: ok · updated 2 times · step 4/4",
    ]


@pytest.fixture
def ipython(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[InteractiveShell]:
    """An in-process IPython shell (no kernel), as a notebook cell runs in, undone afterwards."""
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))
    for name in ("__IPYTHON__", "display"):  # the shell puts these into builtins: put back what was there
        monkeypatch.setattr(builtins, name, getattr(builtins, name, None), raising=False)
    shell = InteractiveShell.instance(config=Config({"HistoryManager": {"enabled": False}}))
    yield shell
    shell.cleanup()  # gives back sys.modules["__main__"]
    atexit.unregister(shell.atexit_operations)
    InteractiveShell.clear_instance()


def test_in_ipython_the_display_sink_updates_one_output_in_place(ipython: InteractiveShell) -> None:
    sink = DisplayHandleSink()
    with capture_output() as captured:
        for frame in (LiveFrame(PNG, 1, 0, 4), LiveFrame(PNG, 2, 4, 4, "ok")):
            sink(frame)
    first, second = captured.outputs
    assert first.transient["display_id"] and second.transient == first.transient  # the same output...
    assert (first.update, second.update) == (False, True)  # ...replaced, not appended
    assert "finished: ok · updated 2 times · step 4/4" in second.data["text/html"]


# --- on a real run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_fp16_run_redraws_at_each_flush_when_unthrottled_and_ends_on_its_saved_figure(
    tiny_config: Any, tmp_path: Path
) -> None:
    frames: list[LiveFrame] = []
    live = LiveFigure(0.0, budget=1.0, show=frames.append)
    config = tiny_config(precision="fp16-mixed", allow_slow=True, steps=6, log_every=2, eval_every=3)
    result = train(config, observers=[live])
    # start, each flush (an eval flushes first), the eval after step 3 as it is measured, the final eval, the end
    assert result.ok and [f.step for f in frames] == [0, 2, 3, 3, 4, 6, 6, 6]
    assert [f.updates for f in frames] == [1, 2, 3, 4, 5, 6, 7, 8] and frames[-1].status == "ok"
    assert [f.last_eval for f in frames[3:5]] == [(3, result.evals[0].loss)] * 2  # on the figure while it trains
    assert frames[3].status is None and all(f.png.startswith(PNG) for f in frames)
    assert frames[-1].png == figure_png(run_figure(result, steps=6))
