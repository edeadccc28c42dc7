"""SIGTERM and SIGINT as an exception that unwinds a job, so each CLI ends with one line, not a traceback.

Used by himae-prep (and its label and verify commands) and himae-probe: `finally` blocks remove temp
files and stop worker pools, then main() prints its line and exits 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable, Iterator


def exit_at_once_on_signals(line: Callable[[int], str]) -> None:
    """For a CLI's process, set before its slow imports: until main() takes over (`stop_on_signals`), and
    after it hands back, SIGTERM/SIGINT end it at once with `line(signum)` on stderr, not a
    KeyboardInterrupt traceback (importing torch, numpy, h5py... takes seconds; nothing is written meanwhile)."""

    def exit_now(signum: int, frame: object) -> None:
        os.write(2, (line(signum) + "\n").encode())
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, exit_now)


class Interrupted(BaseException):
    """SIGTERM/SIGINT reached the job: unwinds like KeyboardInterrupt (finally blocks run), but a
    BaseException that no `except Exception` (bad-row handling, retries) can swallow."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the job runs, SIGTERM and SIGINT raise `Interrupted` in the main thread. A repeated
    signal is ignored while the first unwinds; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    stopping = False

    def raise_interrupted(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Interrupted(signum)

    previous = {sig: signal.signal(sig, raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
