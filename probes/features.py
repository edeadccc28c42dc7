"""Frozen-encoder features: every level pooled once per checkpoint and data, cached on disk.

One batched, no-grad encoder pass (on the GPU when there is one) gives every level's mean, std
and max over time; the result is stored under a key made of the encoder's weights and the exact
model input, so a re-run, another pooling or another probe protocol never re-encodes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from data_prep.atomic_write import atomic_path
from himae_dist.model import HiMAE
from probes.pooling import STATS, pool_stats

FEATURES_VERSION = "pooled-v1"  # bump when pooling changes, so old cache entries are not reused

PooledStats = dict[str, list[np.ndarray]]  # stat -> per level (finest first) [N, C_level]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def encode_pooled(model: HiMAE, signals: np.ndarray, batch_size: int = 1024,
                  device: torch.device | None = None) -> PooledStats:
    """signals [N, C, L] -> {stat: [per level [N, C_level]]}, one pass of the frozen encoder."""
    device = device or default_device()
    model = model.eval().to(device)
    out: PooledStats = {s: [[] for _ in model.encoder_layers] for s in STATS}  # type: ignore[misc]
    for start in range(0, len(signals), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(signals[start : start + batch_size])).to(device)  # [B, C, L]
        for i, fmap in enumerate(model.encode(x)):  # fmap [B, C_i, L_i]
            for s, v in pool_stats(fmap.float()).items():  # v [B, C_i]
                out[s][i].append(v.cpu().numpy())
    return {s: [np.concatenate(chunks) for chunks in per_level] for s, per_level in out.items()}


def level_features(model: HiMAE, signals: np.ndarray, batch_size: int = 1024) -> list[np.ndarray]:
    """signals [N, C, L] -> one mean-pooled [N, C_level] array per encoder level (finest first)."""
    return encode_pooled(model, signals, batch_size)["mean"]


def cache_key(model: HiMAE, signals: np.ndarray) -> str:
    """Content key: the encoder's weights and buffers (BatchNorm statistics too) and the model input."""
    h = hashlib.sha256(FEATURES_VERSION.encode())
    h.update(repr(model.config).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(signals.shape).encode())
    h.update(np.ascontiguousarray(signals, dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


class FeatureCache:
    """Pooled features on disk, one .npz per (encoder, input); written to a temp name then renamed."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder else None
        self.hits = self.misses = 0

    def get_or_encode(self, model: HiMAE, signals: np.ndarray, batch_size: int = 1024) -> PooledStats:
        if self.folder is None:
            return encode_pooled(model, signals, batch_size)
        path = self.folder / f"{cache_key(model, signals)}.npz"
        if path.is_file():
            with np.load(path) as z:
                n_levels = int(z["n_levels"])
                stats = {s: [z[f"{s}_{i}"] for i in range(n_levels)] for s in STATS}
            self.hits += 1
            return stats
        stats = encode_pooled(model, signals, batch_size)
        arrays = {f"{s}_{i}": a for s, per_level in stats.items() for i, a in enumerate(per_level)}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, n_levels=np.int64(len(stats["mean"])), **arrays)
        self.misses += 1
        return stats
