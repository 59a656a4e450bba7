"""The sweep's in-process parts, pinned down exactly: grid parsing, planning, resume checks, failure
records, exit codes and the CLI on already-finished results. No Jupyter kernel is started here (a
kernel runs the un-mutated package, so kernel tests cannot check these functions under mutation)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from amp_lib import sweep as sw
from amp_lib.precision import native_precisions, probe
from amp_lib.results import Metrics, RunResult
from amp_lib.sweep import (
    COMPLETE,
    DEVICE_DEFAULTS,
    Outcome,
    PlannedRun,
    Settings,
    SweepResult,
    build_parser,
    failed_result,
    is_complete,
    main,
    parse_params,
    parse_value,
    plan_sweep,
    run_sweep,
)
from amp_lib.train import RunConfig

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")


# -- values and -p items -------------------------------------------------------------------------


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
        ("wandb_mode", "none", None),  # notebook extras are str | None
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


def test_params_split_values_strip_keys_and_later_items_win() -> None:
    grid = parse_params([" lr =1e-3,3e-3", "steps=20", "steps=9,10", "wandb_mode=disabled"])
    assert grid == {"lr": [0.001, 0.003], "steps": [9, 10], "wandb_mode": ["disabled"]}
    assert parse_params([]) == {}


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
    with pytest.raises(ValueError) as info:
        parse_params([f"{key}=1"])
    assert str(info.value) == (
        f"-p {key}=... is set by the sweep; use --precisions / --seeds (run_name and out_dir follow --out)"
    )


def test_unknown_param_lists_every_settable_name_and_no_reserved_one() -> None:
    with pytest.raises(ValueError) as info:
        parse_params(["stepz=3"])
    settable = [k for k in [*RunConfig.field_names(), "wandb_mode", "wandb_project", "wandb_group"]]
    settable = [k for k in settable if k not in sw.RESERVED]
    assert str(info.value) == f"unknown parameter 'stepz'; valid names: {', '.join(settable)}"


# -- planning ------------------------------------------------------------------------------------


def test_planned_run_result_path_is_out_dir_slash_name_json(tmp_path: Path) -> None:
    run = PlannedRun("a-b", {"out_dir": str(tmp_path / "r")})
    assert run.result_path == tmp_path / "r" / "a-b.json"


def test_slug_keeps_safe_characters_and_replaces_the_rest() -> None:
    assert sw._slug("pkg.mod:fn") == "pkg.mod.fn"
    assert sw._slug("lr=0.001") == "lr=0.001"
    assert sw._slug("a b/c+d-e_f") == "a_b_c+d-e_f"


@CPU_ONLY
def test_plan_orders_grid_then_precisions_then_seeds_and_names_varying_keys(tmp_path: Path) -> None:
    grid = {"lr": [0.001, 0.01], "steps": [9], "model": ["gpt-tiny"]}
    runs = plan_sweep(tmp_path / "sw", ["32", "bf16"], [1, 0], grid)
    assert [r.name for r in runs] == [
        "gpt-tiny-fp32-s1-lr=0.001",
        "gpt-tiny-fp32-s0-lr=0.001",
        "gpt-tiny-bf16-mixed-s1-lr=0.001",
        "gpt-tiny-bf16-mixed-s0-lr=0.001",
        "gpt-tiny-fp32-s1-lr=0.01",
        "gpt-tiny-fp32-s0-lr=0.01",
        "gpt-tiny-bf16-mixed-s1-lr=0.01",
        "gpt-tiny-bf16-mixed-s0-lr=0.01",
    ]
    first = runs[0].parameters
    assert first == {
        **DEVICE_DEFAULTS["cpu"],
        "model": "gpt-tiny",
        "steps": 9,  # the grid wins over the device default
        "lr": 0.001,
        "precision": "fp32",
        "seed": 1,
        "run_name": "gpt-tiny-fp32-s1-lr=0.001",
        "out_dir": str((tmp_path / "sw").resolve() / "results"),
        "wandb_group": "sw",
    }
    assert runs[0].result_path == (tmp_path / "sw").resolve() / "results" / "gpt-tiny-fp32-s1-lr=0.001.json"


@CPU_ONLY
def test_plan_defaults_and_explicit_group(tmp_path: Path) -> None:
    runs = plan_sweep(tmp_path / "my sweep", grid={"wandb_group": ["team"]})
    assert [r.parameters["precision"] for r in runs] == native_precisions(probe("cpu"))
    assert all(r.parameters["seed"] == 0 and r.parameters["wandb_group"] == "team" for r in runs)
    assert runs[0].parameters["model"] == "gpt-tiny"
    assert plan_sweep(tmp_path / "my sweep", ["fp32"])[0].parameters["wandb_group"] == "my_sweep"
    assert plan_sweep(tmp_path / "x", ["fp32"], grid=None)[0].name == "gpt-tiny-fp32-s0"


@CPU_ONLY
def test_plan_probes_the_one_device_in_the_grid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        plan_sweep(tmp_path, ["fp32"], [0], {"device": ["cuda"]})
    runs = plan_sweep(tmp_path, ["fp32"], [0], {"device": ["cpu", "cuda"]})  # several: probe "auto"
    assert [r.name for r in runs] == ["gpt-tiny-fp32-s0-device=cpu", "gpt-tiny-fp32-s0-device=cuda"]


@CPU_ONLY
def test_plan_model_in_the_name_but_never_twice(tmp_path: Path) -> None:
    runs = plan_sweep(tmp_path, ["fp32"], [0], {"model": ["gpt-tiny", "tests.user_models:make"]})
    assert [r.name for r in runs] == ["gpt-tiny-fp32-s0", "tests.user_models.make-fp32-s0"]


@CPU_ONLY
def test_plan_rejects_repeats_and_colliding_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        plan_sweep(tmp_path, ["fp32", "32"], [0])
    assert str(info.value) == "precisions ['fp32', 'fp32'] and seeds [0] must not repeat"
    with pytest.raises(ValueError, match=r"precisions \['fp32'\] and seeds \[1, 1\] must not repeat"):
        plan_sweep(tmp_path, ["fp32"], [1, 1])
    with pytest.raises(ValueError) as info:
        plan_sweep(tmp_path, ["fp32"], [0], {"model": ["a:b", "c", "a.b"]})
    assert str(info.value) == "run names collide: ['a.b-fp32-s0']"


# -- resume --------------------------------------------------------------------------------------


def _result(run: PlannedRun, status: str = "ok", **changes: Any) -> RunResult:
    config = {**{k: v for k, v in run.parameters.items() if k in RunConfig.field_names()}, **changes}
    return RunResult(config=config, plan={"requested": config["precision"], "effective": config["precision"]},
                     metrics=Metrics(tokens_per_s=1000.0, eval_loss=2.0), status=status,
                     error=None if status == "ok" else f"{status}: first line\nsecond")  # fmt: skip


@CPU_ONLY
def test_complete_means_same_parameters_and_a_final_status(tmp_path: Path) -> None:
    (run,) = plan_sweep(tmp_path, ["fp32"], [0], {"steps": [9], "wandb_mode": ["disabled"]})
    assert not is_complete(run)  # no file
    run.result_path.parent.mkdir(parents=True)
    run.result_path.write_text("{not json")
    assert not is_complete(run)  # half a file
    run.result_path.write_text('{"schema_version": 1}')
    assert not is_complete(run)  # missing keys
    for status in ("ok", "diverged", "oom", "failed"):
        _result(run, status).save(run.result_path)
        assert is_complete(run) == (status in COMPLETE)
    _result(run, steps=10).save(run.result_path)
    assert not is_complete(run)
    _result(run, out_dir="/moved/elsewhere").save(run.result_path)
    assert is_complete(run)  # a moved sweep folder still resumes
    assert COMPLETE == ("ok", "diverged", "oom")


# -- failure records -----------------------------------------------------------------------------


def test_failed_result_fills_defaults_and_resolves_the_plan() -> None:
    result = failed_result(
        {"precision": "bf16", "device": "cpu", "steps": 3, "wandb_mode": "disabled", "wandb_group": "g", "stepz": 1},
        "NoSuchKernel: x",
    )
    assert result.status == "failed" and result.error == "NoSuchKernel: x"
    defaults = RunConfig().to_dict()
    assert result.config == {**defaults, "precision": "bf16", "device": "cpu", "steps": 3, "stepz": 1}
    assert result.plan["requested"] == "bf16" and result.plan["effective"] == "bf16-mixed"
    assert result.plan["torch_version"] == torch.__version__ and result.plan["device_type"] == "cpu"


def test_failed_result_of_an_unparseable_precision_keeps_the_request() -> None:
    result = failed_result({"precision": 33, "device": "cpu"}, "boom")
    assert result.plan == {"requested": "33", "effective": None, "fallback_reason": None}
    assert failed_result({}, "e").config["precision"] == RunConfig().precision


def test_error_text_prefers_the_notebook_error_name_and_value() -> None:
    class CellError(Exception):
        ename, evalue = "ValueError", "bad steps"

    assert sw._error_text(CellError("ignored")) == "ValueError: bad steps"
    assert sw._error_text(RuntimeError("kernel died")) == "RuntimeError: kernel died"
    assert sw._error_text(RuntimeError()) == "RuntimeError:"


def test_port_race_is_found_through_implicit_context_and_both_messages() -> None:
    try:
        try:
            raise RuntimeError("Kernel died before replying to kernel_info")
        except RuntimeError:
            raise ValueError("start failed")  # an implicit __context__ on purpose
    except ValueError as exc:
        assert sw._is_port_race(exc)
    assert sw._is_port_race(OSError("Address already in use"))
    assert not sw._is_port_race(OSError("Address in use"))


def test_stamp_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    assert sw._stamp(path) is None
    path.write_text("a")
    st = path.stat()
    assert sw._stamp(path) == (st.st_ino, st.st_mtime_ns)


# -- outcomes, exit codes ------------------------------------------------------------------------


def test_exit_code_interrupted_then_failed_then_report() -> None:
    ok, bad = Outcome("a", "ok"), Outcome("b", "diverged", "loss became nan\ntrace")
    assert SweepResult(Path("x"), (ok,)).exit_code == 0
    assert SweepResult(Path("x"), (ok, bad)).failed == [bad]
    assert SweepResult(Path("x"), (ok, bad)).exit_code == 1
    assert SweepResult(Path("x"), (ok,), report_error="boom").exit_code == 1
    assert SweepResult(Path("x"), (ok, bad), interrupted=True, report_error="boom").exit_code == 130
    assert SweepResult(Path("x"), ()).planned == 0 and SweepResult(Path("x"), ()).report == {}
    assert sw._line(bad) == "diverged b: loss became nan"
    assert sw._line(ok) == "ok       a"
    assert sw._line(Outcome("c", "failed", "  \n")) == "failed   c"


def test_settings_defaults() -> None:
    s = Settings()
    assert (s.kernel, s.timeout, s.retries) == ("amp-workbook", 3600.0, 3)
    assert Path(s.notebooks, "train.ipynb").exists() and Path(s.notebooks, "compare.ipynb").exists()


def test_visible_gpus_from_the_environment_or_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, ,1")
    assert sw._visible_gpus() == ["0", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sw._visible_gpus() == [str(i) for i in range(torch.cuda.device_count())]


def test_csv_and_parser_defaults() -> None:
    assert sw._csv(" a, ,b ,") == ["a", "b"]
    args = build_parser().parse_args(["--out", "o"])
    assert (args.out, args.precisions, args.seeds, args.param) == ("o", None, ["0"], [])
    assert (args.workers, args.force, args.kernel, args.timeout) == (1, False, "amp-workbook", 3600.0)
    assert (args.tolerance, args.report) == (0.02, True)
    args = build_parser().parse_args(
        ["--out", "o", "--precisions", "fp32, bf16", "--seeds", "1,2", "-p", "a=1", "--param", "b=2", "--workers",
         "3", "--force", "--kernel", "k", "--timeout", "5", "--tolerance", "0.1", "--no-report"]
    )  # fmt: skip
    assert (args.precisions, args.seeds, args.param) == (["fp32", "bf16"], ["1", "2"], ["a=1", "b=2"])
    assert (args.workers, args.force, args.kernel, args.timeout, args.tolerance, args.report) == (
        3, True, "k", 5.0, 0.1, False
    )  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # --out is required


# -- the CLI on finished results (resume: nothing executes) --------------------------------------


def _finished_sweep(out: Path, statuses: dict[str, str], tps: dict[str, float]) -> list[PlannedRun]:
    runs = plan_sweep(out, list(statuses), [0], {"device": ["cpu"], "steps": [9], "wandb_mode": ["disabled"]})
    for run in runs:
        result = _result(run, statuses[run.parameters["precision"]])
        result = RunResult(result.config, result.plan, Metrics(tokens_per_s=tps[run.parameters["precision"]],
                           eval_loss=2.0 if result.ok else None), (), result.status, result.error)  # fmt: skip
        result.save(run.result_path)
    return runs


ARGS = ["-p", "device=cpu", "-p", "steps=9", "-p", "wandb_mode=disabled"]
NO_KERNEL = ["--kernel", "no-such-kernel"]  # a run that is (wrongly) executed fails in a second, not minutes


def test_resumed_sweep_prints_counts_paths_and_recommendation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0})
    assert main(["--out", str(out), "--precisions", "fp32,bf16", *ARGS, *NO_KERNEL, "--no-report"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "resuming: 2 of 2 runs already complete (--force re-runs them)"  # tqdm.write: stdout
    assert lines[1] == ""
    assert lines[2] == f"sweep {out}: 2 of 2 runs done (0 executed, 2 resumed), 0 not ok"
    assert lines[3] == f"  results:   {out / 'results'}/"
    assert lines[4] == f"  notebooks: {out / 'runs'}/"
    assert lines[5].startswith("recommendation (gpt-tiny): bf16-mixed — the fastest precision") and len(lines) == 6
    assert "FAILED" not in captured.err and "interrupted" not in captured.err


def test_resumed_sweep_with_a_diverged_run_exits_1_and_lists_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "fp16-mixed": "diverged"}, {"fp32": 1000.0, "fp16-mixed": 3000.0})
    argv = [
        "--out",
        str(out),
        "--precisions",
        "fp32,fp16-mixed",
        *ARGS,
        *NO_KERNEL,
        "--no-report",
        "--tolerance",
        "0.5",
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "(0 executed, 2 resumed), 1 not ok" in captured.out
    assert "recommendation (gpt-tiny): fp32 — stay in fp32" in captured.out
    assert captured.err.splitlines()[-1] == "FAILED diverged gpt-tiny-fp16-mixed-s0: diverged: first line"


def test_sweep_function_resumes_and_reports_without_a_kernel(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    runs = _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "oom"}, {"fp32": 1000.0, "bf16-mixed": 1.0})
    settings = Settings(kernel="no-such-kernel", retries=1)
    result = sw.sweep(out, ["fp32", "bf16"], [0], ARGS[1::2], settings=settings)
    assert result.planned == 2 and result.interrupted is False and result.exit_code == 1
    assert [(o.name, o.status, o.resumed) for o in result.outcomes] == [(r.name, s, True) for r, s in
                                                                         zip(runs, ("ok", "oom"))]  # fmt: skip
    assert result.outcomes[1].error == "oom: first line\nsecond"
    assert result.report_error.startswith("report notebook failed (") and "NoSuchKernel" in result.report_error
    assert result.report == {}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# AMP Workbook sweep summary") and "| oom |" in summary
    assert not (out / "summary.md.tmp").exists()
    quiet = sw.sweep(out, ["fp32", "bf16"], [0], ARGS[1::2], report=False, settings=settings)
    assert quiet.report_error is None and quiet.report == {} and quiet.out == out


def test_forced_rerun_executes_and_records_a_failure_without_a_kernel(tmp_path: Path) -> None:
    out = tmp_path / "sw"
    runs = _finished_sweep(out, {"fp32": "ok"}, {"fp32": 1000.0})
    settings = Settings(kernel="no-such-kernel", retries=2)
    outcomes, interrupted = run_sweep(runs, settings, force=True)
    assert not interrupted
    assert [(o.name, o.status, o.resumed) for o in outcomes] == [(runs[0].name, "failed", False)]
    assert outcomes[0].error == "NoSuchKernel: No such kernel named no-such-kernel"
    assert outcomes[0].notebook == str(out.resolve() / "runs" / f"{runs[0].name}.ipynb")
    saved = RunResult.load(runs[0].result_path)
    assert saved.status == "failed" and saved.error == outcomes[0].error and saved.config["steps"] == 9
    assert run_sweep([], settings) == ([], False)


def _last_frame(stderr: str) -> str:
    return [frame.strip() for frame in stderr.replace("\n", "\r").split("\r") if frame.strip()][-1]


def test_sweep_progress_bar_counts_runs_and_names_the_one_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _finished_sweep(tmp_path / "sw", {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1.0, "bf16-mixed": 2.0})
    settings = Settings(kernel="no-such-kernel", retries=1)
    outcomes, interrupted = run_sweep(runs, settings)  # not forced: complete runs are resumed, none executed
    assert interrupted is False and [(o.status, o.resumed) for o in outcomes] == [("ok", True), ("ok", True)]
    assert re.fullmatch(r"sweep: 100%\|[^|]*\| 2/2 \[.*run/s\]", _last_frame(capsys.readouterr().err))
    run_sweep(runs[:1], settings, force=True)  # executed in this process (workers=1): the bar names the run
    frame = _last_frame(capsys.readouterr().err)
    assert re.fullmatch(rf"sweep: 100%\|[^|]*\| 1/1 \[.*run/s, {runs[0].name}\]", frame), frame
    sw.sweep(tmp_path / "sw", ["fp32"], [0], ARGS[1::2], force=True, report=False, settings=settings)  # same, via sweep()
    assert _last_frame(capsys.readouterr().err).endswith(f"run/s, {runs[0].name}]")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0,x"], "error: invalid --seeds '0,x'; expected comma-separated ints"),
        (["--workers", "0"], "error: invalid --workers 0; expected >= 1"),
        (["--precisions", "fp32", "-p", "stepz=1"], "error: unknown parameter 'stepz'; valid names: model, steps"),
        (["--precisions", "fp32,32"], "error: precisions ['fp32', 'fp32'] and seeds [0] must not repeat"),
    ],
)
def test_bad_command_lines_exit_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["--out", str(tmp_path / "sw"), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1
    assert not (tmp_path / "sw").exists()


def test_workers_one_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok"}, {"fp32": 1000.0})
    assert main(["--out", str(out), "--precisions", "fp32", *ARGS, *NO_KERNEL, "--no-report", "--workers", "1"]) == 0
    assert "1 of 1 runs done (0 executed, 1 resumed), 0 not ok" in capsys.readouterr().out


HELP = """\
usage: python -m amp_lib.sweep [-h] --out OUT [--precisions PRECISIONS] [--seeds SEEDS]
                               [-p KEY=V1[,V2]] [--workers WORKERS] [--force] [--kernel KERNEL]
                               [--timeout TIMEOUT] [--tolerance TOLERANCE] [--no-report]

