"""amp_lib.bench (`make bench`): the bare AMP loop it compares against, the bench rows, the table and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from user_models import PLAN_DTYPES

from amp_lib.bench import (
    BenchRow,
    HeadroomCost,
    bare_loop,
    base_config,
    bench,
    build_parser,
    device_label,
    format_bench_table,
    format_headroom_table,
    format_interleaved,
    headroom_cost,
    main,
)
from amp_lib.config import BUILTIN_MODELS, RunConfig
from amp_lib.precision import Capabilities, probe, resolve_precision
from amp_lib.train import train


def cpu_plan(precision: str, allow_slow: bool = False):
    return resolve_precision(precision, probe(torch.device("cpu")), allow_slow=allow_slow)


def mlp_config(**overrides) -> RunConfig:
    values = {
        "model": "mlp",
        "steps": 6,
        "timing_warmup_steps": 2,
        "batch_size": 4,
        "log_every": 2,
        "device": "cpu",
        "grad_clip": 0.5,
    }
    return RunConfig(**{**values, **overrides})


# --- the bare loop -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"])
def test_bare_loop_trains_exactly_like_amp_lib(precision) -> None:
    """The overhead column compares like with like only if both loops compute the same steps."""
    config = mlp_config(precision=precision, allow_slow=True, lr=0.05)
    plan = cpu_plan(precision, allow_slow=True)
    lib = train(config, write=False)
    bare = bare_loop(config, plan)
    assert lib.ok and bare.step_ms > 0 and bare.timed_steps == config.steps - config.timing_warmup_steps
    assert bare.final_loss == pytest.approx(lib.metrics.final_train_loss, rel=1e-5)
    # and it is not just the first step's loss: a different run length gives a different loss
    assert bare_loop(
        mlp_config(precision=precision, allow_slow=True, lr=0.05, steps=5), plan
    ).final_loss != pytest.approx(bare.final_loss, rel=1e-5)


@pytest.mark.slow
def test_bare_loop_clips_like_amp_lib() -> None:
    plan = cpu_plan("fp32")
    clipped, free = (bare_loop(mlp_config(lr=0.05, grad_clip=clip), plan) for clip in (1e-3, None))
    assert clipped.final_loss == pytest.approx(
        train(mlp_config(lr=0.05, grad_clip=1e-3), write=False).metrics.final_train_loss, rel=1e-5
    )
    assert clipped.final_loss != pytest.approx(free.final_loss, rel=1e-3)


@pytest.mark.slow
def test_bare_loop_scales_the_loss_only_for_a_plan_with_a_scaler(user_models) -> None:
    """fp32 has no GradScaler: a loss that would overflow once scaled still trains, as in amp_lib's loop."""
    config = RunConfig(
        model="user_models:build_huge_loss", steps=4, timing_warmup_steps=1, log_every=2, device="cpu", lr=0.05
    )
    lib = train(config, write=False)
    bare = bare_loop(config, cpu_plan("fp32"))
    assert lib.ok and bare.final_loss == pytest.approx(lib.metrics.final_train_loss, rel=1e-5)


@pytest.mark.slow
def test_bare_loop_starts_and_grows_the_loss_scale_as_the_config_says(user_models) -> None:
    # from 2**14 this model's fp16 gradients overflow every few steps, and growth_interval=1 regrows the
    # scale after each clean step: both loops must skip the same steps, or their losses part
    config = RunConfig(model="user_models:build_ok", precision="fp16-mixed", allow_slow=True, steps=8, timing_warmup_steps=1,
                       log_every=2, batch_size=4, device="cpu", lr=0.05, init_scale=2.0**14, growth_interval=1)  # fmt: skip
    plan = cpu_plan("fp16-mixed", allow_slow=True)
    lib = train(config, write=False)
    assert lib.ok, lib.error
    skipped = [r.skipped for r in lib.history]
    assert any(skipped) and not all(skipped) and lib.metrics.final_loss_scale > min(r.loss_scale for r in lib.history)
    bare = bare_loop(config, plan)
    assert bare.final_loss == pytest.approx(lib.metrics.final_train_loss, rel=1e-5)
    for other in (replace(config, init_scale=2.0**16), replace(config, growth_interval=2000)):
        assert bare_loop(other, plan).final_loss != pytest.approx(bare.final_loss, rel=1e-5)


