"""`amp_lib.distributed`: runs over several processes under torchrun (gloo on CPU), DDP and FSDP2, the
launcher that `train()` uses outside torchrun, and what ends up in the result.

The slow tests start real torchrun jobs; a launch costs seconds of torch imports per process on 2 cores, so
several checks share one launch: this file is also the script torchrun runs (`__main__` at the bottom),
which joins one process group and trains several configs in it, each rank writing what it saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from process_state import alive
from torch import nn

from amp_lib import distributed
from amp_lib.config import RunConfig
from amp_lib.details import summary_markdown
from amp_lib.distributed import (
    Ranks,
    RankSlice,
    gather_floats,
    gradient_sync,
    in_torchrun,
    local_tensor,
    mean_over_ranks,
    root_cause,
    torchrun_command,
    transformer_blocks,
)
from amp_lib.models import build_workload
from amp_lib.report import build_report
from amp_lib.results import RunResult, load_results, load_sweep
from amp_lib.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# One tiny language-model run: 2 processes x 4 sequences of 16 tokens against 1 process x 8.
BASE: dict[str, Any] = {
    "model": "gpt-tiny", "steps": 4, "seq_len": 16, "log_every": 2, "timing_warmup_steps": 1, "eval_batches": 2,
    "device": "cpu", "lr": 3e-3,
}  # fmt: skip
OVERFLOW_AT = 2  # the micro-batch whose rank-1 rows overflow fp16 (see `gate`)
KILL_AT = 3  # the forward call on rank 1 that kills its own process (see `killed_on_rank_1`)


@cache
def single_process(out: str) -> RunResult:
    """The reference: one process with the whole global batch (8), same seed."""
    return train(RunConfig(**BASE, batch_size=8, out_dir=out, run_name="single"), write=False)


# --- models the worker processes import (as "test_distributed:<name>") ------------------------------

CAPTURED: dict[str, nn.Module] = {}
ROWS_SEEN: list[int] = []  # the rows of every batch a Gate computed on, in this process


class Gate(nn.Module):
    """One linear block: a weight of 8 rows, which FSDP shards into rows 0-3 (rank 0) and 4-7 (rank 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ROWS_SEEN.append(x.shape[0])
        for block in self.blocks:
            x = block(x)
        return x


def weighted_sum(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (out.float() * weights).mean()


def gate(config: RunConfig) -> tuple[nn.Module, Any, Any]:
    """Global batches of `batch_size` rows; at micro-batch OVERFLOW_AT the rows of rank 1 (the second half)
    weigh outputs 4-7 by 1e36, so the scaled gradient overflows there only: under FSDP only rank 1's shard
    of the weight holds the inf, under DDP the all-reduce spreads it."""
    torch.manual_seed(config.seed)
    model = CAPTURED["gate"] = Gate()

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(config.batch_size, 8, generator=gen)
        w = torch.full((config.batch_size, 8), 0.1)
        if i == OVERFLOW_AT:
            w[config.batch_size // 2 :, 4:] = 1e36
        return x, w

    return model, batch, weighted_sum


def _failing_on_rank_1(config: RunConfig, fail: Any) -> tuple[nn.Module, Any, Any]:
    """A linear model on 4 fixed batches whose rank-1 process calls `fail()` at its forward call KILL_AT."""
    rank = int(os.environ.get("RANK", "0"))
    model = nn.Linear(8, 1)
    calls = [0]

    def forward_hook(module: nn.Module, args: Any) -> None:
        calls[0] += 1
        if rank == 1 and calls[0] == KILL_AT:
            fail()

    model.register_forward_pre_hook(forward_hook)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(config.batch_size, 8, generator=gen), torch.randn(config.batch_size, 1, generator=gen))
        for _ in range(4)
    ]
    return model, batches, torch.nn.functional.mse_loss


def killed_on_rank_1(config: RunConfig) -> tuple[nn.Module, Any, Any]:
    """Rank 1 SIGKILLs itself mid-run. Rank 0 first starts a child of its own that ignores SIGTERM (as a
    data-loading helper might) and waits long enough for the launcher's 0.5 s poll to see it. Each rank
    writes its pid, torchrun's, its child's and the arguments it was started with."""
    rank = int(os.environ.get("RANK", "0"))
    pids = [os.getpid(), os.getppid()]
    if rank == 0:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
        pids.append(subprocess.Popen([sys.executable, "-c", code]).pid)
        time.sleep(1.5)
    folder = Path(os.environ["AMP_TEST_PIDS"])
    (folder / f"rank{rank}").write_text(" ".join(map(str, pids)))
    (folder / f"argv{rank}.json").write_text(json.dumps(sys.argv))
    return _failing_on_rank_1(config, lambda: os.kill(os.getpid(), signal.SIGKILL))


def out_of_memory_on_rank_1(config: RunConfig) -> tuple[nn.Module, Any, Any]:
    """Rank 1's forward runs out of memory mid-run, as a GPU whose share of the batch does not fit would."""

    def fail() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return _failing_on_rank_1(config, fail)


def hangs_on_rank_1(config: RunConfig) -> tuple[nn.Module, Any, Any]:
    """Rank 1's forward sleeps past any test's patience (rank 0 then waits in the all-reduce). Each rank
    writes its pid and torchrun's."""
    rank = int(os.environ.get("RANK", "0"))
    Path(os.environ["AMP_TEST_PIDS"], f"rank{rank}").write_text(f"{os.getpid()} {os.getppid()}")
    return _failing_on_rank_1(config, lambda: time.sleep(300))


def raises_on_rank_1(config: RunConfig) -> tuple[nn.Module, Any, Any]:
    """Rank 1's forward raises mid-run, as a user model's bug on one rank would."""

    def fail() -> None:
        raise RuntimeError(f"rank 1 broke at forward {KILL_AT}")

    return _failing_on_rank_1(config, fail)


# --- data: each rank's slice of the global batch ---------------------------------------------------


def test_the_ranks_slices_are_disjoint_and_together_the_global_batch() -> None:
    config = RunConfig(**BASE, batch_size=8)
    whole = build_workload(config, torch.device("cpu")).train_batches
    slices = [RankSlice(whole, Ranks(rank, 2)) for rank in (0, 1)]
    for i in (0, 3):
        x, y = whole[i]
        parts = [s[i] for s in slices]
        assert all(p[0].shape == (4, 16) for p in parts) and len(slices[0]) == len(whole)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_1d_targets_are_split_too_and_scalars_and_non_tensors_pass_through() -> None:
    batches = [(torch.zeros(4, 3), torch.arange(4)), (torch.tensor(2.0), None)]
    rank1 = RankSlice(batches, Ranks(1, 2))
    assert torch.equal(rank1[0][1], torch.tensor([2, 3]))  # class labels: one per row
    scalar, none = rank1[1]
    assert scalar.dim() == 0 and float(scalar) == 2.0 and none is None


def test_a_batch_that_does_not_split_evenly_names_its_rows_and_the_processes() -> None:
    batches = [(torch.zeros(5, 3), torch.zeros(5))]
    with pytest.raises(ValueError, match="a batch of 5 rows does not split evenly over 2 processes"):
        RankSlice(batches, Ranks(1, 2))[0]


# --- the model: what FSDP shards, gradient sync ---------------------------------------------------


def test_fsdp_shards_the_blocks_of_the_outermost_module_list() -> None:
    config = RunConfig(**BASE)
    model = build_workload(config, torch.device("cpu")).model
    assert transformer_blocks(model) == list(model.blocks)
    gate_model = Gate()
    assert transformer_blocks(gate_model) == [gate_model.blocks[0]]
    assert transformer_blocks(nn.Sequential(nn.Linear(2, 2), nn.GELU())) == []  # an MLP: nothing to shard per block


class Experts(nn.Module):
    """A block holding a ModuleList of its own (a mixture of experts): sharded as one block, not per expert."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])


def test_fsdp_shards_every_outermost_module_list_and_nothing_nested_in_a_block() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList([Experts(), Experts()])
    model.heads = nn.ModuleList([nn.Linear(2, 1)])
    assert transformer_blocks(model) == [*model.blocks, *model.heads]


@pytest.mark.parametrize("present", [{"LOCAL_RANK": "0"}, {"WORLD_SIZE": "2"}, {"LOCAL_RANK": "0", "WORLD_SIZE": "2"}])
def test_a_torchrun_worker_is_told_by_both_of_torchruns_variables(
    present: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of them alone (a Lightning or Slurm environment sets some) does not make this process a worker."""
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "0")  # recorded, so the unset below is undone too
        monkeypatch.delenv(name)
    for name, value in present.items():
        monkeypatch.setenv(name, value)
    assert in_torchrun() == (len(present) == 2)


