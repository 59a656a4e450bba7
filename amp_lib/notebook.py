"""The thin layer the notebooks call: parameter validation, live progress, report assembly, views.

A notebook cell should be one call here and one display; anything worth testing lives in this module
(or below it), where pytest reaches it without a kernel.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mistune

from amp_lib.config import RunConfig, TrackingConfig, parameter_names
from amp_lib.details import DETAILS, rules_markdown, why_markdown
from amp_lib.diagnose import StepProfile
from amp_lib.explore import VIEWS, Explorer, Selection
from amp_lib.explore import load as load_explorer
from amp_lib.headroom import headroom_table, way_out
from amp_lib.live import DisplayHandleSink
from amp_lib.plots import (
    explore_figure,
    figure_png,
    headroom_figure,
    run_figure,
    save_figure,
    save_report_figures,
)
from amp_lib.precision import PrecisionPlan, probe, resolve_device, resolve_precision
from amp_lib.render import (
    answer,
    context,
    format_memory,
    format_table,
    format_verdicts,
    memory_note,
    recommendations_markdown,
)
from amp_lib.report import (
    DEFAULT_TOLERANCE,
    Measurements,
    SweepReport,
    build_report,
    check_tolerance,
)
from amp_lib.results import EvalRow, HistoryRow, RunResult, load_sweep
from amp_lib.speed import speed_verdicts, time_precisions
from amp_lib.train import train

# The tiny demo compare.ipynb runs when it is given no sweep_dir: seconds on a 2-core CPU.
DEMO_CONFIG: dict[str, Any] = {
    "model": "gpt-tiny",
    "steps": 8,
    "timing_warmup_steps": 2,
    "batch_size": 4,
    "seq_len": 32,
    "log_every": 2,
}
DEMO_PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed")


@dataclass(frozen=True)
class NotebookRun:
    """A train.ipynb run after validation: the config, its resolved plan and the W&B settings."""

    config: RunConfig
    plan: PrecisionPlan
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def run_notebook_parameters(namespace: Mapping[str, Any], before: Collection[str]) -> NotebookRun:
    """Validate a notebook's parameters: `namespace` is its `globals()`, `before` the names it had
    before the parameters cell. Any new name that is not a parameter (a typo papermill injected, which
    papermill itself only warns about) is an error naming it and the valid names."""
    valid = parameter_names()
    new = {
        k
        for k, v in namespace.items()
        if k not in before and not k.startswith("_") and not isinstance(v, types.ModuleType)
    }
    unknown = sorted(new - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(valid)}")
    config = RunConfig.from_dict({k: namespace[k] for k in RunConfig.field_names() if k in namespace})
    tracking = TrackingConfig(**{k: namespace[k] for k in TrackingConfig.field_names() if k in namespace})
    plan = resolve_precision(
        config.precision,
        probe(resolve_device(config.device)),
        allow_slow=config.allow_slow,
        parallelism=config.parallelism,
        reduce_dtype=config.reduce_dtype,
        emulate_fp8=config.emulate_fp8,
        fp8_layers=config.fp8_layers,
    )
    return NotebookRun(config=config, plan=plan, tracking=tracking)


class ProgressBar:
    """A `RunObserver` that advances a `tqdm.auto` bar (a widget in Jupyter) each time rows are logged."""

    def __init__(self, **tqdm_kwargs: Any) -> None:
        self.tqdm_kwargs = tqdm_kwargs
        self.bar: Any = None

    def on_start(self, config: RunConfig, plan: PrecisionPlan) -> None:
        from tqdm.auto import tqdm

        name = config.run_name or config.base_name  # the readable part of the name, without its identity
        self.bar = tqdm(total=config.steps, desc=f"{name} [{plan.effective}]", unit="step", **self.tqdm_kwargs)
        container = getattr(self.bar, "container", None)  # tqdm.notebook's widget row: label, bar, counts
        if container is not None:
            for part in (container.children[0], container.children[-1]):
                part.layout.flex = "0 0 auto"  # the label and the counts keep their one line, never broken mid-word
            container.layout.flex_flow = "row wrap"  # in a narrow output the parts wrap whole instead

    def on_log(self, rows: Sequence[HistoryRow], items_per_step: int) -> None:
        if self.bar is None or not rows:
            return
        last = rows[-1]
        postfix = {"loss": f"{last.loss:.4f}" if last.loss is not None else "nan"}
        if last.loss_scale is not None:
            postfix.update(scale=f"{last.loss_scale:g}", skipped=last.skipped_steps)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(len(rows))

    def on_eval(self, row: EvalRow) -> None:
        pass  # the bar shows the train loss; the eval loss is the live figure's

    def on_end(self, result: RunResult) -> None:
        if self.bar is not None:
            self.bar.set_postfix(status=result.status)
            self.bar.close()


def figure_path(config: RunConfig) -> Path:
    """Where a run's figure goes: beside its result JSON."""
    return config.result_path.with_suffix(".png")


