"""BatchNorm running statistics agreed across ranks (mean of means, pooled variance).

In training mode BatchNorm normalises with batch statistics, so each rank's running
estimates only follow its own 1/world share of the data and drift apart; every checkpoint,
exported weights and probe would use rank 0's. The trainer all-reduces them before every
save: one collective, fp64, equal weight per rank (every rank sees the same number of
batches of the same size). After the save each rank takes its own estimates back (and a resume
restores them from the run state), so when saves happen never changes the run: a preemption
save or a time-based one leaves it bitwise equal to a run without them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def batchnorms(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


@torch.no_grad()
def sync_batchnorm_stats(module: nn.Module, keep_before: bool = True) -> dict[str, torch.Tensor]:
    """Replace every rank's running mean/var by the pooled ones; returns this rank's before (CPU copies,
    a device->host copy: only with keep_before, which saves use and validation does not)."""
    bns = batchnorms(module)
    before = {}
    for n, m in bns if keep_before else ():
        before[f"{n}.running_mean"] = m.running_mean.detach().cpu().clone()
        before[f"{n}.running_var"] = m.running_var.detach().cpu().clone()
    if not bns:
        return before
    # per layer [C] means, then [C] E[x^2] = var + mean^2; averaged over ranks
    flat = torch.cat([t for _, m in bns for t in (m.running_mean.double(), m.running_var.double() + m.running_mean.double() ** 2)])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    off = 0
    for _, m in bns:
        c = m.running_mean.numel()
        mean, sq = flat[off:off + c], flat[off + c:off + 2 * c]
        off += 2 * c
        m.running_mean.copy_(mean)
        m.running_var.copy_((sq - mean**2).clamp_min(0))
    return before


@torch.no_grad()
def restore_batchnorm_stats(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Put back this rank's own running statistics (what `sync_batchnorm_stats` returned)."""
    for n, m in batchnorms(module):
        if f"{n}.running_mean" in before:
            m.running_mean.copy_(before[f"{n}.running_mean"])
            m.running_var.copy_(before[f"{n}.running_var"])


def digest(module: nn.Module) -> float:
    """One number that differs if any running statistic differs (for cross-rank checks)."""
    return float(sum((m.running_mean.double() * 1.7 + m.running_var.double()).sum() for _, m in batchnorms(module)))
