"""The measuring instruments the training loop and the benchmark share: step timer, peak memory,
percentiles.

Timers never synchronise the device on their own: CUDA events are read in one batch when the
caller asks (every `log_every` steps), so timing adds no host-device sync to the hot loop.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


class StepTimer:
    """Per-step wall time: CUDA events on a GPU (no sync until read), perf_counter on a CPU."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.cuda = device.type == "cuda"
        self.clock = clock  # seconds; a parameter so a test can drive the CPU path exactly
        self._open: Any = None
        self._pending: list[tuple[Any, Any]] = []

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = self.clock()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = self.clock()
        self._pending.append((self._open, end))

    def read_ms(self) -> list[float]:
        """Milliseconds of every step since the last read (syncs on the last CUDA event)."""
        if self.cuda and self._pending:
            self._pending[-1][1].synchronize()
            out = [a.elapsed_time(b) for a, b in self._pending]
        else:
            out = [(b - a) * 1e3 for a, b in self._pending]
        self._pending.clear()
        return out


class PeakMemory:
    """Peak memory of the timed region: the CUDA allocator's peak, or the process's peak RSS on a CPU.

    On a CPU the peak is the kernel's high-water mark (VmHWM in `<proc>/status`, reset through
    `<proc>/clear_refs`); where there is no such file (macOS) it is getrusage's lifetime peak.
    """

    def __init__(self, device: torch.device, proc: Path = Path("/proc/self")) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "cpu_rss"
        self.proc = proc  # a parameter so a test can stand in a /proc without VmHWM, as on macOS

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                (self.proc / "clear_refs").write_text("5")  # resets VmHWM on Linux

    def peak_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        with contextlib.suppress(OSError):
            for line in (self.proc / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # "VmHWM:   123456 kB"
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile (0..1) with linear interpolation between ranks, as numpy's default; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)
