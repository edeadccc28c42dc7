"""`python -m himae_dist.torchrun [torchrun flags] -m himae_dist.train ...`: torchrun for preemptible jobs.

Plain torchrun does not forward SIGUSR1 (SLURM's early warning; its default action kills the
agent), gives workers 30 s after a signal before SIGKILL, and ends a signalled run in a
`SignalException` traceback, and a failed worker in a ~25-line `ChildFailedError` wall. This
sets two defaults through torchrun's own environment variables (explicit flags still win),
turns a signal into exit code 128 + signal number (the trainer's rank 0 has already printed
the line that matters: "saved step N ..."), and a failed worker into its exit code and, last, the
first failing rank's own error line (from its torchelastic error file: `himae_dist.train` writes
its `himae-train: error:` line there), so the root cause is the last thing on the screen.
"""

from __future__ import annotations

import os
import sys

DEFAULTS = {
    "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",  # forwarded to the workers
    "PET_SHUTDOWN_TIMEOUT": "120",  # s between forwarding a signal and SIGKILL: room for the save
}


def main(argv: list[str] | None = None) -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ["HIMAE_LAUNCHER_REPORTS_ERRORS"] = "1"  # the workers' error lines are printed once, below
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        rank, failure = root_cause(e.failures)
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        line = error_message(failure)
        if line.startswith("himae-train:"):
            print(f"himae-torchrun: rank {rank} failed ({how}):\n{line}", file=sys.stderr, flush=True)
        elif line:
            print(f"himae-torchrun: rank {rank} failed ({how}): {line} (its traceback is above)", file=sys.stderr,
                  flush=True)
        else:
            print(f"himae-torchrun: rank {rank} failed ({how}); its own error is above", file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


def error_message(failure) -> str:
    """The first line of a failed rank's recorded error ('' when it wrote none: a signal, a crash)."""
    msg = failure.message  # a str is torchrun's own (a signal, no error file): nothing the rank said
    msg = str(msg.get("message") or "").strip() if isinstance(msg, dict) else ""
    return msg.splitlines()[0] if msg else ""


def root_cause(failures: dict) -> tuple:
    """(rank, failure): the earliest failure (by its error file's time, whole seconds), preferring one
    that is not only a peer's death seen in a collective, then one that exited on its own (not
    stopped by torchrun's SIGTERM after another rank failed), then the lowest rank."""
    from himae_dist.train import PEER_EXITED

    return min(failures.items(), key=lambda rf: (rf[1].timestamp, PEER_EXITED in error_message(rf[1]),
                                                 rf[1].exitcode < 0, rf[0]))


if __name__ == "__main__":
    main()
