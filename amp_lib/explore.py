"""What the sweep explorer (explore.ipynb) shows, as plain data: the choices a sweep folder offers, a
selection of them, and the curves, bars and verdicts of that selection.

No widgets and no drawing here: the notebook's widgets turn into a `Selection`, this module turns a
`Selection` into `FigureData` and verdict rows, and plots.py draws. So every answer the explorer
gives is reachable from pytest without a kernel or a browser.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from amp_lib.report import DEFAULT_TOLERANCE, Group, NoiseFloor, build_report
from amp_lib.results import HistoryRow, RunResult, load_sweep
from amp_lib.table import BASELINE, results_by_precision

VIEWS: tuple[str, ...] = ("train loss", "eval loss", "loss scale", "throughput", "memory")
NOTHING_SELECTED = "no run selected: select at least one precision and one seed"
NO_SCALER = "no fp16-mixed run in this selection: no loss scale to show (only fp16-mixed uses a loss scaler)"
BACKOFF = 0.5  # GradScaler's backoff factor (AmpScaler's default): a skipped step halves the scale

MEMORY_PARTS: tuple[tuple[str, str], ...] = (
    ("param_memory_mb", "parameters"),
    ("grad_memory_mb", "gradients"),
    ("optimizer_memory_mb", "optimizer"),
)


@dataclass(frozen=True)
class Run:
    """One result with the coordinates the explorer selects by."""

    setting: str
    precision: str  # the requested precision, canonical (as the report's rows name it)
    seed: int | None
    result: RunResult

    @property
    def label(self) -> str:
        return self.precision if self.seed is None else f"{self.precision} s{self.seed}"


@dataclass(frozen=True)
class Selection:
    """What the widgets say: one setting, some precisions and seeds of it, and a view."""

    setting: str
    precisions: tuple[str, ...]
    seeds: tuple[int | None, ...]
    view: str = VIEWS[0]


@dataclass(frozen=True)
class Line:
    """One run's curve; `marks` are points to cross out (the skipped steps of a loss-scale trace)."""

    label: str
    precision: str  # the effective precision: what the colour says
    seed: int | None
    x: tuple[float, ...]
    y: tuple[float, ...]
    ok: bool = True
    marks: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Bar:
    """One run's peak memory, and what held it: tensor sizes (parameters, gradients, optimizer state, and where
    MemTracker measured a step activations and temporaries) and the rest of the peak."""

    label: str
    precision: str
    seed: int | None
    total: float
    parts: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class FigureData:
    """Everything one view draws: lines or bars, the axis label, and a note when there is nothing to draw."""

    view: str
    ylabel: str
    lines: tuple[Line, ...] = ()
    bars: tuple[Bar, ...] = ()
    note: str = ""
    log_y: bool = False


