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
    """Per rank: non-finite samples dropped on the device, counted, named when the count is read."""

    def __init__(self, policy: str, rank: int, device: torch.device, shard_names: list[str], mine: float = 0.0,
                 all_ranks: float = 0.0, step: int = 0):
        """`mine`, `all_ranks`: the counts a resumed run saved at `step` (this rank's; every rank's summed)."""
        self.policy, self.rank, self.shard_names = policy, rank, shard_names
        self.count = torch.tensor(float(mine), device=device)  # this rank's dropped samples, whole run (device)
        self.settled, self.settled_all = float(mine), float(all_ranks)  # the counts as last read
        self.settled_at = step  # ... after this step
        self._pending: list[tuple[torch.Tensor, dict]] = []  # (keep [B] bool, the batch's keys/shards) since then
        self._rows: torch.Tensor | None = None

    def clean(self, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, L] on the device -> (x with every non-finite sample replaced, keep [B] bool)."""
        finite = torch.isfinite(x)  # [B, C, L]
        keep = finite.flatten(1).all(1)  # [B]
        if self._rows is None or len(self._rows) != len(keep):
            self._rows = torch.arange(len(keep), device=x.device)
        first_good = keep.to(torch.int32).argmax()  # 0 when none is (see the module's docstring)
        x = torch.where(finite, x, 0).index_select(0, torch.where(keep, self._rows, first_good))
        self.count += (~keep).sum()
        self._pending.append((keep, {"key": batch["key"], "shard": batch["shard"]}))
        return x, keep

    def pending(self) -> int:
        """Samples checked since the count was last read (host)."""
        return sum(len(k) for k, _ in self._pending)

    def settle(self, all_ranks: float, mine: float, step: int, world: int) -> None:
        """Collective when anything was dropped (the same `all_ranks` on every rank): the counts as read
        after `step`; name what was dropped since the last read, then abort, or warn."""
        new_all, new_mine = all_ranks - self.settled_all, mine - self.settled
        first, window_samples = self.settled_at + 1, self.pending() * world
        what = None
        if new_mine > 0:
            rows = [(batch, np.flatnonzero(~k.cpu().numpy())) for k, batch in self._pending]
            named = [describe(batch, r, self.shard_names) for batch, r in rows if len(r)]
            what = f"rank {self.rank}: " + "; ".join(named[:3]) + (" ..." if len(named) > 3 else "")
        self._pending.clear()
        self.settled, self.settled_all, self.settled_at = mine, all_ranks, step
        if new_all <= 0:
            return
        import torch.distributed as dist

        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, what)
        where = f"steps {first}..{step}: " + " | ".join(s for s in seen if s)
        if self.policy == "abort":
            raise NonFiniteError(f"{where}; fix the data or pass --on-nonfinite skip (nothing saved from this window)")
        if new_all > window_samples / 2:
            raise NonFiniteError(f"{where}: {int(new_all)} of {window_samples} samples non-finite; the data is broken")
        if self.rank == 0:
            print(f"[himae-train] warning: dropped {int(new_all)} non-finite sample(s) ({where})", file=sys.stderr,
                  flush=True)


def check_weights_finite(module: torch.nn.Module, step: int) -> None:
    """One host sync: raise if any parameter or buffer is NaN/inf (before a save and at the end)."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    raise NonFiniteError(f"non-finite weights at step {step}: {bad[:5]}; not saving them "
                         f"(lower --lr, set --grad-clip, or check the data)")
