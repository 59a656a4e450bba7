"""The result schema, its value cleaning (finite_or_none, first_line) and its atomic JSON/text I/O."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import history, make_result

from amp_lib import results
from amp_lib.results import (
    MANIFEST,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    STATUSES,
    HistoryRow,
    LoadProblem,
    Metrics,
    RunResult,
    finite_or_none,
    first_line,
    load_results,
    load_sweep,
    read_result,
    write_json_atomic,
    write_text_atomic,
)

EVERY_METRIC = {
    "step_time_ms_median": 11.5,
    "step_time_ms_p10": 11.1,
    "step_time_ms_p90": 12.9,
    "timed_steps": 3,
    "peak_memory_kind": "cpu_rss",
    "mfu": 0.125,
}


def sample_result(status: str = "ok", **figures: Any) -> RunResult:
    """A result with every field set: an fp16 run whose loss scale halved at a skipped step. `figures`
    are `make_result`'s metric keywords (tps, eval_loss, min_scale...)."""
    rows = history(4, scaled=True, skip_at=2)
    rows = (replace(rows[0], step_time_ms=None, grad_norm=0.5), *rows[1:])  # an untimed first step
    figures = {
        "tps": 1234.5,
        "mem": 321.0,
        "final_loss": 2.25,
        "eval_loss": 2.5,
        "skipped": 1,
        "final_scale": 32768.0,
        "min_scale": 32768.0,
        **figures,
    }
    return make_result(
        "16",
        effective="fp16-mixed",
        status=status,
        error=None if status == "ok" else "something went wrong\n  at line 3",
        rows=rows,
        metrics=EVERY_METRIC,
        steps=4,
        grad_clip=None,
        allow_slow=True,
        **figures,
    )


def no_nan_constants(text: str) -> Any:
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


# --- finite_or_none and first_line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2.0, 2.0),
        (3, 3.0),
        ("1.5", 1.5),
        (torch.tensor(2.5), 2.5),
        (Decimal("0.25"), 0.25),
        (-0.0, 0.0),
        (1e308, 1e308),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        ("nan", None),
        ("inf", None),
        pytest.param(10**400, None, id="10**400"),  # too large for a float: None, not OverflowError
        (None, None),
        (True, None),
        (False, None),
        ("x", None),
        ([], None),
    ],
    ids=repr,
)
def test_finite_or_none(value: Any, expected: float | None) -> None:
    got = finite_or_none(value)
    assert got == expected and (got is None or type(got) is float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("", None),
        (" \n \t\n ", None),
        ("one", "one"),
        ("\n  first  \nsecond", "first  "),  # leading blank lines and indentation go, the line stays whole
        ("\n\n  \nRuntimeError: boom\n  more", "RuntimeError: boom"),
        ("a\r\nb", "a"),
    ],
    ids=repr,
)
def test_first_line_is_the_first_non_blank_line(text: str | None, expected: str | None) -> None:
    assert first_line(text) == expected


# --- RunResult: status, ok, error_line -----------------------------------------------------------


def test_invalid_status_is_rejected() -> None:
    with pytest.raises(ValueError, match="'crashed'") as info:
        RunResult(config={}, plan={}, status="crashed")
    assert str(info.value) == "invalid status 'crashed'; valid: " + ", ".join(STATUSES)
    assert STATUSES == ("ok", "failed", "oom", "diverged")


@pytest.mark.parametrize("status", STATUSES)
def test_ok_means_status_ok(status: str) -> None:
    assert make_result(status=status).ok is (status == "ok")


def test_error_line_is_the_first_line_of_the_error() -> None:
    failed = make_result(status="failed", error="\n  Traceback (most recent call last):\n  File x\nValueError: boom")
    assert failed.error_line == "Traceback (most recent call last):"
    assert make_result().error_line is None
    assert make_result(status="failed", error=" \n ").error_line is None


