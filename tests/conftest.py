"""Shared fixtures: W&B kept offline and inside tmp dirs, and a factory for small CPU RunConfigs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _wandb_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test talks to W&B servers or writes into the repo or the home directory."""
    root = tmp_path_factory.mktemp("wandb")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        path = root / name.lower()
        path.mkdir()
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Any]:
    """`tiny_config(**overrides)` or `tiny_config(out_dir, **overrides)`: a small, fast gpt-tiny RunConfig
    on the CPU, writing under `out_dir` (default: the test's tmp_path)."""
    from amp_lib.train import RunConfig

    def make(out_dir: Any = None, /, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {
            "model": "gpt-tiny",
            "steps": 8,
            "warmup_steps": 2,
            "batch_size": 4,
            "seq_len": 32,
            "log_every": 2,
            "device": "cpu",
            "out_dir": str(tmp_path if out_dir is None else out_dir),
        }
        values.update(overrides)
        return RunConfig(**values)

    return make
