"""A sweep's grid -> the runs it stands for (pure: no files, no processes, no hardware probing).

-p lr=1e-3,3e-3 --precisions fp32,bf16 --seeds 0,1   ->   8 `SweepRun`s, each a name and the
                                                         parameters papermill injects

Runs are ordered seed-major within each grid point (seed 0 of every precision, then seed 1, ...), so a
drift in the machine's load over a sweep cannot line up with a precision. A run's name is readable
(model, precision, parallelism, seed and the values the user set) and ends with its config's identity,
so two configs never share a result file. `check_runs` sorts the runs into those that run, the
combinations that cannot (skipped, one line each) and values that are simply wrong (the sweep refuses).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amp_lib.config import (
    NON_SETTING_FIELDS,
    RECIPES,
    RunConfig,
    TrackingConfig,
    base_run_name,
    config_identity,
    parameter_names,
    parse_value,
)
from amp_lib.models import default_model_for
from amp_lib.optim import baseline_optimizer, parse_optimizer
from amp_lib.precision import Capabilities, native_precisions, parse_precision

# What `make sweep` runs when not told otherwise: a recipe sized to finish in about a minute on a 2-core
# CPU, or all precisions x 3 seeds in about 10 minutes on one H100; each run profiles one step, so the
# report can say why a precision does not pay.
DEVICE_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {"recipe": "shakespeare-char-tiny", "profile_step": True},
    "cuda": {"recipe": "shakespeare-char-short", "profile_step": True},
}
# Values that already stand in a run's readable name (model, parallelism) or do not change the run (W&B).
_NAMED_ELSEWHERE = ("model", "parallelism", "nproc", "reduce_dtype", *TrackingConfig.field_names())
_MAX_READABLE = 120  # characters of a run name before its identity
TRAIN_NOTEBOOK, SPEED_NOTEBOOK = "train.ipynb", "speed.ipynb"


def parse_params(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["lr=1e-3,3e-3", "steps=20"]` -> `{"lr": [0.001, 0.003], "steps": [20]}`, names and types checked;
    a key given twice is refused (which one should win?)."""
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
        if key in grid:
            raise ValueError(f"-p {key} is given twice; give its values once, comma-separated: -p {key}=v1,v2")
        grid[key] = [parse_value(key, v) for v in values.split(",")]
    return grid


@dataclass(frozen=True)
class SweepRun:
    """One notebook execution: its name (the result file's stem), every parameter papermill injects, and
    the grid coordinates that chose it (precision, seed and each `-p` key with several values)."""

    name: str
    parameters: dict[str, Any]
    coordinates: tuple[tuple[str, Any], ...] = ()
    notebook: str = TRAIN_NOTEBOOK  # in notebooks/: what papermill executes

    @property
    def result_path(self) -> Path:
        return Path(self.config_values()["out_dir"]) / f"{self.name}.json"

    @property
    def identity(self) -> str:
        """The identity of the config it trains (`RunConfig.identity`): the end of its name."""
        return self.name.rsplit("-", 1)[-1]

    @property
    def timed_precisions(self) -> tuple[str, ...]:
        """The precisions a timing run (speed.ipynb) times, the baseline first; () for a training run."""
        return tuple(self.parameters.get("precisions", ())) if self.notebook == SPEED_NOTEBOOK else ()

    @property
    def optimizer(self) -> str:
        """The optimizer it trains with, canonical (as given where that is no optimizer: the run never starts)."""
        value = self.config_values().get("optimizer", "adamw")
        try:
            return parse_optimizer(value)
        except ValueError:
            return str(value)

    def config_values(self) -> dict[str, Any]:
        """The `RunConfig` values of the run (a training run's parameters but the W&B settings; a timing run's
        `config`)."""
        if self.notebook == SPEED_NOTEBOOK:
            return dict(self.parameters["config"])
        tracking = TrackingConfig.field_names()
        return {k: v for k, v in self.parameters.items() if k not in tracking}

    def problems(self) -> list[str]:
        """Every problem with this run's values, as its notebook would find them (no kernel needed)."""
        found = RunConfig.problems(self.config_values())
        tracking = {k: v for k, v in self.parameters.items() if k in TrackingConfig.field_names()}
        try:
            TrackingConfig(**tracking)
        except (ValueError, TypeError) as exc:
            found.append(str(exc))
        return found


def _slug(value: Any) -> str:
    return re.sub(r"[^\w.=+-]", "_", str(value).replace(":", "."))


