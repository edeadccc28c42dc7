"""Preemption: SIGTERM, SIGUSR1, SIGINT and SIGHUP ask the trainer to save and stop, not to die.

SLURM sends SIGTERM at walltime, on `scancel` and on preemption (SIGUSR1 ahead of time with
`--signal=USR1@120`); torchrun forwards the signals it handles to its workers and SIGKILLs
them after `--shutdown-timeout`. The handler only sets a host flag. The ranks agree on it in
the all-reduce they already make at every log step (no extra collective or device sync), so a
signal is honoured at the next log step, within --log-every steps, plus the save.

A second SIGINT (Ctrl-C twice at a terminal) stops at once. A repeated SIGTERM or SIGUSR1 does
not: SLURM may deliver a signal to the workers directly as well as through torchrun.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: saved, stopped on request; run the same command to resume
_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")


class StopRequest:
    """Installs the handlers (main thread only, unless install=False); `signal_name` is the first signal, or None."""

    def __init__(self, install: bool = True) -> None:
        self.signal_name: str | None = None
        if install and threading.current_thread() is threading.main_thread():
            for name in _SIGNALS:
                signal.signal(getattr(signal, name), self._handle)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            print("himae-train: interrupted twice: stopping without a save", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal_name = self.signal_name or name
