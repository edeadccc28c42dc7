"""The seed's probe protocol, kept for parity with the authors' numbers (and as the speed baseline).

The seed's notebook splits *segments* at random 80/20 (a patient's segments land on both sides,
so a probe can recognise patients instead of PVCs: read its numbers as optimistic), mean-pools the
frozen encoder's bottleneck and trains one linear layer (`fc`: [1, 256]) with BCE and Adam,
re-encoding every training batch each epoch. Epochs 7 (from the issue); the batch size (64) and
learning rate (1e-3) are not in the seed's README and are this module's assumptions.

`train_linear_probe` takes a `features_of(idx)` callable, so the same loop runs re-encoding each
batch (the seed's way, `reencode_features`) or on features encoded once (`cached_features`):
with a frozen encoder in eval mode both give the same probe.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from himae_dist.model import HiMAE

SEED_EPOCHS = 7
SEED_BATCH = 64
SEED_LR = 1e-3
SEED_TEST_FRACTION = 0.2
LABEL = "seed protocol: random 80/20 segment split (patients on both sides), bottleneck mean pooling, linear layer 7 epochs"

FeaturesOf = Callable[[np.ndarray], torch.Tensor]  # row indices [B] -> features [B, D]


def random_split(n: int, seed: int, test_fraction: float = SEED_TEST_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The seed's random segment split: (train_idx, test_idx)."""
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(np.arange(n), test_size=test_fraction, random_state=seed, shuffle=True))  # type: ignore[return-value]


def random_folds(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K random 80/20-style segment folds (the seed's split, repeated to cover every segment once)."""
    from sklearn.model_selection import KFold

    return list(KFold(folds, shuffle=True, random_state=seed).split(np.zeros(n)))


def reencode_features(model: HiMAE, signals: np.ndarray) -> FeaturesOf:
    """Bottleneck mean pooling computed afresh for every batch, as the seed's training loop does."""
    model.eval()

    @torch.no_grad()
    def features_of(idx: np.ndarray) -> torch.Tensor:
        return model.encode(torch.from_numpy(signals[np.sort(idx)]))[-1].mean(dim=-1)  # [B, 256]

    return features_of


def cached_features(bottleneck: np.ndarray) -> FeaturesOf:
    t = torch.from_numpy(np.ascontiguousarray(bottleneck, dtype=np.float32))
    return lambda idx: t[np.sort(idx)]


def train_linear_probe(
    features_of: FeaturesOf, labels: np.ndarray, train_idx: np.ndarray, dim: int, seed: int = 0,
    epochs: int = SEED_EPOCHS, batch_size: int = SEED_BATCH, lr: float = SEED_LR,
) -> torch.nn.Linear:
    """The seed's probe: Linear(dim, 1), BCE-with-logits, Adam, shuffled mini-batches."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fc = torch.nn.Linear(dim, 1)
    opt = torch.optim.Adam(fc.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    y = torch.from_numpy(labels.astype(np.float32))
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        for start in range(0, len(order), batch_size):
            idx = np.sort(order[start : start + batch_size])
            logits = fc(features_of(idx)).squeeze(1)  # [B]
            loss = loss_fn(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fc


@torch.no_grad()
def predict(fc: torch.nn.Linear, features_of: FeaturesOf, idx: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """P(PVC) [len(idx)] in the order of np.sort(idx)."""
    idx = np.sort(idx)
    return np.concatenate([torch.sigmoid(fc(features_of(idx[s : s + batch_size]))).squeeze(1).numpy()
                           for s in range(0, len(idx), batch_size)])


def seed_probe_oof(features_of: FeaturesOf, labels: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                   dim: int, seed: int = 0, epochs: int = SEED_EPOCHS) -> np.ndarray:
    """P(PVC) [N] for every row that is a test row of some split (NaN elsewhere)."""
    p = np.full(len(labels), np.nan)
    for k, (tr, te) in enumerate(splits):
        fc = train_linear_probe(features_of, labels, tr, dim, seed + k, epochs)
        p[np.sort(te)] = predict(fc, features_of, te)
    return p
