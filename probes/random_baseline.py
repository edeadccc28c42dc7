"""Random-encoder baselines: what a probe reads from an untrained HiMAE of the same shape.

A freshly built HiMAE's BatchNorm layers keep their default running statistics (mean 0, var 1),
so in eval mode they do not normalise and the baseline is weaker than an honest random-feature
baseline. The statistics are re-estimated on unlabelled segments (the probe's own inputs; labels
are never seen) with `torch.optim.swa_utils.update_bn`, then the encoder is frozen. Several
seeds give the baseline's spread.
"""

from __future__ import annotations

import numpy as np
import torch

from himae_dist.model import DEFAULT_CHANNELS, HiMAE


def random_encoder(in_chans: int, seed: int, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> HiMAE:
    """A HiMAE with the default initialisation under torch seed `seed` (BatchNorm at defaults)."""
    torch.manual_seed(seed)
    return HiMAE(in_chans, channels).eval()


@torch.no_grad()
def reestimate_batchnorm(model: HiMAE, unlabelled: np.ndarray, batch_size: int = 512) -> HiMAE:
    """Recompute every BatchNorm's running mean/var over unlabelled [N, C, L] segments; returns model in eval mode."""
    from torch.optim.swa_utils import update_bn

    x = torch.from_numpy(np.ascontiguousarray(unlabelled, dtype=np.float32))
    loader = torch.utils.data.DataLoader(x, batch_size=batch_size, shuffle=False)
    update_bn(loader, model, device=next(model.parameters()).device)  # cumulative average over all batches
    return model.eval()


def random_baseline(in_chans: int, seed: int, unlabelled: np.ndarray,
                    channels: tuple[int, ...] = DEFAULT_CHANNELS) -> HiMAE:
    return reestimate_batchnorm(random_encoder(in_chans, seed, channels), unlabelled)
