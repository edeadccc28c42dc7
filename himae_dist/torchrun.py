"""`python -m himae_dist.torchrun [torchrun flags] -m himae_dist.train ...`: torchrun for preemptible jobs.

Plain torchrun does not forward SIGUSR1 (SLURM's early warning; its default action kills the
agent), gives workers 30 s after a signal before SIGKILL, and ends a signalled run in a
`SignalException` traceback. This sets two defaults through torchrun's own environment
variables (explicit flags still win) and turns the signal into exit code 128 + signal number;
the trainer's rank 0 has already printed the one line that matters ("saved step N ...").
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
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":
    main()