def test_without_a_process_group_the_collectives_are_the_identity() -> None:
    t = torch.tensor([1.0, 2.0])
    assert mean_over_ranks(t) is t and gather_floats(3.5, torch.device("cpu")) == [3.5]
    assert not in_torchrun()
    model = nn.Linear(2, 2)
    with gradient_sync(model, sync=False):  # a plain module has no gradient sync to skip
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None


# --- the launcher ---------------------------------------------------------------------------------


def test_torchrun_is_this_interpreters_with_a_free_port_and_the_train_module(tmp_path: Path) -> None:
    cmd = torchrun_command(tmp_path / "c.json", tmp_path / "r.json", tmp_path / "logs", 3)
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=3" in cmd and cmd[cmd.index("-m", 3) + 1] == "amp_lib.train"
    assert cmd[-4:] == ["--config", str(tmp_path / "c.json"), "--result", str(tmp_path / "r.json")]


TORCHRUN_FAILURE = """  time      : 2026-11-25_19:03:45
  host      : localhost
  rank      : {0} (local_rank: {0})
  exitcode  : {1} (pid: 42)  ({2})
  error_file: <N/A>
  traceback : Signal {3} ({2}) received by PID 42
"""


def test_the_root_cause_is_the_first_written_error_file_of_a_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    for rank, text in ((1, "boom on rank 1"), (0, "later on rank 0")):
        path = tmp_path / "run" / "attempt_0" / str(rank) / "error.json"
        path.parent.mkdir(parents=True)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
        try:
            raise ValueError(text)
        except ValueError as exc:
            ErrorHandler().record_exception(exc)  # what @record writes in a failing worker
        time.sleep(0.05)  # one after the other
    cause = root_cause(tmp_path, "")
    assert cause.startswith("rank 1: ValueError: boom on rank 1\nTraceback (most recent call last):")
    # torchrun's summary when rank 1 was killed and torchrun then stopped rank 0 (as torch 2.13 prints it)
    summary = (
        "Failures:\n[1]:\n"
        + TORCHRUN_FAILURE.format(0, -15, "SIGTERM", 15)
        + "Root Cause (first observed failure):\n[0]:\n"
    )
    summary += TORCHRUN_FAILURE.format(1, -9, "SIGKILL", 9)
    expected = "rank 1 was killed (exitcode -9): Signal 9 (SIGKILL) received by PID 42"
    assert root_cause(tmp_path, summary) == root_cause(tmp_path / "none", summary) == expected
    stopped = "Root Cause (first observed failure):\n[0]:\n" + TORCHRUN_FAILURE.format(0, -15, "SIGTERM", 15)
    assert root_cause(tmp_path / "none", stopped).endswith(stopped.strip())  # no better cause: torchrun's words
    (tmp_path / "unreadable" / "0" / "error.json").mkdir(parents=True)  # a folder where a file should be
    assert root_cause(tmp_path / "unreadable", stopped).endswith(stopped.strip())  # skipped, not raised


