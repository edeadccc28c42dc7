"""Non-finite data and weights never train silently and never end in exit code 0.

Training batches are checked on the device, with no host sync (`NonFiniteGuard`): a sample
holding a NaN or inf takes the place of the first finite sample of its micro-batch (so
BatchNorm's batch statistics see only real data), gets loss weight 0 and is counted. No NaN
ever reaches a gradient or the all-reduce. The count, and then the shards and keys, are read at
the next log step or save, which read the device anyway: `abort` stops there naming them and
saves nothing; `skip` goes on, the count in metrics.jsonl. A micro-batch with no finite sample
(rare, and counted) trains on copies of its first sample, non-finite values zeroed, at loss
weight 0: no gradient, but one update of BatchNorm's running statistics. Validation batches, read
once at start, are checked on the host (`bad_rows`).
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import torch


class NonFiniteError(ValueError):
    pass


def bad_rows(signal: torch.Tensor) -> np.ndarray:
    """Indices of samples with a NaN or inf ([B, C, L] host tensor)."""
    a = signal.numpy()
    return np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))


def describe(batch: dict, rows: np.ndarray, shard_names: list[str]) -> str:
    shards = sorted({shard_names[int(batch["shard"][i])] for i in rows})
    keys = [str(batch["key"][i]) for i in rows[:5]]
    return f"{len(rows)} sample(s) with NaN/inf, shard(s) {shards}, key(s) {keys}"


class NonFiniteGuard:
    """Per rank: non-finite samples dropped on the device, counted, named when the count is read.

    The count is an int64 device scalar (exact at any scale). The keep masks and keys of the last
    `NAMED_BATCHES` micro-batches are held to name what was dropped; earlier ones are counted only.
    """

    NAMED_BATCHES = 256

    def __init__(self, policy: str, rank: int, device: torch.device, shard_names: list[str], mine: int = 0,
                 all_ranks: int = 0, step: int = 0):
        """`mine`, `all_ranks`: the counts a resumed run saved at `step` (this rank's; every rank's summed)."""
        self.policy, self.rank, self.shard_names = policy, rank, shard_names
        self.count = torch.tensor(int(mine), dtype=torch.int64, device=device)  # this rank's, whole run (device)
        self.settled, self.settled_all = int(mine), int(all_ranks)  # the counts as last read
        self.settled_at = step  # ... after this step
        self.start_all, self.checked = int(all_ranks), 0  # every rank's count at this attempt's start; samples seen
        self._unread = 0  # samples checked since the last read (host: shapes only)
        self._recent: collections.deque = collections.deque(maxlen=self.NAMED_BATCHES)  # (keep [B], keys, shards)
        self._rows: torch.Tensor | None = None

    def clean(self, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, L] on the device -> (x with every non-finite sample replaced, keep [B] bool). No host sync."""
        finite = torch.isfinite(x)  # [B, C, L]
        keep = finite.flatten(1).all(1)  # [B]
        if self._rows is None or len(self._rows) != len(keep):
            self._rows = torch.arange(len(keep), device=x.device)
        first_good = keep.to(torch.int32).argmax()  # 0 when none is (see the module's docstring)
        x = torch.where(finite, x, 0).index_select(0, torch.where(keep, self._rows, first_good))
        self.count += (~keep).sum()
        self._unread += len(keep)
        self._recent.append((keep, batch["key"], batch["shard"]))
        return x, keep

    def pending(self) -> int:
        """Samples checked since the count was last read (host)."""
        return self._unread

    def settle(self, all_ranks: float, mine: float, step: int, world: int) -> None:
        """Collective when anything was dropped (the same `all_ranks` on every rank): the counts as read
        after `step`; name what was dropped since the last read, then abort, or warn. In `skip` mode a run
        whose dropped samples pass half of all samples seen in this attempt stops: the data is broken."""
        all_ranks, mine = int(all_ranks), int(mine)
        new_all, new_mine = all_ranks - self.settled_all, mine - self.settled
        first = self.settled_at + 1
        self.checked += self._unread * world  # every rank takes the same micro-batches: the same on every rank
        what = None
        if new_mine > 0:
            named = []
            for keep, keys, shards in self._recent:  # cleared at every read: all unread
                rows = np.flatnonzero(~keep.cpu().numpy())
                if len(rows):
                    named.append(describe({"key": keys, "shard": shards}, rows, self.shard_names))
            what = f"rank {self.rank}: {new_mine} non-finite sample(s)" + (
                (": " + "; ".join(named[:3]) + (" ..." if len(named) > 3 else "")) if named else "")
        self._recent.clear()
        self._unread = 0
        self.settled, self.settled_all, self.settled_at = mine, all_ranks, step
        if new_all <= 0:
            return
        import torch.distributed as dist

        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, what)
        where = f"steps {first}..{step}: " + " | ".join(s for s in seen if s)
        if self.policy == "abort":
            raise NonFiniteError(f"{where}; fix the data or pass --on-nonfinite skip (nothing saved from this window)")
        dropped = all_ranks - self.start_all
        if dropped > self.checked / 2:
            raise NonFiniteError(f"{where}: {dropped} of the {self.checked} samples of this attempt were non-finite; "
                                 f"the data is broken")
        if self.rank == 0:
            print(f"[himae-train] warning: dropped {new_all} non-finite sample(s) ({where})", file=sys.stderr,
                  flush=True)


def check_weights_finite(module: torch.nn.Module, step: int) -> None:
    """One host sync: raise if any parameter or buffer is NaN/inf (before a save and at the end)."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    raise NonFiniteError(f"non-finite weights at step {step}: {bad[:5]}; not saving them "
                         f"(lower --lr, set --grad-clip, or check the data)")