def expand_grid(
    out: str | os.PathLike[str],
    caps: Capabilities,
    precisions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    grid: dict[str, list[Any]] | None = None,
) -> list[SweepRun]:
    """The runs of a sweep on a device with `caps`: grid points x seeds x precisions (seed-major); no
    precisions means the device's native ones, and parameters the grid leaves out take the device's defaults
    (a recipe, spelt out value by value)."""
    grid = dict(grid or {})
    for key in TrackingConfig.field_names():
        if len(grid.get(key, ())) > 1:
            raise ValueError(f"-p {key} takes one value: it changes where runs are tracked, not what they train")
    if not precisions:
        precisions = native_precisions(caps)
    precisions = [parse_precision(p) for p in precisions]
    if len(set(precisions)) != len(precisions) or len(set(seeds)) != len(seeds):
        raise ValueError(f"precisions {list(precisions)} and seeds {list(seeds)} must not repeat")
    defaults = DEVICE_DEFAULTS[caps.device_type]
    base = {k: v for k, v in defaults.items() if k not in grid}
    results_dir = str(Path(out).resolve() / "results")
    unset = RunConfig()  # what each field holds when nothing sets it
    varying = [k for k, v in grid.items() if len(v) > 1]
    runs = []
    for combo in itertools.product(*grid.values()):
        user = dict(zip(grid, combo))
        values = {**base, **user}
        # The recipe's values, spelt out value by value under what the user set. The name itself is not passed
        # on: RunConfig would apply it again over every value equal to its default, a value the user set too.
        # An unknown name is passed on, for RunConfig to refuse with the valid ones.
        recipe_name = values.pop("recipe")  # always there: every device default names one, and the grid's wins
        if recipe_name and recipe_name not in RECIPES:
            values["recipe"] = recipe_name
        recipe = RECIPES.get(recipe_name, {})
        before_user = {**recipe, **{k: v for k, v in base.items() if k != "recipe"}}
        values = {**recipe, **values}
        values.setdefault("model", default_model_for(caps.device_type))
        # A decay that ends with the steps (the recipe's, else RunConfig's) keeps doing so at the steps the user set.
        follows_steps = recipe.get("lr_decay_steps", unset.lr_decay_steps) == recipe.get("steps", unset.steps)
        if "steps" in user and "lr_decay_steps" not in user and follows_steps:
            values["lr_decay_steps"] = values["steps"] if values["steps"] > values.get("lr_warmup_steps", 0) else 0
        if "steps" in user and "timing_warmup_steps" not in user:
            # A default that depends on a value the user set: -p steps=5 must not fail on a warm-up of 8.
            default = values.get("timing_warmup_steps", unset.timing_warmup_steps)
            values["timing_warmup_steps"] = timing_warmup_for(values["steps"], default)
        shown = [  # in RunConfig's field order, so the order of the -p options never changes a run's name
            f"{k}={user[k]}"
            for k in sorted(user, key=lambda k: _FIELD_ORDER.get(k, len(_FIELD_ORDER)))
            if k not in _NAMED_ELSEWHERE and user[k] != before_user.get(k, getattr(unset, k, None))
        ]
        for seed, precision in itertools.product(seeds, precisions):
            parameters = {
                **values,
                "precision": precision,
                "seed": seed,
                "out_dir": results_dir,
                "wandb_group": values.get("wandb_group") or _slug(Path(out).resolve().name),
            }
            readable, identity = _naming(parameters, shown)
            parameters["run_name"] = readable
            coordinates = (("precision", precision), ("seed", seed), *((k, user[k]) for k in varying))
            runs.append(SweepRun(f"{readable}-{identity}", parameters, coordinates))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names collide: {sorted({n for n in names if names.count(n) > 1})}")
    return runs


_FIELD_ORDER = {f.name: i for i, f in enumerate(dataclasses.fields(RunConfig))}


def _naming(parameters: dict[str, Any], shown: Sequence[str]) -> tuple[str, str]:
    """A run's readable name and its identity, from its config as its notebook will build it (the raw values
    where they make no valid config: such a run never starts)."""
    tracking = TrackingConfig.field_names()
    values = {k: v for k, v in parameters.items() if k not in tracking and k != "run_name"}
    try:
        config = RunConfig.from_dict(values)
        head, identity = config.base_name, config.identity
    except (ValueError, TypeError):  # such a run never starts: its name only has to be unique
        head = base_run_name(values.get("model"), values.get("precision"), "none", 1, "fp32", values.get("seed"))
        identity = config_identity(values)
    readable = "-".join([_slug(head), *map(_slug, shown)])
    return readable[:_MAX_READABLE].rstrip("-"), identity


