"""One trainer per --out: rank 0 holds a lease file there while it runs.

Two trainers on one folder both exited 0, with interleaved metrics and one run's config beside
the other's weights. So rank 0 creates `--out/.himae_lease.json` (host, pid, start time, run
id, heartbeat) with O_EXCL before anything else is written, and rewrites it every
`interval_s` from a thread. A second trainer refuses with one line naming the holder. A lease
is stale, and taken over with a message, when its heartbeat is older than `stale_after`
intervals, when its pid is dead on this host, or when an earlier attempt of the same torchrun
job (same run id, not "none") wrote it: a restarted rank 0 may land on another node.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from data_prep.atomic_write import atomic_path
from data_prep.parent_death import pid_alive

LEASE = ".himae_lease.json"


class LeaseHeld(ValueError):
    pass


class RunLease:
    def __init__(self, out: Path, run_id: str = "none", attempt: int = 0, interval_s: float | None = None,
                 stale_after: int = 6):
        self.path = Path(out) / LEASE
        self.run_id, self.attempt = run_id or "none", attempt
        self.interval_s = interval_s or float(os.environ.get("HIMAE_LEASE_INTERVAL_S", "10"))
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "started": self.started, "heartbeat": time.time(),
                "run_id": self.run_id, "attempt": self.attempt, "token": self.token, "interval_s": self.interval_s}

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            return json.loads((path or self.path).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or unreadable: judged by the file's age below

    def why_stale(self, held: dict) -> str | None:
        """Why the lease `held` may be taken over, or None while its holder may still run."""
        age = time.time() - float(held.get("heartbeat") or self._mtime())
        if age > self.stale_after * float(held.get("interval_s") or self.interval_s):
            return f"its heartbeat is {age:.0f} s old"
        if held.get("host") == socket.gethostname() and not pid_alive(int(held.get("pid") or 0)):
            return f"pid {held.get('pid')} is no longer running on this host"
        if self.run_id != "none" and held.get("run_id") == self.run_id and int(held.get("attempt", -1)) < self.attempt:
            return f"it was written by attempt {held.get('attempt')} of this torchrun job ({self.run_id})"
        return None

    def _same_job(self, held: dict) -> bool:
        """Written by this torchrun job (a SLURM requeue keeps the id but starts the attempt count again)."""
        return self.run_id != "none" and held.get("run_id") == self.run_id

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def acquire(self) -> str | None:
        """Take the lease (a message if a stale one was taken over), or raise LeaseHeld naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        patience = time.monotonic() + (self.stale_after + 1) * self.interval_s
        while time.monotonic() < patience + 5:  # takeover races resolve at once; a same-job wait is bounded
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released meanwhile
                why = self.why_stale(held)
                if why is None and self._same_job(held) and time.monotonic() < patience:
                    time.sleep(min(5.0, self.interval_s))  # this job's earlier attempt, maybe on another host:
                    continue  # its heartbeat goes stale within stale_after intervals
                if why is None:
                    beat = time.time() - float(held.get("heartbeat", 0))
                    raise LeaseHeld(
                        f"--out {self.path.parent} is in use by the trainer on host {held.get('host')}, pid "
                        f"{held.get('pid')} (started {time.ctime(float(held.get('started', 0)))}, heartbeat {beat:.0f} s "
                        f"ago): one run per folder; wait for it, stop it, or choose another --out") from None
                aside = self.path.with_name(f"{LEASE}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(self.path, aside)  # only one taker renames this file
                except FileNotFoundError:
                    continue
                if (self._read(aside) or {}).get("token") != held.get("token"):  # a live lease appeared meanwhile: put it back
                    os.rename(aside, self.path)
                    continue
                aside.unlink()
                note = (f"took over the lease on --out {self.path.parent} from host {held.get('host')}, pid "
                        f"{held.get('pid')}: {why}")
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self._record()))
            return note
        raise LeaseHeld(f"--out {self.path.parent}: could not take the lease {self.path} (other trainers race for it)")

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="himae-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            held = self._read()
            if held == {}:
                continue  # unreadable for now (NFS hiccup, a torn read): try again next beat
            if held is None or held.get("token") != self.token:
                print(f"himae-train: error: lost the lease on --out {self.path.parent} (now {held}); another trainer "
                      f"took the folder over: stopping without writing more", file=sys.stderr, flush=True)
                os._exit(1)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self._record()))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self._read()
        if held and held.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
