"""A sweep's grid -> the runs it stands for (pure: no files, no processes, no hardware probing).

    -p lr=1e-3,3e-3 --precisions fp32,bf16 --seeds 0,1   ->   8 `SweepRun`s, each a name and the
                                                             parameters papermill injects
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amp_lib.config import NON_SETTING_FIELDS, parameter_names, parse_value
from amp_lib.models import default_model_for
from amp_lib.precision import Capabilities, native_precisions, parse_precision

# What `make sweep` runs when not told otherwise: sized to finish in seconds on a CPU, to measure on a GPU.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"steps": 40, "warmup_steps": 8, "batch_size": 8, "seq_len": 64, "log_every": 5},
    "cuda": {"steps": 300, "warmup_steps": 20, "batch_size": 16, "seq_len": 512, "log_every": 25, "lr": 6e-4},
}


def parse_params(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["lr=1e-3,3e-3", "steps=20"]` -> `{"lr": [0.001, 0.003], "steps": [20]}`, names and types checked."""
    valid = [k for k in parameter_names() if k not in NON_SETTING_FIELDS]
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise ValueError(f"invalid -p {item!r}; expected key=value[,value...]")
        if key in NON_SETTING_FIELDS:
            raise ValueError(
                f"-p {key}=... is set by the sweep; use --precisions / --seeds (run_name and out_dir follow --out)"
            )
        if key not in valid:
            raise ValueError(f"unknown parameter {key!r}; valid names: {', '.join(valid)}")
        grid[key] = [parse_value(key, v) for v in values.split(",")]
    return grid


@dataclass(frozen=True)
class SweepRun:
    """One notebook execution: its name and every parameter papermill injects."""

    name: str
    parameters: dict[str, Any]

    @property
    def result_path(self) -> Path:
        return Path(self.parameters["out_dir"]) / f"{self.name}.json"


def _slug(value: Any) -> str:
    return re.sub(r"[^\w.=+-]", "_", str(value).replace(":", "."))


def expand_grid(
    out: str | os.PathLike[str],
    caps: Capabilities,
    precisions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    grid: dict[str, list[Any]] | None = None,
) -> list[SweepRun]:
    """The runs of a sweep on a device with `caps`: precisions x seeds x grid; no precisions means the
    device's native ones, and parameters the grid leaves out take the device's defaults."""
    grid = dict(grid or {})
    if not precisions:
        precisions = native_precisions(caps)
    precisions = [parse_precision(p) for p in precisions]
    if len(set(precisions)) != len(precisions) or len(set(seeds)) != len(seeds):
        raise ValueError(f"precisions {list(precisions)} and seeds {list(seeds)} must not repeat")
    defaults = {"model": default_model_for(caps.device_type), **DEVICE_DEFAULTS[caps.device_type]}
    base = {k: v for k, v in defaults.items() if k not in grid}
    results_dir = str(Path(out).resolve() / "results")
    varying = [k for k, values in grid.items() if len(values) > 1 and k != "model"]
    runs = []
    for combo in itertools.product(*grid.values()):
        values = {**base, **dict(zip(grid, combo))}
        for precision, seed in itertools.product(precisions, seeds):
            name = "-".join(
                [_slug(values["model"]), precision, f"s{seed}", *(_slug(f"{k}={values[k]}") for k in varying)]
            )
            parameters = {
                **values,
                "precision": precision,
                "seed": seed,
                "run_name": name,
                "out_dir": results_dir,
                "wandb_group": values.get("wandb_group") or _slug(Path(out).resolve().name),
            }
            runs.append(SweepRun(name, parameters))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names collide: {sorted({n for n in names if names.count(n) > 1})}")
    return runs
