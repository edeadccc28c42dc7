"""Label efficiency: the headline probe against the number of labelled training patients.

Pretraining is expected to pay most when labels are scarce. For each fraction, each outer fold's
training patients are drawn again (several draws), stratified by PVC presence: the same fraction
of the patients with PVC and of those without, and at least 2 with PVC (an inner split needs
them on both sides). A fraction where some fold cannot keep 2 patients with PVC is skipped, with
the reason recorded. The test patients, the outer folds and the feature extractors (an
encoder's BatchNorm statistics or MiniRocket's transform, fitted on the full training fold) stay
the same, and the draws depend only on the seed, so every model sees the same draws.
"""

from __future__ import annotations

import numpy as np

from probes.metrics import point_metrics
from probes.nested_cv import Folds, nested_probe

MIN_PVC_PATIENTS = 2


def draw_training_patients(outer: Folds, labels: np.ndarray, groups: np.ndarray, fraction: float, draw: int,
                           seed: int) -> tuple[Folds | None, str]:
    """The outer folds with each training part cut to a PVC-stratified draw of its patients.

    Returns (folds, "") or (None, why the fraction cannot be drawn).
    """
    rng = np.random.default_rng([seed, int(round(fraction * 10_000)), draw])
    out = []
    for k, (tr, te) in enumerate(outer):
        pats = np.unique(groups[tr])
        has_pvc = np.array([labels[tr][groups[tr] == p].any() for p in pats])
        pos, neg = pats[has_pvc], pats[~has_pvc]
        n_pos = int(round(fraction * len(pos)))
        if n_pos < MIN_PVC_PATIENTS:
            return None, (f"{fraction:.0%} of outer fold {k + 1}'s {len(pos)} training patients with PVC is {n_pos}; "
                          f"a draw needs at least {MIN_PVC_PATIENTS}")
        chosen = np.r_[rng.choice(pos, n_pos, replace=False),
                       rng.choice(neg, int(round(fraction * len(neg))), replace=False)]
        out.append((tr[np.isin(groups[tr], chosen)], te))
    return out, ""


def label_efficiency(features: list[dict], labels: np.ndarray, groups: np.ndarray, outer: Folds, headline: dict,
                     fractions: list[float], draws: int, inner_folds: int, seed: int) -> dict:
    """{fraction: {"n_patients", "draws": [{"roc_auc", "ap"}], ...}} for one model; 1.0 is the full headline."""
    feats = features if len(features) > 1 else features[0]
    n_all = float(np.mean([len(np.unique(groups[tr])) for tr, _ in outer]))
    m = headline["metrics"]
    out: dict = {"1.0": {"n_patients": n_all, "draws": [{"roc_auc": m["roc_auc"]["value"], "ap": m["ap"]["value"]}]}}
    for f in fractions:
        if f >= 1.0:
            continue
        entry: dict = {"draws": []}
        for d in range(draws):
            sub, why = draw_training_patients(outer, labels, groups, f, d, seed)
            if sub is None:
                entry = {"skipped": why, "draws": []}
                break
            res = nested_probe(feats, labels, groups, inner_folds=inner_folds, seed=seed, outer=sub)
            have = np.isfinite(res.headline_oof)
            pm = point_metrics(labels[have], res.headline_oof[have])
            entry["draws"].append({"roc_auc": pm["roc_auc"], "ap": pm["ap"]})
            entry["n_patients"] = float(np.mean([len(np.unique(groups[tr])) for tr, _ in sub]))
        out[str(f)] = entry  # a skipped fraction keeps its reason
    return out
