"""Nested, patient-grouped cross-validation of logistic probes over candidate feature sets.

Outer loop: StratifiedGroupKFold over patients (no patient on both sides). Inside each outer
training part only, an inner patient-grouped split chooses the regularisation strength C of
every candidate (a level, or all levels) and then which candidate to use; the chosen probe is
refitted on the whole outer training part and scores the outer test patients. So:
  - every candidate's out-of-fold predictions (C chosen inside) give the per-level profile;
  - the headline is the out-of-fold predictions of the candidate *selected inside each fold*,
    an estimate that is not biased by picking the best of the reported numbers.
Features are standardised (fitted on training rows only) before the logistic regression.
"""

from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

C_GRID = (0.01, 0.1, 1.0)


@dataclass
class CandidateOOF:
    """Out-of-fold P(PVC) [N] of one candidate, with C chosen on inner folds of each outer fold."""

    name: str
    dim: int
    oof: np.ndarray = field(repr=False)  # [N]
    inner_auc: list[float] = field(default_factory=list)  # best inner ROC-AUC per outer fold
    chosen_c: list[float] = field(default_factory=list)


@dataclass
class NestedResult:
    candidates: list[CandidateOOF]
    headline_oof: np.ndarray = field(repr=False)  # [N] predictions of the candidate selected per fold
    selected: list[str] = field(default_factory=list)  # selected candidate per outer fold

    @property
    def selected_mode(self) -> str:
        names, counts = np.unique(self.selected, return_counts=True)
        return str(names[np.argmax(counts)])


def _check(labels: np.ndarray, groups: np.ndarray) -> int:
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a patient-grouped split needs at least 2 patients, found {n_groups}")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels hold a single class; ROC-AUC is undefined")
    return n_groups


def grouped_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped, label-stratified folds [(train_idx, test_idx)]; no patient on both sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = _check(labels, groups)
    splitter = StratifiedGroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    out = list(splitter.split(np.zeros(len(labels)), labels, groups))
    for tr, te in out:
        assert not set(groups[tr].tolist()) & set(groups[te].tolist())
    return out


def usable_inner_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inner grouped splits whose both sides hold both classes (ROC-AUC needs them)."""
    if len(np.unique(groups)) < 2:
        return []
    try:
        splits = grouped_folds(labels, groups, folds, seed)
    except ValueError:
        return []
    return [(tr, te) for tr, te in splits
            if len(np.unique(labels[tr])) == 2 and len(np.unique(labels[te])) == 2]


def fit_probe(x: np.ndarray, y: np.ndarray, inner: list[tuple[np.ndarray, np.ndarray]],
              c_grid: tuple[float, ...] = C_GRID):
    """Standardise + logistic regression with C chosen on the given inner splits (indices into x).

    Returns (fitted pipeline, best mean inner ROC-AUC or NaN, chosen C). With no usable inner
    split (too few patients with PVC) C is the middle of the grid and the inner score NaN.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64)  # float32 features against float64 coefficients miss BLAS: 10x slower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if not inner:  # too few patients with PVC to choose C: the middle of the grid, said in the output
            c = c_grid[len(c_grid) // 2]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300))
            return clf.fit(x, y), float("nan"), c
        # scikit-learn 1.8 added (and 1.10 makes default) the non-legacy attributes and l1_ratios for
        # plain L2; pass them only where they exist, and read both attribute layouts below
        new_api = "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters
        lr = LogisticRegressionCV(Cs=list(c_grid), cv=inner, scoring="roc_auc", max_iter=300, tol=1e-3,
                                  **({"l1_ratios": (0.0,), "use_legacy_attributes": False} if new_api else {}))
        clf = make_pipeline(StandardScaler(), lr).fit(x, y)
    scores = lr.scores_  # [folds, 1, n_C] now; legacy: {class: [folds, n_C]}
    scores = next(iter(scores.values())) if isinstance(scores, dict) else scores
    mean_auc = np.asarray(scores).reshape(len(inner), len(c_grid)).mean(axis=0)
    return clf, float(np.nanmax(mean_auc)), float(np.ravel(lr.C_)[0])


def nested_probe(
    features: dict[str, np.ndarray], labels: np.ndarray, groups: np.ndarray,
    folds: int = 5, inner_folds: int = 3, seed: int = 0, n_jobs: int | None = None,
) -> NestedResult:
    """features {candidate name: [N, D]} -> per-candidate OOF and the nested headline OOF.

    Outer folds run in parallel processes (n_jobs, default: all cores); each with single-threaded BLAS.
    """
    from joblib import Parallel, delayed

    outer = grouped_folds(labels, groups, folds, seed)
    names = list(features)
    n_jobs = min(len(outer), n_jobs or os.cpu_count() or 1)
    per_fold = Parallel(n_jobs=n_jobs)(
        delayed(_outer_fold)(features, labels, groups, tr, te, inner_folds, seed + k) for k, (tr, te) in enumerate(outer))
    cands = [CandidateOOF(n, features[n].shape[1], np.full(len(labels), np.nan)) for n in names]
    headline = np.full(len(labels), np.nan)
    selected = []
    for (tr, te), fold in zip(outer, per_fold):
        for c, (p, inner_auc, chosen) in zip(cands, fold):
            c.oof[te] = p
            c.inner_auc.append(inner_auc)
            c.chosen_c.append(chosen)
        inner = np.array([f[1] for f in fold])
        best = int(np.nanargmax(inner)) if np.isfinite(inner).any() else len(cands) - 1
        selected.append(names[best])
        headline[te] = cands[best].oof[te]
    return NestedResult(cands, headline, selected)


def _outer_fold(features, labels, groups, tr, te, inner_folds, seed) -> list[tuple[np.ndarray, float, float]]:
    """(test predictions, best inner ROC-AUC, chosen C) of every candidate for one outer fold."""
    from threadpoolctl import threadpool_limits

    if len(np.unique(labels[tr])) < 2:  # no positives to learn from: a constant guess
        return [(np.full(len(te), labels[tr].mean()), float("nan"), float("nan")) for _ in features]
    out = []
    # Single-threaded BLAS: these matrices are small, and multi-threaded BLAS on a few cores runs
    # the L-BFGS iterations several times slower than one thread does.
    inner = usable_inner_splits(labels[tr], groups[tr], inner_folds, seed)
    with threadpool_limits(1, user_api="blas"):
        for x in features.values():
            clf, inner_auc, chosen = fit_probe(x[tr], labels[tr], inner)
            out.append((clf.predict_proba(np.asarray(x[te], dtype=np.float64))[:, 1], inner_auc, chosen))
    return out