def timing_runs(runs: Sequence[SweepRun], budget_s: float) -> list[SweepRun]:
    """One timing run (speed.ipynb) per setting of `runs` that trains fp32 and another precision in one process:
    the setting's precisions timed against fp32 in alternating blocks within `budget_s` seconds, on the config of
    its first seed's fp32 run. A setting over several processes is timed by its training runs only. Where a
    setting's runs use several optimizers, the precisions are timed with the baseline's (adamw); the rows of the
    other optimizers are judged by their training runs' speed."""
    if budget_s <= 0:
        return []
    by_setting: dict[tuple[tuple[str, str], ...], list[SweepRun]] = {}
    apart = (*NON_SETTING_FIELDS, "optimizer")  # an optimizer is a row of the setting, as in the report
    for run in runs:
        key = tuple(sorted((k, repr(v)) for k, v in run.config_values().items() if k not in apart))
        by_setting.setdefault(key, []).append(run)
    out = []
    for members in by_setting.values():
        timed_optimizer = baseline_optimizer(r.optimizer for r in members)
        members = [r for r in members if r.optimizer == timed_optimizer]
        precisions = list(dict.fromkeys(str(r.parameters["precision"]) for r in members))
        first_seed = min(r.parameters["seed"] for r in members)
        base = next((r for r in members if r.parameters["precision"] == "fp32" and r.parameters["seed"] == first_seed), None)
        if base is None or len(precisions) < 2 or RunConfig.from_dict(base.config_values()).parallelism != "none":
            continue
        timed = ["fp32", *(p for p in precisions if p != "fp32")]
        # the fp32 run's config, so the same identity: the readable part alone tells the two files apart, and it
        # must survive the cut at _MAX_READABLE, so "speed-" comes first
        readable = f"speed-{'+'.join(timed[1:])}-{base.parameters['run_name']}"[:_MAX_READABLE].rstrip("-")
        config = {**base.config_values(), "run_name": readable}
        name = RunConfig.from_dict(config).name  # where speed.ipynb writes its result
        out.append(SweepRun(name, {"config": config, "precisions": timed, "budget_s": float(budget_s)}, (), SPEED_NOTEBOOK))
    return out


def timing_warmup_for(steps: int, default: int) -> int:
    """The untimed warm-up a sweep gives `steps` when the user sets none: the device default, but at most
    a fifth of the steps (so there is always something left to time)."""
    return max(0, min(default, steps // 5))


def run_problems(runs: Sequence[SweepRun]) -> list[str]:
    """Every problem with the runs' parameters, one line each (value, field, what is valid), found by
    building each run's `RunConfig` and `TrackingConfig` exactly as its notebook will: no kernel needed.
    A problem shared by many runs is listed once."""
    problems: list[str] = []
    for run in runs:
        problems += [p for p in run.problems() if p not in problems]
    return problems


@dataclass(frozen=True)
class RunCheck:
    """The runs of a grid sorted by what can happen to them."""

    runs: tuple[SweepRun, ...]  # these run
    skipped: tuple[str, ...]  # combinations that cannot run, one line each: the sweep goes on without them
    problems: tuple[str, ...]  # wrong values: the sweep is refused


def check_runs(runs: Sequence[SweepRun]) -> RunCheck:
    """Sort the runs: a run whose values are fine runs; a run that fails only as a combination (every one of
    its grid values runs in some other combination: fp32 x reduce_dtype=bf16 next to bf16-mixed x bf16 and fp32
    x fp32) is skipped with one line; a value no run can use is a problem that refuses the sweep."""
    found = {run.name: run.problems() for run in runs}
    good = [r for r in runs if not found[r.name]]
    usable = {(k, repr(v)) for r in good for k, v in r.coordinates}
    skipped: dict[str, None] = {}
    problems: list[str] = []
    for run in runs:
        if not found[run.name]:
            continue
        point = [(k, v) for k, v in run.coordinates if k != "seed"]
        if good and all((k, repr(v)) in usable for k, v in run.coordinates):
            where = " x ".join(str(v) if k == "precision" else f"{k}={v}" for k, v in point)
            skipped[f"skipped {where}: {found[run.name][0]}"] = None
        else:
            problems += [p for p in found[run.name] if p not in problems]
    if problems:
        return RunCheck((), tuple(skipped), tuple(problems))
    return RunCheck(tuple(good), tuple(skipped), ())
