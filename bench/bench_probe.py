"""Probe speed: the seed's protocol against ours, same data, same checkpoint, same run.

Baseline (the seed's protocol): 5 random segment folds; in each, a linear layer on the mean-pooled
bottleneck trained 7 epochs with Adam, every training batch re-encoded by the frozen encoder each
epoch (`probes.seed_protocol`, `reencode_features`).
Ours, bottleneck: the same folds and features, encoded once (cold feature cache), then a
standardised logistic regression with C chosen on inner folds of each training part.
Ours, all levels: the default `himae-probe` protocol from a cold cache: five levels and all
levels together, mean+std pooling, patient-grouped nested CV with scaler, C and level chosen inside.
Ours, fold BatchNorm policy: the same with the encoder's BatchNorm statistics re-estimated on each
outer fold's training inputs (`--bn-stats fold`, one encode per fold).
MiniRocket: the baseline (aeon, `--minirocket-kernels`), fitted per outer training fold, same probe.

    python bench/bench_probe.py [--checkpoint PATH] [--scale 0.25] [--skip-seed]

Ends with one line: `probe N s, seed protocol M s, speedup S x` (N: ours, bottleneck).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.hdf5_sources import read_downstream  # noqa: E402
from data_prep.synth_cohort import generate  # noqa: E402
from himae_dist.checkpoint import load_himae  # noqa: E402
from probes import seed_protocol  # noqa: E402
from probes.features import FeatureCache  # noqa: E402
from probes.metrics import point_metrics  # noqa: E402
from probes.model_inputs import input_recipe, model_input  # noqa: E402
from probes.nested_cv import fit_probe, nested_probe  # noqa: E402
from probes.pooling import candidates  # noqa: E402
from probes.nested_cv import grouped_folds  # noqa: E402
from probes.random_baseline import random_baseline, with_batchnorm_from  # noqa: E402


def ours_bottleneck(model, x, labels, folds, seed, cache_dir) -> tuple[np.ndarray, float]:
    """Encode once (cold cache), then per fold a standardised logistic probe, C chosen on inner random folds."""
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    feats = FeatureCache(cache_dir).get_or_encode(model, x)["mean"][-1]  # [N, 256]
    p = np.full(len(labels), np.nan)
    with threadpool_limits(1, user_api="blas"):
        for k, (tr, te) in enumerate(folds):
            inner = list(StratifiedKFold(3, shuffle=True, random_state=seed + k).split(tr, labels[tr]))
            clf, _, _ = fit_probe(feats[tr], labels[tr], inner)
            p[te] = clf.predict_proba(feats[te].astype(np.float64))[:, 1]
    return p, time.perf_counter() - t0


def ours_all_levels(model, x, labels, groups, seed, cache_dir) -> tuple[np.ndarray, float, str]:
    t0 = time.perf_counter()
    stats = FeatureCache(cache_dir).get_or_encode(model, x)
    feats = {c.name(False): c.features(stats) for c in candidates(["mean+std"], len(stats["mean"]))}
    res = nested_probe(feats, labels, groups, folds=5, inner_folds=3, seed=seed)
    return res.headline_oof, time.perf_counter() - t0, res.selected_mode


def ours_fold_policy(model, x, labels, groups, seed, cache_dir) -> tuple[np.ndarray, float, str]:
    """As ours_all_levels, with BatchNorm statistics re-estimated on each outer fold's training inputs."""
    t0 = time.perf_counter()
    outer = grouped_folds(labels, groups, 5, seed)
    cache = FeatureCache(cache_dir)
    feats = []
    for tr, _ in outer:
        stats = cache.get_or_encode(with_batchnorm_from(model, x[tr]), x)
        feats.append({c.name(False): c.features(stats) for c in candidates(["mean+std"], len(stats["mean"]))})
    res = nested_probe(feats, labels, groups, inner_folds=3, seed=seed, outer=outer)
    return res.headline_oof, time.perf_counter() - t0, res.selected_mode