def test_of_error_files_stamped_in_the_same_second_the_first_written_is_the_root_cause(tmp_path: Path) -> None:
    """A rank that raises and the peer that then fails on the lost connection usually stamp the same
    second; the rank number must not decide between them."""
    for rank, text, written_ns in ((1, "boom on rank 1", 1_000_000_000), (0, "Connection closed by peer", 1_002_000_000)):
        path = tmp_path / "attempt_0" / str(rank) / "error.json"
        path.parent.mkdir(parents=True)
        message = {"message": text, "extraInfo": {"py_callstack": "Traceback", "timestamp": "1700000000"}}
        path.write_text(json.dumps({"message": message}))
        os.utime(path, ns=(written_ns, written_ns))
    assert root_cause(tmp_path, "").startswith("rank 1: boom on rank 1")


def test_a_rank_that_aborted_itself_comes_after_the_error_files_and_before_torchruns_words(tmp_path: Path) -> None:
    """gloo may end the rank whose peer failed with SIGABRT (exitcode -6), even after that rank recorded the
    lost connection: the peer's error file is the cause. Only without error files does the abort come first;
    a kill from outside (SIGKILL) still comes before the files."""
    path = tmp_path / "attempt_0" / "1" / "error.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"message": {"message": "OutOfMemoryError: Tried to allocate 2.00 GiB", "extraInfo": {}}}))
    abort = "Root Cause (first observed failure):\n[0]:\n" + TORCHRUN_FAILURE.format(0, -6, "SIGABRT", 6)
    assert root_cause(tmp_path, abort) == "rank 1: OutOfMemoryError: Tried to allocate 2.00 GiB"
    assert root_cause(tmp_path / "none", abort) == "rank 0 aborted (exitcode -6): Signal 6 (SIGABRT) received by PID 42"
    both = abort + "[1]:\n" + TORCHRUN_FAILURE.format(1, -9, "SIGKILL", 9)
    assert root_cause(tmp_path, both) == "rank 1 was killed (exitcode -9): Signal 9 (SIGKILL) received by PID 42"


