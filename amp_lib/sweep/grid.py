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

from amp_lib.config import NON_SETTING_FIELDS, RECIPES, RunConfig, TrackingConfig, parameter_names, parse_value
from amp_lib.models import default_model_for
from amp_lib.precision import Capabilities, native_precisions, parse_precision
from amp_lib.tracking import WANDB_MODES

# What `make sweep` runs when not told otherwise: a recipe sized to finish in about a minute on a 2-core
# CPU, or all precisions x 3 seeds in about 10 minutes on one H100; each run profiles one step, so the
# report can say why a precision does not pay.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"recipe": "shakespeare-char-tiny", "profile_step": True},
    "cuda": {"recipe": "shakespeare-char-short", "profile_step": True},
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
    device's native ones, and parameters the grid leaves out take the device's defaults (a recipe, spelt
    out value by value)."""
    grid = dict(grid or {})
    if not precisions:
        precisions = native_precisions(caps)
    precisions = [parse_precision(p) for p in precisions]
    if len(set(precisions)) != len(precisions) or len(set(seeds)) != len(seeds):
        raise ValueError(f"precisions {list(precisions)} and seeds {list(seeds)} must not repeat")
    defaults = DEVICE_DEFAULTS[caps.device_type]
    base = {k: v for k, v in defaults.items() if k not in grid}
    results_dir = str(Path(out).resolve() / "results")
    varying = [k for k, values in grid.items() if len(values) > 1 and k != "model"]
    unset = RunConfig()  # what each field holds when nothing sets it
    runs = []
    for combo in itertools.product(*grid.values()):
        user = dict(zip(grid, combo))
        values = {**base, **user}
        # The recipe's values, spelt out value by value under what the user set. The name itself is not passed
        # on: RunConfig would apply it again over every value equal to its default, a value the user set too.
        # An unknown name is passed on, for RunConfig to refuse with the valid ones (run_problems says so).
        recipe_name = values.pop("recipe")  # always there: every device default names one, and the grid's wins
        if recipe_name and recipe_name not in RECIPES:
            values["recipe"] = recipe_name
        recipe = RECIPES.get(recipe_name, {})
        values = {**recipe, **values}
        values.setdefault("model", default_model_for(caps.device_type))
        # A decay that ends with the steps (the recipe's, else RunConfig's) keeps doing so at the steps the user set.
        follows_steps = recipe.get("lr_decay_steps", unset.lr_decay_steps) == recipe.get("steps", unset.steps)
        if "steps" in user and "lr_decay_steps" not in user and follows_steps:
            values["lr_decay_steps"] = values["steps"] if values["steps"] > values.get("lr_warmup_steps", 0) else 0
        if user.get("nproc", 1) > 1 and "parallelism" not in user:
            values["parallelism"] = "ddp"  # -p nproc=2 alone: DDP, the one parallelism every model runs under
        if "steps" in user and "timing_warmup_steps" not in user:
            # A default that depends on a value the user set: -p steps=5 must not fail on a warm-up of 8.
            default = values.get("timing_warmup_steps", unset.timing_warmup_steps)
            values["timing_warmup_steps"] = timing_warmup_for(values["steps"], default)
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


def timing_warmup_for(steps: int, default: int) -> int:
    """The untimed warm-up a sweep gives `steps` when the user sets none: the device default, but at most
    a fifth of the steps (so there is always something left to time)."""
    return max(0, min(default, steps // 5))


def _config_problems(values: dict[str, Any]) -> list[str]:
    """Every problem `RunConfig` finds in `values`, not just the first: after each one, the field it
    names goes back to its default and the config is built again."""
    defaults = RunConfig()
    values, problems, reset = dict(values), [], set()
    while True:
        try:
            RunConfig.from_dict(values)
            return problems
        except (ValueError, TypeError) as exc:
            match = re.match(r"(?:invalid )?(\w+)[= ]", str(exc))
            name = match.group(1) if match else None
            if name in reset or str(exc) in problems:  # its default clashes too: nothing more to learn
                return problems
            problems.append(str(exc))
            if name not in values or not hasattr(defaults, name):
                return problems
            reset.add(name)
            values[name] = getattr(defaults, name)


def run_problems(runs: Sequence[SweepRun]) -> list[str]:
    """Every problem with the runs' parameters, one line each (value, field, what is valid), found by
    building each run's `RunConfig` and `TrackingConfig` exactly as its notebook will: no kernel needed.
    A problem shared by many runs is listed once."""
    tracking_fields = set(TrackingConfig.field_names())
    problems: list[str] = []
    for run in runs:
        found = _config_problems({k: v for k, v in run.parameters.items() if k not in tracking_fields})
        tracking = {k: v for k, v in run.parameters.items() if k in tracking_fields}
        try:
            TrackingConfig(**tracking)
        except (ValueError, TypeError) as exc:
            found.append(str(exc))
        mode = tracking.get("wandb_mode")
        if isinstance(mode, str) and mode.strip().lower() not in WANDB_MODES:
            found.append(f"invalid wandb_mode {mode!r}; valid values are: {', '.join(WANDB_MODES)}")
        problems += [p for p in found if p not in problems]
    return problems