Run notebooks/train.ipynb over precisions x seeds x parameters with papermill, then the report.

options:
  -h, --help            show this help message and exit
  --out OUT             sweep folder (runs/, results/, report.html, summary.md, figures/)
  --precisions PRECISIONS
                        comma-separated; default: what this device runs natively
  --seeds SEEDS         comma-separated ints (default 0); several give mean ± spread
  -p KEY=V1[,V2], --param KEY=V1[,V2]
                        any RunConfig field (or wandb_mode/project/group); repeatable
  --workers WORKERS     runs in parallel, one process each (one GPU each on multi-GPU machines)
  --force               re-run runs whose results are already complete
  --kernel KERNEL       Jupyter kernel to run the notebooks with (default amp-workbook)
  --timeout TIMEOUT     seconds a notebook cell may run (default 3600)
  --tolerance TOLERANCE
                        relative eval-loss tolerance vs fp32 for the recommendation
  --no-report           skip report.ipynb / report.html
"""


def test_help_text_documents_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    assert build_parser().format_help() == HELP


@CPU_ONLY
def test_a_cuda_run_on_a_cpu_machine_is_rejected_or_recorded_without_a_plan() -> None:
    from amp_lib import workbook

    with pytest.raises(ValueError, match="CUDA is not available"):
        workbook.run_notebook_parameters({"device": "cuda"}, before=())
    result = failed_result({"precision": "fp32", "device": "cuda"}, "boom")
    assert result.plan == {"requested": "fp32", "effective": None, "fallback_reason": None}
    assert result.config["device"] == "cuda"


def test_execute_run_creates_its_folders_and_records_the_papermill_call(tmp_path: Path) -> None:
    import json

    (run,) = plan_sweep(tmp_path / "deep" / "sw", ["fp32"], [0], {"device": ["cpu"], "steps": [9]})
    settings = Settings(kernel="no-such-kernel", retries=1)
    for _ in range(2):  # the second time the runs/ folder already exists
        outcome = sw.execute_run(run, settings)
        assert (outcome.status, outcome.error) == ("failed", "NoSuchKernel: No such kernel named no-such-kernel")
    notebook = json.loads(Path(outcome.notebook).read_text())
    assert Path(outcome.notebook) == (tmp_path / "deep" / "sw").resolve() / "runs" / f"{run.name}.ipynb"
    meta = notebook["metadata"]["papermill"]
    assert meta["input_path"] == str(Path(settings.notebooks) / "train.ipynb")
    assert meta["output_path"] == outcome.notebook and meta["parameters"] == run.parameters


def test_execute_run_without_any_attempt_records_a_missing_result(tmp_path: Path) -> None:
    (run,) = plan_sweep(tmp_path / "sw", ["fp32"], [0], {"device": ["cpu"]})
    outcome = sw.execute_run(run, Settings(kernel="no-such-kernel", retries=0))
    assert (outcome.status, outcome.error) == ("failed", "the notebook finished without writing its result")
    assert RunResult.load(run.result_path).error == "the notebook finished without writing its result"


def test_cli_force_report_kernel_and_tolerance_reach_the_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sw"
    runs = _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0})
    bf16 = RunResult.load(runs[1].result_path)
    RunResult(bf16.config, bf16.plan, Metrics(tokens_per_s=1500.0, eval_loss=2.1)).save(runs[1].result_path)  # +5%
    base = ["--out", str(out), "--precisions", "fp32,bf16", *ARGS, *NO_KERNEL]
    assert main([*base, "--tolerance", "0.1"]) == 1  # the report notebook cannot start
    captured = capsys.readouterr()
    assert (
        "recommendation (gpt-tiny): bf16-mixed — the fastest precision whose eval loss stays within 10%" in captured.out
    )
    report_error = [line for line in captured.err.splitlines() if line.startswith("report failed:")]
    assert report_error == [
        (
            f"report failed: report notebook failed ({out.resolve() / 'report.ipynb'}): NoSuchKernel: No such kernel"
            " named no-such-kernel"
        )
    ]
    assert "_Tolerance: eval loss at most 10% above fp32's." in (out / "summary.md").read_text()
    assert main([*base, "--no-report"]) == 0
    assert "recommendation (gpt-tiny): fp32 — stay in fp32: bf16-mixed: eval loss" in capsys.readouterr().out
    RunResult(bf16.config, bf16.plan, status="failed", error="x").save(runs[1].result_path)
    assert main([*base, "--no-report"]) == 1  # the failed run is retried (and fails: no kernel)
    assert "2 of 2 runs done (1 executed, 1 resumed), 1 not ok" in capsys.readouterr().out
    assert main([*base, "--no-report", "--force"]) == 1
    assert "2 of 2 runs done (2 executed, 0 resumed), 2 not ok" in capsys.readouterr().out


def test_cli_without_a_baseline_recommends_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sw"
    _finished_sweep(out, {"bf16-mixed": "ok"}, {"bf16-mixed": 1500.0})
    assert main(["--out", str(out), "--precisions", "bf16", *ARGS, *NO_KERNEL, "--no-report"]) == 0
    assert "recommendation (gpt-tiny): none — no successful fp32 run" in capsys.readouterr().out


def test_write_report_writes_summary_then_exports_even_a_failed_report_notebook(tmp_path: Path) -> None:
    import json

    out = tmp_path / "sw"
    _finished_sweep(out, {"fp32": "ok", "bf16-mixed": "ok"}, {"fp32": 1000.0, "bf16-mixed": 1500.0})
    settings = Settings(kernel="no-such-kernel")
    with pytest.raises(RuntimeError) as info:
        sw.write_report(out, settings, tolerance=0.25)
    notebook = out.resolve() / "report.ipynb"
    assert str(info.value) == f"report notebook failed ({notebook}): NoSuchKernel: No such kernel named no-such-kernel"
    assert info.value.__cause__ is not None
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert summary.startswith("# AMP Workbook sweep summary") and "within 25% of fp32's" in summary
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.ipynb", "results", "summary.md"]
    meta = json.loads(notebook.read_text())["metadata"]["papermill"]
    assert meta["input_path"] == str(Path(settings.notebooks) / "compare.ipynb")
    assert meta["output_path"] == str(notebook)
    assert meta["parameters"] == {
        "sweep_dir": str(out.resolve()),
        "tolerance": 0.25,
        "figures_dir": str(out.resolve() / "figures"),
    }
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<html" in html and "comparison_table" in html  # the export of compare.ipynb's output


def test_a_value_may_contain_an_equals_sign() -> None:
    assert parse_params(["wandb_group=a=b"]) == {"wandb_group": ["a=b"]}
