"""amp_lib.processes: a child armed with `die_with_parent` never outlives its parent; thread shares."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_state import alive

import amp_lib.processes
from amp_lib.processes import PR_SET_PDEATHSIG, die_with_parent, thread_share

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


def _armed() -> int:
    """The signal the kernel will send this process when its parent dies (0: none)."""
    sig = ctypes.c_int(0)
    ctypes.CDLL(None).prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    return sig.value


@pytest.fixture
def armed_as_found() -> Iterator[None]:
    """The test process may be armed by a test: it is disarmed (or re-armed as it was) afterwards."""
    before = _armed()
    yield
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, before, 0, 0, 0)


@LINUX
@pytest.mark.usefixtures("armed_as_found")
def test_an_armed_process_gets_the_chosen_signal_when_its_parent_dies() -> None:
    assert die_with_parent(os.getppid(), signal.SIGTERM) is True
    assert _armed() == signal.SIGTERM
    assert die_with_parent(os.getppid()) is True
    assert _armed() == signal.SIGKILL  # unless told otherwise: nothing can ignore it


@LINUX
@pytest.mark.usefixtures("armed_as_found")
def test_a_signal_prctl_refuses_is_reported_not_raised() -> None:
    assert die_with_parent(os.getppid(), 999) is False
    assert _armed() == 0


@pytest.mark.usefixtures("armed_as_found")
def test_elsewhere_nothing_is_armed_and_the_call_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert die_with_parent(-1) is False  # not even the parent check: -1 is nobody's pid
    if os.name == "posix" and Path("/proc/self").exists():
        assert _armed() == 0


@LINUX
def test_a_process_whose_parent_died_before_it_was_armed_exits_at_once() -> None:
    # Another pid than the real parent's is what getppid() reads once the parent is gone and the child adopted.
    pid = os.fork()
    if pid == 0:  # the child: nothing of pytest's may run here, whatever happens
        try:
            die_with_parent(os.getppid() + 1)
        finally:
            os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1  # 7: it went on


@LINUX
def test_a_parent_killed_outright_takes_its_armed_child_with_it(tmp_path: Path) -> None:
    got = tmp_path / "got"
    child = f"""import os, runpy, signal, sys, time
die_with_parent = runpy.run_path({amp_lib.processes.__file__!r})["die_with_parent"]
signal.signal(signal.SIGTERM, lambda *_: (open({str(got)!r}, "w").write("SIGTERM"), os._exit(0)))
die_with_parent(int(sys.argv[1]), signal.SIGTERM)
print(os.getpid(), flush=True)
time.sleep(60)
"""
    parent_code = f"""import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid())])
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())  # printed once armed
        parent.kill()  # SIGKILL: nothing of the parent's can run
        parent.wait()
        deadline = time.monotonic() + 20
        while alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child_pid), "the child outlived its parent"
        assert got.read_text() == "SIGTERM"
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        if child_pid is not None and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


# --- thread shares ---------------------------------------------------------------------------------


def test_children_split_the_threads_and_each_gets_at_least_one() -> None:
    assert thread_share(4, 2) == 2 and thread_share(5, 2) == 2 and thread_share(8, 3) == 2
    assert thread_share(1, 2) == 1 and thread_share(2, 3) == 1  # never 0: OMP_NUM_THREADS=0 is refused
    assert thread_share(4, 1) == thread_share(4, 0) == 4  # no children to share with: all of them
