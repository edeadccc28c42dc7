"""Frozen-encoder features: the time-averaged feature map of every encoder level."""

from __future__ import annotations

import numpy as np
import torch

from himae_dist.model import HiMAE


@torch.no_grad()
def level_features(model: HiMAE, signals: np.ndarray, batch_size: int = 512) -> list[np.ndarray]:
    """signals [N, C, L] -> one [N, C_level] array per encoder level (finest first), mean-pooled over time."""
    model.eval()
    device = next(model.parameters()).device
    per_level: list[list[np.ndarray]] = [[] for _ in model.encoder_layers]
    for start in range(0, len(signals), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(signals[start : start + batch_size])).to(device)
        for i, fmap in enumerate(model.encode(x)):  # fmap [B, C_i, L_i]
            per_level[i].append(fmap.mean(dim=-1).float().cpu().numpy())  # [B, C_i]
    return [np.concatenate(chunks) for chunks in per_level]