def test_bare_loop_reports_the_timed_steps_and_the_loss_of_a_scaled_fp16_run(user_models) -> None:
    """The bench's overhead column reads these three figures: each must be the bare loop's own, scaled as configured."""
    config = RunConfig(model="user_models:build_ok", precision="fp16-mixed", allow_slow=True, steps=6, timing_warmup_steps=1,
                       log_every=4, batch_size=4, device="cpu", lr=0.05, init_scale=2.0**14, growth_interval=1)  # fmt: skip
    lib = train(config, write=False)
    assert lib.ok, lib.error
    assert any(r.skipped for r in lib.history)  # the scale overflows at first: init_scale and growth matter
    bare = bare_loop(config, cpu_plan("fp16-mixed", allow_slow=True))
    assert bare.timed_steps == config.steps - config.timing_warmup_steps
    assert isinstance(bare.step_ms, float) and bare.step_ms > 0
    assert bare.final_loss == pytest.approx(lib.metrics.final_train_loss, rel=1e-5)


@pytest.mark.parametrize(("precision", "param_dtype", "output_dtype"), PLAN_DTYPES)
def test_bare_loop_runs_the_model_in_the_plan_dtypes_with_tf32_off(
    user_models, precision, param_dtype, output_dtype
) -> None:
    import user_models as factories

    factories.SEEN_DTYPES.clear()
    config = RunConfig(
        model="user_models:build_dtype_probe", precision=precision, device="cpu", steps=2, timing_warmup_steps=1
    )
    bare_loop(config, cpu_plan(precision))
    assert set(factories.SEEN_DTYPES) == {(param_dtype, output_dtype, False)}


@pytest.mark.slow
def test_bare_loop_compiles_the_model_when_asked(user_models) -> None:
    import user_models as factories

    for compile in (False, True):  # as amp_lib's loop does, so the overhead compares like with like
        factories.COMPILING.clear()
        torch.compiler.reset()  # an earlier compile in this process (its caches and recompile counts) decides nothing
        config = RunConfig(
            model="user_models:build_compile_probe", device="cpu", steps=3, timing_warmup_steps=1, compile=compile
        )
        bare_loop(config, cpu_plan("fp32"))
        assert factories.COMPILING == {"forward": compile}


# --- bench rows ----------------------------------------------------------------------------------


@pytest.fixture  # per test: mutation testing must see every test that reads the rows call bench()
def rows():
    base = RunConfig(model="mlp", steps=6, timing_warmup_steps=2, batch_size=4, log_every=2, device="cpu")
    return bench(base, ["fp32", "tf32"], repeats=1)  # tf32 falls back to fp32 on every CPU


@pytest.mark.slow
def test_bench_reports_each_precision_with_its_fallback(rows) -> None:
    assert [r.precision for r in rows] == ["fp32", "tf32"]
    assert rows[1].effective == "fp32" and "tf32" in rows[1].fallback_reason
    assert all(r.step_ms > 0 and r.bare_step_ms > 0 and r.items_per_s > 0 for r in rows)
    assert rows[0].unit == "samples"


@pytest.mark.slow
def test_bench_throughput_counts_the_items_of_one_step(rows) -> None:
    for r in rows:
        assert r.items_per_s * r.step_ms / 1e3 == pytest.approx(4)  # batch_size samples per step
        assert r.peak_memory_mb > 0 and r.eval_loss > 0


@pytest.mark.slow
def test_bench_table_quotes_ratios_against_the_fp32_row(rows) -> None:
    table = format_bench_table(rows, "cpu")
    fp32_line, tf32_line = (line for line in table.splitlines() if line.startswith(("| fp32", "| tf32")))
    assert "| 1.00x |" in fp32_line
    ratio = rows[1].items_per_s / rows[0].items_per_s
    assert f"| {ratio:.2f}x |" in tf32_line
    assert "fallbacks:" in table