@pytest.mark.parametrize("content", ["not json", "{}", "[]", '{"message": 3}'])
def test_a_malformed_error_file_is_skipped(tmp_path: Path, content: str) -> None:
    path = tmp_path / "attempt_0" / "1" / "error.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert root_cause(tmp_path, "torchrun's own words") == "a worker failed under torchrun\ntorchrun's own words"


def test_an_error_file_without_extra_info_still_names_its_rank_and_message(tmp_path: Path) -> None:
    path = tmp_path / "attempt_0" / "1" / "error.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"message": {"message": "RuntimeError: no details"}}))
    assert root_cause(tmp_path, "") == "rank 1: RuntimeError: no details"


def test_without_error_files_the_cause_is_torchruns_summary_from_its_root_cause_on(tmp_path: Path) -> None:
    chatter = "agent chatter\n" * 5
    summary = "Root Cause (first observed failure):\n[0]: something"
    assert root_cause(tmp_path, chatter + summary) == "a worker failed under torchrun\n" + summary
    assert root_cause(tmp_path, "x" * 5000) == "a worker failed under torchrun\n" + "x" * 3000  # no summary: the tail


def _child(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"  # its signal handler is installed
    return proc


def test_stopping_a_launch_asks_with_sigterm_first_then_kills_what_ignores_it() -> None:
    """The stop policy of `launch` (a timeout, a Ctrl-C): SIGTERM so torchrun's agent can stop its workers
    and flush its logs, SIGKILL only for a process still alive after the grace period."""
    polite = _child(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('terminated', flush=True), sys.exit(3)))\n"
        "print('ready', flush=True); time.sleep(60)"
    )
    stubborn = _child(
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True); time.sleep(60)"
    )
    try:
        distributed._stop(polite, {}, grace_s=10)
        assert polite.returncode == 3 and polite.stdout.read() == "terminated\n"  # type: ignore[union-attr]
        began = time.monotonic()
        distributed._stop(stubborn, {}, grace_s=0.5)
        assert stubborn.returncode == -signal.SIGKILL and time.monotonic() - began < 10
    finally:
        for proc in (polite, stubborn):
            proc.kill()
            proc.wait()



