"""AMP Workbook: which precision should this model train in on this machine, and what does it buy?

Data flows one way: `config` (RunConfig) -> `precision` (PrecisionPlan) -> `train` (the loop, with
`scaler` and `measure`) -> `results` (JSON) -> `report`; `notebook`, `plots`, `tracking` and `sweep`
sit on top. The Lightning callback is `amp_lib.lightning_callback.AmpWandbCallback` (not imported
here: importing Lightning costs every kernel start about 4 s, and most runs never use it).
"""

from amp_lib.amp_state import get_loss_scale
from amp_lib.config import RunConfig
from amp_lib.precision import (
    Capabilities,
    PrecisionPlan,
    PrecisionUnavailableError,
    compute_effective_precision,
    native_precisions,
    parse_precision,
    probe,
    resolve_precision,
)
from amp_lib.report import SweepReport, build_report
from amp_lib.results import Metrics, RunResult, load_results, load_sweep
from amp_lib.scaler import AmpScaler, StepOutcome
from amp_lib.train import train

__all__ = [
    "AmpScaler",
    "Capabilities",
    "Metrics",
    "PrecisionPlan",
    "PrecisionUnavailableError",
    "RunConfig",
    "RunResult",
    "StepOutcome",
    "SweepReport",
    "build_report",
    "compute_effective_precision",
    "get_loss_scale",
    "load_results",
    "load_sweep",
    "native_precisions",
    "parse_precision",
    "probe",
    "resolve_precision",
    "train",
]
__version__ = "0.1.0"
