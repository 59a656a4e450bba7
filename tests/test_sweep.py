"""`python -m amp_lib.sweep` end to end on the CPU: real papermill runs of train.ipynb and compare.ipynb."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amp_lib.precision import native_precisions, probe
from amp_lib.results import RunResult, load_sweep
from amp_lib.sweep import (
    DEVICE_DEFAULTS,
    PlannedRun,
    Settings,
    _is_port_race,
    _visible_gpus,
    failed_result,
    is_complete,
    main,
    parse_params,
    plan_sweep,
    run_sweep,
)

TINY = ["-p", "steps=8", "-p", "warmup_steps=2", "-p", "batch_size=4", "-p", "seq_len=32", "-p", "log_every=2"]
QUIET = ["-p", "wandb_mode=disabled"]  # W&B itself is tested in test_tracking; here it would only cost time
TWO = ["--precisions", "fp32,bf16-mixed", "--seeds", "0", *TINY, *QUIET]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-precision sweep with the report, shared by this module's tests (given a relative --out)."""
    root, cwd = tmp_path_factory.mktemp("sweeps"), os.getcwd()
    os.chdir(root)
    try:
        assert main(["--out", "two", *TWO]) == 0
    finally:
        os.chdir(cwd)
    return root / "two"


def test_two_precision_sweep_writes_results_notebooks_and_report(sweep_dir: Path) -> None:
    names = ["gpt-tiny-fp32-s0", "gpt-tiny-bf16-mixed-s0"]
    for name in names:
        result = RunResult.load(sweep_dir / "results" / f"{name}.json")
        assert result.ok and result.config["steps"] == 8 and result.config["run_name"] == name
        assert (sweep_dir / "runs" / f"{name}.ipynb").exists()
    assert {r.plan["effective"] for r in load_sweep(sweep_dir)} == {"fp32", "bf16-mixed"}
    summary = (sweep_dir / "summary.md").read_text()
    assert "| fp32 | fp32 | ok |" in summary and "| bf16-mixed | bf16-mixed | ok |" in summary
    assert "**Recommendation (gpt-tiny):" in summary
    html = (sweep_dir / "report.html").read_text()
    assert "amp-comparison" in html and "Recommendation" in html and "data:image/png;base64" in html
    report_nb = json.loads((sweep_dir / "report.ipynb").read_text())
    assert report_nb["metadata"]["papermill"]["parameters"]["sweep_dir"] == str(sweep_dir.resolve())
    assert sorted(p.name for p in (sweep_dir / "figures").glob("*.png")) == [
        "loss.png",
        "loss_scale.png",
        "throughput_memory.png",
    ]


