"""The live figure of a training run: a `RunObserver` that redraws the run's figure in place as rows arrive.

It sees rows only when the loop flushes them (every `log_every` steps), so it adds no host-device sync.
Drawing a matplotlib figure costs tens to hundreds of milliseconds on the training thread, so redraws at a
flush are throttled: at most one per `min_interval_s`, and never more than `budget` of the wall time. An
eval is drawn as it is measured (evals are few, and each costs more than a frame), and the final state
(with the status) is always drawn. The frame is a PNG inside a plain HTML output,
shown through an IPython display handle: JupyterLab updates it in place without any extension, and the
last frame stays in the saved notebook, papermill's output and exported HTML.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amp_lib.config import RunConfig
from amp_lib.plots import figure_png, run_figure
from amp_lib.precision import PrecisionPlan
from amp_lib.results import EvalRow, HistoryRow, RunResult


@dataclass(frozen=True)
class LiveFrame:
    """One drawn state of the live figure; its caption is what a reader (and the browser test) sees change."""

    png: bytes = field(repr=False)
    updates: int  # frames shown so far, this one included
    step: int  # optimizer steps done
    steps: int  # optimizer steps planned
    status: str | None = None  # the run's status once it ended
    last_eval: tuple[int, float] | None = None  # (step, loss) of the latest eval drawn

    @property
    def caption(self) -> str:
        state = f"finished: {self.status}" if self.status else "training"
        text = (
            f"{state} · updated {self.updates} time{'s' if self.updates != 1 else ''} · step {self.step}/{self.steps}"
        )
        if self.last_eval is not None:
            text += f" · eval loss {self.last_eval[1]:.4f} at step {self.last_eval[0]}"
        return text

    def _repr_mimebundle_(self, **_: Any) -> dict[str, str]:
        image = base64.b64encode(self.png).decode("ascii")
        return {
            "text/html": f'<div class="amp-live"><img alt="live figure" src="data:image/png;base64,{image}"/>'
            f'<div class="amp-live-caption">{html.escape(self.caption)}</div></div>',
            "text/plain": self.caption,
        }

    def __str__(self) -> str:  # outside IPython, display() prints this
        return self.caption


class DisplayHandleSink:
    """Shows each object it is given in one output, replacing the previous one (an IPython display handle):
    the live figure's frames, the explorer's views. Outside IPython, display() prints them."""

    def __init__(self) -> None:
        self.handle: Any = None

    def __call__(self, frame: Any) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display(frame, display_id=True)
        else:
            self.handle.update(frame)


class LiveFigure:
    """A `RunObserver` that redraws `plots.run_figure` as the run trains and ends on the same figure the
    notebook saves. `show` receives each `LiveFrame` (default: a display handle updated in place)."""

    def __init__(
        self,
        min_interval_s: float = 0.5,
        budget: float = 0.1,
        *,
        show: Callable[[LiveFrame], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_interval_s < 0 or not 0 < budget <= 1:
            raise ValueError(f"min_interval_s must be >= 0 and budget in (0, 1]; got {min_interval_s}, {budget}")
        self.min_interval_s, self.budget = min_interval_s, budget
        self.show = show if show is not None else DisplayHandleSink()
        self.clock = clock
        self.frames = 0
        self.config: RunConfig | None = None
        self.plan: PrecisionPlan | None = None
        self.rows: list[HistoryRow] = []
        self.evals: list[EvalRow] = []
        self._next_at = 0.0

    def on_start(self, config: RunConfig, plan: PrecisionPlan) -> None:
        self.config, self.plan, self.rows, self.evals, self.frames = config, plan, [], [], 0
        self._draw(self._snapshot(), status=None)  # the axes appear before the first step

    def on_log(self, rows: Sequence[HistoryRow], items_per_step: int) -> None:
        self.rows.extend(rows)
        if rows and self.config is not None and self.clock() >= self._next_at:
            self._draw(self._snapshot(), status=None)

    def on_eval(self, row: EvalRow) -> None:
        """An evaluation finished: drawn at once, so its point shows while the run trains."""
        self.evals.append(row)
        if self.config is not None:
            self._draw(self._snapshot(), status=None)

    def on_end(self, result: RunResult) -> None:
        self._draw(result, status=result.status)

    @property
    def step(self) -> int:
        return self.rows[-1].step + 1 if self.rows else 0

    def _snapshot(self) -> RunResult:
        """The run so far, as the figure function takes it; drawn as a run still training (its status, which a
        result without a final eval loss reads as diverged, is not drawn)."""
        assert self.config is not None and self.plan is not None
        return RunResult(
            config=self.config.to_dict(), plan=self.plan.to_dict(), history=tuple(self.rows), evals=tuple(self.evals)
        )

    def _draw(self, result: RunResult, status: str | None) -> None:
        began = self.clock()
        steps = result.steps or 0  # a snapshot and the loop's result carry the run's config
        figure = run_figure(result, steps=steps, state=None if status else "training")
        step = result.history[-1].step + 1 if result.history else 0
        evals = [(e.step, e.loss) for e in result.evals if e.loss is not None]
        self.frames += 1
        self.show(LiveFrame(figure_png(figure), self.frames, step, steps, status, evals[-1] if evals else None))
        took = self.clock() - began
        # the next redraw waits at least min_interval_s, and long enough that drawing stays within the budget
        self._next_at = began + took + max(self.min_interval_s, took * (1 - self.budget) / self.budget)