def minirocket_probe(x, labels, groups, seed, n_kernels) -> tuple[np.ndarray, float]:
    from probes import minirocket

    t0 = time.perf_counter()
    outer = grouped_folds(labels, groups, 5, seed)
    res = nested_probe(minirocket.fold_features(x, outer, n_kernels, seed), labels, groups, inner_folds=3, seed=seed,
                       outer=outer)
    return res.headline_oof, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="HiMAE weights (default: a random encoder, BatchNorm re-estimated)")
    ap.add_argument("--scale", type=float, default=0.25, help="downstream cohort vs 55,861 segments (0.25: ~14k)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "himae_bench_probe"))
    ap.add_argument("--epochs", type=int, default=seed_protocol.SEED_EPOCHS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-seed", action="store_true", help="skip the seed protocol (minutes); speedups then read n/a")
    ap.add_argument("--minirocket-kernels", type=int, default=10_000, help="0: no MiniRocket row")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    generate(work / f"cohort_{a.scale}", scale=a.scale, seed=a.seed, pretrain_scale=0.001)
    data = read_downstream(work / f"cohort_{a.scale}" / "downstream.h5")
    if a.checkpoint:
        model, info = load_himae(a.checkpoint)
        recipe = input_recipe(Path(a.checkpoint).name, info["preprocess"], None, 25.0, data.signals.shape[-1])
        x = model_input(data.signals, recipe)
        name = a.checkpoint
    else:
        recipe = input_recipe("random", None, None, 25.0, data.signals.shape[-1])
        x = model_input(data.signals, recipe)
        model, name = random_baseline(1, a.seed, x), "random init (BatchNorm re-estimated)"
    labels, groups = data.labels, data.patient_ids
    folds = seed_protocol.random_folds(len(labels), 5, a.seed)
    print(f"data: {len(labels)} segments, {int(labels.sum())} PVC, {len(np.unique(groups))} patients; model: {name}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)

    rows = []
    t_seed = float("nan")
    if not a.skip_seed:
        t0 = time.perf_counter()
        p_seed = seed_protocol.seed_probe_oof(seed_protocol.reencode_features(model, x), labels, folds, 256, a.seed, a.epochs)
        t_seed = time.perf_counter() - t0
        rows.append(("seed protocol (re-encode every epoch)", f"5 random folds, {a.epochs} epochs, bottleneck mean", p_seed, t_seed, None))
    with tempfile.TemporaryDirectory() as cold:
        p_b, t_b = ours_bottleneck(model, x, labels, folds, a.seed, Path(cold) / "b")
        rows.append(("ours, bottleneck (encode once, cold cache)", "same 5 random folds, bottleneck mean", p_b, t_b, None))
        p_all, t_all, sel = ours_all_levels(model, x, labels, groups, a.seed, Path(cold) / "all")
        rows.append(("ours, 5 levels + all, nested (cold cache)", f"patient-grouped nested 5x3, mean+std; selected {sel}",
                     p_all, t_all, None))
        _, t_warm, _ = ours_all_levels(model, x, labels, groups, a.seed, Path(cold) / "all")
        rows.append(("ours, 5 levels + all, nested (warm cache)", "as above, features from the cache", p_all, t_warm, None))
        p_fold, t_fold, sel = ours_fold_policy(model, x, labels, groups, a.seed, Path(cold) / "fold")
        rows.append(("ours, --bn-stats fold (cold cache)", f"as above, BatchNorm per outer training fold; selected {sel}",
                     p_fold, t_fold, None))
    if a.minirocket_kernels:
        p_mr, t_mr = minirocket_probe(x, labels, groups, a.seed, a.minirocket_kernels)
        rows.append((f"MiniRocket baseline ({a.minirocket_kernels} kernels)", "patient-grouped nested 5x3, fitted per "
                     "outer training fold", p_mr, t_mr, None))

    print(f"\n| method | protocol | ROC-AUC | AP | time s | speedup vs seed |\n|---|---|---|---|---|---|")
    for method, proto, p, t, _ in rows:
        m = point_metrics(labels, p)
        speedup = f"{t_seed / t:.1f}x" if np.isfinite(t_seed) else "n/a (--skip-seed)"
        print(f"| {method} | {proto} | {m['roc_auc']:.3f} | {m['ap']:.3f} | {t:.1f} | {speedup} |")
    if np.isfinite(t_seed):
        print(f"\nprobe {t_b:.1f} s, seed protocol {t_seed:.1f} s, speedup {t_seed / t_b:.1f} x")
    print(f"versions: torch {torch.__version__}, scikit-learn {__import__('sklearn').__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}")


if __name__ == "__main__":
    main()
