"""Pooling of encoder feature maps over time, and the probe's candidate feature sets.

Mean pooling alone averages a beat-scale event (one early, weak pulse in ten seconds) into the
background; the standard deviation (and the maximum) of each channel over time keep how much
the map varies, which is where such an event shows. Every level is pooled once into all three
statistics; a pooling is a choice of statistics, and a candidate is a pooling of one level or of
all levels concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STATS = ("mean", "std", "max")
POOLINGS: dict[str, tuple[str, ...]] = {
    "mean": ("mean",),
    "mean+std": ("mean", "std"),
    "mean+std+max": ("mean", "std", "max"),
}
ALL_LEVELS = "all"


def pool_stats(fmap: torch.Tensor) -> dict[str, torch.Tensor]:
    """fmap [B, C, T] -> {"mean", "std", "max"} each [B, C] (std over time, population)."""
    return {
        "mean": fmap.mean(dim=-1),
        "std": fmap.std(dim=-1, unbiased=False),
        "max": fmap.amax(dim=-1),
    }


@dataclass(frozen=True)
class Candidate:
    """One feature set a probe may use: a pooling of one encoder level, or of all levels."""

    pooling: str
    level: int | None  # None: all levels concatenated

    @property
    def level_name(self) -> str:
        return ALL_LEVELS if self.level is None else f"L{self.level}"

    def name(self, several_poolings: bool) -> str:
        return f"{self.pooling}:{self.level_name}" if several_poolings else self.level_name

    def features(self, stats: dict[str, list[np.ndarray]]) -> np.ndarray:
        """stats[stat][level] [N, C_level] -> features [N, D] of this candidate."""
        levels = range(len(stats["mean"])) if self.level is None else [self.level]
        return np.concatenate([stats[s][i] for i in levels for s in POOLINGS[self.pooling]], axis=1)


def candidates(poolings: list[str], n_levels: int, include_all: bool = True) -> list[Candidate]:
    """Every level (finest first) then all levels together, for each pooling."""
    for p in poolings:
        if p not in POOLINGS:
            raise ValueError(f"--pooling {p!r}: expected one of {', '.join(POOLINGS)}")
    levels: list[int | None] = list(range(n_levels)) + ([None] if include_all else [])
    return [Candidate(p, lv) for p in poolings for lv in levels]
