"""AMP Workbook: which precision should this model train in on this machine, and what does it buy?

Data flows one way: `config` (RunConfig) -> `precision` (PrecisionPlan) -> `train` (the loop, with
`scaler` and `measure`) -> `results` (JSON) -> `report` (data) -> `render` (words); `notebook`, `plots`,
`tracking` and `sweep` sit on top. The Lightning callback is `amp_lib.lightning_callback.AmpWandbCallback`.

The names below load on first use: importing the package stays cheap (a papermill kernel, `python -m
amp_lib.train` under torchrun), and `python -m amp_lib.train` runs a module the package has not already
imported (no runpy warning).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AmpScaler": "amp_lib.scaler",
    "Capabilities": "amp_lib.precision",
    "Metrics": "amp_lib.results",
    "PrecisionPlan": "amp_lib.precision",
    "PrecisionUnavailableError": "amp_lib.precision",
    "RunConfig": "amp_lib.config",
    "RunResult": "amp_lib.results",
    "StepOutcome": "amp_lib.scaler",
    "SweepReport": "amp_lib.report",
    "build_report": "amp_lib.report",
    "compute_effective_precision": "amp_lib.precision",
    "get_loss_scale": "amp_lib.amp_state",
    "load_results": "amp_lib.results",
    "load_sweep": "amp_lib.results",
    "native_precisions": "amp_lib.precision",
    "parse_precision": "amp_lib.precision",
    "probe": "amp_lib.precision",
    "resolve_precision": "amp_lib.precision",
    "train": "amp_lib.train",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'amp_lib' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
