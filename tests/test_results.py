"""The result schema and its atomic JSON I/O."""

from __future__ import annotations

import json
import math

import pytest

from amp_lib.results import (
    SCHEMA_VERSION,
    STATUSES,
    HistoryRow,
    Metrics,
    RunResult,
    load_results,
    write_json_atomic,
)


def sample_result(status: str = "ok", **metric_overrides) -> RunResult:
    rows = tuple(
        HistoryRow(
            step=i,
            loss=3.0 - 0.25 * i,
            loss_scale=65536.0 / (2 if i >= 2 else 1),
            grad_norm=0.5 + i,
            step_time_ms=None if i == 0 else 10.0 + i,
            skipped=i == 2,
            skipped_steps=int(i >= 2),
        )
        for i in range(4)
    )
    metrics = {
        "tokens_per_s": 1234.5,
        "step_time_ms_median": 11.5,
        "step_time_ms_p10": 11.1,
        "step_time_ms_p90": 12.9,
        "timed_steps": 3,
        "peak_memory_mb": 321.0,
        "peak_memory_kind": "cpu_rss",
        "final_train_loss": 2.25,
        "eval_loss": 2.5,
        "skipped_steps": 1,
        "final_loss_scale": 32768.0,
        "min_loss_scale": 32768.0,
    }
    metrics.update(metric_overrides)
    return RunResult(
        config={"precision": "16", "model": "gpt-tiny", "steps": 4, "grad_clip": None, "allow_slow": True},
        plan={"requested": "16", "effective": "fp16-mixed", "fallback_reason": None, "torch_version": "x"},
        metrics=Metrics(**metrics),
        history=rows,
        status=status,
        error=None if status == "ok" else "something went wrong",
    )


def no_nan_constants(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.mark.parametrize("status", STATUSES)
def test_save_load_round_trip(tmp_path, status):
    result = sample_result(status)
    path = result.save(tmp_path / "sub" / "r.json")
    assert path == tmp_path / "sub" / "r.json" and path.exists()
    loaded = RunResult.load(path)
    assert loaded == result
    assert loaded.ok is (status == "ok")
    data = no_nan_constants(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data) == {"schema_version", "config", "plan", "metrics", "history", "status", "error"}
    assert len(data["history"]) == len(result.history)


def test_result_files_are_indented_one_field_per_line(tmp_path):
    # results are read and diffed by people too: two-space indentation, one field per line
    path = sample_result().save(tmp_path / "r.json")
    lines = path.read_text().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert '  "status": "ok",' in lines and '    "tokens_per_s": 1234.5,' in lines


def test_non_finite_floats_become_null(tmp_path):
    result = sample_result("diverged", final_train_loss=math.nan, eval_loss=math.inf, min_loss_scale=-math.inf)
    result = RunResult(
        config=result.config,
        plan=result.plan,
        metrics=result.metrics,
        history=(
            *result.history,
            HistoryRow(step=4, loss=math.nan, loss_scale=math.inf, grad_norm=-math.inf, step_time_ms=1.0),
        ),
        status="diverged",
        error="loss became nan",
    )
    d = result.to_dict()
    assert d["metrics"]["final_train_loss"] is None
    assert d["metrics"]["eval_loss"] is None
    assert d["metrics"]["min_loss_scale"] is None
    assert d["metrics"]["tokens_per_s"] == result.metrics.tokens_per_s  # finite values untouched
    assert d["history"][-1] == {
        "step": 4,
        "loss": None,
        "loss_scale": None,
        "grad_norm": None,
        "step_time_ms": 1.0,
        "skipped": False,
        "skipped_steps": 0,
    }
    path = result.save(tmp_path / "d.json")
    no_nan_constants(path.read_text())
    loaded = RunResult.load(path)
    assert loaded.metrics.final_train_loss is None and loaded.history[-1].loss is None
    assert loaded.status == "diverged" and loaded.error == "loss became nan"


def test_nested_non_finite_values_in_config_and_plan(tmp_path):
    result = RunResult(config={"lr": [1.0, math.nan], "x": {"y": math.inf}}, plan={"p": (math.nan, 2.0)})
    d = result.to_dict()
    assert d["config"] == {"lr": [1.0, None], "x": {"y": None}}
    assert d["plan"] == {"p": [None, 2.0]}


def test_invalid_status_is_rejected():
    with pytest.raises(ValueError, match="'crashed'") as info:
        RunResult(config={}, plan={}, status="crashed")
    assert str(info.value).endswith("valid: " + ", ".join(STATUSES))


@pytest.mark.parametrize("version", [None, 0, SCHEMA_VERSION + 1, "1"], ids=repr)
def test_from_dict_rejects_other_schema_versions(version):
    d = sample_result().to_dict()
    if version is None:
        del d["schema_version"]
    else:
        d["schema_version"] = version
    with pytest.raises(ValueError, match="schema_version"):
        RunResult.from_dict(d)


def test_from_dict_defaults_for_missing_optional_parts():
    r = RunResult.from_dict({"schema_version": SCHEMA_VERSION, "config": {}, "plan": {}, "status": "failed"})
    assert r.metrics == Metrics() and r.history == () and r.error is None and not r.ok


# --- atomic writes -------------------------------------------------------------------------------


class Unencodable:
    pass


class ExplodingDict(dict):
    """json reads a dict subclass through items(): this one is interrupted half way."""

    def items(self):
        raise KeyboardInterrupt("interrupted mid-write")


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "r.json")