@pytest.mark.slow
def test_bench_runs_each_precision_as_asked_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = RunConfig(
        model="mlp", steps=4, timing_warmup_steps=1, batch_size=4, log_every=2, device="cpu", allow_slow=True
    )
    (row,) = bench(base, ["fp16-mixed"], repeats=1)
    assert (row.effective, row.fallback_reason) == ("fp16-mixed", None)  # allow_slow reached the plan
    alone = train(replace(base, precision="fp16-mixed"), write=False)
    assert row.eval_loss == pytest.approx(alone.metrics.eval_loss, rel=1e-6)
    assert list(tmp_path.iterdir()) == []  # the bench's runs write no result files


@pytest.mark.slow
def test_bench_skips_a_precision_whose_run_fails(user_models, capsys) -> None:
    base = RunConfig(model="user_models:build_nan", steps=4, timing_warmup_steps=1, log_every=2, device="cpu")
    assert bench(base, ["fp32"], repeats=2) == []
    assert "fp32: skipped, the run ended diverged" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_goes_on_after_a_failed_precision(user_models, capsys) -> None:
    base = RunConfig(model="user_models:build_fails_in_fp32", steps=4, timing_warmup_steps=1, log_every=2, device="cpu")
    assert [r.precision for r in bench(base, ["fp32", "bf16-mixed"], repeats=1)] == ["bf16-mixed"]
    assert "fp32: skipped, the run ended failed" in capsys.readouterr().err


def test_overhead_is_the_slowdown_against_the_bare_loop() -> None:
    row = BenchRow(
        "fp32",
        "fp32",
        step_ms=11.0,
        bare_step_ms=10.0,
        items_per_s=1.0,
        peak_memory_mb=1.0,
        eval_loss=1.0,
        fallback_reason=None,
    )
    assert row.overhead == pytest.approx(0.1)
    assert replace(row, step_ms=9.0).overhead == pytest.approx(-0.1)


# --- the table -----------------------------------------------------------------------------------


def _row(precision: str, effective: str, items_per_s: float, peak: float | None, **kw) -> BenchRow:
    values = {"step_ms": 2.0, "bare_step_ms": 2.0, "eval_loss": 1.23456, "fallback_reason": None, "unit": "samples"}
    return BenchRow(precision, effective, items_per_s=items_per_s, peak_memory_mb=peak, **{**values, **kw})


def test_format_bench_table_lines() -> None:
    rows = [
        _row("fp32", "fp32", 1000.0, 200.0),
        _row("bf16-mixed", "bf16-mixed", 2500.0, 50.0, step_ms=2.1),
        _row("fp16-mixed", "bf16-mixed", 3000.0, None, fallback_reason="no fast fp16"),
    ]
    lines = format_bench_table(rows, "Some GPU").splitlines()
    assert lines[0] == f"device: Some GPU, torch {torch.__version__}"
    assert lines[2] == "|---|---|---|---|---|---|---|---|---|"
    assert lines[1].startswith("| precision | effective | step ms (median) | samples/s | speedup vs fp32 |")
    assert lines[3] == "| fp32 | fp32 | 2.00 | 1,000 | 1.00x | 200 | 1.00x | 1.2346 | +0.0% |"
    assert lines[4] == "| bf16-mixed | bf16-mixed | 2.10 | 2,500 | 2.50x | 50 | 0.25x | 1.2346 | +5.0% |"
    assert lines[5] == "| fp16-mixed | bf16-mixed | 2.00 | 3,000 | 3.00x | 0 | n/a | 1.2346 | +0.0% |"
    assert lines[6:] == ["", "fallbacks:", "- fp16-mixed: no fast fp16"]


