"""Checkpoint probe evaluation (`himae-probe`): which checkpoint, and which level, detects PVC.

    himae-probe --checkpoint A.pt [--checkpoint s3://b/run/himae_final.pt] [--run RUN_DIR ...] --h5 downstream.h5 --out OUT
    himae-probe score --predictions pvc_predictions.csv

Each encoder (a checkpoint, every `weights/step_*.pt` of a run folder, and random-init baselines
over several seeds) is fed the downstream segments preprocessed as its pretraining data was
(`probes.model_inputs`), encoded once per BatchNorm statistics (cached on disk,
`probes.features`), and probed per level and with all levels concatenated. One BatchNorm policy
holds for every encoder and never uses test patients (`probes.random_baseline`). The default
protocol is nested and patient-grouped (`probes.nested_cv`): no patient is on both sides of any
split, and scaler, C and the headline level are chosen on inner folds of the training patients
only. MiniRocket (`probes.minirocket`) runs through the same folds. Metrics carry
patient-bootstrap 95 % CIs, and each checkpoint's difference from random init and MiniRocket a
paired CI on the same resamples (`probes.metrics`); `--label-fractions` adds the label-efficiency
curve (`probes.label_efficiency`). `--protocol seed` runs the seed's random 80/20 segment split
instead, for parity with its numbers, and says so in every output.
"""

from __future__ import annotations

import os
import sys

from data_prep.interruption import Interrupted, exit_at_once_on_signals, stop_on_signals


def interrupted_line(signum: int) -> str:
    """The one line himae-probe ends with on SIGINT/SIGTERM, whenever it comes."""
    import signal

    return (f"himae-probe: interrupted by {signal.Signals(signum).name}; files written so far are complete (each is "
            f"written under a temp name, then renamed; cached features are reused by a re-run)")


if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "himae-probe":  # the CLI, not an import
    exit_at_once_on_signals(interrupted_line)

import argparse  # noqa: E402 (the handler above comes first: these imports are the slow part of starting)
import re
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from data_prep.hdf5_sources import BadSamplePolicy, DownstreamSet, check_labels, check_patient_ids, read_downstream
from data_prep.preprocess import Preprocess
from data_prep.atomic_write import atomic_path, write_json_atomic
from data_prep.storage import Folder, StorageError, is_remote, json_object, redact_secrets
from himae_dist.checkpoint import load_himae
from probes import seed_protocol
from probes.features import FeatureCache
from probes import minirocket
from probes.label_efficiency import label_efficiency
from probes.metrics import paired_difference, score
from probes.model_inputs import SEED_DEFAULT, InputRecipe, input_recipe, manifest_preprocess, model_input
from probes.nested_cv import C_GRID, DegenerateFoldError, Folds, check_outer_folds, grouped_folds, nested_probe
from probes.pooling import POOLINGS, candidates
from probes.random_baseline import (BN_POLICIES, random_baseline, random_encoder, shard_segments,
                                    with_batchnorm_from)
from probes.report import (ModelReport, format_label_efficiency, format_paired, format_table, markdown_report,
                           random_summary, unique_names, verdict_phrase, write_predictions)

NESTED_LABEL = ("protocol nested: patient-grouped {folds}-fold CV{fold_note} (no patient on both sides); scaler, C "
                "and level chosen on inner {inner}-fold patient-grouped splits of the training patients only")


