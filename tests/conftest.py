"""Shared fixtures: W&B kept offline and inside tmp dirs, a factory for small CPU RunConfigs, golden
files, and the `gpu` tier skipped with its reason where there is no GPU."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The files that take longest start first (`make test` hands whole files to workers in this order,
# with --no-loadscope-reorder), so that no worker is still in a long file after the others have finished.
# Longest first, as measured by `make test` with --durations on 2 cores; the other files follow, shuffled.
LONGEST_FILES_FIRST = (
    "test_distributed",
    "test_sweep_slurm_executor",
    "test_sweep_execute",
    "test_hf",
    "test_sweep_cli",
    "test_sweep_ray_executor",
    "test_train",
    "test_tracking",
    "test_notebooks_in_browser",
    "test_bench",
)

GOLDEN_DIR = Path(__file__).parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-goldens", action="store_true", help="rewrite tests/golden/* (`make goldens`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

    def rank(item: pytest.Item) -> int:
        stem = item.path.stem
        return LONGEST_FILES_FIRST.index(stem) if stem in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own (shuffled) order, the rest their shuffled order


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
def golden(request: pytest.FixtureRequest) -> Callable[[str, str], None]:
    """`golden(name, text)`: `text` must equal tests/golden/<name>; `make goldens` rewrites the files."""

    def check(name: str, text: str) -> None:
        path = GOLDEN_DIR / name
        if request.config.getoption("--update-goldens"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.exists(), f"no golden file {path}; run `make goldens` and review it"
        assert text == path.read_text(encoding="utf-8"), (
            f"output differs from {path}; if the change is intended, run `make goldens` and review the diff"
        )

    return check


@pytest.fixture
def user_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make tests/user_models.py importable as "user_models:<factory>"."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


@pytest.fixture
def tiny_config(tmp_path) -> Callable[..., Any]:
    """`tiny_config(**overrides)` or `tiny_config(out_dir, **overrides)`: a small, fast gpt-tiny RunConfig
    on the CPU, writing under `out_dir` (default: the test's tmp_path)."""
    from amp_lib.config import RunConfig
    from amp_lib.notebook import DEMO_CONFIG

    def make(out_dir: Any = None, /, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {
            **DEMO_CONFIG,  # the report notebook's demo size: seconds on a 2-core CPU
            "device": "cpu",
            "out_dir": str(tmp_path if out_dir is None else out_dir),
        }
        values.update(overrides)
        return RunConfig(**values)

    return make


@pytest.fixture(autouse=True, scope="session")
def one_thread() -> Iterator[None]:
    """The models in these tests are tiny: one intra-op thread is as fast, and far faster on a busy 2-core box."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class CtrlCOnFirstOutcome(io.StringIO):
    """A stdout on which Ctrl-C arrives (a real SIGINT) as the sweep prints its first finished run."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker, self.sent = marker, False

    def write(self, text: str) -> int:
        n = super().write(text)
        if self.marker in text and not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGINT)
        return n


@pytest.fixture
def ctrl_c_stdout() -> Iterator[type[CtrlCOnFirstOutcome]]:
    """`ctrl_c_stdout(marker)` makes a stdout that sends a real SIGINT when `marker` is first printed; meanwhile
    SIGINT raises KeyboardInterrupt, as in a terminal."""
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield CtrlCOnFirstOutcome
    signal.signal(signal.SIGINT, saved)


# Set by libraries for themselves, once per process, by whichever test first needs them (importing Lightning
# sets the first, so a whole-suite run has it before any test).
# (inductor sets _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR for its generated code on a first compile; importing
# ray sets RAY_CLIENT_MODE=0)
SET_BY_LIBRARIES_ON_FIRST_USE = {
    "PYTEST_CURRENT_TEST",
    "RAY_CLIENT_MODE",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR",
}


@pytest.fixture(autouse=True)
def environment_left_as_found() -> Iterator[None]:
    """A variable a test sets and does not restore changes every later test of its process: a worker's
    MKL_NUM_THREADS=1, left behind, once gave torchrun's workers one thread each, in one order in eleven.
    (monkeypatch.delenv of an unset variable records nothing to restore: set it first.)"""
    before = dict(os.environ)
    yield
    changed = sorted(
        k
        for k in (before.keys() | os.environ.keys()) - SET_BY_LIBRARIES_ON_FIRST_USE
        if before.get(k) != os.environ.get(k)
    )
    if changed:
        for k in changed:
            if k in before:
                os.environ[k] = before[k]
            else:
                del os.environ[k]
        pytest.fail(f"the test left these environment variables changed: {', '.join(changed)}; use monkeypatch")


DEAD_KERNEL = "amp-dead-kernel"


@pytest.fixture
def dead_kernel(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that exists (a sweep checks that before anything runs) but whose program does not: a run
    that is executed fails in a moment, starting no kernel. Returns its name."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / DEAD_KERNEL
    spec.mkdir(parents=True)
    argv = [f"/nonexistent/{DEAD_KERNEL}", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "dead", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(root), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
    return DEAD_KERNEL


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A real gloo process group of one rank, in this process: gradients and parameters can be DTensor shards
    as under FSDP2 (tests of the scaler's norm and of FSDPMemTracker)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch has no gloo")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
