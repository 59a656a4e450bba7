"""Weights & Biases tracking: one offline-by-default W&B run per training run, logged from host-side rows.

`WandbTracker` is a `RunObserver` for `amp_lib.train`: `train()` already hands observers the history
rows it moved to the host every `log_every` steps, so logging adds no host-device sync of its own.
The Lightning callback is `amp_lib.lightning_callback.AmpWandbCallback`.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from amp_lib.config import PROJECT, WANDB_MODES, RunConfig, check_wandb_mode
from amp_lib.diagnose import StepProfile
from amp_lib.precision import PrecisionPlan
from amp_lib.render import answer, format_ttq, reason
from amp_lib.report import SweepReport
from amp_lib.results import EvalRow, HistoryRow, RunResult, finite_or_none

if TYPE_CHECKING:  # pragma: no cover
    from typing_extensions import Self


log = logging.getLogger(__name__)
__all__ = ["WANDB_MODES", "WandbTracker", "credentials_problem", "record_report", "resolve_wandb_mode"]


def resolve_wandb_mode(mode: str | None = None) -> str:
    """The W&B mode to use: the argument, else `$WANDB_MODE`, else "offline" (no network needed, ever)."""
    source = "W&B mode"
    if mode is None or mode == "":
        mode, source = os.environ.get("WANDB_MODE") or "offline", "W&B WANDB_MODE"
    return check_wandb_mode(mode, source)


def credentials_problem(mode: str | None) -> str | None:
    """Why W&B could not log online in this environment (no API key in $WANDB_API_KEY nor in ~/.netrc for the
    W&B host), or None: a sweep refuses such runs before any kernel starts rather than failing each one."""
    try:
        if resolve_wandb_mode(mode) != "online" or os.environ.get("WANDB_API_KEY"):
            return None
    except ValueError:
        return None  # an invalid mode is reported as such elsewhere
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return (
        f"wandb_mode='online' needs a W&B API key (WANDB_API_KEY, or `wandb login` for {host}); none found: "
        "use wandb_mode=offline (sync later with `wandb sync`) or disabled"
    )


def history_row_metrics(row: HistoryRow, items_per_step: int, use_loss_scaler: bool) -> dict[str, Any]:
    """The W&B keys for one history row (pure: the tests and the tracker share it)."""
    data: dict[str, Any] = {
        "train/loss": row.loss if row.loss is not None else float("nan"),
        "amp/skipped_steps": int(row.skipped_steps),
    }
    grad_norm = finite_or_none(row.grad_norm)
    if grad_norm is not None:
        data["train/grad_norm"] = grad_norm
    scale = finite_or_none(row.loss_scale)
    if use_loss_scaler and scale is not None:
        data["amp/loss_scale"] = scale
    step_ms = finite_or_none(row.step_time_ms)
    if step_ms is not None and step_ms > 0:
        data["perf/step_time_ms"] = step_ms
        data["perf/tokens_per_s"] = items_per_step / (step_ms / 1e3)
    return data


def result_summary(result: RunResult) -> dict[str, Any]:
    """Summary values mirroring the result JSON: `status`, `error`, `metrics/<name>`, `plan/<name>`."""
    d = result.to_dict()
    summary: dict[str, Any] = {"status": d["status"], "error": d["error"], "schema_version": d["schema_version"]}
    summary.update({f"metrics/{k}": v for k, v in d["metrics"].items()})
    summary.update({f"plan/{k}": v for k, v in d["plan"].items()})
    overflows = (result.headroom or {}).get("first_overflow", [])
    if overflows:  # the headroom map's answer to "which layer overflows in fp16?"
        first = overflows[0]
        summary.update({"headroom/first_overflow_module": first["module"], "headroom/first_overflow_step": first["step"],
                        "headroom/first_overflow_phase": first["phase"], "headroom/overflowing_steps": len(overflows)})  # fmt: skip
    if result.profile:
        profile = StepProfile.from_dict(result.profile)
        summary.update({f"profile/{name}_share": profile.share(name) for name in profile.busy_ms})
        summary["profile/idle_share"] = profile.idle_ms / profile.wall_ms if profile.wall_ms else None
    return summary


def report_summary(report: SweepReport) -> dict[str, Any]:
    """A sweep report's answer, verdicts, intervals and time-to-quality as flat W&B summary keys:
    `report/answer`, `report/tolerance`, and per precision `report/<precision>/<name>` (with several
    settings `report/<setting>/<precision>/<name>`, and `report/<setting>/recommendation`). Missing
    values are left out, never written as null or NaN."""
    several = len({g.setting for g in report.groups}) > 1
    summary: dict[str, Any] = {"report/answer": answer(report), "report/tolerance": report.tolerance}

    def prefix(setting: str) -> str:
        return f"report/{setting}/" if several else "report/"

    for rec in report.recommendations:
        summary[f"{prefix(rec.setting)}recommendation"] = rec.precision or "none"
        summary[f"{prefix(rec.setting)}recommendation_reason"] = reason(rec)
    for floor in report.noise:
        if floor.best_eval_loss is not None:
            summary[f"{prefix(floor.setting)}fp32_best_eval_loss"] = floor.best_eval_loss.mean
            summary[f"{prefix(floor.setting)}fp32_noise_std"] = floor.best_eval_loss.std
            summary[f"{prefix(floor.setting)}fp32_noise_ci_half_width"] = floor.half_width
            summary[f"{prefix(floor.setting)}tolerance_abs"] = floor.tolerance_abs
            if floor.seeds_needed:
                summary[f"{prefix(floor.setting)}seeds_needed"] = floor.seeds_needed
    for c in report.groups:
        key = f"{prefix(c.setting)}{c.requested}/"
        ttq = c.ttq
        values: dict[str, Any] = {
            "verdict": c.verdict,
            "status": c.status,
            "best_eval_loss": c.best_eval_loss.mean if c.best_eval_loss else None,
            "loss_diff": c.loss_diff.mean if c.loss_diff else c.point_diff,
            "loss_diff_low": c.loss_diff.low if c.loss_diff else None,
            "loss_diff_high": c.loss_diff.high if c.loss_diff else None,
            "speed_verdict": c.speed_verdict,
            "speed_reason": c.speed_reason or None,
            "speedup": c.speedup.mean if c.speedup else c.point_speedup,
            "speedup_low": c.speedup.low if c.speedup else None,
            "speedup_high": c.speedup.high if c.speedup else None,
            "ttq": format_ttq(ttq) if ttq else None,
            "ttq_time_s": ttq.time_s.mean if ttq and ttq.time_s else None,
            "ttq_steps": ttq.steps.mean if ttq and ttq.steps else None,
            "ttq_reached": ttq.reached if ttq else None,
            "ttq_speedup": (ttq.speedup.mean if ttq.speedup else ttq.point_speedup) if ttq else None,
            "ttq_censored": ttq.censored if ttq else None,
            "speed_source": c.speed_source or None,
            "eligible": c.eligible,
            "loss_diff_pct": c.loss_diff_pct.mean if c.loss_diff_pct else None,
            "seeds_used": c.seeds_used,
            "memory_ratio": c.memory_ratio.mean if c.memory_ratio else None,
            "peak_memory_mb": c.memory.peak_mb if c.memory else None,
            "why": "; ".join(
                w
                for d in report.why
                if (d.setting, d.precision) == (c.setting, c.requested)
                for w in (*d.causes, *d.overflows)
            )
            or None,
        }
        for name, value in values.items():
            if isinstance(value, float):
                value = finite_or_none(value)
            if value is not None:
                summary[key + name] = value
    return summary


def log_report_summary(report: SweepReport, run: Any) -> dict[str, Any]:
    """Write `report_summary(report)` into a W&B run's summary (e.g. the sweep's own run); returns it."""
    summary = report_summary(report)
    run.summary.update(summary)
    return summary


def record_report(
    report: SweepReport,
    *,
    mode: str | None = None,
    project: str | None = None,
    group: str | None = None,
    name: str | None = None,
    dir: str | os.PathLike[str] | None = None,  # wandb.init's own name
) -> Path | None:
    """A sweep's verdicts in a W&B run of their own (job_type "report", in the sweep's group beside its
    training runs); returns the run's folder, None when W&B is disabled."""
    import wandb

    mode = resolve_wandb_mode(mode)
    if mode == "disabled":
        return None
    root = str(dir) if dir is not None else os.environ.get("WANDB_DIR") or None
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=project or PROJECT, group=group, name=name, job_type="report", dir=root, mode=mode,  # type: ignore[arg-type]
        reinit="create_new",
    )  # fmt: skip
    try:
        log_report_summary(report, run)
    finally:
        run.finish()
    return Path(run.settings.sync_dir)


