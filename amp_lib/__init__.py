"""AMP Workbook: which precision should this model train in on this machine, and what does it buy?"""

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
from amp_lib.results import Metrics, RunResult, load_results
from amp_lib.scaler import AmpScaler, StepOutcome, get_loss_scale
from amp_lib.train import RunConfig, train

__all__ = [
    "AmpScaler",
    "Capabilities",
    "Metrics",
    "PrecisionPlan",
    "PrecisionUnavailableError",
    "RunConfig",
    "RunResult",
    "StepOutcome",
    "compute_effective_precision",
    "get_loss_scale",
    "load_results",
    "native_precisions",
    "parse_precision",
    "probe",
    "resolve_precision",
    "train",
]
__version__ = "0.1.0"
