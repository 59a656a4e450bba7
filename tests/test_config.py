"""RunConfig and TrackingConfig validation, and the one ParamType table that checks values and parses
the text of a sweep's `-p key=value` for both."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from amp_lib.config import (
    BUILTIN_MODELS,
    NON_SETTING_FIELDS,
    PROJECT,
    RECIPES,
    TYPES,
    ParamType,
    RunConfig,
    TrackingConfig,
    config_identity,
    parameter_names,
    parameter_type,
    parse_value,
)
from amp_lib.precision import resolve_device, valid_precision_names

# Written out independently of TYPES, so a type dropped from the table (or a label changed) is caught.
LABELS = ("int", "float", "str", "bool", "str | int", "float | None", "str | None")


def type_error(name: str, value: Any, label: str) -> str:
    return f"{name}={value!r} has type {type(value).__name__}; expected {label}"


# --- defaults, names and round trips ------------------------------------------------------------


def test_defaults_are_valid_and_round_trip():
    config = RunConfig()
    assert RunConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == set(RunConfig.field_names())


@pytest.mark.parametrize(
    "field,value",
    [
        ("grad_clip", None),
        ("grad_clip", 0),
        ("grad_clip", 0.5),
        ("lr", 1),
        ("precision", 16),
        ("precision", "bf16"),
        ("device", "cuda:1"),
        ("device", "auto"),
        ("model", "my_pkg.mod:build"),
        ("run_name", "a.b=c+d-e_f"),
    ],
    ids=lambda v: repr(v),
)
def test_accepted_values_survive_the_papermill_round_trip(field, value):
    # a sweep passes a config as plain JSON parameters: an accepted value comes back as the same config
    config = RunConfig(**{field: value})
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_name_and_result_path():
    config = RunConfig(model="pkg.mod:fn", precision="bf16", seed=3, out_dir="out")
    assert re.fullmatch(r"pkg\.mod\.fn-bf16-mixed-s3-[0-9a-f]{8}", config.name)  # the canonical precision, any spelling
    assert config.name == f"{config.base_name}-{config.identity}"
    assert config.result_path == Path("out") / f"{config.name}.json"
    mine = RunConfig(run_name="mine", out_dir="o")
    assert mine.result_path == Path("o") / f"mine-{mine.identity}.json"


# --- identity: a run's name never stands for two configs -----------------------------------------


def test_equal_configs_share_their_identity_whatever_the_spelling_or_placement() -> None:
    base = RunConfig(precision="bf16-mixed", lr=1.0)
    assert RunConfig(precision="bf16", lr=1).identity == base.identity  # an alias, an int for a float
    assert RunConfig(precision=16, allow_slow=True).identity == RunConfig(precision="16-mixed", allow_slow=True).identity
    placed = RunConfig(precision="bf16-mixed", lr=1.0, run_name="x", out_dir="elsewhere")
    assert placed.identity == base.identity and placed.name == f"x-{base.identity}"
    spelt_out = RunConfig(**RECIPES["shakespeare-char-tiny"])
    assert RunConfig(recipe="shakespeare-char-tiny").identity == spelt_out.identity  # the recipe is a source of values


@pytest.mark.parametrize(
    "change",
    [{"steps": 31}, {"allow_slow": True}, {"nproc": 2}, {"seed": 1}, {"precision": "bf16"}, {"lr": 2e-3},
     {"grad_clip": None}, {"device": "cpu"}, {"dropout": 0.1}],
    ids=lambda v: repr(v),
)  # fmt: skip
def test_any_value_that_changes_the_run_changes_its_identity_and_name(change: dict[str, Any]) -> None:
    default, changed = RunConfig(), RunConfig(**change)
    assert changed.identity != default.identity and changed.name != default.name
    assert re.fullmatch(r"[0-9a-f]{8}", changed.identity)


def test_identity_depends_only_on_values_that_differ_from_the_defaults() -> None:
    # so a field added later with a default leaves the identity (and file name) of every older result as it was
    values = RunConfig(steps=12, lr=2e-3).to_dict()
    assert config_identity(values) == config_identity({k: values[k] for k in ("steps", "lr", "precision")})
    assert config_identity({**values, "a_future_field": 1}) != config_identity(values)


def test_non_setting_fields_are_run_config_fields():
    assert NON_SETTING_FIELDS == ("precision", "seed", "run_name", "out_dir")
    assert set(NON_SETTING_FIELDS) <= set(RunConfig.field_names())
    assert PROJECT == "amp-workbook"


# --- unknown keys -------------------------------------------------------------------------------


def test_from_dict_rejects_unknown_keys_naming_them_sorted_and_the_valid_names():
    with pytest.raises(ValueError) as info:
        RunConfig.from_dict({"steps": 4, "zzz": 1, "stpes": 4})
    valid = ", ".join(RunConfig.field_names())
    assert str(info.value) == f"unknown parameter(s) 'stpes', 'zzz'; valid names: {valid}"
    assert valid.startswith("precision, model, steps, ")  # in declaration order, comma-separated
    with pytest.raises(ValueError, match=r"^unknown parameter\(s\) 'lr_rate', 'stpes'; valid names: precision, model"):
        RunConfig.from_dict({"stpes": 3, "lr_rate": 0.1, "seed": 1})


def test_from_dict_does_not_take_tracking_parameters():
    with pytest.raises(ValueError, match=r"^unknown parameter\(s\) 'wandb_mode'; valid names: "):
        RunConfig.from_dict({"wandb_mode": "offline"})


# --- types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", "8"),
        ("steps", 8.0),
        ("steps", True),
        ("batch_size", False),
        ("seed", None),
        ("lr", "0.1"),
        ("lr", True),
        ("grad_clip", "1"),
        ("grad_clip", True),
        ("allow_slow", 1),
        ("allow_slow", "yes"),
        ("precision", 16.0),
        ("precision", True),
        ("model", 3),
        ("device", None),
        ("run_name", 5),
        ("out_dir", Path("results")),
        ("init_scale", "65536"),
    ],
    ids=lambda v: repr(v),
)
def test_wrong_types_name_the_field_the_value_and_the_declared_type(field, value):
    with pytest.raises(ValueError) as info:
        RunConfig(**{field: value})
    label = {f.name: str(f.type) for f in fields(RunConfig)}[field]
    assert str(info.value) == type_error(field, value, label)


def test_type_and_model_errors_quote_the_value_and_the_choices():
    with pytest.raises(ValueError) as info:
        RunConfig(steps="3")  # type: ignore[arg-type]
    assert str(info.value) == "steps='3' has type str; expected int"
    with pytest.raises(ValueError) as info:
        RunConfig(model="gpt-huge")
    assert str(info.value) == (
        f"invalid model 'gpt-huge'; valid: {', '.join(BUILTIN_MODELS)} or 'package.module:function'"
    )
    assert ", ".join(BUILTIN_MODELS) == "gpt-tiny, gpt-small, gpt2-124m, mlp"


@pytest.mark.parametrize("model", BUILTIN_MODELS)
def test_every_builtin_model_is_accepted(model):
    assert RunConfig(model=model).model == model


def test_tracking_config_defaults_and_field_names():
    tracking = TrackingConfig()
    assert (tracking.wandb_mode, tracking.wandb_project, tracking.wandb_group) == (None, PROJECT, None)
    assert TrackingConfig.field_names() == ["wandb_mode", "wandb_project", "wandb_group"]
    assert TrackingConfig(wandb_mode="disabled", wandb_project="p", wandb_group="g").wandb_group == "g"


@pytest.mark.parametrize(
    "field,value,label",
    [
        ("wandb_mode", 1, "str | None"),
        ("wandb_mode", True, "str | None"),
        ("wandb_project", None, "str"),
        ("wandb_project", 3, "str"),
        ("wandb_group", False, "str | None"),
        ("wandb_group", Path("g"), "str | None"),
    ],
    ids=repr,
)
def test_tracking_config_type_errors_name_the_field_the_value_and_the_type(field, value, label):
    with pytest.raises(ValueError) as info:
        TrackingConfig(**{field: value})
    assert str(info.value) == type_error(field, value, label)


# --- recipes ------------------------------------------------------------------------------------


def test_the_shakespeare_char_recipe_is_nanogpts_baby_gpt() -> None:
    config = RunConfig(recipe="shakespeare-char")
    nanogpt = {  # config/train_shakespeare_char.py, plus nanoGPT's weight decay 0.1 and grad clip 1.0
        "model": "gpt-small", "seq_len": 256, "batch_size": 64, "dropout": 0.2, "lr": 1e-3, "lr_warmup_steps": 100,
        "lr_decay_steps": 5000, "min_lr": 1e-4, "beta2": 0.99, "weight_decay": 0.1, "steps": 5000,
        "eval_every": 250, "eval_batches": 200, "grad_clip": 1.0, "grad_accum": 1,
    }  # fmt: skip
    assert {k: getattr(config, k) for k in nanogpt} == nanogpt
    assert config.schedules_lr and config.recipe == "shakespeare-char"


def test_a_recipe_fills_only_the_values_left_at_their_default() -> None:
    config = RunConfig(recipe="shakespeare-char-tiny", precision="bf16-mixed", steps=40, lr_decay_steps=40, seed=2)
    assert (config.steps, config.lr_decay_steps, config.seed, config.precision) == (40, 40, 2, "bf16-mixed")
    assert (config.model, config.lr, config.eval_every) == ("gpt-tiny", 3e-3, 20)  # from the recipe
    assert RunConfig.from_dict(config.to_dict()) == config  # a saved config reloads to the same values
    plain = RunConfig()
    assert not plain.schedules_lr and (plain.lr_warmup_steps, plain.lr_decay_steps, plain.eval_every) == (0, 0, 0)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_is_a_valid_config_whose_values_are_fields(name: str) -> None:
    assert set(RECIPES[name]) <= set(RunConfig.field_names())
    config = RunConfig(recipe=name)
    assert all(getattr(config, k) == v for k, v in RECIPES[name].items())
    assert config.lr_decay_steps <= config.steps and config.eval_every <= config.steps


def test_the_default_sweep_variants_are_shorter_versions_of_the_same_run() -> None:
    full, short = RECIPES["shakespeare-char"], RECIPES["shakespeare-char-short"]
    same = ("model", "seq_len", "batch_size", "dropout", "lr", "lr_warmup_steps", "min_lr", "beta2", "weight_decay")
    assert {k: short[k] for k in same} == {k: full[k] for k in same}
    assert short["steps"] < full["steps"] and short["lr_decay_steps"] == short["steps"]
    assert RECIPES["shakespeare-char-tiny"]["model"] == "gpt-tiny"


def test_an_unknown_recipe_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(recipe="shakespear")
    assert str(info.value) == f"invalid recipe 'shakespear'; valid: {', '.join(RECIPES)}"


# --- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,message",
    [
        ({"min_lr": 2e-3, "lr": 1e-3}, "min_lr=0.002 must be between 0 and lr=0.001"),
        ({"min_lr": -1e-4}, "min_lr=-0.0001 must be between 0 and lr=0.001"),
        (
            {"lr_warmup_steps": 10, "lr_decay_steps": 10},
            "lr_decay_steps=10 must be 0 (no decay) or more than lr_warmup_steps=10",
        ),
        ({"beta2": 1.0}, "beta2=1.0 must be between 0 and 1 (exclusive)"),
        ({"beta2": 0.0}, "beta2=0.0 must be between 0 and 1 (exclusive)"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 must be a finite number >= 0"),
        ({"weight_decay": float("inf")}, "weight_decay=inf must be a finite number >= 0"),
        ({"dropout": 1.0}, "dropout=1.0 must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout=-0.1 must be in [0, 1)"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps=-1 must be >= 0"),
        ({"lr_decay_steps": -1}, "lr_decay_steps=-1 must be >= 0"),
        ({"eval_every": -1}, "eval_every=-1 must be >= 0"),
        ({"eval_batches": 0}, "eval_batches=0 must be >= 1"),
    ],
)
def test_schedule_dropout_and_eval_values_are_checked_with_the_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(**values)
    assert str(info.value) == message


def test_the_edges_of_the_new_ranges_are_accepted() -> None:
    RunConfig(min_lr=1e-3, lr=1e-3, lr_warmup_steps=4, lr_decay_steps=5, beta2=0.5, weight_decay=0.0, dropout=0.0)
    RunConfig(eval_every=0, eval_batches=1, lr_decay_steps=0, lr_warmup_steps=0, min_lr=0.0)
    assert RunConfig(init_scale=0.5).init_scale == 0.5  # any positive loss scale is a valid start, below 1 too


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("batch_size", 0),
        ("seq_len", 0),
        ("grad_accum", 0),
        ("log_every", 0),
        ("growth_interval", 0),
        ("timing_warmup_steps", -1),
        ("seed", -1),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("grad_clip", -1.0),
        ("grad_clip", float("inf")),
        ("grad_clip", float("nan")),
        ("init_scale", 0.0),
        ("init_scale", -1.0),
        ("init_scale", float("inf")),
        ("init_scale", float("nan")),
        ("precision", "int8"),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("device", "tpu"),
        ("device", "cpu:0"),
        ("model", "resnet"),
        ("run_name", "a b"),
        ("run_name", "../escape"),
    ],
    ids=lambda v: repr(v),
)
def test_out_of_range_values_name_the_field(field, value):
    kwargs = {field: value}
    if field == "steps":
        kwargs["timing_warmup_steps"] = 0
    with pytest.raises(ValueError) as info:
        RunConfig(**kwargs)
    message = str(info.value)
    assert field in message
    assert repr(value) in message


@pytest.mark.parametrize(
    ("field", "bad", "minimum"),
    [("steps", 0, 1), ("batch_size", 0, 1), ("seq_len", -3, 1), ("grad_accum", 0, 1), ("log_every", 0, 1),
     ("growth_interval", 0, 1), ("timing_warmup_steps", -1, 0), ("seed", -2, 0)],
)  # fmt: skip
def test_range_errors_name_the_field_its_value_and_the_minimum(field, bad, minimum):
    with pytest.raises(ValueError) as info:
        RunConfig(**{field: bad})
    assert str(info.value) == f"{field}={bad} must be >= {minimum}"


def test_every_minimum_itself_is_accepted():
    config = RunConfig(
        steps=1, batch_size=1, seq_len=1, grad_accum=1, log_every=1, growth_interval=1, timing_warmup_steps=0, seed=0
    )
    assert (config.steps, config.seq_len, config.log_every, config.growth_interval) == (1, 1, 1, 1)
    assert RunConfig(grad_clip=0.0).grad_clip == 0.0  # 0 turns clipping off; it is no error


def test_value_error_messages_of_the_other_checks():
    cases = [
        (
            {"steps": 8, "timing_warmup_steps": 8},
            "timing_warmup_steps=8 must be less than steps=8 (nothing left to time)",
        ),
        ({"lr": 0.0}, "lr=0.0 must be a positive finite number"),
        ({"grad_clip": -1.0}, "grad_clip=-1.0 must be None, 0 (off) or a positive number"),
        ({"init_scale": 0.0}, "init_scale=0.0 must be a positive finite number"),
        ({"device": "gpu"}, "invalid device 'gpu'; valid: 'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"run_name": "a b"}, "invalid run_name 'a b'; use letters, digits and . _ = + -"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            RunConfig(**kwargs)
        assert str(info.value) == message


def test_device_grammar_is_the_one_resolve_device_parses():
    for device in ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "gpu", "cpu:0", "cuda:", "cuda:x", "CUDA", "meta", ""]:
        try:
            resolve_device(device)
            parsed = True
        except ValueError as exc:
            parsed = "invalid device" not in str(exc)  # "CUDA is not available" is about this machine, not syntax
        try:
            RunConfig(device=device)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted is parsed, device


@pytest.mark.parametrize("warmup", [8, 9])
def test_warmup_must_leave_timed_steps(warmup):
    with pytest.raises(ValueError, match="timing_warmup_steps"):
        RunConfig(steps=8, timing_warmup_steps=warmup)
    assert RunConfig(steps=8, timing_warmup_steps=7).timing_warmup_steps == 7


# --- ParamType: the table -----------------------------------------------------------------------


def test_the_table_has_one_entry_per_label_and_covers_every_field():
    assert tuple(TYPES) == LABELS
    assert all(isinstance(t, ParamType) and t.label == label for label, t in TYPES.items())
    annotations = {str(f.type) for cls in (RunConfig, TrackingConfig) for f in fields(cls)}
    assert annotations == set(LABELS)  # every type is used, and every field's type is in the table


@pytest.mark.parametrize("label", LABELS)
def test_optional_exactly_for_the_none_types(label):
    assert TYPES[label].optional is label.endswith("| None")


# --- ParamType.check ----------------------------------------------------------------------------

CHECKS: dict[str, tuple[list[Any], list[Any]]] = {  # label: (accepted values, rejected values)
    "int": ([0, 3, -1], [True, False, 3.0, "3", None]),
    "float": ([1.5, 2, 0.0, float("inf")], [True, "1.5", None]),  # an int is a float, a bool is not
    "str": (["x", "", "none"], [1, None, True, Path("x"), b"x"]),
    "bool": ([True, False], [1, 0, "true", None]),
    "str | int": (["16", 16, "bf16"], [16.0, True, None]),
    "float | None": ([0.5, 1, None], [True, "1", "none"]),
    "str | None": (["x", None], [1, True, Path("x")]),
}


def test_checks_cover_every_type():
    assert tuple(CHECKS) == LABELS


@pytest.mark.parametrize("label", LABELS)
def test_check_accepts_the_values_of_the_type(label):
    for value in CHECKS[label][0]:
        assert TYPES[label].check("knob", value) is None, value


@pytest.mark.parametrize("label", LABELS)
def test_check_rejects_naming_the_parameter_the_value_and_the_type(label):
    for value in CHECKS[label][1]:
        with pytest.raises(ValueError) as info:
            TYPES[label].check("knob", value)
        assert str(info.value) == type_error("knob", value, label)


# --- ParamType.parse ----------------------------------------------------------------------------

PARSES: dict[str, list[tuple[str, Any]]] = {  # label: (text, value)
    "int": [(" 20 ", 20), ("-3", -3), ("0", 0)],
    "float": [("1e-3", 0.001), ("2", 2.0), (" 0.5 ", 0.5), ("inf", float("inf"))],
    "str": [(" cpu ", "cpu"), ("none", "none"), ("NULL", "NULL"), ("16", "16")],
    "bool": [
        ("TRUE", True),
        ("true", True),
        ("1", True),
        ("Yes", True),
        ("False", False),
        ("0", False),
        (" no ", False),
    ],
    "str | int": [("16", "16"), (" bf16 ", "bf16"), ("none", "none")],  # the text stays text: parse_precision reads it
    "float | None": [("0.5", 0.5), ("1", 1.0), ("None", None), (" NULL ", None), ("none", None), ("null", None)],
    "str | None": [("abc", "abc"), ("none", None), ("Null", None), (" none ", None)],
}
BAD_TEXTS: dict[str, list[str]] = {
    "int": ["2.5", "none", "null", "x", "", "True"],
    "float": ["fast", "none", "null", ""],
    "str": [],  # every text is a str
    "bool": ["maybe", "2", "none", "", "on"],
    "str | int": [],
    "float | None": ["x", "", "nil"],
    "str | None": [],
}


def test_parses_cover_every_type():
    assert tuple(PARSES) == tuple(BAD_TEXTS) == LABELS


@pytest.mark.parametrize("label", LABELS)
def test_parse_gives_the_value_of_the_declared_type(label):
    for text, expected in PARSES[label]:
        value = TYPES[label].parse("knob", text)
        assert value == expected and type(value) is type(expected), (text, value)


@pytest.mark.parametrize("label", [label for label in LABELS if BAD_TEXTS[label]])
def test_parse_errors_name_the_parameter_the_text_and_the_type(label):
    for text in BAD_TEXTS[label]:
        with pytest.raises(ValueError) as info:
            TYPES[label].parse("knob", text)
        assert str(info.value) == f"invalid value {text!r} for knob (expected {label})"
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained parser traceback


def test_parse_errors_quote_the_text_as_typed():
    with pytest.raises(ValueError) as info:
        TYPES["int"].parse("steps", " 2.5 ")
    assert str(info.value) == "invalid value ' 2.5 ' for steps (expected int)"


# --- parameter names and types ------------------------------------------------------------------


def test_parameter_names_are_run_config_fields_then_tracking_fields():
    names = parameter_names()
    assert names == RunConfig.field_names() + TrackingConfig.field_names()
    assert names[:3] == ["precision", "model", "steps"]
    assert names[-3:] == ["wandb_mode", "wandb_project", "wandb_group"]
    assert len(names) == len(set(names))


def test_parameter_type_is_the_type_of_the_field():
    for cls in (RunConfig, TrackingConfig):
        for f in fields(cls):
            assert parameter_type(f.name) is TYPES[str(f.type)], f.name


def test_parameter_types_of_some_fields_written_out():
    labels = {name: parameter_type(name).label for name in ("steps", "lr", "grad_clip", "allow_slow", "precision",
                                                            "device", "wandb_mode", "wandb_project")}  # fmt: skip
    assert labels == {
        "steps": "int",
        "lr": "float",
        "grad_clip": "float | None",
        "allow_slow": "bool",
        "precision": "str | int",
        "device": "str",
        "wandb_mode": "str | None",
        "wandb_project": "str",
    }


@pytest.mark.parametrize("lookup", [parameter_type, lambda name: parse_value(name, "1")], ids=["type", "parse"])
def test_unknown_parameter_lists_the_valid_names(lookup):
    with pytest.raises(ValueError) as info:
        lookup("stpes")
    assert str(info.value) == f"unknown parameter 'stpes'; valid names: {', '.join(parameter_names())}"


# --- parse_value: the text of -p key=value ------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("steps", " 20 ", 20),
        ("lr", "1e-3", 0.001),
        ("grad_clip", "0.5", 0.5),
        ("grad_clip", "None", None),
        ("grad_clip", " NULL ", None),
        ("allow_slow", "TRUE", True),
        ("allow_slow", "1", True),
        ("allow_slow", "yes", True),
        ("allow_slow", "False", False),
        ("allow_slow", "0", False),
        ("allow_slow", "no", False),
        ("device", " cpu ", "cpu"),
        ("precision", "16", "16"),  # str | int: kept as text, parsed later by parse_precision
        ("model", "none", "none"),  # a plain str field has no None
        ("wandb_mode", "none", None),  # tracking parameters are str | None
        ("wandb_project", "Proj", "Proj"),
    ],
)
def test_values_take_the_type_of_their_field(key: str, text: str, expected: Any) -> None:
    value = parse_value(key, text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("key", "text", "message"),
    [
        ("allow_slow", "maybe", "invalid value 'maybe' for allow_slow (expected bool)"),
        ("steps", "2.5", "invalid value '2.5' for steps (expected int)"),
        ("steps", "none", "invalid value 'none' for steps (expected int)"),
        ("lr", "fast", "invalid value 'fast' for lr (expected float)"),
        ("grad_clip", "x", "invalid value 'x' for grad_clip (expected float | None)"),
    ],
)
def test_bad_values_name_key_and_expected_type(key: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_value(key, text)
    assert str(info.value) == message


def test_every_default_written_as_text_parses_back_to_a_value_the_config_accepts():
    for name, default in RunConfig().to_dict().items():
        value = parse_value(name, "none" if default is None else str(default))
        assert getattr(RunConfig(**{name: value}), name) == default, name


# --- parallelism: ddp / fsdp over nproc processes ---------------------------------------------------


def test_parallelism_and_reduce_dtype_are_stored_by_their_canonical_names() -> None:
    config = RunConfig(parallelism="FSDP2", nproc=2, precision="bf16", reduce_dtype="bfloat16")
    assert (config.parallelism, config.reduce_dtype) == ("fsdp", "bf16")
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.base_name == "gpt-tiny-bf16-mixed-fsdp2-reduce-bf16-s0"
    assert RunConfig(parallelism="ddp", nproc=4).base_name == "gpt-tiny-fp32-ddp4-s0"
    assert RunConfig(parallelism="ddp", nproc=4, batch_size=3, grad_accum=2).global_batch == 24
    assert parse_value("nproc", "2") == 2 and parse_value("reduce_dtype", "bf16") == "bf16"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"nproc": 2, "parallelism": "none"}, "nproc=2 needs parallelism 'ddp' or 'fsdp' (valid: none, ddp, fsdp)"),
        ({"nproc": 0, "parallelism": "ddp"}, "nproc=0 must be >= 1"),
        ({"parallelism": "zero3"}, "invalid parallelism 'zero3'; valid values are: none, ddp, fsdp"),
        (
            {"reduce_dtype": "int8", "parallelism": "fsdp"},
            "invalid reduce_dtype 'int8'; valid values are: fp32, bf16, fp16",
        ),
        ({"reduce_dtype": "bf16", "parallelism": "ddp", "precision": "bf16"}, "applies to parallelism 'fsdp' only"),
        (
            {"reduce_dtype": "bf16", "parallelism": "fsdp"},
            "reduce_dtype='bf16' does not fit precision 'fp32'; valid: 'fp32'",
        ),
        ({"reduce_dtype": "fp16", "parallelism": "fsdp", "precision": "bf16-mixed"}, "its compute dtype 'bf16'"),
        ({"parallelism": "fsdp", "model": "mlp"}, "model 'mlp' has no transformer blocks for fsdp"),
    ],
)
def test_combinations_that_make_no_sense_are_refused_naming_the_values(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig(**values)


def test_the_reduce_dtype_may_be_the_compute_dtype_of_any_reduced_precision() -> None:
    for precision, reduce in (("bf16-true", "bf16"), ("fp16-mixed", "fp16"), ("fp8-mixed", "bf16"), ("tf32", "fp32")):
        assert RunConfig(parallelism="fsdp", nproc=2, precision=precision, reduce_dtype=reduce).reduce_dtype == reduce
    assert RunConfig(parallelism="ddp", model="mlp").parallelism == "ddp"  # DDP runs any model


def test_parallelism_auto_is_ddp_for_several_processes_and_none_for_one() -> None:
    # `-p nproc=2` means DDP in a sweep, in `python -m amp_lib.train` and in Python alike
    assert (RunConfig(nproc=2).parallelism, RunConfig().parallelism) == ("ddp", "none")
    assert RunConfig(nproc=2, parallelism="auto").to_dict()["parallelism"] == "ddp"  # stored resolved


def test_seq_len_beyond_a_built_in_models_block_size_is_refused() -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(seq_len=257)
    assert str(info.value) == "seq_len=257 is longer than the block size of model 'gpt-tiny'; valid: 1 to 256"
    assert RunConfig(seq_len=256).seq_len == 256 and RunConfig(model="mlp", seq_len=10_000).seq_len == 10_000
    assert RunConfig(model="gpt-small", seq_len=1024).seq_len == 1024


# --- problems: every one, one line each (what a sweep lists before any kernel starts) -------------


def test_problems_lists_every_problem_once_and_none_for_a_valid_config() -> None:
    assert RunConfig.problems(RunConfig().to_dict()) == [] and RunConfig.problems({}) == []
    found = RunConfig.problems({"steps": 0, "lr": "x", "precision": "int8", "seq_len": 1000, "typo": 1})
    assert found[0].startswith("unknown parameter(s) 'typo'; valid names: precision, model")
    assert found[1:] == [
        "lr='x' has type str; expected float",
        f"invalid precision 'int8'; valid values are: {', '.join(valid_precision_names())}",
        "steps=0 must be >= 1",
        "seq_len=1000 is longer than the block size of model 'gpt-tiny'; valid: 1 to 256",
    ]  # steps=0 is not reported again as "warm-up must be less than steps"


def test_a_config_raises_the_first_of_its_problems() -> None:
    values = {"steps": 0, "dropout": 2.0}
    with pytest.raises(ValueError) as info:
        RunConfig(**values)
    assert str(info.value) == RunConfig.problems(values)[0] == "steps=0 must be >= 1"


# --- fp8 recipes and the optimizer: run values like any other ---------------------------------------


def test_the_fp8_and_optimizer_fields_default_to_todays_behaviour_and_keep_older_identities() -> None:
    config = RunConfig()
    assert (config.fp8_layers, config.emulate_fp8, config.optimizer) == ("auto", False, "adamw")
    # a field added with a default leaves every older config's identity (and result file name) as it was
    assert config.identity == config_identity({"precision": "fp32"})
    assert RunConfig(optimizer="adamw-8bit").identity != config.identity
    assert RunConfig(emulate_fp8=True).identity != config.identity


@pytest.mark.parametrize(
    "values,stored",
    [
        ({"fp8_layers": " ALL "}, {"fp8_layers": "all"}),
        ({"fp8_layers": "all, lm_head,blocks.0.*"}, {"fp8_layers": "lm_head,blocks.0.*"}),
        ({"fp8_layers": "auto,lm_head,lm_head"}, {"fp8_layers": "auto,lm_head"}),
        ({"optimizer": "AdamW8bit"}, {"optimizer": "adamw-8bit"}),
        ({"optimizer": "adamw_4bit"}, {"optimizer": "adamw-4bit"}),
        ({"optimizer": "adamw-fp32"}, {"optimizer": "adamw"}),
        ({"optimizer": "adamw-bf16", "precision": "bf16-true"}, {"optimizer": "adamw-bf16"}),
        ({"precision": "fp8-mixed", "emulate_fp8": True}, {"precision": "fp8-tensorwise", "emulate_fp8": True}),
        ({"precision": "fp32", "fp8_layers": "lm_head"}, {"fp8_layers": "lm_head"}),  # ignored by fp32, kept
    ],
    ids=repr,
)
def test_fp8_layers_and_optimizer_are_stored_canonical(values: dict[str, Any], stored: dict[str, Any]) -> None:
    config = RunConfig(**values)
    assert {k: getattr(config, k) for k in stored} == stored
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.identity == RunConfig(**stored, **{k: v for k, v in values.items() if k not in stored}).identity


@pytest.mark.parametrize(
    "values,message",
    [
        ({"optimizer": "adam"}, ("invalid optimizer 'adam'; valid values are: adamw, adamw-bf16, adamw-8bit, "
                                "adamw-4bit, adamw-fp8")),
        ({"fp8_layers": "auto,all"}, "invalid fp8_layers 'auto,all': name one of 'auto' or 'all', not both; valid: "),
        ({"fp8_layers": "lm head"}, "invalid fp8_layers 'lm head': bad pattern 'lm head'; valid: 'auto'"),
        ({"fp8_layers": ""}, "invalid fp8_layers ''; valid: 'auto' (torchao's rule for the recipe), 'all'"),
        ({"emulate_fp8": "yes"}, "emulate_fp8='yes' has type str; expected bool"),
        ({"optimizer": 8}, "optimizer=8 has type int; expected str"),
    ],
    ids=repr,
)  # fmt: skip
def test_bad_fp8_and_optimizer_values_are_one_line_naming_the_value_and_the_choices(values, message) -> None:
    with pytest.raises(ValueError) as info:
        RunConfig(**values)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-true", "fp8-rowwise"])
def test_adamw_bf16_with_parameters_that_are_not_bf16_is_a_problem_a_sweep_skips(precision: str) -> None:
    values = {"optimizer": "adamw-bf16", "precision": precision}
    problems = RunConfig.problems(values)
    dtype = "fp16" if precision == "fp16-true" else "fp32"
    assert problems == [
        ("optimizer 'adamw-bf16' keeps bf16 parameters and state (stochastic rounding): it needs bf16 parameters "
        f"(precision bf16-true); this run's parameters are {dtype}")
    ]
    assert RunConfig.problems({**values, "precision": "bf16-true"}) == []


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "adamw-4bit", "adamw-fp8"])
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-true"])
def test_torchaos_low_bit_optimizers_run_with_any_precision_on_this_machine(optimizer: str, precision: str) -> None:
    # torchao is installed and a C++ compiler is on the PATH here: nothing stops them (optim's own tests say why not)
    assert RunConfig.problems({"optimizer": optimizer, "precision": precision, "device": "cpu"}) == []


def test_the_new_fields_parse_from_the_text_of_a_sweeps_p() -> None:
    assert parse_value("optimizer", "adamw-8bit") == "adamw-8bit"
    assert parse_value("emulate_fp8", "true") is True
    assert parse_value("fp8_layers", "lm_head,blocks.0.*") == "lm_head,blocks.0.*"
    # a sweep's -p splits its values at commas: '+' separates the patterns of one value
    assert RunConfig(fp8_layers=parse_value("fp8_layers", "lm_head+blocks.0.*")).fp8_layers == "lm_head,blocks.0.*"
