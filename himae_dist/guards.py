"""Non-finite data and weights never train silently and never end in exit code 0.

A batch is checked on the host, before its copy to the device (numpy: no device sync, no torch
op). Skipping swaps in the rank's next batch, so every rank still takes the same number of
micro-steps (no collective mismatch) and the stream position stays exact for resume.
"""

from __future__ import annotations

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


def check_weights_finite(module: torch.nn.Module, step: int) -> None:
    """One host sync: raise if any parameter or buffer is NaN/inf (before a save and at the end)."""
    named = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return
    bad = [n for n, t in named if not bool(torch.isfinite(t).all())]
    raise NonFiniteError(f"non-finite weights at step {step}: {bad[:5]}; not saving them "
                         f"(lower --lr, set --grad-clip, or check the data)")
