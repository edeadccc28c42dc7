"""Nested, patient-grouped cross-validation of logistic probes over candidate feature sets.

Outer loop: StratifiedGroupKFold over patients (no patient on both sides). Inside each outer
training part only, an inner patient-grouped split chooses the regularisation strength C of
every candidate (a level, or all levels) and then which candidate to use; the chosen probe is
refitted on the whole outer training part and scores the outer test patients. So:
  - every candidate's out-of-fold predictions (C chosen inside) give the per-level profile;
  - the headline is the out-of-fold predictions of the candidate *selected inside each fold*,
    an estimate that is not biased by picking the best of the reported numbers.
Every fitted step sits inside its fold: the standardisation and the logistic regression form one
pipeline, refitted on each inner training part when C is chosen (the inner validation patients
never shape the scaling), then on the whole outer training part.

A fold whose training or test part holds a single class cannot train or score a probe;
`check_outer_folds` names such folds and refuses them or drops them, as the caller asks.
Features may differ per outer fold (a feature extractor fitted on that fold's training inputs:
BatchNorm statistics, MiniRocket), given as one {candidate: [N, D]} per fold.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from data_prep.parent_death import exit_with_parent

C_GRID = (0.01, 0.1, 1.0)
# Tests only: a folder where each fold worker leaves a file and then waits, so a test can stop the probe
# while its workers run.
TEST_FOLD_HOLD_ENV = "HIMAE_TEST_FOLD_HOLD_DIR"

Folds = list[tuple[np.ndarray, np.ndarray]]  # (train_idx, test_idx) per fold
Features = dict[str, np.ndarray]  # candidate name -> [N, D]


@dataclass
class CandidateOOF:
    """Out-of-fold P(PVC) [N] of one candidate, with C chosen on inner folds of each outer fold."""

    name: str
    dim: int
    oof: np.ndarray = field(repr=False)  # [N]; NaN for rows that are in no test part
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


class DegenerateFoldError(ValueError):
    """An outer fold whose training or test part holds a single class."""


def _check(labels: np.ndarray, groups: np.ndarray) -> int:
    if groups is None:
        raise ValueError("patient ids are required for a patient-grouped split")
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a patient-grouped split needs at least 2 patients, found {n_groups}")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels hold a single class; ROC-AUC is undefined")
    return n_groups


def grouped_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> Folds:
    """Patient-grouped, label-stratified folds [(train_idx, test_idx)]; no patient on both sides.

    At most one fold per patient: fewer patients than `folds` give fewer folds (say so in outputs).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = _check(labels, groups)
    splitter = StratifiedGroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only k members": checked per fold below
        warnings.simplefilter("ignore", UserWarning)
        out = list(splitter.split(np.zeros(len(labels)), labels, groups))
    for tr, te in out:
        assert not set(groups[tr].tolist()) & set(groups[te].tolist())
    return out


def fold_problem(labels: np.ndarray, tr: np.ndarray, te: np.ndarray) -> str | None:
    """Why a fold cannot train or score a probe (a side with a single class), or None."""
    problems = []
    for side, idx in (("training", tr), ("test", te)):
        n_pos = int(labels[idx].sum())
        if n_pos == 0:
            problems.append(f"no PVC in its {side} patients")
        elif n_pos == len(idx):
            problems.append(f"no non-PVC segment in its {side} patients")
    return "; ".join(problems) or None


def check_outer_folds(outer: Folds, labels: np.ndarray, groups: np.ndarray, on_degenerate: str = "error",
                      flag: str = "--on-degenerate") -> tuple[Folds, list[str]]:
    """Refuse (on_degenerate="error") or drop ("drop") folds with a single class on a side.

    Returns (the folds to run, one message per dropped fold). Refusal raises DegenerateFoldError
    naming every bad fold and its test patients.
    """
    bad, kept = [], []
    for k, (tr, te) in enumerate(outer):
        why = fold_problem(labels, tr, te)
        if why is None:
            kept.append((tr, te))
        else:
            pats = ", ".join(str(int(p)) for p in np.unique(groups[te]))
            bad.append(f"outer fold {k + 1} of {len(outer)} (test patients {pats}): {why}")
    if bad and on_degenerate == "error":
        raise DegenerateFoldError("; ".join(bad) + f"; a probe there would print numbers that mean nothing "
                                  f"(use {flag} drop to drop such folds, or give more patients with PVC)")
    if not kept:
        raise DegenerateFoldError("every outer fold holds a single class on a side: " + "; ".join(bad))
    return kept, [f"dropped {b}" for b in bad]