# --- schema: round trip, non-finite values, versions ---------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_save_load_round_trip(tmp_path: Path, status: str) -> None:
    result = sample_result(status)
    path = result.save(tmp_path / "sub" / "r.json")
    assert path == tmp_path / "sub" / "r.json" and path.exists()
    loaded = RunResult.load(path)
    assert loaded == result
    assert loaded.ok is (status == "ok")
    data = no_nan_constants(path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 2
    assert set(data) == {
        "schema_version",
        "config",
        "plan",
        "metrics",
        "history",
        "evals",
        "headroom",
        "profile",
        "timing",
        "fp8_layers",
        "memory",
        "energy",
        "status",
        "error",
    }
    assert data["metrics"]["items_per_s"] == 1234.5 and "tokens_per_s" not in data["metrics"]
    assert data["metrics"]["mfu"] == 0.125 and data["metrics"]["peak_memory_kind"] == "cpu_rss"
    assert data["config"]["grad_clip"] is None and data["config"]["allow_slow"] is True
    assert len(data["history"]) == len(result.history) == 4
    assert data["history"][0]["step_time_ms"] is None and data["history"][2]["skipped"] is True


def test_result_files_are_indented_one_field_per_line(tmp_path: Path) -> None:
    # results are read and diffed by people too: two-space indentation, one field per line
    path = sample_result().save(tmp_path / "r.json")
    lines = path.read_text().splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert '  "status": "ok",' in lines and '    "items_per_s": 1234.5,' in lines


def test_non_finite_floats_become_null(tmp_path: Path) -> None:
    result = sample_result("diverged", final_loss=math.nan, eval_loss=math.inf, min_scale=-math.inf)
    result = replace(
        result,
        history=(
            *result.history,
            HistoryRow(step=4, loss=math.nan, loss_scale=math.inf, grad_norm=-math.inf, step_time_ms=1.0),
        ),
        error="loss became nan",
    )
    d = result.to_dict()
    assert d["metrics"]["final_train_loss"] is None
    assert d["metrics"]["eval_loss"] is None
    assert d["metrics"]["min_loss_scale"] is None
    assert d["metrics"]["items_per_s"] == result.metrics.items_per_s == 1234.5  # finite values untouched
    assert d["history"][-1] == {
        "step": 4,
        "loss": None,
        "loss_scale": None,
        "grad_norm": None,
        "step_time_ms": 1.0,
        "skipped": False,
        "skipped_steps": 0,
        "lr": None,
    }
    path = result.save(tmp_path / "d.json")
    no_nan_constants(path.read_text())
    loaded = RunResult.load(path)
    assert loaded.metrics.final_train_loss is None and loaded.history[-1].loss is None
    assert loaded.status == "diverged" and loaded.error == "loss became nan"


def test_nested_non_finite_values_in_config_and_plan() -> None:
    result = RunResult(
        config={"lr": [1.0, math.nan], "x": {"y": math.inf}, "n": 3, "b": True}, plan={"p": (math.nan, 2.0)}
    )
    d = result.to_dict()
    assert d["config"] == {"lr": [1.0, None], "x": {"y": None}, "n": 3, "b": True}
    assert type(d["config"]["n"]) is int and d["config"]["b"] is True  # ints and bools are not turned into floats
    assert d["plan"]["p"] == [None, 2.0] and d["plan"]["effective"] is None  # unknown keys kept, known ones typed


def test_a_version_1_file_loads_with_tokens_per_s_as_items_per_s(tmp_path: Path) -> None:
    current = sample_result()
    old = current.to_dict()
    old["schema_version"] = 1
    old["metrics"] = {("tokens_per_s" if k == "items_per_s" else k): v for k, v in old["metrics"].items()}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(old))
    loaded = RunResult.load(path)
    assert loaded.metrics.items_per_s == 1234.5
    assert loaded == current and loaded.schema_version == SCHEMA_VERSION  # read as, and saved again as, v2
    assert "items_per_s" in loaded.to_dict()["metrics"] and "tokens_per_s" not in loaded.to_dict()["metrics"]
    del old["metrics"]["tokens_per_s"]  # a v1 run that never measured throughput
    assert RunResult.from_dict(old).metrics.items_per_s is None
    assert RunResult.from_dict({**old, "metrics": {}}).metrics == Metrics()