def save_run_figure(result: RunResult, config: RunConfig) -> Path:
    """The run's figure as PNG: the same figure the live figure's last frame shows."""
    return save_figure(run_figure(result, steps=config.steps), figure_path(config))


# -- views (IPython display objects) -------------------------------------------------------------


def plan_markdown(plan: PrecisionPlan) -> str:
    line = f"**Precision plan:** requested `{plan.requested}` → effective **`{plan.effective}`** on {plan.device_type} ({plan.device_name})"
    line += f"; autocast {plan.autocast_dtype or 'off'}, parameters {plan.param_dtype}, loss scaler {'on' if plan.use_loss_scaler else 'off'}"
    if plan.parallelism != "none":
        line += f"; {plan.label} over {plan.parallelism}, gradients reduced in {plan.reduce_dtype}"
    line = line.replace("torch.", "")
    line += f"\n\n**Emulated:** {plan.emulation_note}" if plan.emulated else ""
    return line + (f"\n\n**Fallback:** {plan.fallback_reason}" if plan.fallback_reason else "")


def result_markdown(result: RunResult) -> str:
    m = result.metrics
    lines = [f"**Status:** {result.status}" + (f" — {result.error_line}" if result.error_line else "")]
    if m.items_per_s is not None:
        lines.append(
            f"- throughput: {m.items_per_s:,.0f} {m.throughput_unit}/s (median step {m.step_time_ms_median:.2f} ms)"
        )
    if m.peak_memory_mb is not None:
        lines.append(f"- peak memory: {m.peak_memory_mb:,.1f} MB ({m.peak_memory_kind})")
    for label, value in (("final train loss", m.final_train_loss), ("eval loss", m.eval_loss)):
        if value is not None:
            lines.append(f"- {label}: {value:.4f}")
    if m.final_loss_scale is not None:
        lines.append(
            f"- loss scale: final {m.final_loss_scale:g}, min {m.min_loss_scale:g}; skipped steps: {m.skipped_steps}"
        )
    if result.fp8_layers is not None:
        lines.append(f"- fp8: {result.fp8_layers.summary}")
    if result.energy is not None and result.energy.joules_per_item is not None:
        lines.append(f"- energy: {result.energy.joules:,.1f} J over the timed steps, {result.energy.joules_per_item:.3g} J per item")
    return "\n".join(lines)


def markdown(text: str) -> Any:
    from IPython.display import Markdown

    return Markdown(text)


def table_html(rows: Sequence[Measurements]) -> Any:
    from IPython.display import HTML

    return HTML(format_table(rows, "html"))


def verdicts_html(report: SweepReport) -> Any:
    """The verdict table (quality and speed against fp32 with intervals, time to quality) as HTML."""
    from IPython.display import HTML

    return HTML(format_verdicts(report.groups, "html"))


def memory_html(report: SweepReport) -> Any:
    """The memory split table as HTML, with the note a CPU's process-wide peak needs."""
    from IPython.display import HTML

    note = memory_note(report.groups)
    return HTML(format_memory(report.groups, "html") + (f"<p><em>{html.escape(note)}</em></p>" if note else ""))


# -- the timing of one setting (speed.ipynb) -----------------------------------------------------


def speed_run(config: Mapping[str, Any], precisions: Sequence[str], budget_s: float = 0.0) -> RunResult:
    """Time `precisions` (fp32 first) on the config's model in alternating blocks (`amp_lib.speed`) within
    `budget_s` seconds (0: the device's default), and write the result beside the training runs' results."""
    run = RunConfig.from_dict(dict(config))
    result = time_precisions(run, list(precisions), budget_s=budget_s or None)
    result.save(run.result_path)
    return result


