"""Memory by what holds it, at the peak of one training step: PyTorch's `MemTracker` (`FSDPMemTracker` for an
FSDP2-sharded model), or the tensor count where the tracker cannot run, with the reason.

A `MemoryProbe` is made for the one step it measures, `start()` before the step and `stop()` after it, as
`diagnose.StepProfiler` is: no probe, no cost. Use an untimed step: the tracker sees every op through a
dispatch mode (slow), and on a CPU the probe resets the process's resident-set high-water mark, which the
timed region's `PeakMemory` reads.

The tracker counts tensor storages as PyTorch creates and frees them (on a GPU rounded up to the caching
allocator's 512-byte blocks), in categories: parameters, buffers, gradients, optimizer state, activations
(made in forward), temporaries (made in backward: a gradient is a temporary until it is accumulated into
`.grad`, so at a peak inside backward the last gradient may sit there) and other. Tensors made before
`start()` that are not the model's, the optimizer's or passed to `start()` are not seen. On a CPU the
process's resident set (the allocator's retained pages, the interpreter, libraries) is reported apart.

The tracker cannot run, and the tensor count (parameters, gradients at their parameters' size, optimizer
state as `optim.state_bytes` counts it) stands in, when:
- the optimizer is torchao's: it runs its step through `torch.compile(fullgraph=True)`, which does not run
  under a dispatch mode ("found no compiled frames");
- the model is `torch.compile`d: under the tracker it would run eagerly, so the split would not be the
  compiled program's.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn

from amp_lib.measure import PeakMemory
from amp_lib.optim import state_bytes, tensor_bytes

HOLDERS: tuple[str, ...] = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_state",
    "activations",
    "temporaries",
    "other",
)
# The trackers' categories (their enum values) -> the holder they count towards. FSDP's all-gather and
# reduce-scatter buffers and the tracked inputs are "other"; `MemorySplit.detail_mb` keeps every category.
_HOLDER_OF: dict[str, str] = {
    "Parameter": "parameters",
    "Sharded Param": "parameters",
    "Unsharded Param": "parameters",
    "Buffer": "buffers",
    "Gradient": "gradients",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Optstate": "optimizer_state",
    "OptState": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
}
MB = 2**20


@dataclass(frozen=True)
class MemorySplit:
    """What held the memory at the step's peak, in MiB. From the tensor count, only parameters, buffers,
    gradients and optimizer state are known (the rest None), and `peak_mb` is None."""

    source: str  # "MemTracker", "FSDPMemTracker" or "tensor count (<why the tracker could not run>)"
    device: str
    peak_mb: float | None  # tensor memory at the peak, as the tracker counts it
    parameters_mb: float | None = None
    buffers_mb: float | None = None
    gradients_mb: float | None = None
    optimizer_state_mb: float | None = None
    activations_mb: float | None = None
    temporaries_mb: float | None = None
    other_mb: float | None = None
    detail_mb: dict[str, float] = dataclasses.field(default_factory=dict)  # the tracker's own categories
    # On a CPU: the process's resident set when the step began and its high-water mark during the step.
    process_rss_start_mb: float | None = None
    process_rss_peak_mb: float | None = None

    @property
    def tracked(self) -> bool:
        """Whether a tracker measured the split (not the tensor count)."""
        return self.peak_mb is not None

    def holders_mb(self) -> dict[str, float | None]:
        return {h: getattr(self, f"{h}_mb") for h in HOLDERS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def tracker_problem(model: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """Why MemTracker cannot measure a step of this model and optimizer, or None when it can."""
    owner = type(optimizer).__module__.split(".")[0]
    if owner == "torchao":
        return (
            f"torchao's {type(optimizer).__name__} runs its step through torch.compile, "
            "which does not run under MemTracker's dispatch mode"
        )
    if _is_compiled(model):
        return "the model is torch.compile'd: under MemTracker it would run eagerly, not as compiled"
    return None


def _is_compiled(model: nn.Module) -> bool:
    if "torch._dynamo" not in sys.modules:  # torch.compile imports it: nothing was compiled in this process
        return False
    inner = getattr(model, "module", model)  # DDP's wrapped module
    return any(
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
        for m in (model, inner)
    )


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class MemoryProbe:
    """The memory split of one training step: `start()` before it, `stop()` after it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.problem = tracker_problem(model, optimizer)
        self.fsdp = self.problem is None and _is_fsdp(model)
        self._tracker: Any = None
        self._hook: Any = None
        self._forwards = 0
        self._rss = PeakMemory(self.device) if self.device.type == "cpu" else None
        self._rss_start: float | None = None
        self._started = False

    @property
    def source(self) -> str:
        if self.problem is not None:
            return f"tensor count ({self.problem})"
        return "FSDPMemTracker" if self.fsdp else "MemTracker"

    def start(self, *inputs: torch.Tensor) -> None:
        """Begin tracking; `inputs` are tensors made before the step that it should count (e.g. the batch)."""
        self._started = True
        if self._rss is not None:
            self._rss.reset()
            self._rss_start = psutil.Process().memory_info().rss / MB
        if self.problem is not None:
            return
        if self.fsdp:
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = FSDPMemTracker(self.model, self.optimizer)
            tracker.track_inputs(inputs)
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(self.model, self.optimizer, *inputs)
        # MemTracker refuses the root module's second forward in one context (it takes it for the next
        # iteration); under gradient accumulation each micro-batch's forward starts the module statistics
        # afresh. The peak and the split are kept. Registered before the tracker's own global hooks: runs first.
        self._forwards = 0
        self._hook = nn.modules.module.register_module_forward_pre_hook(self._new_micro_batch)
        self._tracker = tracker
        tracker.__enter__()

    def _new_micro_batch(self, module: nn.Module, args: Any) -> None:
        if module is self.model:
            if self._forwards:
                self._tracker.reset_mod_stats()
            self._forwards += 1

    def stop(self) -> MemorySplit:
        """End tracking: the split at the step's peak (or the tensor count, with the reason)."""
        if not self._started:
            raise RuntimeError("MemoryProbe.stop() before start()")
        self._started = False
        rss = {}
        if self._rss is not None:
            rss = {"process_rss_start_mb": self._rss_start, "process_rss_peak_mb": self._rss.peak_mb()}
        if self._tracker is None:
            return self._counted(rss)
        tracker, self._tracker = self._tracker, None
        try:
            tracker.__exit__(None, None, None)
        finally:
            self._hook.remove()
        peak = _on_device(tracker.get_tracker_snapshot("peak"), self.device)
        detail = {str(getattr(k, "value", k)): v / MB for k, v in peak.items() if k != "Total"}
        holders = dict.fromkeys(HOLDERS, 0.0)
        for category, mb in detail.items():
            holders[_HOLDER_OF.get(category, "other")] += mb
        return MemorySplit(
            source=self.source,
            device=str(self.device),
            peak_mb=peak.get("Total", 0) / MB,
            **{f"{h}_mb": mb for h, mb in holders.items()},
            detail_mb=detail,
            **rss,
        )

    def _counted(self, rss: dict[str, float | None], why: str | None = None) -> MemorySplit:
        """The hand count: tensor sizes of what the model and optimizer hold (gradients at their parameters' size)."""
        params = [p for p in self.model.parameters()]
        grads = sum(tensor_bytes([p]) for p in params if p.requires_grad)
        return MemorySplit(
            source=self.source if why is None else f"tensor count ({why})",
            device=str(self.device),
            peak_mb=None,
            parameters_mb=tensor_bytes(params) / MB,
            buffers_mb=tensor_bytes(self.model.buffers()) / MB,
            gradients_mb=grads / MB,
            optimizer_state_mb=state_bytes(self.optimizer) / MB,
            **rss,
        )