def test_a_version_2_file_keeps_its_items_per_s() -> None:
    d = sample_result().to_dict()
    assert d["schema_version"] == 2
    assert RunResult.from_dict(d).metrics.items_per_s == 1234.5  # the v1 rename is not applied to v2 files


@pytest.mark.parametrize("version", [None, 0, 3, SCHEMA_VERSION + 1, "1", "2"], ids=repr)
def test_unsupported_schema_versions_are_named_in_the_error(version: Any) -> None:
    d = sample_result().to_dict()
    if version is None:
        del d["schema_version"]
    else:
        d["schema_version"] = version
    with pytest.raises(ValueError) as info:
        RunResult.from_dict(d)
    assert str(info.value) == f"unsupported schema_version {version!r}; this amp_lib reads 1, 2"
    assert READABLE_VERSIONS == (1, 2)


def test_from_dict_defaults_for_missing_optional_parts() -> None:
    r = RunResult.from_dict({"schema_version": SCHEMA_VERSION, "config": {}, "plan": {}, "status": "failed"})
    assert r.metrics == Metrics() and r.history == () and r.error is None and not r.ok


# --- atomic writes -------------------------------------------------------------------------------


class Unencodable:
    pass


class ExplodingDict(dict):
    """json reads a dict subclass through items(): this one is interrupted half way."""

    def items(self):
        raise KeyboardInterrupt("interrupted mid-serialisation")


def leftovers(folder: Path, keep: str = "r.json") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_a_plain_open_gives_under_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        text = write_text_atomic(tmp_path / "a.md", "x")
        result = sample_result().save(tmp_path / "r.json")
    finally:
        os.umask(old)
    assert (text.stat().st_mode & 0o777, result.stat().st_mode & 0o777) == (mode, mode)  # not mkstemp's 0600


def test_write_text_atomic_writes_utf8_and_replaces_the_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "summary.md"
    long_text = "Δ eval ± 0.5 — " * 1000
    assert write_text_atomic(target, long_text) == target  # parent folders are created
    assert target.read_bytes() == long_text.encode("utf-8")
    assert write_text_atomic(str(target), "short\n") == target  # a str path works too
    assert target.read_bytes() == b"short\n"  # replaced whole: no tail of the longer text is left
    assert leftovers(target.parent, keep="summary.md") == []


def test_write_text_atomic_shows_only_a_hidden_temp_file_while_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    sample_result().save(target)
    seen: dict[str, Any] = {}
    real_fsync = os.fsync

    def peek(fd: int) -> None:  # the data is written and flushed, not yet renamed into place
        real_fsync(fd)
        seen["names"] = leftovers(tmp_path)
        seen["target"] = target.read_text()
        seen["loaded"] = load_results(tmp_path)
        seen["temp"] = (tmp_path / seen["names"][0]).read_text()

    monkeypatch.setattr(os, "fsync", peek)
    write_text_atomic(target, '{"new": 1}')
    (temp,) = seen["names"]
    assert temp.startswith(".r.json.") and temp.endswith(".tmp")
    assert seen["temp"] == '{"new": 1}'
    assert json.loads(seen["target"])["status"] == "ok"  # the old file is whole until the rename
    assert seen["loaded"] == [sample_result()]  # load_results skips the temp file
    assert target.read_text() == '{"new": 1}' and leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_in", ["write", "fsync", "replace"])
def test_a_failed_text_write_keeps_the_old_file_and_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_in: str
) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    text = "x" * 100_000 + "\ud800"  # a lone surrogate cannot be encoded: fails after the temp file exists
    if fail_in != "write":
        text = "new"

        def interrupted(*args: Any) -> None:
            raise KeyboardInterrupt(fail_in)  # BaseException too: Ctrl-C must not leave temp files behind

        monkeypatch.setattr(os, fail_in, interrupted)
    with pytest.raises(UnicodeEncodeError if fail_in == "write" else KeyboardInterrupt):
        write_text_atomic(target, text)
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_a_failed_first_text_write_leaves_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(tmp_path / "new" / "r.json", "\ud800")
    assert list((tmp_path / "new").iterdir()) == []


