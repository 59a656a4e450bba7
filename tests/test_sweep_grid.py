"""`amp_lib.sweep.grid`: `-p key=v1,v2` items -> a grid, and a grid + the device's capabilities -> the
runs of a sweep. Pure: the capabilities are plain data, so CPU and GPU sweeps are planned on any machine.
(How each value's text parses is `config.parse_value`'s, tested in test_config.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from amp_lib.config import NON_SETTING_FIELDS, RECIPES, RunConfig
from amp_lib.precision import Capabilities
from amp_lib.sweep.grid import (
    DEVICE_DEFAULTS,
    SweepRun,
    _slug,
    check_runs,
    expand_grid,
    parse_params,
    run_problems,
    timing_runs,
    timing_warmup_for,
)

CPU = Capabilities(device_type="cpu", device_name="test-cpu")  # no fast fp16: native fp32 and bf16-mixed
H100 = Capabilities(
    device_type="cuda",
    cuda_available=True,
    device_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    bf16_supported=True,
    fp16_fast=True,
)


# --- -p items: splitting, names and reserved keys ---


def test_params_split_values_and_strip_keys() -> None:
    grid = parse_params([" lr =1e-3,3e-3", "steps=9,10", "wandb_mode=disabled"])
    assert grid == {"lr": [0.001, 0.003], "steps": [9, 10], "wandb_mode": ["disabled"]}
    assert parse_params([]) == {}


def test_a_key_given_twice_is_refused_not_silently_the_last() -> None:
    with pytest.raises(ValueError) as info:
        parse_params(["steps=3", "lr=1e-3", "steps=4"])
    assert str(info.value) == "-p steps is given twice; give its values once, comma-separated: -p steps=v1,v2"


def test_a_value_may_contain_an_equals_sign() -> None:
    assert parse_params(["wandb_group=a=b"]) == {"wandb_group": ["a=b"]}


@pytest.mark.parametrize("item", ["steps", "steps=", "steps= ", "=3"])
def test_params_without_key_value_are_rejected(item: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_params([item])
    message = str(info.value)
    if item == "=3":  # an empty key is an unknown name
        assert message.startswith("unknown parameter ''")
    else:
        assert message == f"invalid -p {item!r}; expected key=value[,value...]"


@pytest.mark.parametrize("key", ["precision", "seed", "run_name", "out_dir"])
def test_reserved_params_point_to_the_sweep_options(key: str) -> None:
    assert key in NON_SETTING_FIELDS
    with pytest.raises(ValueError) as info:
        parse_params([f"{key}=1"])
    assert str(info.value) == (
        f"-p {key}=... is set by the sweep; use --precisions / --seeds (run_name and out_dir follow --out)"
    )


def test_unknown_param_lists_every_settable_name_and_no_reserved_one() -> None:
    with pytest.raises(ValueError) as info:
        parse_params(["stepz=3"])
    settable = [*RunConfig.field_names(), "wandb_mode", "wandb_project", "wandb_group"]
    settable = [k for k in settable if k not in ("precision", "seed", "run_name", "out_dir")]
    assert str(info.value) == f"unknown parameter 'stepz'; valid names: {', '.join(settable)}"


# --- a run: its result path and the slugs in its name ---


def test_sweep_run_result_path_is_out_dir_slash_name_json(tmp_path: Path) -> None:
    run = SweepRun("a-b", {"out_dir": str(tmp_path / "r")})
    assert run.result_path == tmp_path / "r" / "a-b.json"


def test_slug_keeps_safe_characters_and_replaces_the_rest() -> None:
    assert _slug("pkg.mod:fn") == "pkg.mod.fn"
    assert _slug("lr=0.001") == "lr=0.001"
    assert _slug("a b/c+d-e_f") == "a_b_c+d-e_f"


# --- expanding the grid into runs ---


def readable(run: SweepRun) -> str:
    """A run's name without its identity, after checking that the identity is its config's."""
    assert run.name == f"{run.parameters['run_name']}-{config_of(run).identity}"
    return run.parameters["run_name"]


def config_of(run: SweepRun) -> RunConfig:
    return RunConfig.from_dict(run.config_values())


def test_expand_orders_grid_then_seeds_then_precisions_and_names_the_values_the_user_set(tmp_path: Path) -> None:
    grid = {"lr": [0.001, 0.01], "steps": [9], "model": ["gpt-tiny"]}
    runs = expand_grid(tmp_path / "sw", CPU, ["32", "bf16"], [1, 0], grid)
    assert [readable(r) for r in runs] == [  # seed-major: drift over the sweep cannot line up with a precision
        "gpt-tiny-fp32-s1-steps=9-lr=0.001",
        "gpt-tiny-bf16-mixed-s1-steps=9-lr=0.001",
        "gpt-tiny-fp32-s0-steps=9-lr=0.001",
        "gpt-tiny-bf16-mixed-s0-steps=9-lr=0.001",
        "gpt-tiny-fp32-s1-steps=9-lr=0.01",
        "gpt-tiny-bf16-mixed-s1-steps=9-lr=0.01",
        "gpt-tiny-fp32-s0-steps=9-lr=0.01",
        "gpt-tiny-bf16-mixed-s0-steps=9-lr=0.01",
    ]
    assert runs[0].coordinates == (("precision", "fp32"), ("seed", 1), ("lr", 0.001))
    first = runs[0].parameters
    assert first == {
        **RECIPES["shakespeare-char-tiny"],  # the device default recipe, spelt out (the name is not passed on)
        "profile_step": True,
        "model": "gpt-tiny",
        "steps": 9,  # the grid wins over the recipe
        "lr_decay_steps": 0,  # the recipe decays over its steps; 9 steps end inside its warm-up: no decay
        "timing_warmup_steps": 1,  # the default warm-up follows the steps the user set: 9 // 5
        "lr": 0.001,
        "precision": "fp32",
        "seed": 1,
        "run_name": "gpt-tiny-fp32-s1-steps=9-lr=0.001",
        "out_dir": str((tmp_path / "sw").resolve() / "results"),
        "wandb_group": "sw",
    }
    assert runs[0].result_path == (tmp_path / "sw").resolve() / "results" / f"{runs[0].name}.json"
    assert runs[0].result_path == config_of(runs[0]).result_path  # where the notebook writes it
    assert not (tmp_path / "sw").exists()  # planning writes nothing


def test_default_sweep_uses_native_precisions_and_device_defaults(tmp_path: Path) -> None:
    grid = parse_params(["lr=1e-3,3e-3", "grad_clip=none", "allow_slow=false"])
    runs = expand_grid(tmp_path, CPU, None, [0, 1], grid)
    assert [(r.parameters["precision"], r.parameters["seed"]) for r in runs[:4]] == [
        ("fp32", 0), ("bf16-mixed", 0), ("fp32", 1), ("bf16-mixed", 1)]  # fmt: skip
    assert len(runs) == 2 * 2 * 2
    first = runs[0].parameters
    assert first["model"] == "gpt-tiny" and first["steps"] == RECIPES["shakespeare-char-tiny"]["steps"]
    assert "recipe" not in first and first["profile_step"] is True  # the CPU default, spelt out
    assert first["grad_clip"] is None and first["allow_slow"] is False and first["lr"] == 0.001
    assert first["out_dir"] == str(tmp_path.resolve() / "results") and first["wandb_group"] == tmp_path.name
    assert readable(runs[0]) == "gpt-tiny-fp32-s0-lr=0.001-grad_clip=None"  # allow_slow=false is the default
    assert len({r.name for r in runs}) == len(runs)
    fast_fp16 = Capabilities(device_type="cpu", device_name="test-cpu", fp16_fast=True)
    assert [r.parameters["precision"] for r in expand_grid(tmp_path, fast_fp16)] == ["fp32", "fp16-mixed", "bf16-mixed"]


def test_default_precisions_seed_and_group_with_an_explicit_group(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path / "my sweep", CPU, grid={"wandb_group": ["team"]})
    assert [r.parameters["precision"] for r in runs] == ["fp32", "bf16-mixed"]
    assert all(r.parameters["seed"] == 0 and r.parameters["wandb_group"] == "team" for r in runs)
    assert runs[0].parameters["model"] == "gpt-tiny"
    assert expand_grid(tmp_path / "my sweep", CPU, ["fp32"])[0].parameters["wandb_group"] == "my_sweep"
    assert readable(expand_grid(tmp_path / "x", CPU, ["fp32"], grid=None)[0]) == "gpt-tiny-fp32-s0"


def test_cuda_capabilities_give_the_cuda_defaults_and_model_without_a_gpu(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path / "gpu", H100, None, [0], {"steps": [50]})
    assert [r.parameters["precision"] for r in runs] == ["fp32", "tf32", "fp16-mixed", "bf16-mixed"]
    assert [readable(r) for r in runs] == ["gpt-small-fp32-s0-steps=50", "gpt-small-tf32-s0-steps=50",
                                           "gpt-small-fp16-mixed-s0-steps=50", "gpt-small-bf16-mixed-s0-steps=50"]  # fmt: skip
    assert runs[0].parameters == {
        **RECIPES["shakespeare-char-short"],  # nanoGPT's baby GPT, shortened: the GPU default
        "profile_step": True,
        "steps": 50,
        "lr_decay_steps": 0,  # 50 steps end inside the recipe's 100-step warm-up: no decay
        "timing_warmup_steps": 10,  # the recipe's 20, but at most a fifth of the steps the user set
        "precision": "fp32",
        "seed": 0,
        "run_name": "gpt-small-fp32-s0-steps=50",
        "out_dir": str((tmp_path / "gpu").resolve() / "results"),
        "wandb_group": "gpu",
    }
    assert DEVICE_DEFAULTS["cuda"]["recipe"] != DEVICE_DEFAULTS["cpu"]["recipe"]  # the two really differ
    (decayed,) = expand_grid(tmp_path, H100, ["fp32"], [0], {"steps": [300]})
    assert decayed.parameters["lr_decay_steps"] == 300  # past the warm-up: the decay follows the steps set
    assert expand_grid(tmp_path, H100, ["fp32"], [0], {"model": ["gpt-tiny"]})[0].parameters["lr"] == 1e-3


def test_model_is_in_the_name_but_never_twice(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["fp32"], [0], {"model": ["gpt-tiny", "tests.user_models:make"]})
    assert [r.parameters["run_name"] for r in runs] == ["gpt-tiny-fp32-s0", "tests.user_models.make-fp32-s0"]


def test_several_devices_are_planned_without_probing_them(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["fp32"], [0], {"device": ["cpu", "cuda"]})  # cuda: whether or not there is one
    assert [r.parameters["run_name"] for r in runs] == ["gpt-tiny-fp32-s0-device=cpu", "gpt-tiny-fp32-s0-device=cuda"]
    assert [r.parameters["device"] for r in runs] == ["cpu", "cuda"]


def test_expand_rejects_repeats_and_colliding_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        expand_grid(tmp_path, CPU, ["fp32", "32"], [0])
    assert str(info.value) == "precisions ['fp32', 'fp32'] and seeds [0] must not repeat"
    with pytest.raises(ValueError, match=r"precisions \['fp32'\] and seeds \[1, 1\] must not repeat"):
        expand_grid(tmp_path, CPU, ["fp32"], [1, 1])
    runs = expand_grid(tmp_path, CPU, ["fp32"], [0], {"model": ["a:b", "c", "a.b"]})  # one readable name, two models
    assert runs[0].parameters["run_name"] == runs[2].parameters["run_name"] and runs[0].name != runs[2].name


# --- identity: two configs never share a result file ----------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [(["steps=6"], ["steps=8"]), ([], ["nproc=2"]), (["allow_slow=false"], ["allow_slow=true"]),
     (["lr=1e-3"], ["lr=1e-3", "dropout=0.1"])],
    ids=lambda v: " ".join(v) or "(none)",
)  # fmt: skip
def test_sweeps_that_differ_in_any_value_write_different_result_files(
    tmp_path: Path, first: list[str], second: list[str]
) -> None:
    a = expand_grid(tmp_path, CPU, ["fp16-mixed"], [0], parse_params(first))
    b = expand_grid(tmp_path, CPU, ["fp16-mixed"], [0], parse_params(second))
    assert a[0].result_path != b[0].result_path
    assert config_of(a[0]) != config_of(b[0])


def test_a_value_the_user_sets_to_the_recipes_own_is_not_named_but_the_same_run(tmp_path: Path) -> None:
    (plain,) = expand_grid(tmp_path, CPU, ["fp32"], [0])
    (same,) = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["steps=60", "allow_slow=false"]))
    assert same.name == plain.name and readable(same) == "gpt-tiny-fp32-s0"
    (nproc,) = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["nproc=2"]))
    assert readable(nproc) == "gpt-tiny-fp32-ddp2-s0"  # the parallelism is named where torchrun names it


# --- defaults that depend on the user's values ---


def test_the_default_timing_warm_up_follows_the_steps_the_user_set(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [5, 1, 100]})
    assert [r.parameters["timing_warmup_steps"] for r in runs] == [1, 0, 10]  # a fifth, at most the recipe's 10
    assert run_problems(runs) == []  # -p steps=5 no longer fails on a warm-up of 10 nobody set
    (default,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {})
    assert default.parameters["timing_warmup_steps"] == RECIPES["shakespeare-char-tiny"]["timing_warmup_steps"]
    assert timing_warmup_for(40, 8) == 8 and timing_warmup_for(39, 8) == 7 and timing_warmup_for(4, 8) == 0
    (kept,) = expand_grid(tmp_path, CPU, ["fp32"], [0], {"steps": [5], "timing_warmup_steps": [7]})
    assert kept.parameters["timing_warmup_steps"] == 7  # a value the user set is never changed...
    assert run_problems([kept]) == ["timing_warmup_steps=7 must be less than steps=5 (nothing left to time)"]


@pytest.mark.parametrize(
    ("grid", "decay"),
    [
        ({}, 60),  # the tiny recipe's: a decay that ends with its 60 steps
        ({"steps": [11]}, 11),  # ... so it ends with the steps the user set
        ({"steps": [10]}, 0),  # 10 steps end with the recipe's 10-step warm-up: nothing left to decay
        ({"steps": [200], "lr_decay_steps": [100]}, 100),  # a decay the user set is never changed
    ],
)
def test_the_lr_decay_follows_the_steps_the_user_set_unless_the_user_set_it(
    tmp_path: Path, grid: dict, decay: int
) -> None:
    (run,) = expand_grid(tmp_path, CPU, ["fp32"], [0], grid)
    assert run_problems([run]) == []
    assert RunConfig.from_dict({k: v for k, v in run.parameters.items() if k != "wandb_group"}).lr_decay_steps == decay


def test_without_a_recipe_a_run_has_the_config_defaults_and_the_devices_model(tmp_path: Path) -> None:
    for caps, model in ((CPU, "gpt-tiny"), (H100, "gpt2-124m")):
        (run,) = expand_grid(tmp_path / "s", caps, ["fp32"], [0], {"recipe": [""], "steps": [100]})
        assert run.parameters == {  # no lr_decay_steps: RunConfig's 0, no decay, although the user set the steps
            "profile_step": True,
            "model": model,  # the device's default model
            "steps": 100,
            "timing_warmup_steps": 5,  # RunConfig's, being under a fifth of the steps
            "precision": "fp32",
            "seed": 0,
            "run_name": f"{model}-fp32-s0-steps=100",
            "out_dir": str((tmp_path / "s").resolve() / "results"),
            "wandb_group": "s",
        }
        assert run_problems([run]) == []


# --- checking every run's values before any kernel starts ---


def test_run_problems_lists_each_bad_value_once_with_its_field_and_what_is_valid(tmp_path: Path) -> None:
    grid = parse_params(["batch_size=0,-1", "device=cpu", "wandb_mode=loud"])
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0, 1], grid)
    assert len(runs) == 8
    assert run_problems(runs) == [
        "batch_size=0 must be >= 1",
        "invalid wandb_mode 'loud'; valid values are: offline, online, disabled",
        "batch_size=-1 must be >= 1",
    ]
    with pytest.raises(ValueError) as info:  # the same runs twice, tracked twice: one result file for both
        expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["wandb_mode=offline,disabled"]))
    assert str(info.value) == "-p wandb_mode takes one value: it changes where runs are tracked, not what they train"
    good = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["model=mlp", "wandb_group=g"]))
    assert run_problems(good) == []
    bad_model = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["model=resnet"]))
    assert run_problems(bad_model) == [
        "invalid model 'resnet'; valid: gpt-tiny, gpt-small, gpt2-124m, mlp or 'package.module:function'"
    ]


def test_an_unknown_recipe_is_a_problem_named_with_the_valid_ones_not_a_run_without_one(tmp_path: Path) -> None:
    (run,) = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["recipe=shakespeare-chr"]))
    assert run_problems([run]) == [
        "invalid recipe 'shakespeare-chr'; valid: shakespeare-char, shakespeare-char-short, shakespeare-char-tiny"
    ]


def test_every_bad_field_of_one_run_is_listed_not_only_the_first(tmp_path: Path) -> None:
    grid = parse_params(["batch_size=0", "lr=-1", "model=resnet", "device=tpu"])
    runs = expand_grid(tmp_path, CPU, ["fp32"], [0], grid)
    assert run_problems(runs) == [
        "batch_size=0 must be >= 1",
        "lr=-1.0 must be a positive finite number",
        "invalid model 'resnet'; valid: gpt-tiny, gpt-small, gpt2-124m, mlp or 'package.module:function'",
        "invalid device 'tpu'; valid: 'auto', 'cpu', 'cuda', 'cuda:N'",
    ]


def test_a_recipe_is_spelt_out_under_what_the_user_set(tmp_path: Path) -> None:
    (run,) = expand_grid(
        tmp_path, CPU, ["fp32"], [0], {"recipe": ["shakespeare-char"], "steps": [30], "timing_warmup_steps": [5]}
    )
    p = run.parameters
    assert (p["model"], p["seq_len"], p["dropout"], p["eval_every"]) == ("gpt-small", 256, 0.2, 250)  # the recipe's
    assert (p["steps"], p["timing_warmup_steps"], p["lr_decay_steps"]) == (30, 5, 0)  # the user's, even at defaults
    assert "recipe" not in p and RunConfig.from_dict({k: v for k, v in p.items() if k != "wandb_group"}).steps == 30


# --- runs over several processes --------------------------------------------------------------------


def test_nproc_alone_runs_ddp_and_a_parallelism_the_user_set_is_kept(tmp_path: Path) -> None:
    caps = Capabilities()
    (ddp,) = expand_grid(tmp_path, caps, ["fp32"], grid=parse_params(["nproc=2"]))
    assert ddp.parameters["nproc"] == 2 and config_of(ddp).parallelism == "ddp"
    (fsdp,) = expand_grid(tmp_path, caps, ["fp32"], grid=parse_params(["nproc=2", "parallelism=fsdp"]))
    assert fsdp.parameters["parallelism"] == "fsdp"
    (one,) = expand_grid(tmp_path, caps, ["fp32"], grid=parse_params(["nproc=1"]))
    assert "parallelism" not in one.parameters and config_of(one).parallelism == "none"
    assert run_problems([ddp, fsdp, one]) == []


# --- combinations that cannot run are skipped; values that cannot run refuse the sweep ---------------


def test_the_fsdp_reduce_dtype_comparison_skips_fp32_with_a_half_reduce_dtype(tmp_path: Path) -> None:
    grid = parse_params(["parallelism=fsdp", "nproc=2", "reduce_dtype=fp32,bf16"])
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16-mixed"], [0, 1], grid)
    check = check_runs(runs)
    assert check.problems == ()
    skip = "skipped fp32 x reduce_dtype=bf16: reduce_dtype='bf16' does not fit precision 'fp32'; valid: 'fp32' or its "
    assert check.skipped == (skip + "compute dtype 'fp32'",)  # one line for both seeds
    assert [(r.parameters["precision"], r.parameters["reduce_dtype"], r.parameters["seed"]) for r in check.runs] == [
        ("fp32", "fp32", 0), ("bf16-mixed", "fp32", 0), ("fp32", "fp32", 1), ("bf16-mixed", "fp32", 1),
        ("bf16-mixed", "bf16", 0), ("bf16-mixed", "bf16", 1)]  # fmt: skip


def test_a_value_that_no_combination_can_use_refuses_the_sweep(tmp_path: Path) -> None:
    only_bf16 = expand_grid(tmp_path, CPU, ["fp32", "bf16-mixed"], [0], parse_params(["parallelism=fsdp", "reduce_dtype=bf16"]))
    check = check_runs(only_bf16)  # fp32 would run in no combination at all: that is no comparison with fp32
    assert check.runs == () and check.problems == (
        "reduce_dtype='bf16' does not fit precision 'fp32'; valid: 'fp32' or its compute dtype 'fp32'",)
    wrong = check_runs(expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["batch_size=0,4"])))
    assert wrong.runs == () and wrong.problems == ("batch_size=0 must be >= 1",) and wrong.skipped == ()
    fine = check_runs(expand_grid(tmp_path, CPU, ["fp32"], [0, 1]))
    assert len(fine.runs) == 2 and fine.skipped == fine.problems == ()


# --- timing runs: each setting's precisions timed against fp32 in one process ---------------------------


def test_each_setting_that_trains_fp32_and_another_precision_gets_one_timing_run(tmp_path: Path) -> None:
    runs = expand_grid(tmp_path, CPU, ["bf16", "fp32"], [1, 0], parse_params(["lr=1e-3,3e-3"]))
    timed = timing_runs(runs, 15.0)
    assert len(timed) == 2 and all(t.notebook == "speed.ipynb" for t in timed)
    first = timed[0]
    assert first.timed_precisions == ("fp32", "bf16-mixed")  # fp32 first: the baseline
    assert first.parameters["budget_s"] == 15.0 and first.parameters["precisions"] == ["fp32", "bf16-mixed"]
    base = next(r for r in runs if r.parameters["precision"] == "fp32" and r.parameters["seed"] == 0
                and r.parameters["lr"] == 1e-3)  # fmt: skip
    config = first.config_values()
    assert {k: v for k, v in config.items() if k != "run_name"} == {k: v for k, v in base.config_values().items() if k != "run_name"}
    assert config["run_name"] == f"speed-bf16-mixed-{base.parameters['run_name']}"
    assert first.name == RunConfig.from_dict(config).name and first.result_path.parent == base.result_path.parent
    assert check_runs([*runs, *timed]).problems == ()  # a timing run's values are a valid config too


def test_a_timing_run_never_shares_a_file_with_the_training_run_whose_config_it_times(tmp_path: Path) -> None:
    """The timing run has its fp32 run's config, so the same identity: with a name long enough to be cut, the
    readable part must still tell them apart, or the timing would overwrite that run's result."""
    long = ["model=amp_lib.hf:gpt2_small", "steps=3", "timing_warmup_steps=1", "batch_size=2", "seq_len=16",
            "log_every=1", "eval_batches=1", "lr=0.001", "grad_clip=0.5", "weight_decay=0.05"]  # fmt: skip
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0], parse_params(long))
    (timed,) = timing_runs(runs, 5.0)
    assert len(timed.name) > 100 and timed.name not in {r.name for r in runs}
    assert timed.result_path not in {r.result_path for r in runs}
    assert RunConfig.from_dict(timed.config_values()).result_path == timed.result_path  # where speed.ipynb writes