def test_rerun_resumes_without_executing_finished_runs(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamps = {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "results").glob("*.json")}
    assert main(["--out", str(sweep_dir), *TWO, "--no-report"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (sweep_dir / "results").glob("*.json")} == stamps
    assert "2 of 2 runs done (0 executed, 2 resumed)" in capsys.readouterr().out


def test_completeness_requires_the_same_parameters(sweep_dir: Path) -> None:
    grid = parse_params(
        ["steps=8", "warmup_steps=2", "batch_size=4", "seq_len=32", "log_every=2", "wandb_mode=disabled"]
    )
    (same,) = plan_sweep(sweep_dir, ["fp32"], [0], grid)
    assert is_complete(same)
    (other,) = plan_sweep(sweep_dir, ["fp32"], [0], {**grid, "steps": [9]})
    assert other.name == same.name and not is_complete(other)  # same name, different run: not skipped


def test_failing_runs_are_isolated_and_recorded_with_their_error(tmp_path: Path) -> None:
    # A misspelt parameter fails the notebook before it writes a result (so the sweep writes one);
    # seq_len=512 exceeds gpt-tiny's block size inside train(), which writes its `failed` result itself.
    grid = parse_params([*(v for v in TINY if v != "-p"), "seq_len=512", "wandb_mode=disabled"])
    (too_long,) = plan_sweep(tmp_path, ["fp32"], [0], grid)
    typo = PlannedRun("typo", {**too_long.parameters, "seq_len": 32, "run_name": "typo", "stepz": 3})
    outcomes, interrupted = run_sweep([typo, too_long], Settings(), workers=1)
    assert not interrupted and [(o.name, o.status) for o in outcomes] == [("typo", "failed"), (too_long.name, "failed")]
    assert outcomes[0].error.startswith(
        "ValueError: unknown parameter(s) 'stepz'; valid names: precision, model, steps"
    )
    assert outcomes[1].error.startswith("ValueError: seq_len=512 exceeds gpt-tiny's block size 256")
    results = {r.config["run_name"]: r for r in load_sweep(tmp_path)}
    assert results["typo"].config["stepz"] == 3 and results["typo"].plan["effective"] == "fp32"  # written by the sweep
    assert results[too_long.name].config["seq_len"] == 512 and results[too_long.name].history == ()
    assert (tmp_path / "runs" / "typo.ipynb").exists()  # the executed notebook shows the error


def test_bad_command_lines_name_the_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("-p", "stepz=3"): "unknown parameter 'stepz'; valid names: model, steps",
        ("-p", "steps=abc"): "invalid value 'abc' for steps (expected int)",
        ("-p", "precision=fp16"): "use --precisions / --seeds",
        ("--precisions", "fp33"): "invalid precision 'fp33'; valid values are: fp32, tf32",
        ("--seeds", "a"): "invalid --seeds 'a'",
        ("--workers", "0"): "invalid --workers 0",
        ("-p", "steps"): "invalid -p 'steps'; expected key=value",
    }
    for argv, message in cases.items():
        assert main(["--out", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_default_sweep_uses_native_precisions_and_device_defaults(tmp_path: Path) -> None:
    runs = plan_sweep(tmp_path, None, [0, 1], parse_params(["lr=1e-3,3e-3", "grad_clip=none", "allow_slow=false"]))
    precisions = native_precisions(probe())
    assert len(runs) == 2 * 2 * len(precisions)
    first = runs[0].parameters
    assert first["model"] == "gpt-tiny" and first["steps"] == DEVICE_DEFAULTS["cpu"]["steps"]
    assert first["grad_clip"] is None and first["allow_slow"] is False and first["lr"] == 0.001
    assert first["out_dir"] == str(tmp_path.resolve() / "results") and first["wandb_group"] == tmp_path.name
    assert runs[0].name == f"gpt-tiny-{precisions[0]}-s0-lr=0.001"
    assert len({r.name for r in runs}) == len(runs)
    with pytest.raises(ValueError, match="must not repeat"):
        plan_sweep(tmp_path, ["fp32", "32"], [0])


def test_failed_result_records_what_is_known_of_a_broken_config() -> None:
    result = failed_result(
        {"precision": "fp33", "steps": 3, "wandb_mode": "disabled"}, "ValueError: invalid precision 'fp33'"
    )
    assert result.status == "failed" and result.config["steps"] == 3 and "wandb_mode" not in result.config
    assert result.plan == {"requested": "fp33", "effective": None, "fallback_reason": None}


def test_runs_that_cannot_start_are_reported_one_line_each_and_exit_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--precisions", "fp32", *TINY, "--kernel", "no-such-kernel"]
    assert main([*argv, "--workers", "2"]) == 1  # the pool path (a worker process), with no kernel to start
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("FAILED")] == [
        "FAILED failed   gpt-tiny-fp32-s0: NoSuchKernel: No such kernel named no-such-kernel",
    ]
    assert "report failed: report notebook failed" in err
    assert {r.status for r in load_sweep(tmp_path)} == {"failed"}
    assert "| failed |" in (tmp_path / "summary.md").read_text()  # written from Python even without the notebook


def test_kernel_port_races_are_recognised_through_exception_chains() -> None:
    try:
        try:
            raise OSError("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:5555')")
        except OSError as inner:
            raise RuntimeError("kernel start failed") from inner
    except RuntimeError as outer:
        assert _is_port_race(outer)
    assert not _is_port_race(ValueError("batch_size=0 must be >= 1"))


def test_each_worker_gets_its_own_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert _visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _visible_gpus() == []