class WandbTracker:
    """A `RunObserver` that mirrors one `train()` run into one W&B run.

    `mode` None means `$WANDB_MODE`, else "offline"; "disabled" makes every call a cheap no-op.
    Use it as an observer (`train(config, observers=[tracker])`); the run is finished in `on_end`.
    As a context manager it also finishes (as failed) a run that an exception cut short.
    """

    def __init__(
        self,
        mode: str | None = None,
        project: str | None = None,
        group: str | None = None,
        dir: str | os.PathLike[str] | None = None,  # wandb.init's own name
        *,
        name: str | None = None,
        tags: Sequence[str] = (),
        job_type: str | None = None,
    ) -> None:
        self.mode = resolve_wandb_mode(mode)
        self.project = project or PROJECT
        self.group = group or None
        self.dir = None if dir is None else str(dir)
        self.name = name
        self.tags = list(tags)
        self.job_type = job_type
        self.run: Any = None
        self.run_id: str | None = None
        self.run_dir: Path | None = None  # the offline run's folder (holds run-<id>.wandb); None when disabled
        self.error: str | None = None  # why W&B could not start, when it could not (the run trains untracked)
        self._plan: PrecisionPlan | None = None

    # RunObserver ---------------------------------------------------------------------------------
    def on_start(self, config: RunConfig, plan: PrecisionPlan) -> None:
        """Open the W&B run with the full RunConfig and PrecisionPlan (fallback reason included) as config."""
        import wandb

        self.finish()  # one W&B run per training run, even when a tracker object is reused
        self._plan = plan
        # wandb reads $WANDB_DIR once per process (its settings singleton); read it per run instead, so a
        # sweep or a test that points WANDB_DIR elsewhere between runs is obeyed.
        run_root = self.dir if self.dir is not None else os.environ.get("WANDB_DIR") or None
        if run_root is not None:
            Path(run_root).mkdir(parents=True, exist_ok=True)
        run_config = {**config.to_dict(), "plan": plan.to_dict()}
        notes = f"precision fallback: {plan.fallback_reason}" if plan.fallback_reason else None
        try:
            self.run = wandb.init(
                project=self.project,
                group=self.group,
                name=self.name or config.name,
                job_type=self.job_type,
                tags=self.tags or None,
                notes=notes,
                config=run_config,
                dir=run_root,
                mode=self.mode,  # type: ignore[arg-type]
                reinit="create_new",  # never log into (or finish) a run the user has open
            )
        except Exception as exc:  # noqa: BLE001 - tracking that cannot start must not cost the training run
            log.warning("W&B could not start (%s: %s); this run is not tracked", type(exc).__name__, exc)
            self.run, self.run_id, self.run_dir, self.error = None, None, None, f"{type(exc).__name__}: {exc}"
            return
        self.run_id = self.run.id
        self.run_dir = None if self.mode == "disabled" else Path(self.run.settings.sync_dir)

    def on_log(self, rows: Sequence[HistoryRow], items_per_step: int) -> None:
        """Log each host-side row at its own training step (step=row.step)."""
        if self.run is None:
            return
        use_scaler = bool(self._plan and self._plan.use_loss_scaler)
        for row in rows:
            self.run.log(history_row_metrics(row, items_per_step, use_scaler), step=row.step)

    def on_eval(self, row: EvalRow) -> None:
        """Log each eval at its training step as it is measured (`eval/loss`; a non-finite one is left out)."""
        if self.run is not None and row.loss is not None:
            self.run.log({"eval/loss": row.loss}, step=row.step)

    def on_end(self, result: RunResult) -> None:
        """Write summary values that match the result JSON, then finish (failed unless status is ok)."""
        if self.run is None:
            return
        self.run.summary.update(result_summary(result))
        self.finish(exit_code=0 if result.ok else 1)

    # lifecycle -----------------------------------------------------------------------------------
    def finish(self, exit_code: int | None = None) -> None:
        """Finish the open run, if any (idempotent)."""
        run, self.run = self.run, None
        if run is not None:
            run.finish(exit_code=exit_code)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=1 if exc_type is not None else None)
