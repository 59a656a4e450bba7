"""`scripts/mutation_score.py`: which listed survivors a run shows to be out of date."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "mutation_score", Path(__file__).resolve().parents[1] / "scripts" / "mutation_score.py"
)
assert _spec and _spec.loader
mutation_score = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation_score)

GRID = "amp_lib.sweep.grid.x_expand_grid__mutmut_"
LOCK = "amp_lib.sweep.lock.xǁSweepLockǁacquire__mutmut_"


def test_a_listed_survivor_the_run_caught_or_no_longer_has_is_out_of_date() -> None:
    found = {f"{GRID}1": "survived", f"{GRID}2": "killed", f"{GRID}3": "timeout", f"{LOCK}1": "survived"}
    listed = {f"{GRID}1", f"{GRID}2", f"{GRID}3", f"{GRID}9", f"{LOCK}1"}
    assert mutation_score.stale(found, listed) == [f"{GRID}2", f"{GRID}3", f"{GRID}9"]


def test_modules_the_run_did_not_reach_say_nothing_about_their_entries() -> None:
    found = {f"{GRID}1": "not checked", f"{LOCK}1": "killed"}
    assert mutation_score.stale(found, {f"{GRID}2", f"{GRID}1"}) == []
    assert mutation_score.stale(found, {f"{LOCK}1", f"{LOCK}2"}) == [f"{LOCK}1", f"{LOCK}2"]
