"""Checkpoint probe evaluation (`himae-probe`): which checkpoint, and which level, detects PVC.

The encoder is frozen; each encoder level's feature map is mean-pooled over time and a
logistic probe is fitted per level. Scores are out-of-fold over a patient-grouped,
label-stratified K-fold split (StratifiedGroupKFold): no patient is ever on both sides. A random
segment split lets the probe recognise patients instead of PVCs and reads far too high.

Also applies a probe saved in the seed's format (`fc.weight [1, D]`, `fc.bias [1]`) to the
bottleneck features, as the seed's notebook does.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.hdf5_sources import BadSamplePolicy, DownstreamSet, read_downstream
from himae_dist.atomic_write import atomic_path, write_json_atomic
from himae_dist.checkpoint import load_himae
from himae_dist.model import DEFAULT_CHANNELS, HiMAE
from probes.features import level_features


@dataclass
class LevelScore:
    level: int
    dim: int
    auroc: float
    ap: float


@dataclass
class ProbeResult:
    name: str
    levels: list[LevelScore]
    oof: list[np.ndarray] = field(repr=False)  # out-of-fold p_pvc per level, [N] each

    @property
    def best(self) -> LevelScore:
        return max(self.levels, key=lambda s: s.auroc)


def grouped_oof_probe(
    feats: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Out-of-fold P(PVC) [N] from a logistic probe over patient-grouped stratified folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a patient-grouped split needs at least 2 patients, found {n_groups}")
    if len(np.unique(labels)) < 2:
        raise ValueError("labels hold a single class; ROC-AUC is undefined")
    splitter = StratifiedGroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    oof = np.full(len(labels), np.nan)
    for train_idx, test_idx in splitter.split(feats, labels, groups):
        assert not set(groups[train_idx]) & set(groups[test_idx])  # no patient on both sides
        if len(np.unique(labels[train_idx])) < 2:
            oof[test_idx] = labels[train_idx].mean()  # no positives to learn from: a constant guess
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(feats[train_idx], labels[train_idx])
        oof[test_idx] = clf.predict_proba(feats[test_idx])[:, 1]
    return oof


def probe_model(
    model: HiMAE, data: DownstreamSet, name: str, folds: int = 5, seed: int = 0
) -> ProbeResult:
    return probe_levels(level_features(model, data.signals), data, name, folds, seed)


def probe_levels(
    feats: list[np.ndarray], data: DownstreamSet, name: str, folds: int = 5, seed: int = 0
) -> ProbeResult:
    """Grouped out-of-fold probe on each level's pooled features [N, C_level]."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if data.patient_ids is None:
        raise ValueError("the downstream data has no /patient_ids; a patient-grouped split is impossible")
    scores, oofs = [], []
    for i, f in enumerate(feats):
        p = grouped_oof_probe(f, data.labels, data.patient_ids, folds, seed)
        scores.append(LevelScore(i, f.shape[1], float(roc_auc_score(data.labels, p)), float(average_precision_score(data.labels, p))))
        oofs.append(p)
    return ProbeResult(name, scores, oofs)


def apply_seed_probe(
    bottleneck_feats: np.ndarray, labels: np.ndarray, probe_path: str
) -> tuple[np.ndarray, float, float]:
    """Apply a seed-format linear probe (fc.weight [1, D], fc.bias [1]) to pooled bottleneck features [N, D]."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    sd = torch.load(probe_path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "fc.weight" not in sd or "fc.bias" not in sd:
        raise ValueError(f"{probe_path}: expected a state_dict with 'fc.weight' [1, D] and 'fc.bias' [1]")
    w, b = sd["fc.weight"].float(), sd["fc.bias"].float()
    bottleneck = torch.from_numpy(bottleneck_feats)  # [N, D]
    if w.shape != (1, bottleneck.shape[1]) or b.shape != (1,):
        raise ValueError(
            f"{probe_path}: fc.weight {tuple(w.shape)} / fc.bias {tuple(b.shape)} do not fit a "
            f"{bottleneck.shape[1]}-d bottleneck; expected [1, {bottleneck.shape[1]}] and [1]"
        )
    p = torch.sigmoid(bottleneck @ w.T + b).squeeze(1).numpy()
    return p, float(roc_auc_score(labels, p)), float(average_precision_score(labels, p))


def write_predictions(path: str | Path, data: DownstreamSet, p: np.ndarray) -> None:
    """pvc_predictions.csv in the seed's columns: patient_id,label,p_pvc."""
    pids = data.patient_ids if data.patient_ids is not None else np.full(len(p), -1)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", "p_pvc"])
        for pid, y, pp in zip(pids, data.labels, p):
            w.writerow([int(pid), int(y), f"{pp:.6g}"])


