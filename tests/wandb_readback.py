"""Read an offline W&B run back from disk, the way wandb itself prints it: `wandb leet inspect --json`.

Offline runs write no `wandb-summary.json`; the `.wandb` transaction log is the only record, and
`wandb leet inspect` (wandb >= 0.2x) prints its records as JSON lines, or the run's state, config and
summary as one object with `--summary`. Tests assert on what these return, so what is checked is what
W&B actually stored, not what the code meant to send.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def wandb_cli() -> str:
    """The `wandb` executable of this interpreter's environment (falls back to PATH)."""
    local = Path(sys.executable).with_name("wandb")
    if local.exists():
        return str(local)
    found = shutil.which("wandb")
    if found is None:
        raise RuntimeError("the wandb CLI is not installed next to the interpreter nor on PATH")
    return found


def _inspect(run_dir: str | Path, *extra: str) -> str:
    proc = subprocess.run(
        [wandb_cli(), "leet", "inspect", "--json", *extra, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wandb leet inspect failed ({proc.returncode}) on {run_dir}: {proc.stderr.strip()}")
    return proc.stdout


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of the run's .wandb log, in write order (one JSON object per record)."""
    return [json.loads(line) for line in _inspect(run_dir).splitlines() if line.strip()]


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """`wandb leet inspect --summary --json`: state, exit_code, config, summary, project, name, notes..."""
    return json.loads(_inspect(run_dir, "--summary"))


@dataclass
class RunRecord:
    """The parts of a run tests look at: its run header, config, history rows and exit code."""

    run: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def metric_keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def read_run(run_dir: str | Path) -> RunRecord:
    """Parse the records of one run: history rows (with `_step`), the merged config, the exit code."""
    run: dict[str, Any] = {}
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    exit_code: int | None = None
    for record in read_records(run_dir):
        kind = record.get("type")
        if kind == "run":
            run = record["run"]
            config.update(run.get("config", {}).get("update", {}))
        elif kind == "config":
            config.update(record["config"].get("update", {}))
        elif kind == "history":
            history.append(dict(record["history"]["item"]))
        elif kind == "exit":
            exit_code = record["exit"].get("exit_code", 0)
    config.pop("_wandb", None)
    return RunRecord(run=run, config=config, history=history, exit_code=exit_code)


def only_run_dir(wandb_dir: str | Path) -> Path:
    """The single run folder under `<WANDB_DIR>/wandb` (fails loudly if there are none or several)."""
    runs = sorted(p for p in (Path(wandb_dir) / "wandb").glob("*run-*") if p.is_dir())
    if len(runs) != 1:
        raise AssertionError(f"expected exactly one run under {wandb_dir}, found {[p.name for p in runs]}")
    return runs[0]
