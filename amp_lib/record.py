"""A run's record: each step's device tensors kept, turned into host history rows once per log interval (the one
host-device transfer there), the metrics a finished or a cut-short run has, and divergence read off the rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from amp_lib.distributed import mean_over_ranks
from amp_lib.energy import EnergyReading
from amp_lib.fp8 import LayerPlan
from amp_lib.measure import StepTimer
from amp_lib.memtrack import MemorySplit
from amp_lib.results import EvalRow, HistoryRow, Metrics
from amp_lib.scaler import COLLAPSED_SCALE, StepOutcome


class Diverged(RuntimeError):
    """The run diverged: a non-finite loss the scaler did not skip, a collapsed loss scale or a non-finite eval."""


class Recorder:
    """Owns the run's history: per-step device tensors, turned into host rows every `log_every` steps."""

    def __init__(self, timer: StepTimer, item_unit: str = "tokens", constant_lr: float | None = None) -> None:
        self.timer, self.item_unit, self.constant_lr = timer, item_unit, constant_lr
        self.headroom: dict[str, Any] | None = None  # the fp16 headroom map, when it was on
        self.over_ranks = False  # several processes: the logged loss is the mean of every rank's
        self.profile: dict[str, Any] | None = None  # the profiled step's summary, when asked for
        self.fp8_layers: LayerPlan | None = None  # an fp8 run's linears: which ran in fp8, and why not the others
        self.memory: MemorySplit | None = None  # what held the memory at one untimed step's peak
        self.energy: EnergyReading | None = None  # the timed steps' energy (None with the reason where not read)
        self.machine: dict[str, Any] = {}  # where the run ran (amp_lib.diagnose.machine_context)
        self.history: list[HistoryRow] = []
        self.evals: list[EvalRow] = []
        self.timed_ms: list[float] = []
        self._steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._outcomes: list[StepOutcome] = []
        self._lrs: list[torch.Tensor] = []
        self._timed_steps: list[int] = []

    def record(
        self, step: int, loss: torch.Tensor, outcome: StepOutcome, timed: bool, lr: torch.Tensor | None = None
    ) -> None:
        """Keep one step's device tensors; `lr` is the scheduled learning rate (None: `constant_lr`)."""
        self._steps.append(step)
        self._losses.append(loss)
        self._outcomes.append(outcome)
        if lr is not None:
            self._lrs.append(lr)
        if timed:
            self._timed_steps.append(step)

    def flush(self) -> list[HistoryRow]:
        """The pending steps as history rows: the one host-device transfer per log interval."""
        if not self._steps:
            return []
        nan = torch.full_like(self._outcomes[0].grad_norm, math.nan)
        losses = torch.stack(self._losses).float()
        columns = [
            mean_over_ranks(losses) if self.over_ranks else losses,  # one collective per log interval
            torch.stack([o.grad_norm.float() for o in self._outcomes]),
            torch.stack([o.skipped.float() for o in self._outcomes]),
            torch.stack([(o.scale if o.scale is not None else nan).float() for o in self._outcomes]),
        ]
        if self._lrs:
            columns.append(torch.stack(self._lrs).float().to(columns[0].device))
        table = torch.stack(columns).tolist()  # the one host-device transfer per log interval
        losses, grad_norms, skipped, scales = table[:4]
        lrs = table[4] if self._lrs else [self.constant_lr] * len(self._steps)
        step_ms = dict(zip(self._timed_steps, self.timer.read_ms()))
        self.timed_ms.extend(step_ms.values())
        cumulative = self.history[-1].skipped_steps if self.history else 0
        rows = []
        for i, step in enumerate(self._steps):
            cumulative += bool(skipped[i])
            rows.append(
                HistoryRow(
                    step=step,
                    loss=losses[i],
                    loss_scale=None if math.isnan(scales[i]) else scales[i],
                    grad_norm=grad_norms[i],
                    step_time_ms=step_ms.get(step),
                    skipped=bool(skipped[i]),
                    skipped_steps=cumulative,
                    lr=lrs[i],
                )
            )
        self.history.extend(rows)
        self._steps, self._losses, self._outcomes, self._lrs, self._timed_steps = [], [], [], [], []
        return rows

    def metrics(self) -> Metrics:
        """What the history says: losses, skipped steps and loss scales (all a run cut short has)."""
        scales = [r.loss_scale for r in self.history if r.loss_scale is not None]
        eval_losses = [e.loss for e in self.evals if e.loss is not None]
        return Metrics(
            throughput_unit=self.item_unit,
            best_eval_loss=min(eval_losses) if eval_losses else None,
            final_train_loss=self.history[-1].loss if self.history else None,
            skipped_steps=self.history[-1].skipped_steps if self.history else 0,
            final_loss_scale=scales[-1] if scales else None,
            min_loss_scale=min(scales) if scales else None,
        )


def check_divergence(rows: Sequence[HistoryRow], use_scaler: bool) -> None:
    """Raise `Diverged` on a non-finite loss the scaler did not skip, or a collapsed loss scale."""
    for row in rows:
        loss_ok = row.loss is not None and math.isfinite(row.loss)
        if not loss_ok and not (use_scaler and row.skipped):
            raise Diverged(f"loss became {row.loss} at step {row.step}")
        if use_scaler and row.loss_scale is not None and row.loss_scale < COLLAPSED_SCALE:
            raise Diverged(
                f"loss scale collapsed to {row.loss_scale:g} at step {row.step}: fp16 overflows on every step"
            )