def test_write_json_atomic_replaces_the_file(tmp_path):
    target = tmp_path / "r.json"
    write_json_atomic(target, {"v": 1})
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"early": list(range(2000)), "late": Unencodable()}, TypeError),
        ({"early": list(range(2000)), "late": math.nan}, ValueError),  # strict JSON: NaN is refused
        ({"early": list(range(2000)), "late": ExplodingDict(a=1)}, KeyboardInterrupt),
    ],
    ids=["unencodable", "nan", "interrupted"],
)
def test_interrupted_write_keeps_the_old_file_and_no_temp_files(tmp_path, bad, error):
    target = tmp_path / "r.json"
    old = sample_result()
    old.save(target)
    before = target.read_bytes()
    with pytest.raises(error):
        write_json_atomic(target, bad)
    assert target.read_bytes() == before
    assert RunResult.load(target) == old
    assert leftovers(tmp_path) == []


def test_a_write_in_progress_is_a_hidden_temp_file_that_load_results_skips(tmp_path):
    target = tmp_path / "r.json"
    seen = {}

    class Peek(dict):
        """json reads a dict subclass through items(): look at the folder mid-write."""

        def items(self):
            seen["names"] = sorted(p.name for p in tmp_path.iterdir())
            seen["loaded"] = load_results(tmp_path)
            return super().items()

    write_json_atomic(target, {"v": Peek(a=1)})
    (temp,) = seen["names"]  # only the temp file exists while the data is being written
    assert temp.startswith(".r.json.") and temp.endswith(".tmp")
    assert seen["loaded"] == []
    assert json.loads(target.read_text()) == {"v": {"a": 1}}
    assert leftovers(tmp_path) == []


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "new" / "r.json", {"a": 1, "b": Unencodable()})
    assert list((tmp_path / "new").iterdir()) == []


# --- load_results --------------------------------------------------------------------------------


def test_load_results_finds_complete_files_recursively_sorted(tmp_path):
    a = sample_result("ok")
    b = sample_result("failed")
    c = sample_result("oom")
    b.save(tmp_path / "b.json")
    a.save(tmp_path / "a.json")
    c.save(tmp_path / "nested" / "deeper" / "c.json")
    (tmp_path / ".a.json.123.tmp").write_text("{ half a fi")  # a temp file of a write in progress
    (tmp_path / ".hidden.json").write_text("{ half")
    (tmp_path / "notes.txt").write_text("not a result")
    assert load_results(tmp_path) == [a, b, c]


def test_load_results_of_an_empty_or_missing_folder(tmp_path):
    assert load_results(tmp_path) == []
    assert load_results(tmp_path / "missing") == []
