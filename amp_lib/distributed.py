"""Beyond one device: the torchrun launcher, the process group, DDP/FSDP2 wrapping, each rank's slice of
the data and the few collectives the training loop needs.

Why torchrun rather than a spawner of our own: its elastic agent already does the rendezvous, the per-rank
environment, the per-rank error files (`@record`) and the tear-down of every worker when one dies. The
launcher here only starts it, waits, turns a failure into the failing rank's error, and makes sure no process
outlives the run (the agent's workers run in sessions of their own, so a process-group kill would miss them).

Data: every rank builds the workload of the *global* batch (`nproc x batch_size`) from the same seed and takes
its own rows of each batch, so N processes see exactly the batches of one process with an N-times batch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn

from amp_lib.config import RunConfig
from amp_lib.precision import PrecisionPlan
from amp_lib.processes import die_with_parent, thread_share
from amp_lib.results import RunResult

TRAIN_MODULE = "amp_lib.train"  # what torchrun runs: its main() is one run's command line
STOP_GRACE_S = 20.0  # after SIGTERM, how long the agent gets to stop its workers before everything is killed


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank, number of processes, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the result and reports skipped steps and loss scales."""
        return self.rank == 0


def in_torchrun() -> bool:
    """Whether this process is a torchrun worker (or already in a process group): then `train` runs its
    share of the run here instead of launching one."""
    return dist.is_available() and (
        dist.is_initialized() or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)
    )


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def worker_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process on a machine (cuda:LOCAL_RANK); CPU processes share the CPU."""
    if device.type != "cuda":
        return device
    dev = torch.device("cuda", local_rank)
    torch.cuda.set_device(dev)
    return dev


@contextlib.contextmanager
def process_group(device: torch.device, nproc: int) -> Iterator[Ranks]:
    """Join torchrun's process group for one run (or use the one a script already joined, and leave it
    open); `nproc` must be the processes torchrun started on this machine."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
    if local != nproc:
        raise ValueError(f"nproc={nproc} but torchrun started {local} processes per node (--nproc-per-node {local})")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend_for(device))
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


# -- the model ----------------------------------------------------------------------------------------


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the children of the model's outermost `nn.ModuleList`s (nanoGPT's
    `blocks`, Hugging Face's `h`/`layers`), as torchtitan shards `model.layers`."""
    blocks: list[nn.Module] = []
    lists: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(f"{outer}.") for outer in lists):
            lists.append(name)
            blocks.extend(module)
    return blocks


def wrap_model(model: nn.Module, plan: PrecisionPlan, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per transformer block, then the root) with the plan's gather and reduce
    dtypes; a plan without parallelism returns the model as it is."""
    if plan.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if plan.parallelism != "fsdp":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no transformer blocks (an nn.ModuleList) for fsdp to shard one by one; use parallelism 'ddp'"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=plan.gather_dtype, reduce_dtype=plan.reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation (DDP's `no_sync`,
    FSDP2's `set_requires_gradient_sync`): one reduction per optimizer step."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (a DTensor's shard; a plain tensor itself): what its memory holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (e.g. FSDP2's total gradient norm); a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -- the data and the collectives ------------------------------------------------------------------


class RankSlice:
    """Rank r's rows of each global batch (inputs and targets alike): together the ranks see each batch once."""

    def __init__(self, batches: Any, ranks: Ranks) -> None:
        self.batches, self.ranks = batches, ranks

    def __len__(self) -> int:
        return len(self.batches)

    def _rows(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        n, world = t.shape[0], self.ranks.world_size
        if n % world:
            raise ValueError(f"a batch of {n} rows does not split evenly over {world} processes")
        per = n // world
        return t[self.ranks.rank * per : (self.ranks.rank + 1) * per]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        x, y = self.batches[i]
        return self._rows(x), self._rows(y)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all ranks (gloo has no AVG: a sum, divided); `t` itself on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def gather_floats(value: float | None, device: torch.device) -> list[float | None]:
    """`value` of every rank, in rank order (None travels as NaN); `[value]` on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    mine = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [None if math.isnan(v) else v for v in (float(t.item()) for t in out)]


# -- the launcher ----------------------------------------------------------------------------------


def torchrun_command(config_path: Path, result_path: Path, log_dir: Path, nproc: int, plan_path: Path | None = None) -> list[str]:
    """torchrun of this interpreter (`python -m torch.distributed.run`, the same venv) running one run on
    `nproc` local processes with the launcher's plan; `--standalone` picks a free rendezvous port, so runs can
    share a machine."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--log-dir={log_dir}", "-m", TRAIN_MODULE, "--config", str(config_path), "--result", str(result_path),
        *(["--plan", str(plan_path)] if plan_path is not None else []),
    ]  # fmt: skip


# One failure in torchrun's summary: rank, exit code (negative: the signal that ended it), traceback line.
_FAILURE = re.compile(
    r"rank\s*:\s*(\d+)[^\n]*\n\s*exitcode\s*:\s*(-?\d+)[^\n]*\n\s*error_file[^\n]*\n\s*traceback\s*:\s*([^\n]+)"
)