def test_the_header_names_the_gpu_or_the_cpus_model_and_the_instruction_set_torch_uses(tmp_path: Path) -> None:
    h100 = Capabilities("cuda", True, "NVIDIA H100 80GB HBM3", (9, 0))
    assert device_label(h100) == "NVIDIA H100 80GB HBM3"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2\n")
    cpu = Capabilities("cpu", device_name="AVX512")
    assert device_label(cpu, str(cpuinfo)) == "Intel(R) Xeon(R) Platinum 8481C (torch's CPU capability: AVX512)"
    assert device_label(cpu, str(tmp_path / "none")) == "CPU (torch's CPU capability: AVX512)"  # no /proc/cpuinfo


def test_format_bench_table_without_an_fp32_row_has_no_ratios() -> None:
    lines = format_bench_table([_row("bf16-mixed", "bf16-mixed", 10.0, 5.0, unit="tokens")], "cpu").splitlines()
    assert "| tokens/s |" in lines[1]
    assert lines[3] == "| bf16-mixed | bf16-mixed | 2.00 | 10 | n/a | 5 | n/a | 1.2346 | +0.0% |"
    assert len(lines) == 4  # no fallback section


def test_format_bench_table_of_no_rows_is_just_the_header() -> None:
    lines = format_bench_table([], "cpu").splitlines()
    assert len(lines) == 3 and "| tokens/s |" in lines[1]


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cuda", "model", "batch_size", "seq_len"), [(True, "gpt2-124m", 16, 1024), (False, "gpt-tiny", 8, 128)]
)
def test_bench_defaults_are_the_documented_setup(cuda, model, batch_size, seq_len) -> None:
    args = build_parser(cuda).parse_args([])
    config = base_config(args)
    assert (config.model, config.batch_size, config.seq_len) == (model, batch_size, seq_len)
    assert (config.steps, config.timing_warmup_steps, config.log_every, config.device) == (40, 10, 10, "auto")
    assert (args.precisions, args.repeats, args.json) == (["fp32", "bf16-mixed", "fp16-mixed"], 3, None)
    assert args.speed_budget == 30.0
    assert not (config.allow_slow or config.compile)
    flags = base_config(build_parser(cuda).parse_args(["--allow-slow", "--compile", "--steps", "12"]))
    assert flags.allow_slow and flags.compile and flags.steps == 12


def test_bench_cli_parses_every_option_to_its_type() -> None:
    """Numbers arrive as ints, several precisions as a list, the JSON target as a path; the headroom map is off by default."""
    assert build_parser(False).parse_args([]).headroom_every == 0
    argv = ["--precisions", "fp32", "bf16-mixed", "--timing-warmup-steps", "3", "--batch-size", "2", "--repeats", "1",
            "--json", "rows.json", "--headroom-every", "5"]  # fmt: skip
    args = build_parser(False).parse_args(argv)
    assert args.precisions == ["fp32", "bf16-mixed"]
    assert (args.timing_warmup_steps, args.batch_size, args.repeats, args.headroom_every) == (3, 2, 1, 5)
    assert all(type(v) is int for v in (args.timing_warmup_steps, args.batch_size, args.repeats, args.headroom_every))
    assert args.json == Path("rows.json")
    config = base_config(args)
    assert (config.timing_warmup_steps, config.batch_size) == (3, 2)


def test_base_config_takes_the_device() -> None:
    config = base_config(build_parser(False).parse_args(["--device", "cpu", "--seq-len", "64"]))
    assert (config.device, config.seq_len) == ("cpu", 64)


