"""Start launchers and always reap their whole process tree: torchrun starts workers in their own
sessions, so killing the launcher's process group misses them."""

from __future__ import annotations

import subprocess
import time

import psutil


def kill_tree(*pids: int) -> None:
    """SIGKILL these processes and every descendant still attached to them; wait until gone."""
    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for every process (text pipes); on a timeout or any error kill all their trees, then re-raise."""
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    except BaseException:
        kill_tree(*(p.pid for p in procs))
        raise
    return results


def alive_after(pids: list[int], seconds: float) -> list[int]:
    """The pids still running (zombies count as gone) after up to `seconds`, polling."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if _running(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(proc: int | psutil.Process) -> bool:
    """Alive and not a zombie; a process that exits while we look counts as gone."""
    try:
        p = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
