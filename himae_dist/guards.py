"""Non-finite data and weights never train silently and never end in exit code 0.

Training batches are checked on the device (`NonFiniteRows`): a sample with NaN/inf is zeroed and
dropped from the loss's mask, so it adds neither loss nor gradient and no NaN is ever
all-reduced; the count rides in the log step's all-reduce, and only then, when it is not zero,
are the samples named (shard and keys). `--on-nonfinite abort` then stops every rank at that log
step, before any save; `skip` warns and trains on. Every rank takes the same micro-steps, and the
stream position stays exact for resume. Validation batches are read once at start and checked
on the host (`bad_rows`).
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


def describe_rows(keys, shards, rows: np.ndarray, shard_names: list[str]) -> str:
    names = sorted({shard_names[int(shards[i])] for i in rows})
    return f"{len(rows)} sample(s) with NaN/inf, shard(s) {names}, key(s) {[str(keys[i]) for i in rows[:5]]}"


class NonFiniteRows:
    """This rank's non-finite training samples between two log steps, found and masked on the device."""

    def __init__(self, device: torch.device, shard_names: list[str], micro_batch: int, world: int):
        self.count = torch.zeros((), dtype=torch.float32, device=device)  # masked samples since the last log step
        self.window: list = []  # (ok [B] device bool, keys, shards) per micro-batch since then
        self.shard_names, self.micro_batch, self.world = shard_names, micro_batch, world

    def take(self, x: torch.Tensor, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, L] on the device -> (x as fp32 with non-finite samples zeroed, ok [B] bool). No sync."""
        ok = torch.isfinite(x).flatten(1).all(dim=1)  # [B]
        self.count += (~ok).sum()
        self.window.append((ok, batch["key"], batch["shard"]))
        return torch.where(ok[:, None, None], x, 0).float(), ok

    def settle(self, total: int, policy: str, rank: int, first: int, last: int) -> int:
        """At a log step, with `total` the all-reduced count: name this rank's samples, abort (every
        rank raises) or warn; returns this rank's count. Reads the device only when total > 0."""
        window, self.window = self.window, []
        if not total:
            return 0
        found = [(np.flatnonzero(~ok.cpu().numpy()), keys, shards) for ok, keys, shards in window]
        found = [(rows, keys, shards) for rows, keys, shards in found if len(rows)]
        mine = sum(len(rows) for rows, _, _ in found)
        self.count.zero_()
        what = "; ".join(describe_rows(keys, shards, rows, self.shard_names) for rows, keys, shards in found[:3])
        where = f"rank {rank}, steps {first}..{last}"
        if policy == "abort":
            raise NonFiniteError(f"{where}: {what}; fix the data or pass --on-nonfinite skip" if mine else
                                 f"{where}: {total} non-finite sample(s) on other ranks (named there); not saving")
        if mine:
            print(f"[himae-train] warning: {where}: masked {what} (no loss, no gradient)", file=sys.stderr, flush=True)
        if total > 0.5 * len(window) * self.micro_batch * self.world:
            raise NonFiniteError(f"{where}: {total} of {len(window) * self.micro_batch * self.world} samples were "
                                 f"non-finite; the data is broken")
        return mine


def check_weights_finite(module: torch.nn.Module, step: int) -> None:
    """One host sync: raise if any parameter or buffer is NaN/inf (before a save and at the end)."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    raise NonFiniteError(f"non-finite weights at step {step}: {bad[:5]}; not saving them "
                         f"(lower --lr, set --grad-clip, or check the data)")
