"""A child process that must not outlive its parent: Linux's parent-death signal.

torchrun starts workers in their own sessions and `ProcessPoolExecutor` workers block on a
queue, so neither dies with a SIGKILLed (or OOM-killed) parent: they ran on, writing into the
run's folder. `exit_with_parent()` asks the kernel to SIGKILL this process when its parent
dies (`prctl(PR_SET_PDEATHSIG)`); atomic writes mean a kill leaves nothing half-written.
Elsewhere (not Linux) a daemon thread polls the parent pid instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGKILL, poll_s: float = 1.0, parent: int | None = None) -> None:
    """Die with `sig` when the parent process dies. Call first thing in the child. `parent`: the pid
    the parent passed in, which catches a parent that died before this call (we were re-parented)."""
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), sig)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-death-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