def test_an_interrupt_just_after_the_rename_is_the_error_raised_and_the_new_file_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    real_replace = os.replace

    def replace_then_interrupt(src: str, dst: Path) -> None:
        real_replace(src, dst)
        raise KeyboardInterrupt("Ctrl-C right after the rename")  # the temp file is gone already

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux tells the umask in /proc")
def test_writing_a_file_never_changes_the_process_umask_where_proc_tells_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The umask is process-wide: setting it to read it, even briefly, gives a file another thread creates meanwhile
    # the wrong mode. Where /proc says what it is, nothing sets it.
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask was set to read it"))
        written = write_text_atomic(tmp_path / "a.md", "x")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert written.stat().st_mode & 0o777 == 0o640


# Run with an ASCII locale encoding: Python fixes it at start-up, hence a child process. results.py needs only the
# standard library, so the child loads that one file (no torch import: fast).
IN_AN_ASCII_LOCALE = r"""
import importlib.util, json, sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("results_alone", sys.argv[1])
results = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = results
spec.loader.exec_module(results)
folder = Path(sys.argv[2])
results.write_text_atomic(folder / "summary.md", "\u0394 eval \u00b1 0.5")
loaded = results.load_sweep(folder)
read = results.read_result(folder / "results" / "new.json")
print(json.dumps({
    "encoding": __import__("locale").getpreferredencoding(False),
    "load": results.RunResult.load(folder / "results" / "new.json").config["note"],
    "read": str(read) if isinstance(read, results.LoadProblem) else read.config["note"],
    "sweep": [r.config["run_name"] for r in loaded],
    "problems": [str(p) for p in loaded.problems],
}))
"""


def test_result_files_are_utf8_whatever_the_locale(tmp_path: Path) -> None:
    # JSON is UTF-8 (RFC 8259): a file another tool or an editor wrote with unescaped non-ASCII text must load
    note = "Δ eval ± 0.5 — naïve"
    for name in ("new", "old"):
        data = make_result("fp32", run_name=name).to_dict()
        data["config"]["note"] = note
        (tmp_path / "results").mkdir(exist_ok=True)
        (tmp_path / "results" / f"{name}.json").write_bytes(json.dumps(data, ensure_ascii=False).encode("utf-8"))
    manifest = {"runs": ["new"], "title": note}
    (tmp_path / MANIFEST).write_bytes(json.dumps(manifest, ensure_ascii=False).encode("utf-8"))
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    child = subprocess.run(
        [sys.executable, "-c", IN_AN_ASCII_LOCALE, results.__file__, str(tmp_path)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen["encoding"].lower() in ("ascii", "ansi_x3.4-1968")  # the child really ran in an ASCII locale
    assert (seen["load"], seen["read"]) == (note, note)
    assert (seen["sweep"], seen["problems"]) == (["new"], [])  # the manifest was read: "old" is left out
    assert (tmp_path / "summary.md").read_bytes() == "Δ eval ± 0.5".encode()


def test_write_json_atomic_is_indented_json_and_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    assert write_json_atomic(target, {"v": 1, "w": [1]}) == target
    assert target.read_text() == '{\n  "v": 1,\n  "w": [\n    1\n  ]\n}'
    write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"early": list(range(2000)), "late": Unencodable()}, TypeError),
        ({"early": list(range(2000)), "late": math.nan}, ValueError),  # strict JSON: NaN is refused
        ({"early": list(range(2000)), "late": math.inf}, ValueError),
        ({"early": list(range(2000)), "late": ExplodingDict(a=1)}, KeyboardInterrupt),
    ],
    ids=["unencodable", "nan", "inf", "interrupted"],
)
def test_unserialisable_json_keeps_the_old_file_and_leaves_no_temp_files(
    tmp_path: Path, bad: dict[str, Any], error: type[BaseException]
) -> None:
    target = tmp_path / "r.json"
    old = sample_result()
    old.save(target)
    before = target.read_bytes()
    with pytest.raises(error):
        write_json_atomic(target, bad)
    assert target.read_bytes() == before
    assert RunResult.load(target) == old
    assert leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "new" / "r.json", {"a": 1, "b": Unencodable()})
    assert not (tmp_path / "new").exists()  # serialised before anything is created