def apply_seed_probe(
    bottleneck_feats: np.ndarray, labels: np.ndarray, probe_path: str
) -> tuple[np.ndarray, float, float]:
    """Apply a seed-format linear probe (fc.weight [1, D], fc.bias [1]) to mean-pooled bottleneck features [N, D]."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    sd = torch.load(probe_path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or "fc.weight" not in sd or "fc.bias" not in sd:
        raise ValueError(f"{probe_path}: expected a state_dict with 'fc.weight' [1, D] and 'fc.bias' [1]")
    w, b = sd["fc.weight"].float(), sd["fc.bias"].float()
    bottleneck = torch.from_numpy(np.ascontiguousarray(bottleneck_feats, dtype=np.float32))  # [N, D]
    if w.shape != (1, bottleneck.shape[1]) or b.shape != (1,):
        raise ValueError(
            f"{probe_path}: fc.weight {tuple(w.shape)} / fc.bias {tuple(b.shape)} do not fit a "
            f"{bottleneck.shape[1]}-d bottleneck; expected [1, {bottleneck.shape[1]}] and [1]"
        )
    p = torch.sigmoid(bottleneck @ w.T + b).squeeze(1).numpy()
    return p, float(roc_auc_score(labels, p)), float(average_precision_score(labels, p))


# ---------------------------------------------------------------------------------------------
# inputs


def run_checkpoints(run_dir: str, storage_options: dict | None = None) -> list[str]:
    """Every `weights/step_*.pt` of a trainer run folder (local, or an s3:// export), in step order."""
    if is_remote(run_dir):
        folder = Folder(run_dir, storage_options)
        found = [(folder.child_url(n), n.rsplit("/", 1)[-1]) for n in folder.listing("weights")
                 if "/" not in n[len("weights/"):] and fnmatch(n.rsplit("/", 1)[-1], "step_*.pt")]
    else:
        found = [(str(p), p.name) for p in Path(run_dir).joinpath("weights").glob("step_*.pt")]
    if not found:
        raise FileNotFoundError(f"--run {run_dir}: no weights/step_*.pt in it (is it a himae_dist.train --out folder?)")
    return [url for url, name in sorted(found, key=lambda f: int(re.sub(r"\D", "", f[1]) or 0))]


def data_rate(h5_path: str, fs_flag: float | None) -> float | None:
    """The downstream rate: the file's attrs['fs'], else --fs; both given and different is an error."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        fs = f.attrs.get("fs")
    fs = float(fs) if fs is not None else None
    if fs is not None and fs_flag is not None and float(fs_flag) != fs:
        raise ValueError(f"--fs {fs_flag:g} but {h5_path} records attrs['fs'] = {fs:g}; drop --fs or fix the file")
    return fs if fs is not None else fs_flag


def drop_constant(data: DownstreamSet) -> tuple[DownstreamSet, int]:
    """Flat-line segments have no min-max scale: drop them (counted), as the conversion job does."""
    _, kept = Preprocess(normalize="none", constant="drop").apply(data.signals)
    if kept.all():
        return data, 0
    pids = None if data.patient_ids is None else data.patient_ids[kept]
    return DownstreamSet(data.signals[kept], data.labels[kept], pids, data.rows[kept]), int((~kept).sum())


def check_probe_data(data: DownstreamSet, h5: str, protocol: str) -> None:
    if len(np.unique(data.labels)) < 2:
        raise ValueError(f"{h5}: '/labels' holds a single class ({int(data.labels[0])}); a PVC probe needs both")
    if protocol == "nested":
        if data.patient_ids is None:
            raise ValueError(f"{h5}: no '/patient_ids'; a patient-grouped split is impossible (or use --protocol seed)")
        n = len(np.unique(data.patient_ids))
        if n < 2:
            raise ValueError(f"{h5}: '/patient_ids' holds a single patient; a patient-grouped split needs at least 2")


# ---------------------------------------------------------------------------------------------
# folds and the BatchNorm policy


def outer_folds(data: DownstreamSet, a: argparse.Namespace) -> tuple[Folds, str, list[str]]:
    """The folds every encoder and baseline shares: (folds actually run, protocol label, drop messages)."""
    if a.protocol == "seed":
        outer_all = [seed_protocol.random_split(len(data.labels), a.seed)]
    else:
        outer_all = grouped_folds(data.labels, data.patient_ids, a.folds, a.seed)
    outer, dropped = check_outer_folds(outer_all, data.labels,
                                       data.patient_ids if data.patient_ids is not None else np.zeros(len(data.labels)),
                                       a.on_degenerate)
    if a.protocol == "seed":
        return outer, seed_protocol.LABEL, dropped
    notes = []
    if len(outer_all) < a.folds:
        notes.append(f"--folds {a.folds} asked, but {len(outer_all)} patients allow {len(outer_all)}")
    if dropped:
        notes.append(f"{len(dropped)} of {len(outer_all)} folds dropped for a single class on a side")
    fold_note = f" ({'; '.join(notes)})" if notes else ""
    return outer, NESTED_LABEL.format(folds=len(outer), fold_note=fold_note, inner=a.inner_folds), dropped


def bn_policy(a: argparse.Namespace) -> str:
    """--bn-stats auto: the pretraining shards' statistics when --manifest names them, else each fold's training inputs."""
    if a.bn_stats == "auto":
        return "pretrain" if a.manifest else "fold"
    if a.bn_stats == "pretrain" and not a.manifest:
        raise ValueError("--bn-stats pretrain needs --manifest (the pretraining shards the random encoders' "
                         "BatchNorm statistics come from); or use --bn-stats fold")
    return a.bn_stats


def fold_stats(model, x: np.ndarray, outer: Folds, policy: str, cache: FeatureCache) -> list:
    """Pooled stats per outer fold under the policy (one shared entry when the statistics do not depend on the fold)."""
    if policy == "fold":
        return [cache.get_or_encode(with_batchnorm_from(model, x[tr]), x) for tr, _ in outer]
    return [cache.get_or_encode(model, x)]


# ---------------------------------------------------------------------------------------------
# probing one encoder


def _score_covered(y: np.ndarray, p: np.ndarray, groups: np.ndarray | None, a: argparse.Namespace) -> dict:
    """Score the rows that are a test row of some fold run (dropped folds leave NaN)."""
    have = np.isfinite(p)
    return score(y[have], p[have], None if groups is None else groups[have], a.n_boot, a.seed)


def probe_features(fold_feats: list[dict], data: DownstreamSet, outer: Folds,
                   a: argparse.Namespace) -> tuple[list[dict], dict, np.ndarray]:
    """Per-candidate scores, the headline and its predictions [N] from per-fold candidate features."""
    res = nested_probe(fold_feats if len(fold_feats) > 1 else fold_feats[0], data.labels, data.patient_ids,
                       a.folds, a.inner_folds, a.seed, outer=outer)
    out = [{"name": c.name, "dim": c.dim, "chosen_c": c.chosen_c, "inner_auc": c.inner_auc,
            "metrics": _score_covered(data.labels, c.oof, data.patient_ids, a)} for c in res.candidates]
    headline = {"metrics": _score_covered(data.labels, res.headline_oof, data.patient_ids, a),
                "selected": res.selected, "selected_mode": res.selected_mode}
    return out, headline, res.headline_oof


def encoder_candidates(stats_per_fold: list, a: argparse.Namespace) -> list[dict]:
    """Per fold {candidate name: features [N, D]}: each level and all levels, for each pooling."""
    several = len(a.pooling) > 1
    cands = candidates(a.pooling, len(stats_per_fold[0]["mean"]), include_all=True)
    return [{c.name(several): c.features(st) for c in cands} for st in stats_per_fold]


def probe_encoder(stats_per_fold: list, data: DownstreamSet, outer: Folds,
                  a: argparse.Namespace) -> tuple[list[dict], dict, np.ndarray]:
    """Per-candidate scores, the headline and its predictions [N] for one encoder's pooled stats (per fold)."""
    n_levels = len(stats_per_fold[0]["mean"])
    if a.protocol == "seed":
        bottleneck = stats_per_fold[0]["mean"][-1]
        tr, te = outer[0]
        p = np.full(len(data.labels), np.nan)
        p[np.sort(te)] = seed_protocol.seed_probe_oof(
            seed_protocol.cached_features(bottleneck), data.labels, [(tr, te)], bottleneck.shape[1], a.seed)[np.sort(te)]
        m = _score_covered(data.labels, p, data.patient_ids, a)
        name = f"L{n_levels - 1}"
        cand = {"name": name, "dim": int(bottleneck.shape[1]), "metrics": m, "chosen_c": [], "inner_auc": []}
        return [cand], {"metrics": m, "selected": [name], "selected_mode": name}, p
    return probe_features(encoder_candidates(stats_per_fold, a), data, outer, a)


def add_paired(reports: list[ModelReport], data: DownstreamSet, a: argparse.Namespace) -> None:
    """Each checkpoint minus random init (mean over seeds per resample) and minus MiniRocket, on the same resamples."""
    if data.patient_ids is None:
        return
    baselines = {"random init": [r for r in reports if r.kind == "random"],
                 minirocket.NAME: [r for r in reports if r.kind == "minirocket"]}
    rows = np.logical_and.reduce([np.isfinite(r.p) for r in reports])
    y, g = data.labels[rows], data.patient_ids[rows]
    for r in reports:
        if r.kind != "checkpoint":
            continue
        r.paired = {name: paired_difference(y, r.p[rows], [b.p[rows] for b in bs], g, a.n_boot, a.seed)
                    for name, bs in baselines.items() if bs}


# ---------------------------------------------------------------------------------------------
# CLI


def _fractions(text: str) -> list[float]:
    try:
        out = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.25,0.5, got {text!r}")
    if any(not 0 < f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="himae-probe", description=__doc__.split("\n\n")[0],
                                 epilog="`himae-probe score --predictions CSV` scores a predictions CSV "
                                        "(`himae-probe score --help`).")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="HiMAE weights (ours, a seed Lightning .ckpt, a bare state_dict, a DeepSpeed folder), "
                         "local or an s3:// (fsspec) URL of one file; repeatable")
    ap.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                    help="a trainer --out folder or its s3:// export: probe every weights/step_*.pt in it; repeatable")
    ap.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                    help='fsspec options for s3:// checkpoints as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    ap.add_argument("--random-baselines", type=int, default=3, metavar="K",
                    help="random-init encoders (seeds 0..K-1, BatchNorm statistics per --bn-stats); 0 = none")
    ap.add_argument("--bn-stats", choices=["auto", "pretrain", "fold"], default="auto",
                    help="where every encoder's BatchNorm statistics come from: pretrain = checkpoints keep their "
                         "pretraining statistics and random encoders re-estimate on the --manifest shards; fold = "
                         "every encoder re-estimates on each outer fold's training inputs; auto (default) = pretrain "
                         "with --manifest, else fold. Never the test patients")
    ap.add_argument("--bn-segments", type=int, default=4096, metavar="N",
                    help="pretraining-shard segments that random encoders' BatchNorm statistics are estimated on "
                         "(--bn-stats pretrain)")
    ap.add_argument("--minirocket-kernels", type=int, default=10_000, metavar="K",
                    help="MiniRocket baseline (aeon, fitted on each outer training fold) with K kernels (aeon rounds "
                         "to a multiple of 84); 0 = none. Needs the [baselines] extra")
    ap.add_argument("--label-fractions", type=_fractions, default=[], metavar="F[,F...]",
                    help="label efficiency: also train each final checkpoint, the random encoders and MiniRocket on "
                         "these fractions of each outer fold's training patients (PVC-stratified draws), e.g. 0.25,0.5; "
                         "1.0 (all) is always included. Default: off")
    ap.add_argument("--label-draws", type=int, default=3, metavar="D", help="draws of patients per label fraction")
    ap.add_argument("--h5", required=True, help="downstream HDF5 (/ppg|/ecg [N, L], /labels [N], /patient_ids [N])")
    ap.add_argument("--signal-key", default="ppg", help="the dataset of --h5 holding the segments (default ppg; "
                                                        "e.g. ecg)")
    ap.add_argument("--fs", type=float, default=None, help="downstream sampling rate (Hz) when the file has no attrs['fs']")
    ap.add_argument("--manifest", default=None,
                    help="the pretraining shards' manifest.json: its 'preprocess' applies to checkpoints that record "
                         "none, and its shards give random encoders their BatchNorm statistics (--bn-stats)")
    ap.add_argument("--pooling", action="append", default=None, choices=list(POOLINGS),
                    help="pooling over time per level (repeatable; default mean+std)")
    ap.add_argument("--protocol", choices=["nested", "seed"], default="nested",
                    help="nested: patient-grouped nested CV (default); seed: the seed's random 80/20 segment split")
    ap.add_argument("--folds", type=int, default=5, help="outer patient-grouped folds (at most one per patient; the "
                                                         "outputs give the count actually run)")
    ap.add_argument("--inner-folds", type=int, default=3,
                    help="inner patient-grouped folds of each outer training part, which choose scaler, C and level")
    ap.add_argument("--on-degenerate", choices=["error", "drop"], default="error",
                    help="an outer fold with no PVC (or only PVC) on its training or test side: error (default) "
                         "names it and stops; drop names it and runs without it")
    ap.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for the 95 %% CIs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the folds, the bootstrap and the label draws")
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="a segment with NaN/inf samples: error (default) names it; skip drops it (counted)")
    ap.add_argument("--seed-probe", help="also apply a seed-format probe (fc.weight, fc.bias) to the bottleneck")
    ap.add_argument("--cache", default=None, help="feature cache folder (default OUT/feature_cache)")
    ap.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    ap.add_argument("--out", default="probe_results", help="output folder")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with stop_on_signals():
            if argv[:1] == ["score"]:
                score_main(argv[1:])
                return
            a = build_parser().parse_args(argv)
            run(a)
    except Interrupted as e:  # the fold workers die with this process (nested_cv); every output is written atomically
        print(interrupted_line(e.signum), file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except (ValueError, KeyError, FileNotFoundError, StorageError) as e:
        sys.exit(redact_secrets(f"himae-probe: error: {e}"))


def _label_efficiency(fold_feats: list[dict], data: DownstreamSet, outer: Folds, headline: dict,
                      a: argparse.Namespace) -> dict:
    if not a.label_fractions or a.protocol != "nested":
        return {}
    return label_efficiency(fold_feats, data.labels, data.patient_ids, outer, headline, a.label_fractions,
                            a.label_draws, a.inner_folds, a.seed)


def run(a: argparse.Namespace) -> list[ModelReport]:
    t0 = time.time()
    a.pooling = a.pooling or ["mean+std"]
    runs = [run_checkpoints(r, a.storage_options) for r in a.run]
    paths = list(a.checkpoint) + [p for steps in runs for p in steps]
    final_paths = set(a.checkpoint) | {steps[-1] for steps in runs}  # label efficiency: the final encoders
    if not paths and a.random_baselines < 1:
        raise ValueError("give at least one --checkpoint or --run, or --random-baselines K >= 1")
    if a.n_boot < 0 or a.folds < 2 or a.inner_folds < 2:
        raise ValueError("--n-boot must be >= 0 and --folds/--inner-folds >= 2")
    if a.label_draws < 1:
        raise ValueError("--label-draws must be >= 1")
    policy = bn_policy(a)
    try:
        raw = read_downstream(a.h5, a.signal_key, policy=BadSamplePolicy(a.on_bad))
        fs = data_rate(a.h5, a.fs)
    except OSError as e:  # h5py: truncated, not HDF5, unreadable
        raise ValueError(f"--h5 {a.h5}: not a readable HDF5 file ({e}); expected the downstream HDF5 "
                         f"(/ppg|/ecg [N, L], /labels [N], /patient_ids [N])") from None
    data, n_constant = drop_constant(raw)
    check_probe_data(data, a.h5, a.protocol)
    manifest = manifest_preprocess(a.manifest) if a.manifest else None
    out = Path(a.out)
    cache = FeatureCache(a.cache or out / "feature_cache")
    try:
        outer, protocol_label, dropped = outer_folds(data, a)
    except DegenerateFoldError as e:
        raise ValueError(f"{a.h5}: {e}") from None
    n_pat = len(np.unique(data.patient_ids)) if data.patient_ids is not None else "?"
    data_line = (f"data: {a.h5} '/{a.signal_key}', {len(data.labels)} segments, {int(data.labels.sum())} PVC "
                 f"({100 * data.labels.mean():.2f} %), {n_pat} patients, fs {fs if fs is not None else 'unknown'} Hz"
                 + (f"; {n_constant} constant (flat) segments dropped" if n_constant else ""))
    print(f"[himae-probe] {data_line}", flush=True)
    for msg in dropped:
        print(f"[himae-probe] {msg} (--on-degenerate drop)", flush=True)
    print(f"[himae-probe] {protocol_label}", flush=True)
    bn_x = None
    if policy == "pretrain" and a.random_baselines > 0:
        bn_x = shard_segments(a.manifest, a.bn_segments, a.storage_options)
    bn_line = BN_POLICIES[policy].format(n=0 if bn_x is None else len(bn_x), manifest=a.manifest)
    print(f"[himae-probe] BatchNorm policy {policy}: {bn_line}", flush=True)

    inputs: dict[Preprocess, np.ndarray] = {}  # model input per distinct preprocessing

    def input_for(recipe: InputRecipe) -> np.ndarray:
        if recipe.preprocess not in inputs:
            inputs[recipe.preprocess] = model_input(data.signals, recipe)
        return inputs[recipe.preprocess]

    reports: list[ModelReport] = []
    names = unique_names(paths) if paths else []
    first_recipe, channels = None, None
    for name, path in zip(names, paths):
        model, info = load_himae(path, storage_options=a.storage_options)
        recipe = input_recipe(name, info["preprocess"], manifest, fs, data.signals.shape[-1])
        first_recipe = first_recipe or recipe
        channels = channels or model.config.channels  # random baselines get the first checkpoint's shape
        stats = fold_stats(model, input_for(recipe), outer, policy, cache)
        cands, headline, p = probe_encoder(stats, data, outer, a)
        rep = ModelReport(name, "checkpoint", str(path), info.get("step"), None, recipe.note, cands, headline,
                          p, stats[0]["mean"][-1])
        if path in final_paths:
            rep.label_efficiency = _label_efficiency(encoder_candidates(stats, a), data, outer, headline, a)
        reports.append(rep)
        print(f"[himae-probe] {name}: {recipe.note}; headline ROC-AUC {headline['metrics']['roc_auc']['value']:.3f} "
              f"({headline['selected_mode']})", flush=True)
    base_recipe = first_recipe or InputRecipe(SEED_DEFAULT, "seed default", "seed default: per-segment min-max to [-1, 1]")
    in_chans = data.signals.shape[1]
    x = input_for(base_recipe)
    for s in range(a.random_baselines):
        kw = {"channels": channels} if channels else {}
        if policy == "pretrain":
            if bn_x.shape[1] != in_chans:
                raise ValueError(f"--manifest {a.manifest}: its shards hold {bn_x.shape[1]}-channel segments, the "
                                 f"probe data {in_chans}")
            stats = fold_stats(random_baseline(in_chans, s, bn_x, **kw), x, outer, policy, cache)
        else:
            stats = fold_stats(random_encoder(in_chans, s, **kw), x, outer, policy, cache)
        cands, headline, p = probe_encoder(stats, data, outer, a)
        note = f"random init, torch seed {s}, BatchNorm policy {policy}; {base_recipe.note}"
        rep = ModelReport(f"random-init({s})", "random", None, None, s, note, cands, headline, p, stats[0]["mean"][-1])
        rep.label_efficiency = _label_efficiency(encoder_candidates(stats, a), data, outer, headline, a)
        reports.append(rep)
    minirocket_note = None
    if a.minirocket_kernels > 0 and a.protocol == "nested":
        minirocket_note = minirocket.unavailable()
        if minirocket_note is None:
            t_mr = time.time()
            feats = minirocket.fold_features(x, outer, a.minirocket_kernels, a.seed)
            cands, headline, p = probe_features(feats, data, outer, a)
            note = (f"MiniRocket (aeon), {feats[0][minirocket.CANDIDATE].shape[1]} features, fitted on each outer "
                    f"training fold only; {base_recipe.note}")
            rep = ModelReport(minirocket.NAME, "minirocket", None, None, a.seed, note, cands,
                              {**headline, "selected_mode": "-"}, p)
            rep.label_efficiency = _label_efficiency(feats, data, outer, headline, a)
            reports.append(rep)
            print(f"[himae-probe] {minirocket.NAME}: headline ROC-AUC {headline['metrics']['roc_auc']['value']:.3f} "
                  f"({time.time() - t_mr:.0f} s)", flush=True)
    elif a.minirocket_kernels > 0:
        minirocket_note = "MiniRocket baseline skipped: it runs under --protocol nested only"
    if minirocket_note:
        print(f"[himae-probe] {minirocket_note}", flush=True)
    if a.seed_probe:
        for r in reports:
            if r.bottleneck is None:
                continue
            p, auroc, apr = apply_seed_probe(r.bottleneck, data.labels, a.seed_probe)
            write_predictions(out / "seed_probe" / f"{_file_name(r.name)}.csv", data.labels, data.patient_ids, data.rows, p)
            print(f"[himae-probe] seed probe on {r.name}: ROC-AUC {auroc:.3f}  AP {apr:.3f} (all {len(p)} segments)")
    add_paired(reports, data, a)

    table = format_table(reports, protocol_label)
    paired = format_paired(reports)
    label_eff = format_label_efficiency(reports)
    text = "\n\n".join(t for t in (table, paired, label_eff) if t)
    print("\n" + text)
    for r in reports:
        for base, d in r.paired.items():
            print(f"[himae-probe] {r.name} is {verdict_phrase(d, base)} (ROC-AUC; AP {d['ap']['value']:+.3f})")
    with atomic_path(out / "table.txt") as tmp:
        tmp.write_text(text + "\n")
    _write_outputs(out, reports, data, a, protocol_label, data_line, n_constant, cache,
                   {"policy": policy, "description": bn_line}, [len(outer), dropped], minirocket_note)
    print(f"[himae-probe] wrote {out}/results.json, results.md, table.txt, pvc_predictions.csv ({reports[0].name}, headline), "
          f"predictions/, *.png; features: {cache.hits} from cache, {cache.misses} encoded; {time.time() - t0:.0f} s")
    return reports


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()+-]+", "__", name)