def test_no_timing_without_fp32_another_precision_a_budget_or_with_several_processes(tmp_path: Path) -> None:
    assert timing_runs(expand_grid(tmp_path, CPU, ["fp32"], [0]), 15.0) == []
    assert timing_runs(expand_grid(tmp_path, CPU, ["bf16", "fp16"], [0]), 15.0) == []
    assert timing_runs(expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0]), 0.0) == []
    ddp = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0], parse_params(["nproc=2"]))
    assert timing_runs(ddp, 15.0) == []  # timed by its training runs


# --- the optimizer and fp8 options as sweep axes -----------------------------------------------------


def test_an_optimizer_axis_is_one_run_per_optimizer_named_by_it_and_skips_what_cannot_run(tmp_path: Path) -> None:
    grid = parse_params(["optimizer=adamw,adamw-8bit,adamw-bf16"])
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16-true"], [0, 1], grid)
    check = check_runs(runs)
    assert check.problems == ()
    assert check.skipped == (
        ("skipped fp32 x optimizer=adamw-bf16: optimizer 'adamw-bf16' keeps bf16 parameters and state (stochastic "
        "rounding): it needs bf16 parameters (precision bf16-true); this run's parameters are fp32"),
    )  # one line for both seeds
    ran = {(r.parameters["precision"], r.optimizer) for r in check.runs}
    assert ran == {(p, o) for p in ("fp32", "bf16-true") for o in ("adamw", "adamw-8bit")} | {("bf16-true", "adamw-bf16")}
    # a run's name says its optimizer where it is not the default
    assert all((f"optimizer={r.optimizer}" in readable(r)) is (r.optimizer != "adamw") for r in check.runs)
    assert len({r.name for r in check.runs}) == len(check.runs) == 10


