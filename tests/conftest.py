"""Shared fixtures: W&B kept offline and inside tmp dirs, and a factory for small CPU RunConfigs."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Under mutmut (it sets MUTANT_UNDER_TEST) the fast unit files run first, so that with `-x` a mutant
# dies on the first cheap test that sees it instead of after the training-loop tests.
_MUTATION_ORDER = (
    "test_precision",
    "test_results",
    "test_scaler",
    "test_models",
    "test_core_contracts",
    "test_report_mutants",
    "test_report",
    "test_sweep_mutants",
    "test_workbook_mutants",
    "test_workbook",
    "test_tracking_mutants",
    "test_lightning_callback_mutants",
    "test_tracking",
    "test_lightning_callback",
    "test_bench",
    "test_train",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if "MUTANT_UNDER_TEST" not in os.environ:
        return

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return _MUTATION_ORDER.index(stem) if stem in _MUTATION_ORDER else len(_MUTATION_ORDER)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def wandb_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No test talks to W&B servers or writes into the repo or home: `<root>/wandb_dir` is WANDB_DIR."""
    root = tmp_path_factory.mktemp("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        (root / name.lower()).mkdir(parents=True)
        monkeypatch.setenv(name, str(root / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _wandb_teardown()  # wandb reads these once per process set-up: make it read this test's
    yield root
    _wandb_teardown()


def _wandb_teardown() -> None:
    if "wandb" in sys.modules:  # only if a test imported it: importing wandb costs a second
        import wandb

        wandb.teardown()


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make tests/user_models.py importable as "user_models:<factory>"."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Any]:
    """`tiny_config(**overrides)` or `tiny_config(out_dir, **overrides)`: a small, fast gpt-tiny RunConfig
    on the CPU, writing under `out_dir` (default: the test's tmp_path)."""
    from amp_lib.train import RunConfig
    from amp_lib.workbook import DEMO_CONFIG

    def make(out_dir: Any = None, /, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {
            **DEMO_CONFIG,  # the report notebook's demo size: seconds on a 2-core CPU
            "device": "cpu",
            "out_dir": str(tmp_path if out_dir is None else out_dir),
        }
        values.update(overrides)
        return RunConfig(**values)

    return make