def _write_outputs(out: Path, reports: list[ModelReport], data: DownstreamSet, a, protocol_label: str,
                   data_line: str, n_constant: int, cache: FeatureCache, batchnorm: dict, folds_run: list,
                   minirocket_note: str | None) -> None:
    from probes import plots

    write_predictions(out / "pvc_predictions.csv", data.labels, data.patient_ids, data.rows, reports[0].p)
    for r in reports:
        write_predictions(out / "predictions" / f"{_file_name(r.name)}.csv", data.labels, data.patient_ids, data.rows, r.p)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(markdown_report(reports, protocol_label, data_line))
    write_json_atomic(out / "results.json", {
        "protocol": a.protocol, "protocol_label": protocol_label, "data": str(a.h5), "signal_key": a.signal_key,
        "n_segments": int(len(data.labels)), "n_pvc": int(data.labels.sum()), "prevalence": float(data.labels.mean()),
        "n_patients": None if data.patient_ids is None else int(len(np.unique(data.patient_ids))),
        "n_constant_dropped": n_constant, "folds": a.folds, "folds_run": folds_run[0], "folds_dropped": folds_run[1],
        "inner_folds": a.inner_folds, "c_grid": list(C_GRID), "pooling": a.pooling, "n_boot": a.n_boot, "seed": a.seed,
        "batchnorm": batchnorm, "minirocket": {"kernels": a.minirocket_kernels, "note": minirocket_note},
        "label_fractions": a.label_fractions, "label_draws": a.label_draws,
        "predictions_csv": {"pvc_predictions.csv": reports[0].name},
        "models": [r.to_json() for r in reports], "random_baselines": random_summary(reports),
    })
    if a.no_plots:
        return
    ckpts = [r for r in reports if r.kind == "checkpoint"]
    rnd = [r for r in reports if r.kind == "random"]
    shown = (ckpts[:1] + ckpts[-1:] if len(ckpts) > 1 else ckpts) + rnd[:1] + [r for r in reports if r.kind == "minirocket"]
    if any(r.label_efficiency for r in reports):
        plots.label_efficiency(out / "label_efficiency.png", reports, "headline ROC-AUC and AP against labelled "
                               "training patients (mean ± sd over draws)")
    curves = []
    for r in shown:
        have = np.isfinite(r.p)
        curves.append((f"{r.name} ({r.headline['selected_mode']}, AUC {r.headline['metrics']['roc_auc']['value']:.3f})",
                       data.labels[have], r.p[have], None if data.patient_ids is None else data.patient_ids[have]))
    plots.roc_pr_curves(out / "roc_pr.png", curves, protocol_label, n_boot=min(a.n_boot, 200), seed=a.seed)
    levels = [c["name"] for c in (ckpts or rnd or reports)[0].candidates]
    rs = random_summary(reports)
    random_line = ([rs["candidates"][c]["roc_auc"]["mean"] for c in levels],
                   [rs["candidates"][c]["roc_auc"]["sd"] for c in levels]) if rs else None
    plots.level_profile(out / "level_profile.png", levels,
                        [(r.name, [c["metrics"]["roc_auc"]["value"] for c in r.candidates],
                          [c["metrics"]["roc_auc"]["ci95"] for c in r.candidates]) for r in ckpts],
                        random_line, "ROC-AUC by encoder level (the resolution profile)")
    stepped = [r for r in ckpts if r.step is not None]
    if len(stepped) > 1:
        stepped.sort(key=lambda r: r.step)
        plots.auc_over_steps(
            out / "auc_over_steps.png", [r.step for r in stepped],
            [r.headline["metrics"]["roc_auc"]["value"] for r in stepped],
            [r.headline["metrics"]["roc_auc"]["ci95"] for r in stepped],
            {c: [r.candidates[i]["metrics"]["roc_auc"]["value"] for r in stepped] for i, c in enumerate(levels)},
            rs["headline"]["roc_auc"]["mean"] if rs else None, "ROC-AUC over pretraining steps")


