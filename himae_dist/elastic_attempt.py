"""One key namespace per torchrun attempt that every node agrees on.

torchrun's agent store outlives a restart, still holding the last attempt's gloo addresses, so
each attempt needs fresh keys. `TORCHELASTIC_RESTART_COUNT` cannot name them: an agent counts a
restart only when its own worker failed ("membership changes do not count as retries"), so
after one node's rank dies the nodes disagree (1 on that node, 0 on a node whose worker was
still healthy when the other rejoined) and the ranks never meet.

A handshake in the agent store instead. Global rank 0 (the leader) draws the attempt number
from a counter (`store.add`) and a fresh token. Every other rank registers a token of its own
under the next number of a second counter and waits for the leader to answer under that token:
a key no earlier attempt could have written, so no rank can take a stale answer. The leader
answers the registrations made since shortly before it started (the last world-1 of them may
be this attempt's; answering an older one is harmless) until the process group is formed. Every
process of an attempt starts after every process of the previous one was stopped (the agents
stop their workers before the next rendezvous round), so only this attempt's leader answers.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import timedelta

_ATTEMPTS = "himae/attempts"  # counter: one add per leader, so per attempt
_SEQ = "himae/registrations"  # counter: one add per non-leader rank per attempt
_REGISTERED = "himae/registered/"  # + number -> the rank's token
_ANSWER = "himae/answer/"  # + token -> "attempt:namespace"


def _client(timeout: timedelta):
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                         is_master=False, timeout=timeout)


class _Answerer:
    """The leader's thread: answers every registration until `stop()` (the group is formed)."""

    def __init__(self, store, world: int, answer: bytes):
        self.store, self.answer = store, answer
        self.next = max(1, store.add(_SEQ, 0) - (world - 2))  # the last world-1 registrations may be ours
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="himae-attempt-answer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: set[int] = set()
        while not self._stop.is_set():
            last = self.store.add(_SEQ, 0)
            pending.update(range(self.next, last + 1))
            self.next = last + 1
            for i in sorted(pending):
                key = f"{_REGISTERED}{i}"
                if self.store.check([key]):  # registered: counter taken, token written right after
                    self.store.set(_ANSWER + self.store.get(key).decode(), self.answer)
                    pending.discard(i)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def attempt_store(timeout: timedelta):
    """Under torchrun: (store for `init_process_group`, attempt number, finish). Else (None, 0, no-op).

    Call `finish()` once the process group is formed (the leader stops answering).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None, 0, lambda: None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return handshake(_client(timeout), rank, world, timeout, lambda: _client(timeout))


def handshake(store, rank: int, world: int, timeout: timedelta, new_client):
    """The protocol above over `store`; `new_client()` gives the leader's answering thread its own connection.

    `finish()` returns once every rank holds its answer: the leader keeps answering until then,
    whether or not the backend's init waited for all ranks (NCCL's may return at once).
    """
    import torch.distributed as dist

    token = uuid.uuid4().hex
    finish = lambda: None  # noqa: E731
    if rank == 0:
        attempt = store.add(_ATTEMPTS, 1) - 1
        namespace = f"himae/attempt_{attempt}_{token[:12]}"
        if world > 1:  # its own connection: the process group uses `store` meanwhile
            answerer = _Answerer(new_client(), world, f"{attempt}:{namespace}".encode())
            finish = lambda: _wait_answered(store, namespace, world, timeout, answerer)  # noqa: E731
    else:
        store.set(f"{_REGISTERED}{store.add(_SEQ, 1)}", token)
        store.wait([_ANSWER + token], timeout)
        attempt_s, namespace = store.get(_ANSWER + token).decode().split(":", 1)
        attempt = int(attempt_s)
        store.add(f"{namespace}/answered", 1)
    return dist.PrefixStore(namespace, store), attempt, finish


def _wait_answered(store, namespace: str, world: int, timeout: timedelta, answerer: _Answerer) -> None:
    """Leader: stop answering once all world-1 other ranks took their answer (or after `timeout`)."""
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"{namespace}/answered", 0) < world - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    answerer.stop()