# --- load_results and load_sweep -----------------------------------------------------------------


def test_load_results_finds_complete_files_recursively_sorted(tmp_path: Path) -> None:
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
    assert load_results(str(tmp_path)) == [a, b, c]
    assert load_results(tmp_path).problems == ()  # hidden files are not results, nor problems to report


def test_load_results_of_an_empty_or_missing_folder(tmp_path: Path) -> None:
    assert load_results(tmp_path) == []
    assert load_results(tmp_path / "missing") == []


def test_load_sweep_prefers_the_results_folder_else_reads_a_flat_folder(tmp_path: Path) -> None:
    make_result("fp32").save(tmp_path / "flat" / "a.json")
    assert [r.config["precision"] for r in load_sweep(tmp_path / "flat")] == ["fp32"]
    (tmp_path / "flat" / MANIFEST).write_text(json.dumps({"runs": ["b"]}))  # a grid is a sweep's, of its results/
    assert [r.config["precision"] for r in load_sweep(tmp_path / "flat")] == ["fp32"]  # a folder of JSONs has none
    make_result("fp16-mixed").save(tmp_path / "sweep" / "results" / "a.json")
    make_result("bf16-mixed").save(tmp_path / "sweep" / "elsewhere" / "b.json")  # not in this sweep's layout
    (tmp_path / "sweep" / "runs").mkdir()
    assert [r.config["precision"] for r in load_sweep(tmp_path / "sweep")] == ["fp16-mixed"]
    assert [r.config["precision"] for r in load_sweep(str(tmp_path / "sweep" / "elsewhere"))] == ["bf16-mixed"]
    (tmp_path / "empty" / "results").mkdir(parents=True)
    make_result("fp32").save(tmp_path / "empty" / "a.json")
    assert load_sweep(tmp_path / "empty") == []  # an empty results/ folder still wins over the files beside it


def test_unreadable_truncated_and_foreign_json_files_are_named_with_the_reason_never_raised(tmp_path: Path) -> None:
    good = sample_result("ok")
    good.save(tmp_path / "good.json")
    text = json.dumps(good.to_dict())
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    (tmp_path / "hello.json").write_text('{"hello": 1}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "future.json").write_text(json.dumps({**good.to_dict(), "schema_version": 99}))
    (tmp_path / "keys.json").write_text('{"schema_version": 2}')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "folder.json").mkdir()  # unreadable as a file, even for root
    loaded = load_results(tmp_path)
    assert loaded == [good]  # the good result is still read
    reasons = {p.path.name: p.reason for p in loaded.problems}
    assert reasons == {
        "binary.json": "not text (not a result file)",
        "folder.json": "unreadable (Is a directory)",
        "future.json": "not a readable result of this schema (unsupported schema_version 99; this amp_lib reads 1, 2)",
        "hello.json": "not an AMP Workbook result (no schema_version)",
        "keys.json": "not a readable result of this schema (missing key 'config')",
        "list.json": "not an AMP Workbook result (no schema_version)",
        "truncated.json": reasons["truncated.json"],
    }
    assert reasons["truncated.json"].startswith("not valid JSON, truncated or corrupt (")
    assert [p.path for p in loaded.problems] == sorted(p.path for p in loaded.problems)
    assert str(loaded.problems[0]) == "binary.json: not text (not a result file)"
    assert loaded.notes[0] == "not read: binary.json: not text (not a result file)" and len(loaded.notes) == 7
    assert read_result(tmp_path / "good.json") == good
    assert read_result(tmp_path / "gone.json") == LoadProblem(
        tmp_path / "gone.json", "unreadable (No such file or directory)"
    )
    swept = load_sweep(tmp_path)
    assert swept == [good] and swept.problems == loaded.problems and swept.left_out == ()


