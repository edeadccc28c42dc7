"""Turns a hang into a clear error: a rank that makes no progress for the timeout exits non-zero.

Backend timeouts do not cover every wait: DeepSpeed's CPU all-reduce (shared-memory op) spins
without one, and a NCCL collective may block its caller. So the trainer beats a watchdog at
every step and around saves; a silent interval longer than `--collective-timeout-s` prints
which rank and where it stalled, and exits 1, so torchrun restarts or fails the job.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._last, self._where = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="himae-watchdog", daemon=True)
        self._thread.start()

    def beat(self, where: str, timeout_s: float | None = None) -> None:
        """Progress at `where`; `timeout_s` changes the bound from now on."""
        self._last, self._where = time.monotonic(), where
        if timeout_s is not None:
            self.timeout_s = timeout_s

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(f"himae-train: error: rank {self.rank} made no progress for {idle:.0f} s after {self._where} "
                      f"(--collective-timeout-s={self.timeout_s:g}): a rank stalled or died, or a collective hangs",
                      file=sys.stderr, flush=True)
                os._exit(1)