def format_table(results: list[ProbeResult]) -> str:
    """Per-level ROC-AUC and AP, one column pair per probed encoder."""
    w = 15
    lines = [f"{'':10}" + "".join(f" | {r.name[:w]:^{w}}" for r in results),
             f"{'level':>5} {'dim':>4}" + "".join(f" | {'ROC-AUC':>7} {'AP':>7}" for _ in results)]
    lines.append("-" * len(lines[1]))
    for i, lvl in enumerate(results[0].levels):
        lines.append(f"{i:>5} {lvl.dim:>4}" + "".join(
            f" | {r.levels[i].auroc:7.3f} {r.levels[i].ap:7.3f}" for r in results))
    lines.append("-" * len(lines[1]))
    lines.append(f"{'best':>10}" + "".join(f" | {r.best.auroc:7.3f} {'(L' + str(r.best.level) + ')':>7}" for r in results))
    return "\n".join(lines)


def random_encoder(in_chans: int, seed: int, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> HiMAE:
    torch.manual_seed(seed)
    return HiMAE(in_chans, channels).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="HiMAE weights (ours, a seed Lightning .ckpt, or a DeepSpeed folder); repeatable")
    ap.add_argument("--random-init", type=int, default=None, metavar="SEED", help="also probe a random encoder")
    ap.add_argument("--h5", required=True, help="downstream HDF5 (/ppg|/ecg [N, L], /labels, /patient_ids)")
    ap.add_argument("--signal-key", default="ppg")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error")
    ap.add_argument("--seed-probe", help="apply a seed-format probe (fc.weight, fc.bias) to the bottleneck")
    ap.add_argument("--out", default="probe_results", help="folder for results.json and pvc_predictions.csv")
    a = ap.parse_args(argv)
    try:
        run(a)
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"himae-probe: error: {e}")


def run(a: argparse.Namespace) -> list[ProbeResult]:
    if not a.checkpoint and a.random_init is None:
        raise ValueError("give at least one --checkpoint or --random-init")
    data = read_downstream(a.h5, a.signal_key, policy=BadSamplePolicy(a.on_bad))
    out = Path(a.out)
    models = [(Path(c).name, load_himae(c)[0]) for c in a.checkpoint]
    if a.random_init is not None:
        models.append((f"random-init({a.random_init})", random_encoder(data.signals.shape[1], a.random_init)))
    results = []
    for name, m in models:
        feats = level_features(m, data.signals)  # one encoder pass per model serves both probes
        if a.seed_probe:
            p, auroc, apr = apply_seed_probe(feats[-1], data.labels, a.seed_probe)
            write_predictions(out / f"pvc_predictions_seedprobe_{name}.csv", data, p)
            print(f"[himae-probe] seed probe on {name}: ROC-AUC {auroc:.3f}  AP {apr:.3f} (all {len(p)} segments)")
        results.append(probe_levels(feats, data, name, a.folds, a.seed))
    print(format_table(results))
    first = results[0]
    write_predictions(out / "pvc_predictions.csv", data, first.oof[first.best.level])
    write_json_atomic(out / "results.json", {
        "data": str(a.h5), "n_segments": int(len(data.labels)), "n_pvc": int(data.labels.sum()),
        "folds": a.folds, "results": [{"name": r.name, "levels": [vars(s) for s in r.levels],
                                       "best_level": r.best.level} for r in results],
    })
    print(f"[himae-probe] wrote {out / 'results.json'} and {out / 'pvc_predictions.csv'} "
          f"({first.name}, level {first.best.level}, out-of-fold)")
    return results


if __name__ == "__main__":
    main()