def test_a_sweep_folder_returns_the_runs_of_its_last_grid_and_names_the_others(tmp_path: Path) -> None:
    results_dir = tmp_path / "results"
    old, new = make_result("fp32", run_name="old"), make_result("bf16-mixed", run_name="new")
    old.save(results_dir / "old.json")
    new.save(results_dir / "new.json")
    assert load_sweep(tmp_path) == [new, old]  # no sweep.json (a folder from before it existed): every result
    (tmp_path / MANIFEST).write_text(json.dumps({"runs": ["new", "never-ran"]}))
    loaded = load_sweep(tmp_path)
    assert loaded == [new] and loaded.problems == ()
    assert loaded.left_out == (
        LoadProblem(results_dir / "old.json", "from an earlier grid, not part of the one this sweep was last run with"),
    )
    assert loaded.notes == [
        "left out: old.json: from an earlier grid, not part of the one this sweep was last run with"
    ]
    assert load_results(results_dir) == [new, old]  # a plain folder of results has no grid
    for manifest in (
        "{ half",
        '{"runs": "new"}',
        '{"runs": {"new": 1}}',
        '{"runs": 3}',
        '["new"]',
        '{"grid": ["new"]}',
    ):
        (tmp_path / MANIFEST).write_text(manifest)
        assert load_sweep(tmp_path) == [new, old], manifest  # an unreadable or malformed manifest hides nothing


@pytest.mark.parametrize("missing", ["missing", "a-file.json"])
def test_load_sweep_names_a_path_that_is_not_a_folder(tmp_path: Path, missing: str) -> None:
    make_result().save(tmp_path / "a-file.json")
    with pytest.raises(ValueError) as info:
        load_sweep(tmp_path / missing)
    assert str(info.value) == f"sweep_dir {str(tmp_path / missing)!r} is not a folder"
    with pytest.raises(ValueError, match="is not a folder"):
        load_sweep(str(tmp_path / missing))


def test_results_is_io_only_and_does_not_re_export_the_report() -> None:
    # the report imports results, never the other way round (the old re-exports made an import cycle)
    for name in ("comparison_table", "recommend", "recommendations", "format_table", "summary_markdown"):
        assert not hasattr(results, name)


def test_eval_curves_headroom_and_profile_round_trip(tmp_path: Path) -> None:
    from amp_lib.results import EvalRow

    result = RunResult(
        config={"precision": "fp16-mixed"},
        plan={"effective": "fp16-mixed"},
        metrics=Metrics(
            best_eval_loss=1.5, train_time_s=2.0, param_memory_mb=1.0, grad_memory_mb=1.0, optimizer_memory_mb=2.0
        ),
        history=(HistoryRow(step=0, loss=2.0, loss_scale=1024.0, grad_norm=1.0, step_time_ms=None, lr=1e-4),),
        evals=(EvalRow(step=5, loss=1.6, elapsed_s=1.0), EvalRow(step=10, loss=None, elapsed_s=2.0)),
        headroom={"every": 2, "modules": ["fc"], "samples": [], "first_overflow": [{"step": 3, "module": "fc"}]},
        profile={"step": 1, "wall_ms": 3.0, "busy_ms": {"matmul": 1.0}},
    )
    loaded = RunResult.load(result.save(tmp_path / "r.json"))
    assert loaded.evals == result.evals and loaded.headroom == result.headroom and loaded.profile == result.profile
    assert loaded.evals[1].loss is None and loaded.history[0].lr == 1e-4
    # an "ok" result whose eval loss is not finite (NaN, null in the file) is what it is: diverged
    assert (result.status, loaded.status) == ("diverged", "diverged") and "eval loss is not finite" in loaded.error
    old = {
        "schema_version": 1,
        "config": {"warmup_steps": 3},
        "plan": {},
        "status": "ok",
        "metrics": {"tokens_per_s": 9.0},
    }
    upgraded = RunResult.from_dict(old)
    assert upgraded.config == {"timing_warmup_steps": 3} and upgraded.metrics.items_per_s == 9.0
    assert (upgraded.evals, upgraded.headroom, upgraded.profile) == ((), None, None)