def usable_inner_splits(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> Folds:
    """Inner grouped splits whose both sides hold both classes (ROC-AUC needs them)."""
    if len(np.unique(groups)) < 2:
        return []
    try:
        splits = grouped_folds(labels, groups, folds, seed)
    except ValueError:
        return []
    return [(tr, te) for tr, te in splits
            if len(np.unique(labels[tr])) == 2 and len(np.unique(labels[te])) == 2]


def probe_pipeline(c: float):
    """Standardise then L2 logistic regression: one estimator, so every fit of it scales on its own rows only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, tol=1e-3))


def fit_probe(x: np.ndarray, y: np.ndarray, inner: Folds, c_grid: tuple[float, ...] = C_GRID):
    """Standardise + logistic regression with C chosen on the given inner splits (indices into x).

    The scaler is part of the pipeline that each inner split refits on its training rows, so the
    choice of C never sees the inner validation rows' statistics. Returns (pipeline refitted on
    all of x, best mean inner ROC-AUC or NaN, chosen C). With no usable inner split (too few
    patients with PVC) C is the middle of the grid and the inner score NaN.
    """
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(x, dtype=np.float64)  # float32 features against float64 coefficients miss BLAS: 10x slower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if not inner:  # too few patients with PVC to choose C: the middle of the grid, said in the output
            c = c_grid[len(c_grid) // 2]
            return probe_pipeline(c).fit(x, y), float("nan"), c
        mean_auc = inner_scores(x, y, inner, c_grid).mean(axis=0)
        best = int(np.argmax(mean_auc))  # ties: the first in the grid
        return probe_pipeline(c_grid[best]).fit(x, y), float(mean_auc[best]), float(c_grid[best])


def inner_scores(x: np.ndarray, y: np.ndarray, inner: Folds, c_grid: tuple[float, ...] = C_GRID) -> np.ndarray:
    """ROC-AUC [inner split, C] of the probe pipeline fitted on each inner training part.

    Per split the scaler is fitted on the inner training rows only, then the logistic regression
    runs along the C grid from the strongest regularisation, each fit warm-started from the last
    (as LogisticRegressionCV's path does): the same pipeline as `probe_pipeline(C)`, refitted per
    split, at a fraction of the iterations.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    out = np.zeros((len(inner), len(c_grid)))
    for i, (tr, va) in enumerate(inner):
        scaler = StandardScaler().fit(x[tr])
        x_tr, x_va = scaler.transform(x[tr]), scaler.transform(x[va])
        lr = LogisticRegression(max_iter=300, tol=1e-3, warm_start=True)
        for j in np.argsort(c_grid):
            lr.set_params(C=c_grid[j]).fit(x_tr, y[tr])
            out[i, j] = roc_auc_score(y[va], lr.decision_function(x_va))
    return out


_TRACKER_QUIET = "ignore::UserWarning:joblib.externals.loky.backend.resource_tracker"


def _quiet_loky_tracker() -> None:
    """Silence the UserWarnings of loky's resource tracker, a process that shares our stderr. When the probe is
    stopped, its workers die with it and the tracker, outliving it by a moment, reports the semaphores it then
    cleans up ("leaked semlock objects") after the probe's one closing line. loky starts the tracker with our
    sys.warnoptions as -W flags (the last wins over a user's -W and PYTHONWARNINGS); this process's own
    warning filters are untouched."""
    if _TRACKER_QUIET not in sys.warnoptions:
        sys.warnoptions.append(_TRACKER_QUIET)


def nested_probe(
    features: Features | list[Features], labels: np.ndarray, groups: np.ndarray,
    folds: int = 5, inner_folds: int = 3, seed: int = 0, n_jobs: int | None = None, outer: Folds | None = None,
) -> NestedResult:
    """features {candidate name: [N, D]} (or one such dict per outer fold) -> per-candidate OOF and the nested headline OOF.

    `outer` (default: `grouped_folds(labels, groups, folds, seed)`) fixes the outer folds, so
    several encoders, baselines and label-efficiency subsets share them; rows in no test part
    stay NaN. Outer folds run in parallel processes (n_jobs, default: all cores), each with
    single-threaded BLAS.
    """
    from joblib import Parallel, delayed

    if outer is None:
        outer = grouped_folds(labels, groups, folds, seed)
    per_fold_feats = features if isinstance(features, list) else [features] * len(outer)
    if len(per_fold_feats) != len(outer):
        raise ValueError(f"{len(per_fold_feats)} feature sets for {len(outer)} outer folds")
    names = list(per_fold_feats[0])
    n_jobs = min(len(outer), n_jobs or os.cpu_count() or 1)
    # Each worker ties its life to this process as it starts (loky's initializer): joblib's loky workers (and so
    # their resource trackers) would outlive a killed probe by their 300 s idle timeout, holding its stdout open.
    _quiet_loky_tracker()
    per_fold = Parallel(n_jobs=n_jobs, backend="loky", initializer=exit_with_parent,
                        initargs=(signal.SIGKILL, 1.0, os.getpid()))(
        delayed(_outer_fold)({n: f[n] for n in names}, labels, groups, tr, te, inner_folds, seed + k)
        for k, ((tr, te), f) in enumerate(zip(outer, per_fold_feats)))
    cands = [CandidateOOF(n, per_fold_feats[0][n].shape[1], np.full(len(labels), np.nan)) for n in names]
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

    if hold := os.environ.get(TEST_FOLD_HOLD_ENV):  # tests only: say so, then wait to be signalled
        open(os.path.join(hold, str(os.getpid())), "w").close()
        time.sleep(120)

    if len(np.unique(labels[tr])) < 2:  # callers refuse or drop such folds (check_outer_folds); never guess here
        raise DegenerateFoldError(f"an outer training part of {len(tr)} segments holds a single class")
    out = []
    # Single-threaded BLAS: these matrices are small, and multi-threaded BLAS on a few cores runs
    # the L-BFGS iterations several times slower than one thread does.
    inner = usable_inner_splits(labels[tr], groups[tr], inner_folds, seed)
    with threadpool_limits(1, user_api="blas"):
        for x in features.values():
            clf, inner_auc, chosen = fit_probe(x[tr], labels[tr], inner)
            out.append((clf.predict_proba(np.asarray(x[te], dtype=np.float64))[:, 1], inner_auc, chosen))
    return out