def root_cause(log_dir: Path, output: str) -> str:
    """The first failure of a torchrun job. A rank killed from outside (by a signal other than the SIGTERM
    torchrun sends to the survivors and SIGABRT) comes first: it leaves no error file, and what its peers
    then record (a reset connection) is its consequence. Else the first-written per-rank error file
    (`@record` writes the exception and its traceback; the file's time, not the stamp inside, which has
    whole seconds: the peer that fails on the lost connection writes within the same second). A rank that
    aborted itself (SIGABRT: the C++ runtime ending on an uncaught exception, as gloo does on the peer's
    lost connection, even after the rank recorded its own error) is usually such a consequence, so it
    comes only after the error files; else torchrun's own failure summary."""
    signalled = [
        (rank, code, why.strip())
        for rank, code, why in _FAILURE.findall(output)
        if int(code) < 0 and int(code) != -signal.SIGTERM
    ]
    killed = [failure for failure in signalled if int(failure[1]) != -signal.SIGABRT]
    if killed:
        return "rank {} was killed (exitcode {}): {}".format(*killed[0])
    failures = []
    for path in log_dir.rglob("error.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            message = json.loads(path.read_text())["message"]
            if isinstance(message, str):
                message = {"message": message, "extraInfo": {}}
            extra = message.get("extraInfo", {})
            rank = path.parent.name
            text = f"rank {rank}: {message['message']}"
            if extra.get("py_callstack"):
                text += "\n" + str(extra["py_callstack"])
            failures.append((path.stat().st_mtime_ns, text))
    if failures:
        return min(failures)[1]
    if signalled:  # what is left are ranks that aborted themselves
        return "rank {} aborted (exitcode {}): {}".format(*signalled[0])
    summary = output[output.find("Root Cause") :] if "Root Cause" in output else output[-3000:]
    return "a worker failed under torchrun\n" + summary.strip()


def _descendants(proc: subprocess.Popen[Any]) -> list[Any]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop(proc: subprocess.Popen[Any], known: dict[int, Any], grace_s: float) -> None:
    """SIGTERM to torchrun (its agent stops the workers), then SIGKILL to whatever of it and its
    descendants is still alive after `grace_s`. psutil's Process objects check the start time, so a pid
    reused meanwhile is never hit."""
    for p in _descendants(proc):
        known.setdefault(p.pid, p)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    alive = [p for p in known.values() if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def launch(
    config: RunConfig,
    plan: PrecisionPlan,
    *,
    timeout: float | None = None,
    grace_s: float = STOP_GRACE_S,
) -> RunResult:
    """Run `config` under torchrun on `config.nproc` local processes and return rank 0's result; a failure
    on any rank (or the timeout) is a `failed` (`oom`) result with that rank's error. Nothing outlives the
    call: on a timeout, a Ctrl-C or any error the agent, every worker it started and their own children are
    stopped, and the scratch folder (`amp-torchrun-*` in the temp folder) is removed.
    """
    with tempfile.TemporaryDirectory(prefix="amp-torchrun-") as tmp:
        folder = Path(tmp)
        config_path, result_path, log_dir = folder / "config.json", folder / "result.json", folder / "logs"
        plan_path = folder / "plan.json"
        config_path.write_text(json.dumps(config.to_dict()))
        plan_path.write_text(json.dumps(plan.to_dict()))  # the workers run the plan the observers were told
        env = dict(os.environ)
        # Each process gets its share of this one's threads (torchrun would otherwise set 1 and warn).
        env.setdefault("OMP_NUM_THREADS", str(thread_share(torch.get_num_threads(), config.nproc)))
        env.pop("LOCAL_RANK", None)
        log = open(folder / "torchrun.log", "w+", encoding="utf-8")  # noqa: SIM115 - read back below
        proc = subprocess.Popen(
            torchrun_command(config_path, result_path, log_dir, config.nproc, plan_path),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # A launcher killed outright (a sweep's timed-out kernel) still stops torchrun; its agent stops the workers.
            preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )  # fmt: skip
        known: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while proc.poll() is None:
                for p in _descendants(proc):  # remembered, so none can be missed once torchrun is gone
                    known.setdefault(p.pid, p)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the run did not finish within {timeout:g} s; torchrun and its workers were stopped"
                    )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.5)
        except TimeoutError as exc:
            _stop(proc, known, grace_s)
            return _failed(config, plan, "failed", f"{type(exc).__name__}: {exc}")
        except BaseException:
            _stop(proc, known, grace_s)
            raise
        finally:
            log.seek(0)
            output = log.read()
            log.close()
        _stop(proc, known, grace_s)  # normally a no-op: torchrun stops its workers when one fails
        if proc.returncode == 0 and result_path.exists():
            return RunResult.load(result_path)
        error = root_cause(log_dir, output)
        status = "oom" if "OutOfMemoryError" in error.splitlines()[0] else "failed"
        return _failed(config, plan, status, f"torchrun exited with {proc.returncode}; {error}")


def _failed(config: RunConfig, plan: PrecisionPlan, status: str, error: str) -> RunResult:
    return RunResult(
        config=config.to_dict(),
        plan={**plan.to_dict(), "torch_version": torch.__version__},
        status=status,
        error=error,
    )
