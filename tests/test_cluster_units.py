"""In-process checks of the cluster pieces: the attempt handshake, the folder lease, determinism, stop requests."""

import json
import os
import signal
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from himae_dist import elastic_attempt
from himae_dist.preemption import StopRequest
from himae_dist.run_lease import LEASE, LeaseHeld, RunLease
from himae_dist.train import set_determinism
from tests.ports import free_port


def _attempt(port: int, world: int, ranks: list[int]) -> dict[int, tuple]:
    """One attempt: `ranks` start in this order (threads), each with its own store client; {rank: (attempt, store)}."""
    timeout = timedelta(seconds=20)
    client = lambda: dist.TCPStore("127.0.0.1", port, 1, is_master=False, timeout=timeout)  # noqa: E731
    got = {}

    def one(rank: int) -> None:
        store, attempt, formed = elastic_attempt.handshake(client(), rank, world, timeout, client)
        if rank == 0:
            formed()  # at once, as NCCL's lazy init returns: the leader still answers everyone first
        store.add("joined", 1)
        got[rank] = (attempt, store)

    threads = []
    for r in ranks:
        threads.append(threading.Thread(target=one, args=(r,)))
        threads[-1].start()
        time.sleep(0.05)  # in this order
    for t in threads:
        t.join(60)
    return got


@pytest.mark.parametrize("leader_first", [True, False])
def test_every_rank_of_an_attempt_meets_in_one_fresh_namespace(leader_first):
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=20), wait_for_workers=False)
    world = 4
    # attempt 0: all ranks meet
    first = _attempt(port, world, [0, 1, 2, 3] if leader_first else [3, 2, 1, 0])
    assert {a for a, _ in first.values()} == {0}
    # a previous attempt's stale registration (a rank that died before its leader answered) is harmless
    server.set(f"{elastic_attempt._REGISTERED}{server.add(elastic_attempt._SEQ, 1)}", "stale-token")
    second = _attempt(port, world, [0, 2, 3, 1] if leader_first else [1, 3, 2, 0])
    assert len(second) == world and {a for a, _ in second.values()} == {1}
    assert all(s.add("joined", 0) == world for _, s in second.values())  # met in one namespace, not the last
    second[0][1].set("only-in-attempt-1", "x")
    assert all(s.check(["only-in-attempt-1"]) for _, s in second.values())  # one namespace for all ranks
    assert not first[1][1].check(["only-in-attempt-1"])  # ...not the last attempt's


def test_attempt_store_is_off_outside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    store, attempt, formed = elastic_attempt.attempt_store(timedelta(seconds=1))
    assert store is None and attempt == 0
    formed()


def _lease_file(out, **fields):
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
           "run_id": "none", "attempt": 0, "token": "t0", "interval_s": 10.0, **fields}
    out.mkdir(parents=True, exist_ok=True)
    (out / LEASE).write_text(json.dumps(rec))


def test_a_live_lease_is_refused_naming_its_holder(tmp_path):
    _lease_file(tmp_path, host="node7", pid=4242)
    with pytest.raises(LeaseHeld, match=r"is in use by the trainer on host node7, pid 4242 .*one run per folder"):
        RunLease(tmp_path).acquire()


@pytest.mark.parametrize("fields,why", [
    ({"host": "node7", "heartbeat": time.time() - 3600}, r"its heartbeat is \d+ s old"),
    ({"pid": 2**22 + 17}, r"pid \d+ is no longer running on this host"),
    ({"host": "node7", "run_id": "job9", "attempt": 0}, r"written by attempt 0 of this torchrun job \(job9\)"),
])
def test_a_stale_lease_is_taken_over_with_a_message(tmp_path, fields, why):
    _lease_file(tmp_path, **fields)
    lease = RunLease(tmp_path, run_id="job9", attempt=1)
    assert __import__("re").search(why, lease.acquire())
    held = json.loads((tmp_path / LEASE).read_text())
    assert held["token"] == lease.token and held["pid"] == os.getpid()
    lease.release()
    assert not (tmp_path / LEASE).exists()


def test_the_heartbeat_renews_the_lease(tmp_path):
    lease = RunLease(tmp_path, interval_s=0.1)
    assert lease.acquire() is None
    lease.start_heartbeat()
    first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first
    with pytest.raises(LeaseHeld):
        RunLease(tmp_path).acquire()
    lease.release()
    assert RunLease(tmp_path).acquire() is None


def test_deterministic_switches_the_kernels():
    try:
        set_determinism(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_determinism(False, tf32=False)  # the default: fastest cuDNN kernels for the fixed shapes
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        set_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.allow_tf32


def test_stop_request_takes_the_first_signal_and_keeps_running():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
    try:
        stop = StopRequest()
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM may deliver twice: still running, still the first name
        time.sleep(0.1)
        assert stop.requested and stop.signal_name == "SIGUSR1"
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_lease_of_the_same_job_is_waited_for_until_stale(tmp_path):
    # a SLURM requeue keeps the run id but starts the attempt count again; the old rank 0 may be on another host
    _lease_file(tmp_path, host="node7", run_id="job9", attempt=3, interval_s=0.1)
    t0 = time.monotonic()
    note = RunLease(tmp_path, run_id="job9", attempt=0, interval_s=0.1).acquire()
    assert "heartbeat is" in note and 0.5 < time.monotonic() - t0 < 5, note
    _lease_file(tmp_path / "other", host="node7", run_id="job8", attempt=0)
    with pytest.raises(LeaseHeld):  # another job's live lease: refused at once
        RunLease(tmp_path / "other", run_id="job9", attempt=1, interval_s=0.1).acquire()


def test_a_second_ctrl_c_stops_at_once_without_a_save():
    import subprocess
    import sys

    code = ("import os, signal, time; from himae_dist.preemption import StopRequest; s = StopRequest(); "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); assert s.signal_name == 'SIGINT'; "
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(10)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "interrupted twice: stopping without a save" in proc.stderr, proc.stderr
