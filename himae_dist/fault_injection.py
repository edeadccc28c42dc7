"""Test hook, outside the step loop: HIMAE_FAULT=WHAT:RANK:STEP[,...] acts before that step of the
first attempt (as all nodes count it; `elastic_attempt`), on that global rank.

kill: SIGKILL this rank; stall: sleep until a stop is requested (the others' next collective
waits); term: SIGTERM the torchrun agent (a preemption); killnode: SIGKILL the torchrun agent (the
node is lost; this rank follows it, `exit_with_parent`). Unset, the steps pass through untouched.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable

from himae_dist.preemption import StopRequest


def steps(steps: range, rank: int, attempt: int, stop: StopRequest, beat: Callable[[str], None]) -> Iterable[int]:
    """`steps`, acting on the faults set for this rank before each step's start (after `beat`, the
    watchdog's, so a stalled rank is reported at the step it stalled in)."""
    spec = os.environ.get("HIMAE_FAULT")
    if not spec or attempt != 0:
        return steps
    faults = {}
    for item in spec.split(","):
        what, r, s = item.split(":")
        if what not in ("kill", "stall", "term", "killnode"):
            raise ValueError(f"HIMAE_FAULT={spec}: {what!r} is not kill, stall, term or killnode")
        faults[(int(r), int(s))] = what
    return _with_faults(steps, faults, rank, stop, beat)


def _with_faults(steps: range, faults: dict, rank: int, stop: StopRequest, beat: Callable[[str], None]) -> Iterable[int]:
    for step in steps:
        beat(f"step {step}")
        what = faults.get((rank, step))
        if what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif what == "term":
            os.kill(os.getppid(), signal.SIGTERM)
        elif what == "killnode":
            os.kill(os.getppid(), signal.SIGKILL)
            time.sleep(3600)  # until exit_with_parent ends this rank
        elif what == "stall":
            deadline = time.monotonic() + 3600
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.05)
        yield step


def keys_log(rank: int):
    """Test hook: HIMAE_TEST_KEYS=PREFIX makes rank r append "step micro key ..." per micro-batch to PREFIX.r
    (the samples each step consumed, to compare runs on other world sizes); None when unset."""
    prefix = os.environ.get("HIMAE_TEST_KEYS")
    return open(f"{prefix}.{rank}", "a", buffering=1) if prefix else None
