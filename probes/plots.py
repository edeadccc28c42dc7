"""PNG figures of a probe run: ROC/PR curves with CI bands, the resolution profile, ROC-AUC over steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_prep.atomic_write import atomic_path
from probes.metrics import curve_bands


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return path


def roc_pr_curves(path: Path, curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                  title: str, n_boot: int = 200, seed: int = 0) -> Path:
    """curves: (label, y [N], p [N], patient ids [N] or None); bands are patient-bootstrap 95 % CIs."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.8))
    for i, (label, y, p, groups) in enumerate(curves):
        color = f"C{i}"
        fpr, tpr, _ = roc_curve(y, p)
        prec, rec, _ = precision_recall_curve(y, p)
        ax_roc.plot(fpr, tpr, color=color, lw=1.4, label=label)
        ax_pr.plot(rec, prec, color=color, lw=1.4, label=label)
        if groups is not None and n_boot > 0:
            b = curve_bands(y, p, groups, n_boot, seed)
            ax_roc.fill_between(b["grid"], b["tpr_lo"], b["tpr_hi"], color=color, alpha=0.15, lw=0)
            ax_pr.fill_between(b["grid"], b["precision_lo"], b["precision_hi"], color=color, alpha=0.15, lw=0)
    prevalence = float(np.mean(curves[0][1]))
    ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax_pr.axhline(prevalence, color="grey", ls=":", lw=1, label=f"prevalence {prevalence:.3f}")
    ax_roc.set(xlabel="false-positive rate", ylabel="sensitivity", title="ROC (band: patient bootstrap 95 % CI)")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    ax_roc.legend(fontsize=7, loc="lower right")
    ax_pr.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def level_profile(path: Path, levels: list[str], models: list[tuple[str, list[float], list[list[float] | None]]],
                  random: tuple[list[float], list[float]] | None, title: str) -> Path:
    """ROC-AUC by encoder level per model (error bars: 95 % CI) and the random baselines' mean +- sd."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    x = np.arange(len(levels))
    if random is not None:
        mean, sd = np.asarray(random[0]), np.asarray(random[1])
        ax.fill_between(x, mean - sd, mean + sd, color="grey", alpha=0.25, lw=0)
        ax.plot(x, mean, color="grey", ls="--", marker="s", ms=4, label="random init (mean +- sd over seeds)")
    for i, (name, auc, ci) in enumerate(models):
        yerr = None
        if all(c is not None for c in ci):
            yerr = np.abs(np.array(ci, dtype=float).T - np.asarray(auc))
        ax.errorbar(x + 0.04 * (i - len(models) / 2), auc, yerr=yerr, marker="o", ms=4, capsize=2, lw=1.2, label=name)
    ax.set_xticks(x, levels)
    ax.set(xlabel="encoder level (finest first; 'all' = concatenated)", ylabel="out-of-fold ROC-AUC", title=title)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def auc_over_steps(path: Path, steps: list[int], headline: list[float], headline_ci: list[list[float] | None],
                   per_level: dict[str, list[float]], random_mean: float | None, title: str) -> Path:
    """Nested (headline) ROC-AUC with its 95 % CI and each level's ROC-AUC against the training step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, auc) in enumerate(per_level.items()):
        ax.plot(steps, auc, lw=0.9, alpha=0.7, marker=".", color=f"C{i + 1}", label=name)
    ax.plot(steps, headline, color="C0", lw=2, marker="o", label="nested (level selected inside folds)")
    if all(c is not None for c in headline_ci):
        ci = np.array(headline_ci, dtype=float)
        ax.fill_between(steps, ci[:, 0], ci[:, 1], color="C0", alpha=0.15, lw=0)
    if random_mean is not None:
        ax.axhline(random_mean, color="grey", ls="--", label="random init, nested (mean over seeds)")
    ax.set(xlabel="pretraining step", ylabel="out-of-fold ROC-AUC", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def label_efficiency(path: Path, reports: list, title: str) -> Path:
    """Headline ROC-AUC and AP against labelled training patients per model (bars: sd over draws and seeds)."""
    from probes.report import label_efficiency_curves

    plt = _plt()
    fig, (ax_auc, ax_ap) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (model, pts) in enumerate(label_efficiency_curves(reports).items()):
        n = [p[0] for p in pts]
        for ax, k in ((ax_auc, 1), (ax_ap, 2)):
            mean = [float(np.mean(p[k])) for p in pts]
            sd = [float(np.std(p[k], ddof=1)) if len(p[k]) > 1 else 0.0 for p in pts]
            ax.errorbar(n, mean, yerr=sd, marker="o", ms=4, capsize=2, lw=1.3, color=f"C{i}", label=model)
    ax_auc.set(xlabel="labelled training patients per outer fold", ylabel="out-of-fold headline ROC-AUC")
    ax_ap.set(xlabel="labelled training patients per outer fold", ylabel="out-of-fold headline AP")
    ax_auc.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