@dataclass(frozen=True)
class Explorer:
    """A sweep's runs, indexed by setting, precision and seed."""

    runs: tuple[Run, ...]
    tolerance: float = DEFAULT_TOLERANCE
    problems: tuple[str, ...] = field(default=())  # files the folder had that could not be read

    @classmethod
    def of(cls, results: Sequence[RunResult], tolerance: float = DEFAULT_TOLERANCE) -> Explorer:
        runs = [
            Run(setting, key.label, r.seed, r)
            for (setting, key), group in results_by_precision(results).items()
            for r in group
        ]
        return cls(tuple(runs), tolerance, tuple(getattr(results, "notes", ())))

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.setting for r in self.runs))

    def precisions(self, setting: str) -> tuple[str, ...]:
        """The setting's precisions, in the report's order (fp32 first)."""
        return tuple(dict.fromkeys(r.precision for r in self.runs if r.setting == self._setting(setting)))

    def seeds(self, setting: str) -> tuple[int | None, ...]:
        found = {r.seed for r in self.runs if r.setting == self._setting(setting)}
        return tuple(sorted(found, key=lambda s: (s is None, s or 0)))

    def default_selection(self, setting: str | None = None) -> Selection:
        """Everything of one setting (the first by default), train-loss view."""
        chosen = self._setting(setting if setting is not None else self.settings[0])
        return Selection(chosen, self.precisions(chosen), self.seeds(chosen))

    def check(self, selection: Selection) -> Selection:
        """The selection if every part of it exists, else a ValueError naming the bad value and the choices."""
        setting = self._setting(selection.setting)
        for kind, chosen, valid in (
            ("precision", selection.precisions, self.precisions(setting)),
            ("seed", selection.seeds, self.seeds(setting)),
            ("view", (selection.view,), VIEWS),
        ):
            bad = [v for v in chosen if v not in valid]
            if bad:
                raise ValueError(
                    f"unknown {kind} {bad[0]!r} for setting {setting!r}; valid: {', '.join(map(str, valid))}"
                )
        return selection

    def selected(self, selection: Selection) -> tuple[Run, ...]:
        """The runs of the selection, in report order (precision, then seed)."""
        self.check(selection)
        return tuple(
            r
            for r in self.runs
            if r.setting == selection.setting and r.precision in selection.precisions and r.seed in selection.seeds
        )

    def verdicts(self, selection: Selection) -> tuple[tuple[Group, ...], tuple[NoiseFloor, ...]]:
        """The verdicts of the selected precisions over the selected seeds, each judged against fp32 of the
        same seeds whether or not fp32 is among the curves (a verdict without its baseline means nothing)."""
        self.check(selection)
        pool = [
            r.result
            for r in self.runs
            if r.setting == selection.setting
            and r.seed in selection.seeds
            and (r.precision in selection.precisions or r.result.requested == BASELINE)  # every fp32 row: the report picks its baseline
        ]
        if not pool or not selection.precisions:
            return (), ()
        report = build_report(pool, self.tolerance)
        return tuple(g for g in report.groups if g.requested in selection.precisions), report.noise

    def figure_data(self, selection: Selection) -> FigureData:
        """The selection's view as plain data: one line (or bar) per selected run; with nothing to draw, the
        `note` says why (nothing selected, no fp16-mixed run for the loss scale, nothing recorded)."""
        runs = self.selected(selection)
        data = _VIEW_DATA[selection.view](runs)
        return data if runs else replace(data, note=NOTHING_SELECTED)

    def _setting(self, setting: str) -> str:
        if setting not in self.settings:
            raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(map(repr, self.settings))}")
        return setting


def load(sweep_dir: str | os.PathLike[str], tolerance: float = DEFAULT_TOLERANCE) -> Explorer:
    """The explorer over a sweep folder (or a folder of result JSONs)."""
    results = load_sweep(sweep_dir)
    if not results:
        raise ValueError(f"no result JSON files in {str(sweep_dir)!r} (nor in its results/ folder)")
    return Explorer.of(results, tolerance)


def with_view(selection: Selection, view: str) -> Selection:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid: {', '.join(VIEWS)}")
    return replace(selection, view=view)


# -- the views -----------------------------------------------------------------------------------


def scales_in_use(rows: Sequence[HistoryRow]) -> tuple[tuple[int, float, bool], ...]:
    """(step, the loss scale the step ran with, skipped) of each row that has a scale. A row holds the scale
    after its step's update; a step ran with the one before it: the previous row's, and for a first row that
    skipped, its scale undone by the backoff (a run that starts at 2**20 and skips shows its skip at 2**20)."""
    out: list[tuple[int, float, bool]] = []
    before: HistoryRow | None = None
    for row in rows:
        if row.loss_scale is not None:
            if before is not None and before.loss_scale is not None and before.step == row.step - 1:
                used = before.loss_scale
            else:
                used = row.loss_scale / BACKOFF if row.skipped else row.loss_scale
            out.append((row.step, used, row.skipped))
        before = row
    return tuple(out)


def _line(run: Run, points: Sequence[tuple[float, float]], marks: Sequence[tuple[float, float]] = ()) -> Line:
    return Line(
        label=run.label if run.result.ok else f"{run.label} [{run.result.status}]",
        precision=str(run.result.effective or run.precision),
        seed=run.seed,
        x=tuple(p[0] for p in points),
        y=tuple(p[1] for p in points),
        ok=run.result.ok,
        marks=tuple(marks),
    )


