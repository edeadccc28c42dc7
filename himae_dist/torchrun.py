"""`python -m himae_dist.torchrun [torchrun flags] -m himae_dist.train ...`: torchrun for preemptible jobs.

Plain torchrun does not forward SIGUSR1 (SLURM's early warning; its default action kills the
agent), gives workers 30 s after a signal before SIGKILL, and ends a signalled run in a
`SignalException` traceback, and a failed worker in a ~25-line `ChildFailedError` wall. This
sets two defaults through torchrun's own environment variables (explicit flags still win),
turns a signal into exit code 128 + signal number (the trainer's rank 0 has already printed
the line that matters: "saved step N ..."), and a failed worker into one line and its exit code.
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
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"himae-torchrun: rank {rank} failed ({how}); its own error is above", file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