# ---------------------------------------------------------------------------------------------
# himae-probe score


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A predictions CSV in the seed's columns (patient_id,label,p_pvc; `row` optional): (labels, p, patient ids)."""
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--predictions {p} does not exist")
    try:
        df = pd.read_csv(p)
    except pd.errors.EmptyDataError:
        raise ValueError(f"--predictions {p} is empty; expected a CSV with the header patient_id,label,p_pvc") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ValueError(f"--predictions {p}: not a CSV ({e}); expected the columns patient_id,label,p_pvc") from None
    if len(df) == 0:
        raise ValueError(f"--predictions {p}: a header and no rows; expected one row per segment")
    missing = [c for c in ("label", "p_pvc") if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: columns {list(df.columns)} lack {missing}; expected the seed's patient_id,label,p_pvc")
    labels = check_labels(df["label"].to_numpy(), f"{p}: column 'label'")
    probs = pd.to_numeric(df["p_pvc"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(probs).all():
        raise ValueError(f"{p}: column 'p_pvc' has {int((~np.isfinite(probs)).sum())} missing or non-numeric values")
    pids = check_patient_ids(df["patient_id"].to_numpy(), f"{p}: column 'patient_id'") if "patient_id" in df else None
    return labels, probs, pids


def score_main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="himae-probe score",
                                 description="Score a predictions CSV (patient_id,label,p_pvc) with patient-bootstrap 95 % CIs.")
    ap.add_argument("--predictions", required=True, help="CSV with columns label, p_pvc and (for CIs) patient_id")
    ap.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for the 95 %% CIs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    ap.add_argument("--json", default=None, help="also write the scores to this JSON file")
    a = ap.parse_args(argv)
    labels, probs, pids = read_predictions(a.predictions)
    m = score(labels, probs, pids, a.n_boot, a.seed)
    how = m.get("ci_note") or f"95 % CIs: patient bootstrap, {a.n_boot} resamples"
    print(f"{a.predictions}: {m['n']} segments, {m['n_pos']} PVC (prevalence {100 * m['prevalence']:.2f} %), "
          f"{m['n_patients'] if m['n_patients'] is not None else 'no'} patients; {how}")
    for k, label in (("roc_auc", "ROC-AUC"), ("ap", "AP"), ("sens_at_spec90", "sensitivity at 90 % specificity"),
                     ("f1_at_spec90", "F1 at 90 % specificity")):
        ci = m[k]["ci95"]
        print(f"  {label:32} {m[k]['value']:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    if a.json:
        write_json_atomic(a.json, m)
    return m


if __name__ == "__main__":
    main()
