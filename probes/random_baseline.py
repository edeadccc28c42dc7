"""Random-encoder baselines and the one BatchNorm policy every probed encoder follows.

A freshly built HiMAE's BatchNorm layers keep their default running statistics (mean 0, var 1),
so in eval mode they do not normalise and the baseline is weaker than an honest random-feature
baseline. Their statistics are re-estimated (a cumulative average over unlabelled batches, labels
never seen), and where from is the BatchNorm policy, the same for checkpoints and random encoders:

- `pretrain`: statistics from the pretraining data. Checkpoints keep the statistics they were
  pretrained with; random encoders re-estimate theirs on segments of the pretraining shards
  (`--manifest`), the data a checkpoint's statistics came from.
- `fold`: every encoder, checkpoints included, re-estimates its statistics on each outer fold's
  training inputs (unlabelled), and that fold's test patients are encoded with them.

Neither ever uses the test patients: re-estimating on all probe inputs would be test-time
adaptation for whichever encoder gets it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from himae_dist.model import DEFAULT_CHANNELS, HiMAE

BN_POLICIES = {
    "pretrain": "BatchNorm statistics from the pretraining data: checkpoints keep theirs, random encoders re-estimate "
                "theirs on {n} segments of the pretraining shards ({manifest})",
    "fold": "BatchNorm statistics re-estimated for every encoder (checkpoints too) on each outer fold's training "
            "inputs, unlabelled; the fold's test patients never contribute",
}


def random_encoder(in_chans: int, seed: int, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> HiMAE:
    """A HiMAE with the default initialisation under torch seed `seed` (BatchNorm at defaults)."""
    torch.manual_seed(seed)
    return HiMAE(in_chans, channels).eval()


@torch.no_grad()
def reestimate_batchnorm(model: HiMAE, unlabelled: np.ndarray, batch_size: int = 512) -> HiMAE:
    """Recompute the encoder's BatchNorm running mean/var over unlabelled [N, C, L] segments; returns model in eval mode.

    As `torch.optim.swa_utils.update_bn` (a cumulative average over all batches), but through the
    encoder only: the probe reads encoder features, and the decoder's pass would double the cost.
    The decoder's BatchNorm statistics are left as they were.
    """
    bns = [m for m in model.encoder_layers.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch weighs by its size
    model.train()
    x = torch.from_numpy(np.ascontiguousarray(unlabelled, dtype=np.float32))
    device = next(model.parameters()).device
    for start in range(0, len(x), batch_size):
        model.encode(x[start : start + batch_size].to(device))
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    return model.eval()


def with_batchnorm_from(model: HiMAE, unlabelled: np.ndarray) -> HiMAE:
    """A copy of `model` whose BatchNorm statistics are re-estimated on `unlabelled` (the original is untouched)."""
    return reestimate_batchnorm(copy.deepcopy(model), unlabelled)


def random_baseline(in_chans: int, seed: int, unlabelled: np.ndarray,
                    channels: tuple[int, ...] = DEFAULT_CHANNELS) -> HiMAE:
    return reestimate_batchnorm(random_encoder(in_chans, seed, channels), unlabelled)


def shard_segments(manifest: str, max_segments: int = 4096, storage_options: dict | None = None,
                   split: str = "train") -> np.ndarray:
    """Up to `max_segments` [n, C, L] float32 segments of the shards a manifest lists, in shard order.

    The shards hold segments already preprocessed for pretraining, so they are model inputs as
    they are.
    """
    from data_prep.shard_format import read_shard_blocks
    from data_prep.storage import Folder
    from himae_dist.streaming import load_manifest

    m = load_manifest(manifest, storage_options)
    out, n = [], 0
    for s in m.shards(split):
        base, name = s.url.rsplit("/", 1)
        data = Folder(base, storage_options).read_bytes(name)
        for block in read_shard_blocks(data, s.url):
            take = np.asarray(block.signal[: max_segments - n], dtype=np.float32)
            out.append(take.copy())
            n += len(take)
            if n >= max_segments:
                return np.concatenate(out)
    if not out:
        raise ValueError(f"--manifest {manifest}: its {split!r} shards hold no segments")
    return np.concatenate(out)
