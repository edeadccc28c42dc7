"""Metrics of a PVC detector with patient-level bootstrap 95 % confidence intervals.

With 18 patients, segments are not independent: a patient contributes many near-identical
segments. So CIs resample *patients* with replacement (all of a resampled patient's segments
come along), which is what a new cohort would vary.

Metrics: ROC-AUC, average precision (AP), and at the operating point of 90 % specificity (the
lowest threshold whose false-positive rate is <= 10 %) sensitivity and F1; plus prevalence.

The bootstrap is vectorised: each patient's segments are histogrammed once over the distinct
scores; a resample is then a weighting of patients, and the ROC/PR sums of all resamples come
from one matrix product. The same code at weight 1 gives the point estimates, which tests check
against scikit-learn's `roc_auc_score`, `average_precision_score` and `roc_curve`.
"""

from __future__ import annotations

import numpy as np

METRICS = ("roc_auc", "ap", "sens_at_spec90", "f1_at_spec90")
SPECIFICITY = 0.90
MIN_CI_PATIENTS = 3  # resampling 1 or 2 patients gives an interval that describes nothing


def _histograms(y: np.ndarray, p: np.ndarray, groups: np.ndarray):
    """Per-patient counts of positives and negatives at each distinct score, highest score first.

    Returns (pos [G, U], neg [G, U], patient ids [G]).
    """
    uniq, u_idx = np.unique(-np.asarray(p, dtype=np.float64), return_inverse=True)  # descending scores
    gids, g_idx = np.unique(groups, return_inverse=True)
    G, U = len(gids), len(uniq)
    pos = np.zeros((G, U))
    neg = np.zeros((G, U))
    np.add.at(pos, (g_idx[y == 1], u_idx[y == 1]), 1)
    np.add.at(neg, (g_idx[y == 0], u_idx[y == 0]), 1)
    return pos, neg, gids


def _curves(wpos: np.ndarray, wneg: np.ndarray):
    """wpos, wneg [B, U] (descending score) -> cumulative TP, FP [B, U] and totals P, N [B, 1]."""
    tp, fp = np.cumsum(wpos, axis=1), np.cumsum(wneg, axis=1)
    return tp, fp, tp[:, -1:], fp[:, -1:]