def test_stopping_also_kills_what_the_process_started_since_the_launchers_last_look() -> None:
    """`launch` looks for descendants every 0.5 s; ones started after its last look (two here, both ignoring
    SIGTERM and left behind by their parent's exit) are found by the stop itself."""
    parent = _child(
        "import subprocess, sys, time\n"
        "code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)'\n"
        "kids = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE) for _ in range(2)]\n"
        "for kid in kids: kid.stdout.readline()  # from here on it ignores SIGTERM\n"
        "print('ready', flush=True); print(*(kid.pid for kid in kids), flush=True); time.sleep(60)"
    )
    kids = [int(pid) for pid in parent.stdout.readline().split()]  # type: ignore[union-attr]
    try:
        distributed._stop(parent, {}, grace_s=5)
        deadline = time.monotonic() + 10
        while any(map(alive, kids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert parent.returncode == -signal.SIGTERM
        assert [pid for pid in kids if alive(pid)] == []
    finally:
        parent.kill()
        parent.wait()
        _kill_left_over(set(kids))

# --- under torchrun -------------------------------------------------------------------------------


class Rows:
    """A RunObserver that keeps what it is given."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.rows: list[Any] = []
        self.items = 0

    def on_start(self, config: RunConfig, plan: Any) -> None:
        self.calls.append(f"start {plan.label}")

    def on_log(self, rows: Any, items_per_step: int) -> None:
        self.calls.append("log")
        self.rows += list(rows)
        self.items = items_per_step

    def on_eval(self, row: Any) -> None:
        self.calls.append(f"eval {row.step}")

    def on_end(self, result: RunResult) -> None:
        self.calls.append(f"end {result.status}")


@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    observer = Rows()
    config = RunConfig(
        **BASE, batch_size=4, parallelism="ddp", nproc=2, profile_step=True, out_dir=str(tmp_path / "out")
    )
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # unset: each process gets half of this one's 4 threads
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        result = train(config, [observer])
    finally:
        torch.set_num_threads(threads)
    assert result.plan.threads == 2, result.error
    reference = single_process(str(tmp_path))
    assert result.ok, result.error
    assert [f.name for f in (tmp_path / "out").iterdir()] == [config.result_path.name]  # rank 0's, nothing else
    assert RunResult.load(config.result_path) == result
    losses = [r.loss for r in result.history]
    assert losses == pytest.approx([r.loss for r in reference.history], rel=1e-4)
    assert result.metrics.eval_loss == pytest.approx(reference.metrics.eval_loss, rel=1e-4)
    # replayed to the observers as a run in this process would report it, with the global batch's tokens
    evals = [f"eval {e.step}" for e in result.evals]
    assert observer.calls == ["start ddp fp32", "log", *evals, "end ok"] and observer.rows == list(result.history)
    assert observer.items == result.metrics.items_per_step == 8 * 16
    assert len(result.metrics.peak_memory_mb_ranks) == 2
    assert result.metrics.peak_memory_mb == max(result.metrics.peak_memory_mb_ranks)
    assert result.plan.parallelism == "ddp" and result.plan.reduce_dtype == "fp32"
    assert result.metrics.param_memory_mb == pytest.approx(reference.metrics.param_memory_mb)  # a full replica
    # the profiled step saw DDP's gradient all-reduce; a single process has none to report
    assert result.metrics.comm_time_ms is not None and result.metrics.comm_time_ms > 0
    assert reference.metrics.comm_time_ms is None


def _scenarios(out: Path) -> dict[str, RunConfig]:
    fsdp = {**BASE, "batch_size": 4, "parallelism": "fsdp", "nproc": 2, "out_dir": str(out / "results")}
    overflow = {
        "model": "test_distributed:gate", "steps": 4, "batch_size": 4, "log_every": 4, "timing_warmup_steps": 1,
        "eval_batches": 1, "device": "cpu", "precision": "fp16-mixed", "allow_slow": True, "init_scale": 1024.0,
        "grad_clip": None, "nproc": 2, "out_dir": str(out / "results"),
    }  # fmt: skip
    return {
        "fsdp-fp32": RunConfig(**fsdp, run_name="fsdp-fp32"),
        "fsdp-bf16-reduce-fp32": RunConfig(
            **{**fsdp, "steps": 2, "grad_clip": None}, precision="bf16-mixed", run_name="reduce-fp32"
        ),
        "fsdp-bf16-reduce-bf16": RunConfig(
            **{**fsdp, "steps": 2, "grad_clip": None},
            precision="bf16-mixed",
            reduce_dtype="bf16",
            run_name="reduce-bf16",
        ),
        "ddp-overflow": RunConfig(**overflow, parallelism="ddp", run_name="ddp-overflow"),
        "fsdp-overflow": RunConfig(**overflow, parallelism="fsdp", run_name="fsdp-overflow"),
    }


def _worker(out: Path) -> None:
    """Run by torchrun: every scenario in one process group; each rank writes what it saw, per scenario."""
    import test_distributed  # the module the workloads are imported from, not this __main__
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seen: dict[str, list[dict[str, Any]]] = {}

    def grads_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [
            local_tensor(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        seen.setdefault(current, []).append({
            "dtypes": sorted({str(g.dtype) for g in grads}),
            "bf16_exact": all(torch.equal(g, g.bfloat16().float()) for g in grads),
            "weights": sum(float(local_tensor(p).double().sum()) for group in optimizer.param_groups for p in group["params"]),
        })  # fmt: skip

    hook = register_optimizer_step_pre_hook(grads_before_step)
    report: dict[str, Any] = {}
    for current, config in _scenarios(out).items():
        test_distributed.ROWS_SEEN.clear()
        result = train(config)
        entry = {"status": result.status, "error": result.error, "history": [vars(r) for r in result.history]}
        entry["eval_loss"] = result.metrics.eval_loss
        entry["param_memory_mb"] = result.metrics.param_memory_mb
        entry["steps_seen"] = seen.get(current, [])
        entry["rows_seen"] = sorted(set(test_distributed.ROWS_SEEN))
        if current.endswith("overflow"):
            weight = test_distributed.CAPTURED["gate"].blocks[0].weight
            full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
            entry["weight"] = full.detach().double().flatten().tolist()
        report[current] = entry
    hook.remove()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def _agreed(history: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What every rank must log alike (step times are each rank's own)."""
    return [(h["step"], h["loss"], h["grad_norm"], h["skipped"], h["loss_scale"]) for h in history]


@pytest.fixture(scope="module")
def under_torchrun(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """One torchrun job of 2 processes running every scenario of `_scenarios`: (folder, per-rank reports)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_and_shards_the_memory(under_torchrun: Any, tmp_path: Path) -> None:
    out, (rank0, rank1) = under_torchrun
    reference = single_process(str(tmp_path))
    run = rank0["fsdp-fp32"]
    assert run["status"] == "ok", run["error"]
    assert [r["loss"] for r in run["history"]] == pytest.approx([r.loss for r in reference.history], rel=1e-4)
    assert run["eval_loss"] == pytest.approx(reference.metrics.eval_loss, rel=1e-4)
    assert _agreed(run["history"]) == _agreed(rank1["fsdp-fp32"]["history"])  # every rank logged the same
    # each rank holds about half of the parameters (shards are padded to equal sizes)
    assert 0.45 < run["param_memory_mb"] / reference.metrics.param_memory_mb < 0.6
    names = sorted(p.name for p in (out / "results").iterdir())  # rank 0 alone wrote, one file per run
    assert names == sorted(c.result_path.name for c in _scenarios(out).values())
    saved = RunResult.load(_scenarios(out)["fsdp-fp32"].result_path)
    assert saved.plan.parallelism == "fsdp" and saved.metrics.items_per_step == 8 * 16


@pytest.mark.slow
def test_fsdp_reduces_gradients_in_the_dtype_the_plan_names(under_torchrun: Any) -> None:
    out, ranks = under_torchrun
    for name, reduce in (("fsdp-bf16-reduce-fp32", "fp32"), ("fsdp-bf16-reduce-bf16", "bf16")):
        saved = RunResult.load(_scenarios(out)[name].result_path)
        assert saved.ok and saved.plan.reduce_dtype == reduce and saved.plan.gather_dtype == "bfloat16"
        for rank in ranks:
            steps = rank[name]["steps_seen"]
            assert len(steps) == 2 and all(s["dtypes"] == ["torch.float32"] for s in steps)  # fp32 master shards
            # bf16 gradients summed in bf16 stay bf16 numbers; summed in fp32 they need more mantissa
            assert [s["bf16_exact"] for s in steps] == [reduce == "bf16"] * 2, (name, steps)
    losses = {r: [h["loss"] for h in ranks[0][f"fsdp-bf16-reduce-{r}"]["history"]] for r in ("fp32", "bf16")}
    assert losses["fp32"][1] < losses["fp32"][0] and losses["bf16"][1] < losses["bf16"][0]  # both train


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_an_overflow_on_one_rank_is_skipped_on_every_rank_and_the_scale_backs_off_once(
    under_torchrun: Any, parallelism: str
) -> None:
    out, ranks = under_torchrun
    runs = [rank[f"{parallelism}-overflow"] for rank in ranks]
    for run in runs:
        assert run["status"] == "ok", run["error"]
        assert [h["skipped"] for h in run["history"]] == [i == OVERFLOW_AT for i in range(4)]
        assert [h["loss_scale"] for h in run["history"]] == [1024.0, 1024.0, 512.0, 512.0]
        # the fused optimizer is called every step and takes the skip from the scaler: the weights before each
        # call show that the skipped step left them as they were, and that the others moved them
        before = [s["weights"] for s in run["steps_seen"]]
        assert len(before) == 4 and before[OVERFLOW_AT + 1] == before[OVERFLOW_AT] != before[OVERFLOW_AT - 1]
        assert run["rows_seen"] == [4]  # each rank computed on its half of every 8-row global batch only
    assert _agreed(runs[0]["history"]) == _agreed(runs[1]["history"])
    assert runs[0]["weight"] == runs[1]["weight"]  # the replicas (or the shards' whole) agree
    saved = RunResult.load(_scenarios(out)[f"{parallelism}-overflow"].result_path)  # reported once, by rank 0
    assert saved.metrics.skipped_steps == 1 and saved.metrics.min_loss_scale == 512.0


def _rank_1_run(model: str, out: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> RunConfig:
    """A two-process DDP run of one of the `*_on_rank_1` models above, which the workers import from here."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), str(ROOT)]))
    return RunConfig(
        model=f"test_distributed:{model}", steps=6, batch_size=4, log_every=1, timing_warmup_steps=1,
        device="cpu", parallelism="ddp", nproc=2, out_dir=str(out), run_name=name,
    )  # fmt: skip


def _pids_seen(folder: Path) -> set[int]:
    return {int(p) for f in folder.glob("rank*") for p in f.read_text().split()}


def _kill_left_over(pids: set[int]) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_rank_killed_mid_run_fails_the_run_and_leaves_no_process_or_folder_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids, scratch = tmp_path / "pids", tmp_path / "scratch"
    pids.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("AMP_TEST_PIDS", str(pids))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the launcher's scratch folder goes
    out = tmp_path / "results"
    finished = RunResult(config={"run_name": "earlier"}, plan={}).save(out / "earlier.json")
    before = finished.read_bytes()
    config = _rank_1_run("killed_on_rank_1", out, "killed", monkeypatch)
    observer = Rows()
    result = train(config, [observer])
    assert result.status == "failed" and "exitcode" in result.error and "-9" in result.error, result.error
    assert RunResult.load(config.result_path).status == "failed" and observer.calls[-1] == "end failed"
    assert finished.read_bytes() == before  # a finished result is untouched
    seen = _pids_seen(pids)  # both workers, torchrun's agent and rank 0's child
    assert len(seen) == 4
    assert [p for p in seen if alive(p)] == []
    config_arg = Path(json.loads((pids / "argv0.json").read_text())[2])  # --config <path>: in the scratch folder
    assert config_arg.parent.parent == scratch and config_arg.parent.name.startswith("amp-torchrun-")
    assert list(scratch.iterdir()) == []  # and it is gone


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_error_on_one_rank_fails_the_run_with_that_ranks_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank's exception is raised, not recorded: torchrun stops the other rank (which would otherwise
    wait in the gradient all-reduce) and the launcher reports the failing rank's error."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another child of ours
    config = _rank_1_run("raises_on_rank_1", tmp_path, "raised", monkeypatch)
    try:
        result = train(config, timeout=120)
        alive = bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert alive  # the launcher stopped torchrun's processes, not every child of this one
    assert result.status == "failed", result.error
    assert result.error.startswith("torchrun exited with 1; rank 1: ") and f"rank 1 broke at forward {KILL_AT}" in result.error
    assert result.plan.torch_version == torch.__version__ and result.plan.parallelism == "ddp"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_rank_out_of_memory_makes_the_run_an_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _rank_1_run("out_of_memory_on_rank_1", tmp_path, "oom", monkeypatch)
    result = train(config, timeout=120)
    assert result.status == "oom", result.error
    assert result.error.startswith("torchrun exited with 1; rank 1: ") and "Tried to allocate 2.00 GiB" in result.error


def _hung_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RunConfig, Path]:
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("AMP_TEST_PIDS", str(pids))
    config = _rank_1_run("hangs_on_rank_1", tmp_path / "out", "hung", monkeypatch)
    return config, pids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_run_past_its_timeout_is_stopped_with_all_its_processes_and_fails_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, pids = _hung_run(tmp_path, monkeypatch)
    began = time.monotonic()
    result = train(config, timeout=30)  # ample for two workers to start on a loaded 2-core machine
    took = time.monotonic() - began
    seen = _pids_seen(pids)
    try:
        assert result.status == "failed", result.error
        assert result.error == "TimeoutError: the run did not finish within 30 s; torchrun and its workers were stopped"
        assert took < 30 + distributed.STOP_GRACE_S + 15
        assert len(seen) == 3 and [p for p in seen if alive(p)] == []  # both workers and torchrun's agent
    finally:
        _kill_left_over(seen)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_launcher_killed_outright_takes_torchrun_and_its_workers_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook kernel or a sweep worker killed with SIGKILL runs no clean-up: the kernel's death signal
    to torchrun must stop the job."""
    config, pids = _hung_run(tmp_path, monkeypatch)
    scratch = tmp_path / "scratch"  # a launcher killed outright cannot remove its scratch folder: keep it here
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    code = "import sys; from amp_lib.config import RunConfig; from amp_lib.train import train; "
    code += "train(RunConfig.from_dict(__import__('json').loads(sys.argv[1])))"
    launcher = subprocess.Popen([sys.executable, "-c", code, json.dumps(config.to_dict())])
    seen: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.glob("rank*"))) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)  # both files written in full
        seen = _pids_seen(pids)
        assert len(seen) == 3, "the workers did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + distributed.STOP_GRACE_S + 15
        while any(alive(p) for p in seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p for p in seen if alive(p)] == []
        assert [p.name[:13] for p in scratch.iterdir()] == ["amp-torchrun-"]
    finally:
        launcher.kill()
        launcher.wait()
        _kill_left_over(seen)


@pytest.mark.slow
@pytest.mark.notebook
def test_a_sweep_with_nproc_2_runs_under_torchrun_and_its_report_shows_the_parallel_run(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path / "sw"), "--precisions", "fp32", "-p", "nproc=2", "-p", "device=cpu",
            "-p", "model=gpt-tiny", "-p", "steps=4", "-p", "timing_warmup_steps=1", "-p", "batch_size=2",
            "-p", "seq_len=16", "-p", "log_every=2", "-p", "eval_batches=2", "-p", "wandb_mode=disabled",
            "--no-report"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "amp_lib.sweep", *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = load_results(tmp_path / "sw" / "results")
    assert result.ok and result.config["parallelism"] == "ddp" and result.config["nproc"] == 2
    assert result.metrics.items_per_step == 2 * 2 * 16 and len(result.metrics.peak_memory_mb_ranks) == 2
    report = build_report(load_sweep(tmp_path / "sw"))  # what summary.md and report.ipynb show (--no-report: no kernel)
    (row,) = report.groups
    assert row.requested == "ddp fp32" and "| ddp fp32 |" in summary_markdown(report)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