class StepMemoryProbe:
    """The training loop's probe (`amp_lib.train`) that measures the split of one untimed step, `step`, with a
    `MemoryProbe`; `record()` is that split, or the tensor count with the reason where the step never ran. The
    step's wall time (the tracker slows it) is handed to `exclude`, so it is not counted as training time."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        step: int | None,
        exclude: Callable[[float], None] | None = None,
        why_not: str = "no untimed step to measure",
    ) -> None:
        self.probe, self.step, self.exclude, self.why_not = MemoryProbe(model, optimizer, device), step, exclude, why_not
        self.split: MemorySplit | None = None
        self._began = 0.0

    def begin_step(self, step: int) -> None:
        if step == self.step:
            self._sync()
            self._began = time.perf_counter()
            self.probe.start()

    def end_step(self, step: int) -> None:
        if step == self.step:
            self._sync()
            self.split = self.probe.stop()
            if self.exclude is not None:
                self.exclude(time.perf_counter() - self._began)

    def flush(self, rows: Sequence[Any]) -> None:
        pass

    def close(self) -> None:
        """Remove the tracker of a step that raised."""
        if self.probe._started:
            self.probe.stop()

    def record(self) -> MemorySplit:
        return self.split if self.split is not None else self.probe._counted({}, self.why_not)

    def counted(self) -> MemorySplit:
        """What the model and optimizer hold now, as tensor sizes (this rank's shards under FSDP): no tracker."""
        return self.probe._counted({})

    def _sync(self) -> None:
        if self.probe.device.type == "cuda":
            torch.cuda.synchronize(self.probe.device)


def _on_device(snapshot: dict[torch.device, dict[Any, int]], device: torch.device) -> dict[Any, int]:
    """The run's device's entry of a tracker snapshot ('cuda' names the current CUDA device): a GPU run also has
    CPU tensors (torchao's step counters), which are not the device's memory."""
    for dev, entry in snapshot.items():
        if dev.type == device.type and (device.index is None or dev.index in (None, device.index)):
            return entry
    return {}