def _metrics_from_weights(wpos: np.ndarray, wneg: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric for B weightings at once; NaN where a weighting holds a single class."""
    tp, fp, P, N = _curves(wpos, wneg)
    with np.errstate(invalid="ignore", divide="ignore"):
        # ROC-AUC: P(score of a positive > score of a negative) + 0.5 P(tie)
        fp_above = fp - wneg  # negatives strictly above each distinct score
        auc = (wpos * (N - fp_above - 0.5 * wneg)).sum(axis=1, keepdims=True) / (P * N)
        # AP: sum over thresholds of (recall step) x (precision), sklearn's definition
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        ap = (wpos / P * precision).sum(axis=1, keepdims=True)
        fpr = fp / N
        ok = fpr <= 1 - SPECIFICITY + 1e-12
        # the lowest threshold that still keeps FPR <= 10 %; cumulative FPR is monotone
        last = np.where(ok.any(axis=1), ok.sum(axis=1) - 1, -1)
        rows = np.arange(len(wpos))
        tp_at = np.where(last >= 0, tp[rows, np.maximum(last, 0)], 0.0)
        fp_at = np.where(last >= 0, fp[rows, np.maximum(last, 0)], 0.0)
        sens = tp_at / P[:, 0]
        f1 = 2 * tp_at / (2 * tp_at + fp_at + (P[:, 0] - tp_at))
    bad = (P[:, 0] == 0) | (N[:, 0] == 0)
    out = {"roc_auc": auc[:, 0], "ap": ap[:, 0], "sens_at_spec90": sens, "f1_at_spec90": f1}
    return {k: np.where(bad, np.nan, v) for k, v in out.items()}


def point_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The four metrics of predictions p [N] for labels y [N] (0/1)."""
    y = np.asarray(y)
    pos, neg, _ = _histograms(y, p, np.zeros(len(y), dtype=np.int64))
    return {k: float(v[0]) for k, v in _metrics_from_weights(pos, neg).items()}


def _patient_resamples(rng: np.random.Generator, n_patients: int, n: int) -> np.ndarray:
    """How often each patient is drawn in each of n resamples of the patients with replacement: [n, G]."""
    return np.stack([np.bincount(rng.integers(0, n_patients, n_patients), minlength=n_patients)
                     for _ in range(n)]).astype(float)


def patient_bootstrap(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0, chunk: int = 100
) -> dict[str, np.ndarray]:
    """Each metric over n_boot patient resamples: {metric: [n_boot]} (NaN: a one-class resample)."""
    pos, neg, gids = _histograms(np.asarray(y), p, np.asarray(groups))
    rng = np.random.default_rng(seed)
    G = len(gids)
    out: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        counts = _patient_resamples(rng, G, b)  # [b, G]
        for k, v in _metrics_from_weights(counts @ pos, counts @ neg).items():
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def score(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Point estimates with patient-bootstrap 95 % CIs, prevalence and counts (JSON-ready)."""
    y, p = np.asarray(y), np.asarray(p, dtype=np.float64)
    if len(np.unique(y)) < 2:
        raise ValueError(f"labels hold a single class ({int(y[0])}) in {len(y)} segments; ROC-AUC is undefined")
    if not np.isfinite(p).all():
        raise ValueError(f"{int((~np.isfinite(p)).sum())} predictions are NaN or infinite")
    point = point_metrics(y, p)
    res: dict = {"n": int(len(y)), "n_pos": int(y.sum()), "prevalence": float(y.mean())}
    if groups is None:
        res["n_patients"] = None
        res.update({k: {"value": v, "ci95": None} for k, v in point.items()})
        res["ci_note"] = "no patient ids: no patient-level CI"
        return res
    res["n_patients"] = n_pat = int(len(np.unique(groups)))
    if n_pat < MIN_CI_PATIENTS:
        res.update({k: {"value": v, "ci95": None} for k, v in point.items()})
        res["ci_note"] = (f"no CI: {n_pat} patient{'s' if n_pat > 1 else ''}; a patient bootstrap needs at least "
                          f"{MIN_CI_PATIENTS}")
        return res
    boot = patient_bootstrap(y, p, groups, n_boot, seed) if n_boot > 0 else None
    for k, v in point.items():
        ci = None
        if boot is not None and np.isfinite(boot[k]).sum() >= 2:
            lo, hi = np.nanpercentile(boot[k], [2.5, 97.5])
            ci = [float(lo), float(hi)]
        res[k] = {"value": v, "ci95": ci}
    res["n_boot"] = int(n_boot)
    res["n_boot_one_class"] = int(np.isnan(boot["roc_auc"]).sum()) if boot is not None else 0
    return res


def paired_difference(y: np.ndarray, p: np.ndarray, baselines: list[np.ndarray], groups: np.ndarray,
                      n_boot: int = 1000, seed: int = 0, metrics: tuple[str, ...] = ("roc_auc", "ap")) -> dict:
    """Metric of p minus the mean metric of the baselines' predictions, with a paired patient-bootstrap 95 % CI.

    Every model is scored on the same patient resamples (`patient_bootstrap` draws them from the
    seed and the patient count alone), so the difference is a subtraction per resample: it varies
    far less than either model's own score, which is what lets 18 patients tell two models apart.
    Several baselines (random-init seeds) are averaged per resample. The CI is None for fewer than
    MIN_CI_PATIENTS patients.
    """
    y, groups = np.asarray(y), np.asarray(groups)
    point_a = point_metrics(y, p)
    point_b = [point_metrics(y, b) for b in baselines]
    out: dict = {"n_patients": int(len(np.unique(groups))), "n_baselines": len(baselines), "n_boot": int(n_boot)}
    boot = None
    if out["n_patients"] >= MIN_CI_PATIENTS and n_boot > 0:
        boot_a = patient_bootstrap(y, p, groups, n_boot, seed)
        boot_b = [patient_bootstrap(y, b, groups, n_boot, seed) for b in baselines]
        boot = {k: boot_a[k] - np.mean([bb[k] for bb in boot_b], axis=0) for k in metrics}
    for k in metrics:
        ci = None
        if boot is not None and np.isfinite(boot[k]).sum() >= 2:
            lo, hi = np.nanpercentile(boot[k], [2.5, 97.5])
            ci = [float(lo), float(hi)]
        out[k] = {"value": point_a[k] - float(np.mean([pb[k] for pb in point_b])), "ci95": ci}
    return out


def curve_bands(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, n_boot: int = 200, seed: int = 0, grid: int = 101
) -> dict[str, np.ndarray]:
    """Patient-bootstrap 95 % bands of the ROC (TPR at fixed FPR) and PR (precision at fixed recall) curves."""
    pos, neg, gids = _histograms(np.asarray(y), p, np.asarray(groups))
    rng = np.random.default_rng(seed)
    G = len(gids)
    counts = _patient_resamples(rng, G, n_boot)  # [n_boot, G]
    tp, fp, P, N = _curves(counts @ pos, counts @ neg)
    ok = (P[:, 0] > 0) & (N[:, 0] > 0)
    x = np.linspace(0, 1, grid)
    tprs, precs = [], []
    for b in np.flatnonzero(ok):
        fpr, tpr = np.r_[0, fp[b] / N[b, 0]], np.r_[0, tp[b] / P[b, 0]]
        tprs.append(np.interp(x, fpr, tpr))
        rec, prec = tp[b] / P[b, 0], tp[b] / np.maximum(tp[b] + fp[b], 1e-12)
        # precision at recall r: the best precision reachable at recall >= r (the PR envelope)
        env = np.maximum.accumulate(prec[::-1])[::-1]
        precs.append(np.interp(x, rec, env, left=env[0], right=np.nan))
    tprs, precs = np.array(tprs), np.array(precs)
    return {
        "grid": x,
        "tpr_lo": np.nanpercentile(tprs, 2.5, axis=0), "tpr_hi": np.nanpercentile(tprs, 97.5, axis=0),
        "precision_lo": np.nanpercentile(precs, 2.5, axis=0), "precision_hi": np.nanpercentile(precs, 97.5, axis=0),
    }