def speed_markdown(result: RunResult) -> str:
    """The timing in words: each precision's speed-up over the baseline with its interval and verdict."""
    timing = result.timing
    if timing is None or not timing.blocks:
        return f"**Status:** {result.status}" + (f" — {result.error_line}" if result.error_line else "")
    how = "every comparison decided" if timing.stopped == "decided" else "budget spent"
    head = f"Timed {len(timing.precisions)} precisions in alternating blocks of {timing.block_steps} steps"
    lines = [f"{head}, {timing.elapsed_s:.0f} s ({how}):", ""]
    for p, v in speed_verdicts(timing).items():
        shown = "—" if v.interval is None else v.interval.format(".2f", "x")
        lines.append(f"- {p} vs {timing.precisions[0]}: {shown}, {v.verdict} ({v.rounds} rounds, {v.dropped} dropped)")
    lines += [f"- {p}: not timed — {why}" for p, why in timing.failed.items()]
    return "\n".join(lines)


def report_header(report: SweepReport) -> Any:
    """The top of the report: its context (machine, versions, model, recipe, seeds, tolerance) and the answer,
    with its caveat, as HTML."""
    from IPython.display import HTML

    facts = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>" for k, v in context(report))
    answer_html = mistune.html(answer(report)) if report.recommendations else "<p>No results.</p>"
    return HTML(f'<div class="amp-header"><ul class="amp-context">{facts}</ul>'
                f'<div class="amp-answer"><b>Answer:</b> {answer_html}</div></div>')  # fmt: skip


def details_html(report: SweepReport) -> Any:
    """The report's details, each in a collapsed section: caveats, causes, timing, noise, every measurement, rules."""
    from IPython.display import HTML

    parts = []
    for title, body in DETAILS:
        text = body(report)
        if text:
            parts.append(
                f'<details class="amp-details"><summary>{html.escape(title)}</summary>{mistune.html(text)}</details>'
            )
    return HTML("".join(parts))


def answer_text(report: SweepReport) -> str:
    """The report's answer, one sentence per setting."""
    return answer(report)


def recommendation_text(report: SweepReport) -> str:
    """Each setting's recommendation with its reason and evidence, as markdown."""
    return recommendations_markdown(report)


def rules_text(report: SweepReport) -> str:
    """The rules every verdict of the report follows."""
    return rules_markdown(report.tolerance)


def show_images(paths: Sequence[str | os.PathLike[str]]) -> None:
    from IPython.display import Image, display

    display(*(Image(filename=str(p)) for p in paths))


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportView:
    """What compare.ipynb shows: the report of one folder and its figures."""

    sweep_dir: Path
    report: SweepReport
    figures: dict[str, Path] = field(default_factory=dict)


def demo_sweep(directory: str | os.PathLike[str], seeds: Sequence[int] = (0,)) -> Path:
    """Tiny runs (fp32 and bf16-mixed, each seed, in-process) into `<directory>/results`: the demo data of
    the report and the explorer. With several seeds the run names end in -s<seed>."""
    out = Path(directory)
    for precision in DEMO_PRECISIONS:
        for seed in seeds:
            name = f"demo-{precision}" + (f"-s{seed}" if len(seeds) > 1 else "")
            train(RunConfig(precision=precision, seed=seed, run_name=name, out_dir=str(out / "results"), **DEMO_CONFIG))
    return out


def check_report_view(view: ReportView) -> bool:
    """Raise unless the report is whole: a table row per run, a verdict per row, every figure drawn, an answer.
    The report notebook's last cell: a report that is not whole fails its notebook, and the sweep says so."""
    report = view.report
    if not (report.results and len(report.runs) == len(report.results)):
        raise AssertionError(f"{len(report.results)} results but {len(report.runs)} table rows")
    if sum(g.runs for g in report.groups) != len(report.results):
        raise AssertionError("a result is in no verdict row, or in two")
    missing = [name for name, path in view.figures.items() if not path.exists()]
    if "eval_curves" not in view.figures or missing:
        raise AssertionError(f"figures not drawn: {missing or ['eval_curves']}")
    if not (report.recommendations and answer(report)):
        raise AssertionError("no answer")
    return True


