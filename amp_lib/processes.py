"""Child processes: they never outlive their parent, and each gets its share of the threads.

A sweep's workers and the torchrun launcher's agent must stop even when their parent is killed outright
(SIGKILL: a timed-out kernel, an OOM kill), when no clean-up code of the parent can run. Linux can do it:
`prctl(PR_SET_PDEATHSIG)` has the kernel signal the child when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (Linux; False elsewhere or if prctl
    refuses), and exit now if the parent `parent` is already gone: it may have died before the call, and then
    no signal will ever come. Call it first thing in the child (a pool's initializer, a `preexec_fn`)."""
    if not sys.platform.startswith("linux"):
        return False
    if ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, sig) != 0:  # the kernel reads no other argument
        return False
    if os.getppid() != parent:
        os._exit(1)
    return True


def thread_share(threads: int, children: int) -> int:
    """Threads for each of `children` processes sharing `threads` (at least one: OMP_NUM_THREADS=0 is
    refused), so parallel processes do not oversubscribe the cores."""
    return max(1, threads // max(1, children))
