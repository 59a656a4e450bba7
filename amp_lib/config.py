"""`RunConfig`, every knob of one run, and the one value coercion that validation, notebooks and
`-p key=v1,v2` parsing share.

A parameter's type is written once, as the annotation of its field; `ParamType` turns that
annotation into both a check (for values papermill or Python hand over) and a parser (for the text
of a sweep's `-p`), so the notebook and the CLI can never disagree about what a value means.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from amp_lib.precision import compute_dtype_name, parse_parallelism, parse_precision, parse_reduce_dtype

PROJECT = "amp-workbook"  # the package, its Jupyter kernel and the default W&B project
BUILTIN_MODELS: tuple[str, ...] = ("gpt-tiny", "gpt-small", "gpt2-124m", "mlp")
# Fields that name or place a run rather than change what it measures: a sweep sets them itself,
# and the report groups runs into one setting across them.
NON_SETTING_FIELDS: tuple[str, ...] = ("precision", "seed", "run_name", "out_dir")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
# Built-in models FSDP cannot shard per transformer block (they have none): DDP runs them.
UNSHARDABLE_MODELS: tuple[str, ...] = ("mlp",)

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
    parallelism: str = "none"  # none, ddp or fsdp (FSDP2): ddp/fsdp run under torchrun (amp_lib.distributed)
    nproc: int = 1  # processes (one per GPU) on this machine; batch_size is per process
    reduce_dtype: str = "fp32"  # FSDP's gradient-reduction dtype: fp32 or the compute dtype (bf16, fp16)

    def __post_init__(self) -> None:
        for f in fields(self):
            TYPES[str(f.type)].check(f.name, getattr(self, f.name))
        if self.recipe:
            self._apply_recipe()
        parse_precision(self.precision)
        for name, minimum in (
            ("steps", 1),
            ("batch_size", 1),
            ("seq_len", 1),
            ("grad_accum", 1),
            ("log_every", 1),
            ("growth_interval", 1),
            ("timing_warmup_steps", 0),
            ("seed", 0),
            ("lr_warmup_steps", 0),
            ("lr_decay_steps", 0),
            ("eval_every", 0),
            ("eval_batches", 1),
            ("headroom_every", 0),
        ):
            if getattr(self, name) < minimum:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= {minimum}")
        if self.timing_warmup_steps >= self.steps:
            raise ValueError(
                f"timing_warmup_steps={self.timing_warmup_steps} must be less than steps={self.steps} (nothing left to time)"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} must be a positive finite number")
        if self.grad_clip is not None and not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip={self.grad_clip!r} must be None, 0 (off) or a positive number")
        if not (0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr={self.min_lr!r} must be between 0 and lr={self.lr!r}")
        if self.lr_decay_steps and self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(
                f"lr_decay_steps={self.lr_decay_steps} must be 0 (no decay) or more than lr_warmup_steps={self.lr_warmup_steps}"
            )
        if not 0 < self.beta2 < 1:
            raise ValueError(f"beta2={self.beta2!r} must be between 0 and 1 (exclusive)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init_scale={self.init_scale!r} must be a positive finite number")
        if self.model not in BUILTIN_MODELS and ":" not in self.model:
            raise ValueError(
                f"invalid model {self.model!r}; valid: {', '.join(BUILTIN_MODELS)} or 'package.module:function'"
            )
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"invalid device {self.device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.run_name and not re.fullmatch(r"[\w.=+-]+", self.run_name):
            raise ValueError(f"invalid run_name {self.run_name!r}; use letters, digits and . _ = + -")
        self._check_parallelism()

    def _check_parallelism(self) -> None:
        """Canonical spellings, and the combinations that make no sense refused before anything runs."""
        object.__setattr__(self, "parallelism", parse_parallelism(self.parallelism))
        object.__setattr__(self, "reduce_dtype", parse_reduce_dtype(self.reduce_dtype))
        if self.nproc < 1:
            raise ValueError(f"nproc={self.nproc!r} must be >= 1")
        if self.nproc > 1 and self.parallelism == "none":
            raise ValueError(
                f"nproc={self.nproc} needs parallelism 'ddp' or 'fsdp' (valid: none, ddp, fsdp); 'none' runs one process"
            )
        if self.reduce_dtype != "fp32" and self.parallelism != "fsdp":
            raise ValueError(
                f"reduce_dtype={self.reduce_dtype!r} applies to parallelism 'fsdp' only (parallelism={self.parallelism!r}); "
                "DDP reduces gradients in their own dtype: use 'fp32'"
            )
        compute = compute_dtype_name(parse_precision(self.precision))
        if self.reduce_dtype not in ("fp32", compute):
            raise ValueError(
                f"reduce_dtype={self.reduce_dtype!r} does not fit precision {self.precision!r}; valid: 'fp32' or its compute dtype {compute!r}"
            )
        if self.parallelism == "fsdp" and self.model in UNSHARDABLE_MODELS:
            raise ValueError(
                f"model {self.model!r} has no transformer blocks for fsdp to shard one by one; use parallelism 'ddp' "
                "(or a model with blocks in an nn.ModuleList)"
            )

    def _apply_recipe(self) -> None:
        """Fill in the recipe's values wherever the config still holds the field's default."""
        if self.recipe not in RECIPES:
            raise ValueError(f"invalid recipe {self.recipe!r}; valid: {', '.join(RECIPES)}")
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in RECIPES[self.recipe].items():
            if getattr(self, name) == defaults[name]:
                object.__setattr__(self, name, value)  # frozen: this is still construction

    @property
    def schedules_lr(self) -> bool:
        """Whether the learning rate changes during the run (warm-up or decay)."""
        return bool(self.lr_warmup_steps or self.lr_decay_steps)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
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
    def name(self) -> str:
        if self.run_name:
            return self.run_name
        parallel = "" if self.parallelism == "none" else f"-{self.parallelism}{self.nproc}"
        if self.parallelism == "fsdp" and self.reduce_dtype != "fp32":
            parallel += f"-reduce-{self.reduce_dtype}"
        return f"{self.model.replace(':', '.')}-{parse_precision(self.precision)}{parallel}-s{self.seed}"

    @property
    def result_path(self) -> Path:
        return Path(self.out_dir) / f"{self.name}.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrackingConfig:
    """Where a run is mirrored in W&B: the notebook parameters that are not `RunConfig` fields."""

    wandb_mode: str | None = None  # None means $WANDB_MODE, else offline
    wandb_project: str = PROJECT
    wandb_group: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            TYPES[str(f.type)].check(f.name, getattr(self, f.name))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


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