def report_view(sweep_dir: str = "", tolerance: float = DEFAULT_TOLERANCE, figures_dir: str = "") -> ReportView:
    """Load a sweep folder ("" runs the tiny demo into a temp folder), build its report, draw the figures."""
    folder = Path(sweep_dir) if sweep_dir else demo_sweep(tempfile.mkdtemp(prefix="amp-demo-"))
    results = load_sweep(folder)
    if not results:
        raise ValueError(f"no result JSON files in {str(folder)!r} (nor in its results/ folder)")
    report = build_report(results, tolerance)
    figures = save_report_figures(report, Path(figures_dir) if figures_dir else folder / "figures")
    return ReportView(sweep_dir=folder, report=report, figures=figures)


# -- the explorer (explore.ipynb) ------------------------------------------------------------------

DEMO_SEEDS: tuple[int, ...] = (0, 1)  # the explorer's demo: two seeds, so overlaying seeds shows something


def explorer(sweep_dir: str = "", tolerance: float = DEFAULT_TOLERANCE) -> Explorer:
    """The explorer over a sweep folder; "" trains a tiny demo (two precisions, two seeds) into a temp folder."""
    folder = sweep_dir or demo_sweep(tempfile.mkdtemp(prefix="amp-explore-demo-"), DEMO_SEEDS)
    return load_explorer(folder, check_tolerance(tolerance))


@dataclass(frozen=True)
class ExploreView:
    """What the explorer shows for one selection: the figure (or, with nothing to draw, why: `note`), a
    caption, the verdicts (and, for the memory view, the memory split). Plain HTML, so the last view stays in
    the saved notebook and exported HTML; the figure is shown at its own size (at least 900 px wide)."""

    selection: Selection
    runs: int
    png: bytes = field(repr=False)
    tables_html: str
    note: str = ""  # why the view draws nothing (nothing selected, no fp16-mixed run for the loss scale, ...)

    @property
    def caption(self) -> str:
        s = self.selection
        return f"{s.view} · {s.setting} · {self.runs} run{'s' if self.runs != 1 else ''} selected"

    def _repr_mimebundle_(self, **_: Any) -> dict[str, str]:
        if self.note:
            shown = f'<div class="amp-explore-note">{html.escape(self.note)}</div>'
        else:
            image = base64.b64encode(self.png).decode("ascii")
            shown = f'<img alt="{html.escape(self.selection.view)}" src="data:image/png;base64,{image}"/>'
        return {
            "text/html": f'<div class="amp-explore"><div class="amp-explore-caption">{html.escape(self.caption)}</div>'
            f"{shown}{self.tables_html}</div>",
            "text/plain": self.caption + (f"\n{self.note}" if self.note else ""),
        }


def explore_view(explorer: Explorer, selection: Selection) -> ExploreView:
    """The view of one selection: its figure and the verdicts of its precisions (against fp32, same seeds)."""
    runs = explorer.selected(selection)
    comparisons, _ = explorer.verdicts(selection)
    if comparisons:
        tables = format_verdicts(comparisons, "html")
        if selection.view == "memory":
            note = memory_note(comparisons)
            tables += format_memory(comparisons, "html") + (f"<p><em>{html.escape(note)}</em></p>" if note else "")
    else:
        tables = "<p><em>Select at least one precision and one seed to see their verdicts.</em></p>"
    data = explorer.figure_data(selection)
    png = figure_png(explore_figure(data))
    return ExploreView(selection, len(runs), png, tables, data.note)