def test_bench_cli_help_and_a_bad_model(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m amp_lib.bench ")
    description = "`make bench`: fp32 vs bf16-mixed vs fp16-mixed on a built-in model, in one process."
    flat = " ".join(out.split())  # argparse wraps lines to the terminal width
    assert description in flat
    assert "--timing-warmup-steps TIMING_WARMUP_STEPS untimed steps before measuring --batch-size" in flat
    assert "--allow-slow run fp16 even on a CPU without fast fp16 --compile" in flat
    assert "--compile torch.compile the model in both loops --json" in flat
    assert "--json JSON also write the rows as JSON here --headroom-every" in flat
    assert "--headroom-every HEADROOM_EVERY also measure the fp16 headroom map sampling every N steps" in flat
    assert flat.endswith("--speed-budget SPEED_BUDGET seconds for the interleaved timing (0: skip it)")
    with pytest.raises(SystemExit) as info:
        build_parser(False).parse_args(["--model", "gpt-huge"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'gpt-huge'" in err and all(name in err for name in BUILTIN_MODELS)


@pytest.mark.slow
def test_bench_cli_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model", "mlp", "--precisions", "fp32", "--steps", "4", "--timing-warmup-steps", "1", "--repeats", "1",
            "--batch-size", "2", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert row["precision"] == row["effective"] == "fp32" and row["unit"] == "samples"
    assert row["overhead"] == pytest.approx(row["step_ms"] / row["bare_step_ms"] - 1)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"device: {device_label(probe(torch.device('cpu')))}, torch {torch.__version__}"
    assert printed[3].startswith("| fp32 | fp32 |")
    assert not any(line.startswith("interleaved timing") for line in printed)  # one precision: nothing to pair
    assert out.read_text() == json.dumps(json.loads(out.read_text()), indent=2)  # readable, two-space indent


# --- the headroom map's cost ---------------------------------------------------------------------


@pytest.mark.slow
def test_headroom_cost_times_map_off_unsampled_and_sampled_steps_apart(capsys) -> None:
    base = RunConfig(model="mlp", steps=7, timing_warmup_steps=1, batch_size=4, log_every=3, device="cpu")
    (row,) = headroom_cost(base, ["fp32"], every=3, repeats=1)
    assert row.precision == "fp32" and min(row.off_ms, row.unsampled_ms, row.sampled_ms) > 0
    table = format_headroom_table([HeadroomCost("fp32", 10.0, 11.0, 15.0)], every=3)
    assert table.splitlines() == [
        "headroom map (sampled every 3 steps): median step ms",
        "| precision | map off | on, unsampled step | on, sampled step | unsampled vs off | sampled vs off |",
        "|---|---|---|---|---|---|",
        "| fp32 | 10.00 | 11.00 | 15.00 | +10.0% | +50.0% |",
    ]
    argv = ["--model", "mlp", "--precisions", "fp32", "--steps", "7", "--timing-warmup-steps", "1", "--repeats", "1",
            "--batch-size", "2", "--device", "cpu", "--headroom-every", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "headroom map (sampled every 3 steps): median step ms" in capsys.readouterr().out


# --- the interleaved speed-up: the sweep's own protocol ----------------------------------------


@pytest.mark.slow
def test_bench_quotes_the_interleaved_speed_up_with_its_interval_and_verdict(capsys) -> None:
    base = mlp_config(timing_warmup_steps=1, batch_size=8)
    table = format_interleaved(base, ["fp32", "bf16-mixed"], budget_s=2.0).splitlines()
    assert table[0].startswith("interleaved timing (the sweep's protocol: ABBA blocks of ")
    assert table[1:3] == ["| precision | speed-up vs fp32 [95% CI] | rounds | verdict |", "|---|---|---|---|"]
    (row,) = table[3:]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "bf16-mixed" and int(cells[2]) >= 1
    low, high = (float(x) for x in cells[1].split("[")[1].rstrip("x]").replace("x", "").split(", "))
    assert 0 < low <= float(cells[1].split("x")[0]) <= high
    assert cells[3].split(" (")[0] in {"faster", "slower", "no measurable gain", "undecided"}
    argv = ["--model", "mlp", "--precisions", "fp32", "bf16-mixed", "--steps", "4", "--timing-warmup-steps", "1",
            "--repeats", "1", "--batch-size", "2", "--device", "cpu", "--speed-budget", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "\ninterleaved timing (the sweep's protocol" in capsys.readouterr().out
    assert main([*argv[:-1], "0"]) == 0
    assert "interleaved timing" not in capsys.readouterr().out