def _train_loss(runs: Sequence[Run]) -> FigureData:
    lines = tuple(_line(r, [(h.step, h.loss) for h in r.result.history if h.loss is not None]) for r in runs)
    lines = tuple(line for line in lines if line.x)
    note = "" if lines else "no train loss recorded: the selected runs ended before their first logged step"
    return FigureData("train loss", "train loss", lines, note=note)


def _eval_loss(runs: Sequence[Run]) -> FigureData:
    lines = tuple(_line(r, [(e.step, e.loss) for e in r.result.evals if e.loss is not None]) for r in runs)
    lines = tuple(line for line in lines if line.x)
    note = "" if lines else "no eval recorded: the selected runs ended before their first eval"
    return FigureData("eval loss", "eval loss", lines, note=note)


def _loss_scale(runs: Sequence[Run]) -> FigureData:
    lines = []
    for r in runs:
        trace = scales_in_use(r.result.history)
        if trace:
            marks = [(step, scale) for step, scale, skipped in trace if skipped]
            lines.append(_line(r, [(step, scale) for step, scale, _ in trace], marks))
    if lines:
        note = ""
    elif any(r.result.plan.use_loss_scaler for r in runs):
        note = "no loss scale recorded: the selected fp16-mixed runs ended before their first logged step"
    else:
        note = NO_SCALER
    ylabel = "loss scale the step ran with (x = skipped)"
    return FigureData("loss scale", ylabel, tuple(lines), note=note, log_y=bool(lines))


def _throughput(runs: Sequence[Run]) -> FigureData:
    """Throughput of each timed step: items per step (throughput x median step time) over the step's time."""
    lines, units = [], set()
    for r in runs:
        m = r.result.metrics
        if not (m.items_per_s and m.step_time_ms_median):
            continue
        items_per_step = m.items_per_s * m.step_time_ms_median / 1e3
        points = [(h.step, items_per_step / (h.step_time_ms / 1e3)) for h in r.result.history if h.step_time_ms]
        if points:
            lines.append(_line(r, points))
            units.add(m.throughput_unit)
    unit = " and ".join(f"{u}/s" for u in sorted(units)) or "items/s"
    return FigureData(
        "throughput",
        f"throughput ({unit}) per timed step",
        tuple(lines),
        note="" if lines else "no timed step recorded: the selected runs ended before their timed steps",
    )


def _holders(result: RunResult) -> list[tuple[str, float]]:
    """What held the run's memory: at its tracked step's peak where MemTracker measured one (activations and
    temporaries too), else the tensor counts of the run; [] when neither was recorded."""
    tracked = result.memory
    if tracked is not None and tracked.tracked:
        temporaries = (tracked.temporaries_mb or 0.0) + (tracked.other_mb or 0.0)
        parts = [("parameters", tracked.parameters_mb), ("gradients", tracked.gradients_mb),
                 ("optimizer", tracked.optimizer_state_mb), ("activations", tracked.activations_mb),
                 ("temporaries", temporaries)]  # fmt: skip
        return [(name, value) for name, value in parts if value is not None]
    m = result.metrics
    parts = [(name, getattr(m, attr)) for attr, name in MEMORY_PARTS if getattr(m, attr) is not None]
    return parts if len(parts) == len(MEMORY_PARTS) else []


def _memory(runs: Sequence[Run]) -> FigureData:
    bars = []
    for r in runs:
        m = r.result.metrics
        if m.peak_memory_mb is None:
            continue
        parts = _holders(r.result)
        if parts:
            parts.append(("rest", max(m.peak_memory_mb - sum(v for _, v in parts), 0.0)))
        bar = Bar(
            label=_line(r, []).label,
            precision=str(r.result.effective or r.precision),
            seed=r.seed,
            total=m.peak_memory_mb,
            parts=tuple(parts),
        )
        bars.append(bar)
    kinds = {r.result.metrics.peak_memory_kind for r in runs} - {None}
    ylabel = "peak memory (MB)" + (", CPU: whole process" if "cpu_rss" in kinds else "")
    return FigureData("memory", ylabel, bars=tuple(bars), note="" if bars else "no peak memory recorded")


_VIEW_DATA = {
    "train loss": _train_loss,
    "eval loss": _eval_loss,
    "loss scale": _loss_scale,
    "throughput": _throughput,
    "memory": _memory,
}
