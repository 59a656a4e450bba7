"""A run's energy where the hardware reports it: NVML's total-energy counter of the run's GPU(s), read when the
run starts and when it ends (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver loaded; Volta
and newer). Elsewhere the reading is None, with the reason.

Nothing heavy is imported here: nvidia-ml-py (`pynvml`) and torch are imported when a meter starts. The counter
is the board's, so another process on the same GPU adds to it, and it updates a few times a second: a run of
less than a few seconds reads coarsely. Synchronise the device before `stop()` so queued kernels are counted.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class EnergyReading:
    """Joules a run used on its GPU(s), and per item (token or sample); None with `reason` where not reported."""

    joules: float | None
    joules_per_item: float | None = None
    items: int | None = None
    seconds: float | None = None
    devices: tuple[str, ...] = ()  # the NVML devices read (their UUIDs)
    reason: str | None = None  # why there is no reading
    source: str = "NVML total energy"

    @property
    def watts(self) -> float | None:
        """Mean power over the reading."""
        return self.joules / self.seconds if self.joules is not None and self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    def over_ranks(self, joules: Sequence[float | None], items: int | None) -> EnergyReading:
        """A run's reading from every rank's `joules` (each rank reads its own GPU): their sum over the `items`
        of the whole run; this one alone on one process, and none where a rank has none."""
        if len(joules) <= 1 or self.joules is None:
            return self
        if any(j is None for j in joules):
            return replace(self, joules=None, joules_per_item=None, reason="not every rank's GPU reports energy")
        total = float(sum(j for j in joules if j is not None))
        return replace(self, joules=total, joules_per_item=total / items if items else None, items=items)


class EnergyMeter:
    """`start()` when the run starts, `stop(items)` when it ends. `devices` are the run's devices as torch names
    them (`cuda`, `cuda:1`, a torch.device, an index); `nvml_module` is the module that binds NVML (a parameter
    so a test can name one that is not installed)."""

    def __init__(self, devices: Any, nvml_module: str = "pynvml") -> None:
        self.devices = [str(d) for d in (devices if isinstance(devices, (list, tuple)) else [devices])]
        self.devices = [f"cuda:{d}" if d.isdigit() else d for d in self.devices]
        self.nvml_module = nvml_module
        self.reason: str | None = None
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._uuids: tuple[str, ...] = ()
        self._start_mj: list[int] = []
        self._began = 0.0

    def start(self) -> None:
        """Read every device's counter; on failure the reason is kept and `stop()` reports it."""
        self.reason = self._open()
        if self.reason is None:
            try:
                self._start_mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
            except self._nvml.NVMLError as exc:
                self.reason = f"the GPU does not report energy (NVML: {exc})"
        self._began = time.perf_counter()

    def stop(self, items: int | None = None) -> EnergyReading:
        """The energy since `start()`; `items` processed meanwhile gives joules per item."""
        seconds = time.perf_counter() - self._began
        if self.reason is not None or not self._start_mj:
            self._close()
            return EnergyReading(None, reason=self.reason or "the meter was not started", devices=self._uuids)
        try:
            end_mj = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        except self._nvml.NVMLError as exc:
            return EnergyReading(None, reason=f"NVML stopped reporting energy: {exc}", devices=self._uuids)
        finally:
            self._close()
        joules = sum(e - s for s, e in zip(self._start_mj, end_mj)) / 1e3
        return EnergyReading(
            joules=joules,
            joules_per_item=joules / items if items else None,
            items=items,
            seconds=seconds,
            devices=self._uuids,
        )

    def _close(self) -> None:
        """Release this meter's hold on NVML (nvmlInit counts its callers)."""
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError:
                pass

    def _open(self) -> str | None:
        """Find the devices' NVML handles; the reason when there are none."""
        others = [d for d in self.devices if not d.startswith("cuda")]
        if others or not self.devices:
            return f"no NVIDIA GPU: the run is on {', '.join(others) or 'no device'}"
        try:
            nvml = importlib.import_module(self.nvml_module)
        except ImportError:
            return "nvidia-ml-py not installed (pip install nvidia-ml-py, the energy extra)"
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            return f"no NVIDIA GPU: NVML could not start ({exc})"
        self._nvml = nvml
        try:
            self._uuids = tuple(_uuid(d) for d in self.devices)
            self._handles = [nvml.nvmlDeviceGetHandleByUUID(u) for u in self._uuids]
        except (nvml.NVMLError, RuntimeError, AssertionError) as exc:
            return f"cannot find the run's GPU in NVML: {exc}"
        return None


def _uuid(device: str) -> str:
    """NVML's UUID of a torch CUDA device: NVML counts physical GPUs, torch those CUDA_VISIBLE_DEVICES shows."""
    import torch

    index = torch.device(device).index
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    uuid = str(props.uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
