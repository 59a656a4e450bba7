"""`RunConfig`, every knob of one run, and the one value coercion that validation, notebooks and
`-p key=v1,v2` parsing share.

A parameter's type is written once, as the annotation of its field; `ParamType` turns that
annotation into both a check (for values papermill or Python hand over) and a parser (for the text
of a sweep's `-p`), so the notebook and the CLI can never disagree about what a value means.

Validation is one function, `RunConfig.problems(values)`: every problem, one line each. A `RunConfig`
raises the first of them and stores canonical values (the precision's canonical name, the parallelism
`auto` resolves to), so nothing downstream parses a value again. A run's identity is its whole
config: `identity` hashes the values that differ from the defaults, and the run's name carries it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from amp_lib.fp8 import parse_fp8_layers
from amp_lib.optim import optimizer_problem, parse_optimizer
from amp_lib.precision import parse_parallelism, parse_precision, parse_reduce_dtype, reduce_dtype_problem

PROJECT = "amp-workbook"  # the package, its Jupyter kernel and the default W&B project
# The built-in models and their context length (None: not a sequence model). models.py builds exactly these.
BUILTIN_BLOCK_SIZES: dict[str, int | None] = {"gpt-tiny": 256, "gpt-small": 1024, "gpt2-124m": 1024, "mlp": None}
BUILTIN_MODELS: tuple[str, ...] = tuple(BUILTIN_BLOCK_SIZES)
# Fields that name or place a run rather than change what it measures: a sweep sets them itself,
# and the report groups runs into one setting across them.
NON_SETTING_FIELDS: tuple[str, ...] = ("precision", "seed", "run_name", "out_dir")
# Fields outside a run's identity: where it is written, what it is called, and the recipe (a source of
# values, which the config holds spelt out).
PLACEMENT_FIELDS: tuple[str, ...] = ("run_name", "out_dir", "recipe")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
# Built-in models FSDP cannot shard per transformer block (they have none): DDP runs them.
UNSHARDABLE_MODELS: tuple[str, ...] = ("mlp",)
WANDB_MODES: tuple[str, ...] = ("offline", "online", "disabled")

_SHAKESPEARE_CHAR: dict[str, Any] = {
    # nanoGPT's config/train_shakespeare_char.py, the "baby GPT": best validation loss 1.4697 after 5,000
    # steps (about 3 minutes on one A100). Weight decay 0.1 and gradient clipping 1.0 are nanoGPT's defaults.
    "model": "gpt-small",  # 6 layers, 6 heads, 384 wide
    "seq_len": 256,
    "batch_size": 64,
    "dropout": 0.2,
    "lr": 1e-3,
    "lr_warmup_steps": 100,
    "lr_decay_steps": 5000,
    "min_lr": 1e-4,
    "beta2": 0.99,
    "weight_decay": 0.1,
    "steps": 5000,
    "eval_every": 250,
    "eval_batches": 200,
    "timing_warmup_steps": 50,
    "log_every": 50,
}
# Named sets of values a run starts from; a value the user sets (anything but the field's default) wins.
RECIPES: dict[str, dict[str, Any]] = {
    "shakespeare-char": _SHAKESPEARE_CHAR,
    # The default GPU sweep: the same model and schedule shape, short enough that fp32, tf32, fp16-mixed and
    # bf16-mixed x 3 seeds fit in about 10 minutes on one H100 (an estimate until measured: docs/benchmarks.md).
    "shakespeare-char-short": {
        **_SHAKESPEARE_CHAR,
        "steps": 500,
        "lr_decay_steps": 500,
        "eval_every": 50,
        "eval_batches": 50,
        "timing_warmup_steps": 20,
        "log_every": 25,
    },
    # The default CPU sweep: a 2-layer, 64-wide model for seconds per run on 2 cores.
    "shakespeare-char-tiny": {
        "model": "gpt-tiny",
        "seq_len": 64,
        "batch_size": 8,
        "lr": 3e-3,
        "lr_warmup_steps": 10,
        "lr_decay_steps": 60,
        "min_lr": 3e-4,
        "beta2": 0.99,
        "weight_decay": 0.1,
        "steps": 60,
        "eval_every": 20,
        "eval_batches": 8,
        "timing_warmup_steps": 10,
        "log_every": 10,
    },
}


def _parse_bool(text: str) -> bool:
    word = text.lower()
    if word not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return word in ("true", "1", "yes")


@dataclass(frozen=True)
class ParamType:
    """One parameter type: which Python values it accepts and how its text form parses."""

    label: str  # as written in the annotation, quoted in errors
    accepts: tuple[type, ...]
    parse_text: Callable[[str], Any]

    @property
    def optional(self) -> bool:
        return type(None) in self.accepts

    def check(self, name: str, value: Any) -> None:
        """Raise `ValueError` unless `value` has this type (a bool is not an int here)."""
        if (isinstance(value, bool) and bool not in self.accepts) or not isinstance(value, self.accepts):
            raise ValueError(f"{name}={value!r} has type {type(value).__name__}; expected {self.label}")

    def parse(self, name: str, text: str) -> Any:
        """The value the text of `-p name=text` stands for."""
        raw = text.strip()
        if self.optional and raw.lower() in ("none", "null"):
            return None
        try:
            return self.parse_text(raw)
        except ValueError:
            raise ValueError(f"invalid value {text!r} for {name} (expected {self.label})") from None


TYPES: dict[str, ParamType] = {
    t.label: t
    for t in (
        ParamType("int", (int,), int),
        ParamType("float", (float, int), float),
        ParamType("str", (str,), str),
        ParamType("bool", (bool,), _parse_bool),
        ParamType("str | int", (str, int), str),  # precision: "16" is an accepted spelling as text
        ParamType("float | None", (float, int, type(None)), float),
        ParamType("str | None", (str, type(None)), str),
    )
}

# Lower bounds of the integer fields.
MINIMUMS: dict[str, int] = {
    "steps": 1,
    "batch_size": 1,
    "seq_len": 1,
    "grad_accum": 1,
    "log_every": 1,
    "growth_interval": 1,
    "timing_warmup_steps": 0,
    "seed": 0,
    "lr_warmup_steps": 0,
    "lr_decay_steps": 0,
    "eval_every": 0,
    "eval_batches": 1,
    "headroom_every": 0,
    "nproc": 1,
}


@dataclass(frozen=True)
class RunConfig:
    """Every knob of one run. Unknown keys, wrong types and out-of-range values raise `ValueError`."""

    precision: str | int = "fp32"
    model: str = "gpt-tiny"
    steps: int = 30
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 1e-3
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    timing_warmup_steps: int = 5  # untimed steps before throughput and memory are measured
    log_every: int = 5
    out_dir: str = "results"
    run_name: str = ""
    init_scale: float = 2.0**16
    growth_interval: int = 2000
    allow_slow: bool = False  # run fp16 on a CPU without fast fp16 instead of falling back to bf16
    compile: bool = False  # torch.compile the model (fp8 needs it to be fast)
    recipe: str = ""  # a name in RECIPES: its values replace every value left at its default
    lr_warmup_steps: int = 0  # learning-rate warm-up (linear); not the timing warm-up above
    lr_decay_steps: int = 0  # cosine decay of the learning rate to min_lr by this step; 0: no decay
    min_lr: float = 0.0
    beta2: float = 0.999  # AdamW's second-moment decay
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    dropout: float = 0.0  # built-in GPT models only
    eval_every: int = 0  # steps between evaluations on held-out batches; 0: only at the end
    eval_batches: int = 4  # held-out batches per evaluation (built-in models)
    headroom_every: int = 0  # fp16 headroom map (amp_lib.headroom): sample every N steps; 0: off, no hooks
    profile_step: bool = False  # profile the warm-up's last step, or the first without one (amp_lib.diagnose)
    # auto (ddp with nproc > 1, else none), none, ddp or fsdp (FSDP2): ddp/fsdp run under torchrun
    parallelism: str = "auto"
    nproc: int = 1  # processes (one per GPU) on this machine; batch_size is per process
    reduce_dtype: str = "fp32"  # FSDP's gradient-reduction dtype: fp32 or the compute dtype (bf16, fp16)
    # fp8 recipes only: 'auto' (torchao's rule for the recipe), 'all' (every linear with dims multiple of 16),
    # or a comma list of module-name patterns kept in high precision (e.g. 'lm_head,blocks.0.*')
    fp8_layers: str = "auto"
    emulate_fp8: bool = False  # without fp8 hardware, run an fp8 recipe emulated (its loss only), not bf16-mixed
    optimizer: str = "adamw"  # adamw (fused, fp32 state); torchao's adamw-bf16, adamw-8bit, adamw-4bit, adamw-fp8

    def __post_init__(self) -> None:
        values, problems = _validated(asdict(self))
        if problems:
            raise ValueError(problems[0])
        for name, value in values.items():
            if value != getattr(self, name) or type(value) is not type(getattr(self, name)):
                object.__setattr__(self, name, value)  # frozen: this is still construction

    @classmethod
    def problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Every problem with `values` as a config, one line each (the value, the field, what is valid); []
        when they make a valid config. `RunConfig(**values)` raises the first; a sweep lists them all."""
        unknown = sorted(set(values) - set(cls.field_names()))
        found = (
            [f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(cls.field_names())}"]
            if unknown
            else []
        )
        return found + _validated({k: v for k, v in values.items() if k not in unknown})[1]

    @property
    def schedules_lr(self) -> bool:
        """Whether the learning rate changes during the run (warm-up or decay)."""
        return bool(self.lr_warmup_steps or self.lr_decay_steps)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    @property
    def global_batch(self) -> int:
        """Samples (sequences) per optimizer step over all processes: what runs must share to compare."""
        return self.nproc * self.batch_size * self.grad_accum

    @property
    def identity(self) -> str:
        """A short hash of everything the run trains with (`config_identity`)."""
        return config_identity(self.to_dict())

    @property
    def base_name(self) -> str:
        """The readable part of an unnamed run's name: model, precision, parallelism and seed."""
        return base_run_name(self.model, self.precision, self.parallelism, self.nproc, self.reduce_dtype, self.seed)

    @property
    def name(self) -> str:
        """`<run_name or base_name>-<identity>`: readable, and never shared by two configs."""
        return f"{self.run_name or self.base_name}-{self.identity}"

    @property
    def result_path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_of(values: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The recipe a config's values mostly spell out (a sweep passes its recipe value by value), and the values
    that differ from it: ("shakespeare-char-tiny", {"steps": 40}). (None, {}) when no recipe holds most of them."""
    name = values.get("recipe")
    candidates = [name] if isinstance(name, str) and name in RECIPES else list(RECIPES)
    best, changed = None, {}
    for n in candidates:
        if sum(k in values for k in RECIPES[n]) < len(RECIPES[n]):
            continue  # a config that does not hold every value (a hand-made or older result) spells no recipe out
        differ = {k: values.get(k) for k, v in RECIPES[n].items() if values.get(k) != v}
        if len(differ) <= len(RECIPES[n]) // 3 and (best is None or len(differ) < len(changed)):
            best, changed = n, differ
    return best, changed


def base_run_name(model: Any, precision: Any, parallelism: Any, nproc: Any, reduce_dtype: Any, seed: Any) -> str:
    """`<model>-<precision>[-<parallelism><nproc>[-reduce-<dtype>]]-s<seed>`, from canonical values."""
    parallel = "" if parallelism in ("none", "auto") else f"-{parallelism}{nproc}"
    if parallelism == "fsdp" and reduce_dtype != "fp32":
        parallel += f"-reduce-{reduce_dtype}"
    return f"{str(model).replace(':', '.')}-{precision}{parallel}-s{seed}"


@functools.cache
def _canonical_defaults() -> tuple[tuple[str, Any], ...]:
    return tuple(RunConfig().to_dict().items())


def config_identity(values: Mapping[str, Any]) -> str:
    """Eight hex digits of a hash over a config's values that differ from the (canonical) defaults, its
    placement aside: equal for equal configs, different for any difference; unchanged when a new field with
    a default is added, so older results keep their identity."""
    defaults = dict(_canonical_defaults())
    relevant = {
        k: (float(v) if isinstance(v, int) and not isinstance(v, bool) and isinstance(defaults.get(k), float) else v)
        for k, v in values.items()
        if k not in PLACEMENT_FIELDS
    }
    relevant = {k: v for k, v in sorted(relevant.items()) if k not in defaults or v != defaults[k]}
    text = json.dumps(relevant, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _annotation(name: str) -> ParamType:
    return TYPES[{f.name: str(f.type) for f in fields(RunConfig)}[name]]


def _validated(given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The canonical values of a config and every problem with it. A value with a problem keeps its
    default for the checks that follow, so one mistake is reported once, not again by every rule it touches."""
    defaults = {f.name: f.default for f in fields(RunConfig)}
    values, problems, bad = dict(defaults), [], set()

    def problem(message: str, *names: str) -> None:
        if message not in problems:
            problems.append(message)
        bad.update(names)

    for name, value in given.items():
        try:
            _annotation(name).check(name, value)
        except ValueError as exc:
            problem(str(exc), name)
            continue
        if isinstance(defaults[name], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # 1 and 1.0 are one learning rate: one identity
        values[name] = value
    if values["recipe"] and "recipe" not in bad:
        if values["recipe"] not in RECIPES:
            problem(f"invalid recipe {values['recipe']!r}; valid: {', '.join(RECIPES)}", "recipe")
        else:
            for name, value in RECIPES[values["recipe"]].items():
                if values[name] == defaults[name]:
                    values[name] = value

    def canonical(name: str, parse: Callable[[Any], Any]) -> None:
        if name not in bad:
            try:
                values[name] = parse(values[name])
            except ValueError as exc:
                problem(str(exc), name)

    def rule(names: tuple[str, ...], broken: Callable[[], str | None]) -> None:
        """Check `broken()` (a message, or None) when none of `names` has a problem yet."""
        if not bad & set(names) and (message := broken()) is not None:
            problem(message, *names)

    canonical("precision", parse_precision)
    canonical("parallelism", lambda p: "auto" if str(p).strip().lower() == "auto" else parse_parallelism(p))
    canonical("reduce_dtype", parse_reduce_dtype)
    canonical("fp8_layers", lambda v: str(parse_fp8_layers(v)))
    canonical("optimizer", parse_optimizer)
    for name, minimum in MINIMUMS.items():
        rule((name,), lambda n=name, m=minimum: f"{n}={values[n]!r} must be >= {m}" if values[n] < m else None)
    for names, check in _RULES:
        rule(names, lambda c=check: c(values))
    _parallel_rules(values, rule)
    return values, problems


def _unless(ok: bool, message: str) -> str | None:
    return None if ok else message


# Each rule: the fields it reads (checked only when none of them has a problem yet) and its message, or None.
_RULES: tuple[tuple[tuple[str, ...], Callable[[dict[str, Any]], str | None]], ...] = (
    (("timing_warmup_steps", "steps"), lambda v: _unless(
        v["timing_warmup_steps"] < v["steps"],
        f"timing_warmup_steps={v['timing_warmup_steps']} must be less than steps={v['steps']} (nothing left to time)")),
    (("lr",), lambda v: _unless(v["lr"] > 0 and math.isfinite(v["lr"]), f"lr={v['lr']!r} must be a positive finite number")),
    (("grad_clip",), lambda v: _unless(
        v["grad_clip"] is None or (v["grad_clip"] >= 0 and math.isfinite(v["grad_clip"])),
        f"grad_clip={v['grad_clip']!r} must be None, 0 (off) or a positive number")),
    (("min_lr", "lr"), lambda v: _unless(
        0 <= v["min_lr"] <= v["lr"], f"min_lr={v['min_lr']!r} must be between 0 and lr={v['lr']!r}")),
    (("lr_decay_steps", "lr_warmup_steps"), lambda v: _unless(
        not v["lr_decay_steps"] or v["lr_decay_steps"] > v["lr_warmup_steps"],
        f"lr_decay_steps={v['lr_decay_steps']} must be 0 (no decay) or more than lr_warmup_steps={v['lr_warmup_steps']}")),
    (("beta2",), lambda v: _unless(0 < v["beta2"] < 1, f"beta2={v['beta2']!r} must be between 0 and 1 (exclusive)")),
    (("weight_decay",), lambda v: _unless(
        v["weight_decay"] >= 0 and math.isfinite(v["weight_decay"]),
        f"weight_decay={v['weight_decay']!r} must be a finite number >= 0")),
    (("dropout",), lambda v: _unless(0 <= v["dropout"] < 1, f"dropout={v['dropout']!r} must be in [0, 1)")),
    (("init_scale",), lambda v: _unless(
        v["init_scale"] > 0 and math.isfinite(v["init_scale"]),
        f"init_scale={v['init_scale']!r} must be a positive finite number")),
    (("model",), lambda v: _unless(
        v["model"] in BUILTIN_MODELS or ":" in v["model"],
        f"invalid model {v['model']!r}; valid: {', '.join(BUILTIN_MODELS)} or 'package.module:function'")),
    (("model", "seq_len"), lambda v: _block_problem(v["model"], v["seq_len"])),
    (("device",), lambda v: _unless(
        re.fullmatch(DEVICE_PATTERN, v["device"]) is not None,
        f"invalid device {v['device']!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")),
    (("run_name",), lambda v: _unless(
        not v["run_name"] or re.fullmatch(r"[\w.=+-]+", v["run_name"]) is not None,
        f"invalid run_name {v['run_name']!r}; use letters, digits and . _ = + -")),
    (("optimizer", "precision", "device"), lambda v: optimizer_problem(
        v["optimizer"], TRUE_PARAM_DTYPES.get(v["precision"], "fp32"), _device_type(v["device"]))),
)  # fmt: skip
# The parameter dtype of the precisions that train in half ("true"); every other keeps fp32 master weights.
TRUE_PARAM_DTYPES: dict[str, str] = {"bf16-true": "bf16", "fp16-true": "fp16"}


def _device_type(device: str) -> str:
    """cpu or cuda: what a config's device (auto, cpu, cuda, cuda:N) runs on here."""
    return "cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "cpu"


def _block_problem(model: str, seq_len: int) -> str | None:
    block = BUILTIN_BLOCK_SIZES.get(model)
    if block is not None and seq_len > block:
        return f"seq_len={seq_len} is longer than the block size of model {model!r}; valid: 1 to {block}"
    return None


def _parallel_rules(values: dict[str, Any], rule: Callable[[tuple[str, ...], Callable[[], str | None]], None]) -> None:
    """The parallelism `auto` resolves to, and the combinations that make no sense, refused before anything runs."""
    v = values
    if v["parallelism"] == "auto" and isinstance(v["nproc"], int):
        v["parallelism"] = "ddp" if v["nproc"] > 1 else "none"  # more than one process: DDP runs any model
    rule(("nproc", "parallelism"), lambda: f"nproc={v['nproc']} needs parallelism 'ddp' or 'fsdp' (valid: none, ddp, fsdp); "
         "'none' runs one process" if v["nproc"] > 1 and v["parallelism"] == "none" else None)
    rule(("reduce_dtype", "parallelism"), lambda: f"reduce_dtype={v['reduce_dtype']!r} applies to parallelism 'fsdp' only "
         f"(parallelism={v['parallelism']!r}); DDP reduces gradients in their own dtype: use 'fp32'"
         if v["reduce_dtype"] != "fp32" and v["parallelism"] != "fsdp" else None)

    rule(("reduce_dtype", "precision"), lambda: reduce_dtype_problem(v["precision"], v["reduce_dtype"]))
    rule(("parallelism", "model"), lambda: f"model {v['model']!r} has no transformer blocks for fsdp to shard one by one; "
         "use parallelism 'ddp' (or a model with blocks in an nn.ModuleList)"
         if v["parallelism"] == "fsdp" and v["model"] in UNSHARDABLE_MODELS else None)  # fmt: skip


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is mirrored in W&B: the notebook parameters that are not `RunConfig` fields."""

    wandb_mode: str | None = None  # None means $WANDB_MODE, else offline
    wandb_project: str = PROJECT
    wandb_group: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            TYPES[str(f.type)].check(f.name, getattr(self, f.name))
        if self.wandb_mode is not None and self.wandb_mode != "":
            object.__setattr__(self, "wandb_mode", check_wandb_mode(self.wandb_mode))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_wandb_mode(mode: Any, source: str = "wandb_mode") -> str:
    """The canonical W&B mode (offline, online, disabled); `ValueError` naming `source` otherwise."""
    if not isinstance(mode, str) or mode.strip().lower() not in WANDB_MODES:
        raise ValueError(f"invalid {source} {mode!r}; valid values are: {', '.join(WANDB_MODES)}")
    return mode.strip().lower()


def parameter_names() -> list[str]:
    """Every parameter train.ipynb (and so a sweep's `-p`) accepts."""
    return [*RunConfig.field_names(), *TrackingConfig.field_names()]


def parameter_type(name: str) -> ParamType:
    annotations = {f.name: str(f.type) for cls in (RunConfig, TrackingConfig) for f in fields(cls)}
    if name not in annotations:
        raise ValueError(f"unknown parameter {name!r}; valid names: {', '.join(parameter_names())}")
    return TYPES[annotations[name]]


def parse_value(name: str, text: str) -> Any:
    """The text of `-p name=text` as the type the parameter declares."""
    return parameter_type(name).parse(name, text)