class ExplorerPanel:
    """The explorer's controls (ipywidgets: setting, precisions, seeds, view) above its view, an output
    replaced in place at each change. Every callback is one call to `explore_view`."""

    def __init__(self, explorer: Explorer, show: Callable[[Any], None] | None = None) -> None:
        import ipywidgets as widgets

        self.explorer = explorer
        self.show = show if show is not None else DisplayHandleSink()
        first = explorer.default_selection()
        self.setting = widgets.Dropdown(options=explorer.settings, value=first.setting, description="setting")
        self.precisions = widgets.SelectMultiple(description="precisions", rows=4)
        self.seeds = widgets.SelectMultiple(description="seeds", rows=4)
        self.view = widgets.ToggleButtons(options=VIEWS, value=first.view, description="view")
        self._fill(first.setting)
        self.controls = widgets.VBox([self.setting, widgets.HBox([self.precisions, self.seeds]), self.view])
        self._quiet = False
        self.setting.observe(self._setting_changed, names="value")
        for control in (self.precisions, self.seeds, self.view):
            control.observe(lambda _change: self.refresh(), names="value")

    def selection(self) -> Selection:
        return Selection(self.setting.value, tuple(self.precisions.value), tuple(self.seeds.value), self.view.value)

    def refresh(self) -> ExploreView | None:
        """Redraw the view for the controls' current values (not while the setting's choices are refilled)."""
        if self._quiet:
            return None
        view = explore_view(self.explorer, self.selection())
        self.show(view)
        return view

    def _fill(self, setting: str) -> None:
        """Offer the setting's precisions and seeds, all selected."""
        precisions, seeds = self.explorer.precisions(setting), self.explorer.seeds(setting)
        self.precisions.options, self.precisions.value = precisions, precisions
        self.seeds.options = [(str(s), s) for s in seeds]
        self.seeds.value = seeds

    def _setting_changed(self, change: dict[str, Any]) -> None:
        self._quiet = True
        try:
            self._fill(change["new"])
        finally:
            self._quiet = False
        self.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.controls)
        self.refresh()


# -- why: the headroom map and the profiled step -------------------------------------------------


def why_text(report: SweepReport) -> str:
    """The report's causes and overflow diagnoses, or what to turn on to get them."""
    if report.why:
        return why_markdown(report.why)
    return (
        "_Nothing to explain, or nothing recorded: run the sweep with `-p profile_step=true` (why a precision is "
        "not faster) and `-p headroom_every=N` (which layer overflows fp16)._"
    )


def headroom_markdown(result: RunResult) -> str:
    """The headroom map of one run in words: the first module to overflow (and the way out), and the layers
    with the least fp16 headroom."""
    if not result.headroom:
        return "_The headroom map was off (`headroom_every=0`)._"
    bf16 = result.bf16_capable
    events = result.headroom.get("first_overflow", [])
    lines = [f"- {way_out(e, bf16)}" for e in events[:1]] + (
        [f"- ({len(events) - 1} more overflowing steps)"] if len(events) > 1 else []
    )
    rows = [r for r in headroom_table(result.headroom) if r["fp16_headroom_activation"] is not None]
    tight = sorted(rows, key=lambda r: r["fp16_headroom_activation"])[:3]
    lines += [
        f"- `{r['module']}`: overflowed fp16 (inf/NaN)"
        if r["fp16_headroom_activation"] == -math.inf
        else f"- `{r['module']}`: largest |activation| {r['max_activation']:.3g}, "
        f"{r['fp16_headroom_activation']:.1f} doublings of fp16 headroom"
        for r in tight
    ]
    return "\n".join(lines) or "_No sampled step yet._"


def save_headroom_figure(result: RunResult, config: RunConfig) -> Path | None:
    """The headroom heatmap beside the run's result JSON, when the map was on."""
    if not result.headroom or not result.headroom.get("samples"):
        return None
    return save_figure(headroom_figure(result.headroom), config.result_path.with_name(f"{config.name}-headroom.png"))


def profile_markdown(result: RunResult) -> str:
    """Where the profiled step's time went, when the run was asked to profile one."""
    if not result.profile:
        return "_No step was profiled (`profile_step=False`)._"
    profile = StepProfile.from_dict(result.profile)
    parts = (
        ", ".join(f"{name} {profile.share(name):.0%}" for name in profile.busy_ms)
        + f", idle/host {profile.idle_ms / profile.wall_ms:.0%}"
    )
    bad = profile.misaligned_gemms
    gemms = f"; {len(bad)} of {len(profile.gemms)} reduced-precision GEMMs not multiples of 8" if profile.gemms else ""
    return f"Step {result.profile['step']} took {profile.wall_ms:.1f} ms: {parts}{gemms}."