# --- runs over several processes: per-rank memory, global items per step -----------------------------


def test_the_per_rank_fields_round_trip_and_a_file_without_them_still_loads(tmp_path: Path) -> None:
    metrics = Metrics(peak_memory_mb=30.0, peak_memory_mb_ranks=(30.0, 24.5), items_per_step=256, eval_loss=2.0)
    result = RunResult(config={"nproc": 2}, plan={"reduce_dtype": "bf16"}, metrics=metrics)
    loaded = RunResult.load(result.save(tmp_path / "r.json"))
    assert loaded == result and loaded.metrics.peak_memory_mb_ranks == (30.0, 24.5)
    assert loaded.metrics.peak_memory_spread_mb == 5.5 and Metrics().peak_memory_spread_mb is None
    older = result.to_dict()
    for name in ("peak_memory_mb_ranks", "items_per_step", "comm_time_ms"):
        del older["metrics"][name]
    back = RunResult.from_dict(older)
    assert back.metrics.items_per_step is None and back.metrics.peak_memory_mb_ranks is None
    assert back.schema_version == 2


# --- fp8 layer plans, the memory split, energy and the optimizer: typed at the seam ----------------------


def test_the_fp8_layer_plan_memory_split_and_energy_are_typed_records_through_the_file(tmp_path: Path) -> None:
    from amp_lib.energy import EnergyReading
    from amp_lib.fp8 import LayerPlan, LinearDecision
    from amp_lib.memtrack import MemorySplit

    layers = LayerPlan("fp8-rowwise", "rowwise", "lm_head", True, ("output", "grad_input", "grad_weight"),
                       (LinearDecision("fc", 64, 64, True, "eligible: dims multiples of 16"),
                        LinearDecision("lm_head", 64, 65, False, "kept in high precision by pattern 'lm_head'")),
                       tokens_per_step=512)  # fmt: skip
    memory = MemorySplit("MemTracker", "cpu", 3.0, 1.0, 0.0, 0.5, 1.0, 0.4, 0.1, 0.0, {"Parameter": 1.0}, 400.0, 410.0)
    energy = EnergyReading(None, reason="no NVIDIA GPU: the run is on cpu")
    result = replace(make_result("fp8-rowwise", plan={"emulated": True, "fp8_layers": "lm_head"}, optimizer="adamw-8bit"),
                     fp8_layers=layers, memory=memory, energy=energy)  # fmt: skip
    loaded = RunResult.load(result.save(tmp_path / "r.json"))
    assert loaded == result
    assert isinstance(loaded.fp8_layers, LayerPlan) and loaded.fp8_layers.high_precision_fqns == ("lm_head",)
    assert isinstance(loaded.memory, MemorySplit) and loaded.memory.tracked
    assert loaded.energy.joules is None and loaded.energy.reason == "no NVIDIA GPU: the run is on cpu"
    assert loaded.plan.emulated is True and loaded.plan.fp8_layers == "lm_head" and loaded.plan.extra == {}
    assert loaded.row.label == "fp8-rowwise adamw-8bit" and loaded.optimizer == "adamw-8bit"
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["fp8_layers"]["decisions"][1]["reason"] == "kept in high precision by pattern 'lm_head'"
    assert data["energy"]["devices"] == [] and data["memory"]["detail_mb"] == {"Parameter": 1.0}


def test_an_older_result_has_none_of_them_and_the_optimizer_it_ran_adamw(tmp_path: Path) -> None:
    data = make_result("fp32").to_dict()
    for key in ("fp8_layers", "memory", "energy"):
        del data[key]
    old = RunResult.from_dict(data)
    assert (old.fp8_layers, old.memory, old.energy, old.optimizer) == (None, None, None, "adamw")
    assert not old.plan.emulated and old.plan.fp8_layers is None