def test_a_setting_of_several_optimizers_is_timed_once_with_the_baselines(tmp_path: Path) -> None:
    """Timing compares precisions on one optimizer (adamw where the sweep has it): the other optimizers' rows are
    judged by their training runs' speed."""
    runs = expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0, 1], parse_params(["optimizer=adamw-8bit,adamw"]))
    (timed,) = timing_runs(runs, 15.0)
    assert timed.timed_precisions == ("fp32", "bf16-mixed") and timed.optimizer == "adamw"
    (alone,) = timing_runs(expand_grid(tmp_path, CPU, ["fp32", "bf16"], [0], parse_params(["optimizer=adamw8bit"])), 15.0)
    assert alone.optimizer == "adamw-8bit"  # no adamw in the sweep: its precisions are compared on adamw-8bit


def test_emulated_fp8_and_its_layer_selection_are_values_of_every_run_of_the_setting(tmp_path: Path) -> None:
    grid = parse_params(["emulate_fp8=true", "fp8_layers=lm_head+blocks.0.*"])
    runs = expand_grid(tmp_path, CPU, ["fp32", "fp8-mixed"], [0], grid)
    assert [r.parameters["precision"] for r in runs] == ["fp32", "fp8-tensorwise"]
    assert check_runs(runs).problems == () and len(check_runs(runs).runs) == 2
    assert {config_of(r).fp8_layers for r in runs} == {"lm_head,blocks.0.*"}
    (timed,) = timing_runs(runs, 15.0)  # speed.ipynb leaves the emulated recipe out of its timing (test_speed)
    assert timed.timed_precisions == ("fp32", "fp8-tensorwise")


def test_the_order_of_the_options_never_changes_a_runs_name(tmp_path: Path) -> None:
    """The same config given in another order is the same run: resumed, never re-run under a second name."""
    one = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["device=cpu", "steps=8", "lr=0.002"]))
    other = expand_grid(tmp_path, CPU, ["fp32"], [0], parse_params(["lr=0.002", "steps=8", "device=cpu"]))
    assert [r.name for r in one] == [r.name for r in other]
    assert one[0].name.startswith("gpt-tiny-fp32-s0-steps=8-lr=0.002-device=cpu-")  # RunConfig's field order
