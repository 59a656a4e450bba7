"""A sweep's runs as Ray tasks: one task per run, named after it, on a Ray cluster or a local instance.

Each task is `execute_run` (train.ipynb through papermill) on whichever node Ray picks, writing its
result JSON into the output folder, which must therefore be shared by every node (NFS, a cluster
filesystem; on one machine it simply is). A task asks for one CPU and, for a GPU run, `nproc` GPUs, so
Ray sets its CUDA_VISIBLE_DEVICES and the run's kernel inherits it. Ray does not retry a task: a run
whose worker or node died is recorded `failed` with Ray's reason, and a resumed sweep re-runs it.

Ray is an optional extra (`pip install amp-workbook[ray]`), imported only when a sweep uses it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from amp_lib.results import first_line
from amp_lib.sweep.execute import Outcome, Settings, error_text, execute_run, lost_run, stamp
from amp_lib.sweep.grid import SweepRun

EXTRA = "pip install amp-workbook[ray]"
# "auto" (the cluster this machine belongs to, or RAY_ADDRESS), "host:port" of its GCS, or a Ray Client
# "ray://host:port" URL: what `ray.init(address=...)` takes.
ADDRESS = re.compile(r"auto|(ray://)?[\w.\-]+:\d{1,5}")


def address_problems(address: str | None) -> list[str]:
    """What is wrong with `--ray-address` (checked before anything runs); [] when it is usable."""
    problems = []
    if importlib.util.find_spec("ray") is None:
        problems.append(f"--executor ray needs Ray, which is not installed: {EXTRA}")
    if address is not None and not ADDRESS.fullmatch(address):
        problems.append(
            f"invalid --ray-address {address!r}; expected auto, host:port or ray://host:port"
            " (leave it out to start a local Ray instance)"
        )
    return problems


CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an unreachable cluster for minutes; a sweep says so in seconds


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing answers at a `host:port` or `ray://host:port` address (a TCP connection within `timeout`
    seconds), or None; "auto" resolves through $RAY_ADDRESS when set, else Ray finds its local cluster itself."""
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not ADDRESS.fullmatch(address) or address == "auto":
            return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        return f"nothing answers at {host}:{port} within {timeout:g} s ({exc.strerror or type(exc).__name__})"
    return None


def _another_cluster(address: str | None) -> str | None:
    """The GCS address this process's Ray is connected to, when `address` names another cluster (its port
    differs); None when no address was asked for, "auto", or the same port."""
    if address is None or address == "auto":
        return None
    import ray

    try:
        current = ray.get_runtime_context().gcs_address
    except (AttributeError, ray.exceptions.RaySystemError):  # a Ray Client connection has no GCS client here
        return None
    same = str(current).rpartition(":")[2] == address.removeprefix("ray://").rpartition(":")[2]
    return None if same else str(current)


def wants_gpus(run: SweepRun, cluster_has_gpus: bool) -> bool:
    """A run trains on a GPU: its device says cuda, or it is `auto` on a cluster that has GPUs."""
    device = str(run.config_values().get("device", "auto"))
    return device.startswith("cuda") or (device == "auto" and cluster_has_gpus)


def task_resources(run: SweepRun, cluster_has_gpus: bool) -> dict[str, Any]:
    """`.options()` of a run's task: its name (what the dashboard and `ray list tasks` show), one CPU,
    and `nproc` GPUs (one per process of the run) for a GPU run."""
    gpus = int(run.config_values().get("nproc", 1)) if wants_gpus(run, cluster_has_gpus) else 0
    return {"name": run.name, "num_cpus": 1, "num_gpus": gpus, "max_retries": 0}


def _task(run: SweepRun, settings: Settings) -> Outcome:
    """The body of a run's Ray task (module level, so workers import it instead of unpickling code)."""
    return execute_run(run, settings)


@dataclass
class RayExecutor:
    """Runs on Ray. `address` None starts a local instance (`num_cpus`, default this machine's cores; no
    dashboard unless `dashboard`) for the sweep and stops it at `close()`; a sweep that finds Ray already
    initialised in its process uses that instance and leaves it running, unless `address` names another
    cluster (then it refuses: running on the one it found would mislabel where the runs ran)."""

    address: str | None = None
    dashboard: bool = False
    num_cpus: int | None = None  # of a local instance; None: this machine's cores
    _started: bool = field(default=False, init=False, repr=False)
    _resources: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _temp_dir: str | None = field(default=None, init=False, repr=False)

    def open(self) -> None:
        """Connect (or start a local instance); a cluster that cannot be reached is a `ValueError`, raised
        before the sweep writes anything."""
        problems = address_problems(self.address)
        if problems:
            raise ValueError("\n".join(problems))
        import ray

        if ray.is_initialized() and (other := _another_cluster(self.address)):
            raise ValueError(
                f"--ray-address {self.address}: Ray is already initialised in this process, connected to {other};"
                " call ray.shutdown() first, or leave --ray-address out to use that cluster"
            )
        if not ray.is_initialized():
            try:
                if self.address is None:
                    # The local instance's session files go to a folder of its own, removed by close().
                    self._temp_dir = tempfile.mkdtemp(prefix="amp-ray-")
                    ray.init(
                        num_cpus=self.num_cpus or len(os.sched_getaffinity(0)),
                        include_dashboard=self.dashboard,
                        log_to_driver=False,  # the runs' output is in their notebooks; the sweep prints its bar
                        _temp_dir=self._temp_dir,
                    )
                else:
                    if (why := unreachable(self.address)) is not None:
                        raise ConnectionError(why)
                    ray.init(address=self.address, log_to_driver=False)
            except Exception as exc:  # Ray raises bare Exceptions too (a node that timed out starting)
                # What did start of a local instance dies with this process (Ray fate-shares it).
                self.close()
                where = f"--ray-address {self.address}: cannot connect to Ray" if self.address else "cannot start Ray"
                raise ValueError(f"{where}: {first_line(error_text(exc))}") from exc
            self._started = True
        self._resources = dict(ray.cluster_resources())

    def close(self) -> None:
        if self._started or self._temp_dir:
            import ray

            ray.shutdown()
            self._started = False
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    def concurrency(self, todo: Sequence[SweepRun]) -> int:
        """Runs the cluster can hold at once (its CPUs, or its GPUs over a GPU run's share)."""
        if not todo:
            return 1
        has_gpus = self._resources.get("GPU", 0) > 0
        need = task_resources(todo[0], has_gpus)
        slots = int(self._resources.get("CPU", 1))
        if need["num_gpus"]:
            slots = min(slots, int(self._resources.get("GPU", 0) // need["num_gpus"]))
        return max(1, min(slots, len(todo)))

    def run(
        self,
        todo: Sequence[SweepRun],
        settings: Settings,
        done: Callable[[Outcome], None],
        starting: Callable[[SweepRun], None],
    ) -> None:
        import ray

        remote = ray.remote(_task)
        has_gpus = self._resources.get("GPU", 0) > 0
        stamps = {run.name: stamp(run.result_path) for run in todo}
        refs = {remote.options(**task_resources(run, has_gpus)).remote(run, settings): run for run in todo}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    run = refs[ref]
                    try:
                        outcome = ray.get(ref)
                    except ray.exceptions.RayError as exc:  # the worker or its node died, or Ray killed it
                        outcome = lost_run(run, f"Ray lost the run's task: {error_text(exc)}", stamps[run.name])
                    done(outcome)
        except KeyboardInterrupt:
            # force=True kills the workers (a running papermill call does not stop for anything less);
            # their kernels exit with them (ipykernel polls its parent).
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
