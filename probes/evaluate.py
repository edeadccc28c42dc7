"""Checkpoint probe evaluation (`himae-probe`): which checkpoint, and which level, detects PVC.

    himae-probe --checkpoint A.pt [--checkpoint s3://b/run/himae_final.pt] [--run RUN_DIR ...] --h5 downstream.h5 --out OUT
    himae-probe score --predictions pvc_predictions.csv

Each encoder (a checkpoint, every `weights/step_*.pt` of a run folder, and random-init baselines
with re-estimated BatchNorm statistics over several seeds) is fed the downstream segments
preprocessed as its pretraining data was (`probes.model_inputs`), encoded once (cached on disk,
`probes.features`), and probed per level and with all levels concatenated. The default protocol
is nested and patient-grouped (`probes.nested_cv`): no patient is on both sides of any split,
and the headline level is selected on inner folds of the training patients only. Metrics carry
patient-bootstrap 95 % CIs (`probes.metrics`). `--protocol seed` runs the seed's random 80/20
segment split instead, for parity with its numbers, and says so in every output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import torch

from data_prep.hdf5_sources import BadSamplePolicy, DownstreamSet, check_labels, check_patient_ids, read_downstream
from data_prep.preprocess import Preprocess
from data_prep.atomic_write import atomic_path, write_json_atomic
from data_prep.storage import Folder, StorageError, is_remote
from himae_dist.checkpoint import load_himae
from probes import seed_protocol
from probes.features import FeatureCache
from probes.metrics import score
from probes.model_inputs import SEED_DEFAULT, InputRecipe, input_recipe, manifest_preprocess, model_input
from probes.nested_cv import C_GRID, nested_probe
from probes.pooling import POOLINGS, candidates
from probes.random_baseline import random_baseline, random_encoder  # noqa: F401  (random_encoder: public API)
from probes.report import ModelReport, format_table, markdown_report, random_summary, unique_names, write_predictions

NESTED_LABEL = ("protocol nested: patient-grouped {folds}-fold CV (no patient on both sides); C and level "
                "chosen on inner {inner}-fold patient-grouped splits of the training patients only")


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
# probing one encoder


def probe_encoder(stats, data: DownstreamSet, a: argparse.Namespace) -> tuple[list[dict], dict, np.ndarray]:
    """Per-candidate scores, the headline and its predictions [N] for one encoder's pooled stats."""
    n_levels = len(stats["mean"])
    if a.protocol == "seed":
        bottleneck = stats["mean"][-1]
        tr, te = seed_protocol.random_split(len(data.labels), a.seed)
        p = np.full(len(data.labels), np.nan)
        p[np.sort(te)] = seed_protocol.seed_probe_oof(
            seed_protocol.cached_features(bottleneck), data.labels, [(tr, te)], bottleneck.shape[1], a.seed)[np.sort(te)]
        m = score(data.labels[te], p[te], None if data.patient_ids is None else data.patient_ids[te], a.n_boot, a.seed)
        name = f"L{n_levels - 1}"
        cand = {"name": name, "dim": int(bottleneck.shape[1]), "metrics": m, "chosen_c": [], "inner_auc": []}
        return [cand], {"metrics": m, "selected": [name], "selected_mode": name}, p
    several = len(a.pooling) > 1
    cands = candidates(a.pooling, n_levels, include_all=True)
    feats = {c.name(several): c.features(stats) for c in cands}
    res = nested_probe(feats, data.labels, data.patient_ids, a.folds, a.inner_folds, a.seed)
    out = []
    for c in res.candidates:
        out.append({"name": c.name, "dim": c.dim, "chosen_c": c.chosen_c, "inner_auc": c.inner_auc,
                    "metrics": score(data.labels, c.oof, data.patient_ids, a.n_boot, a.seed)})
    headline = {"metrics": score(data.labels, res.headline_oof, data.patient_ids, a.n_boot, a.seed),
                "selected": res.selected, "selected_mode": res.selected_mode}
    return out, headline, res.headline_oof


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="himae-probe", description=__doc__.split("\n\n")[0],
                                 epilog="`himae-probe score --predictions CSV` scores a predictions CSV.")
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="HiMAE weights (ours, a seed Lightning .ckpt, a bare state_dict, a DeepSpeed folder), "
                         "local or an s3:// (fsspec) URL of one file; repeatable")
    ap.add_argument("--run", action="append", default=[], metavar="RUN_DIR",
                    help="a trainer --out folder or its s3:// export: probe every weights/step_*.pt in it; repeatable")
    ap.add_argument("--storage-options", type=json.loads, default=None,
                    help='fsspec options for s3:// checkpoints as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    ap.add_argument("--random-baselines", type=int, default=3, metavar="K",
                    help="random-init encoders (seeds 0..K-1, BatchNorm re-estimated); 0 = none")
    ap.add_argument("--h5", required=True, help="downstream HDF5 (/ppg|/ecg [N, L], /labels [N], /patient_ids [N])")
    ap.add_argument("--signal-key", default="ppg")
    ap.add_argument("--fs", type=float, default=None, help="downstream sampling rate (Hz) when the file has no attrs['fs']")
    ap.add_argument("--manifest", default=None,
                    help="shards' manifest.json whose 'preprocess' applies to checkpoints that record none")
    ap.add_argument("--pooling", action="append", default=None, choices=list(POOLINGS),
                    help="pooling over time per level (repeatable; default mean+std)")
    ap.add_argument("--protocol", choices=["nested", "seed"], default="nested",
                    help="nested: patient-grouped nested CV (default); seed: the seed's random 80/20 segment split")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner-folds", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=1000, help="patient bootstrap resamples for the 95 %% CIs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error")
    ap.add_argument("--seed-probe", help="also apply a seed-format probe (fc.weight, fc.bias) to the bottleneck")
    ap.add_argument("--cache", default=None, help="feature cache folder (default OUT/feature_cache)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out", default="probe_results", help="output folder")
    return ap


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["score"]:
            score_main(argv[1:])
            return
        a = build_parser().parse_args(argv)
        run(a)
    except (ValueError, KeyError, FileNotFoundError, StorageError) as e:
        sys.exit(f"himae-probe: error: {e}")


def run(a: argparse.Namespace) -> list[ModelReport]:
    t0 = time.time()
    a.pooling = a.pooling or ["mean+std"]
    paths = list(a.checkpoint) + [p for r in a.run for p in run_checkpoints(r, a.storage_options)]
    if not paths and a.random_baselines < 1:
        raise ValueError("give at least one --checkpoint or --run, or --random-baselines K >= 1")
    if a.n_boot < 0 or a.folds < 2 or a.inner_folds < 2:
        raise ValueError("--n-boot must be >= 0 and --folds/--inner-folds >= 2")
    raw = read_downstream(a.h5, a.signal_key, policy=BadSamplePolicy(a.on_bad))
    data, n_constant = drop_constant(raw)
    check_probe_data(data, a.h5, a.protocol)
    fs = data_rate(a.h5, a.fs)
    manifest = manifest_preprocess(a.manifest) if a.manifest else None
    out = Path(a.out)
    cache = FeatureCache(a.cache or out / "feature_cache")
    protocol_label = (seed_protocol.LABEL if a.protocol == "seed"
                      else NESTED_LABEL.format(folds=a.folds, inner=a.inner_folds))
    n_pat = len(np.unique(data.patient_ids)) if data.patient_ids is not None else "?"
    data_line = (f"data: {a.h5} '/{a.signal_key}', {len(data.labels)} segments, {int(data.labels.sum())} PVC "
                 f"({100 * data.labels.mean():.2f} %), {n_pat} patients, fs {fs if fs is not None else 'unknown'} Hz"
                 + (f"; {n_constant} constant (flat) segments dropped" if n_constant else ""))
    print(f"[himae-probe] {data_line}", flush=True)

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
        stats = cache.get_or_encode(model, input_for(recipe))
        cands, headline, p = probe_encoder(stats, data, a)
        reports.append(ModelReport(name, "checkpoint", str(path), info.get("step"), None, recipe.note, cands, headline,
                                   p, stats["mean"][-1]))
        print(f"[himae-probe] {name}: {recipe.note}; headline ROC-AUC {headline['metrics']['roc_auc']['value']:.3f} "
              f"({headline['selected_mode']})", flush=True)
    base_recipe = first_recipe or InputRecipe(SEED_DEFAULT, "seed default", "seed default: per-segment min-max to [-1, 1]")
    in_chans = data.signals.shape[1]
    for s in range(a.random_baselines):
        x = input_for(base_recipe)
        model = random_baseline(in_chans, s, x, **({"channels": channels} if channels else {}))
        stats = cache.get_or_encode(model, x)
        cands, headline, p = probe_encoder(stats, data, a)
        note = f"random init, torch seed {s}, BatchNorm statistics re-estimated on the unlabelled probe inputs; {base_recipe.note}"
        reports.append(ModelReport(f"random-init({s})", "random", None, None, s, note, cands, headline, p, stats["mean"][-1]))
    if a.seed_probe:
        for r in reports:
            p, auroc, apr = apply_seed_probe(r.bottleneck, data.labels, a.seed_probe)
            write_predictions(out / "seed_probe" / f"{_file_name(r.name)}.csv", data.labels, data.patient_ids, data.rows, p)
            print(f"[himae-probe] seed probe on {r.name}: ROC-AUC {auroc:.3f}  AP {apr:.3f} (all {len(p)} segments)")

    table = format_table(reports, protocol_label)
    print("\n" + table)
    with atomic_path(out / "table.txt") as tmp:
        tmp.write_text(table + "\n")
    _write_outputs(out, reports, data, a, protocol_label, data_line, n_constant, cache)
    print(f"[himae-probe] wrote {out}/results.json, results.md, table.txt, pvc_predictions.csv ({reports[0].name}, headline), "
          f"predictions/, *.png; features: {cache.hits} from cache, {cache.misses} encoded; {time.time() - t0:.0f} s")
    return reports


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.()+-]+", "__", name)


def _write_outputs(out: Path, reports: list[ModelReport], data: DownstreamSet, a, protocol_label: str,
                   data_line: str, n_constant: int, cache: FeatureCache) -> None:
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
        "n_constant_dropped": n_constant, "folds": a.folds, "inner_folds": a.inner_folds, "c_grid": list(C_GRID),
        "pooling": a.pooling, "n_boot": a.n_boot, "seed": a.seed,
        "predictions_csv": {"pvc_predictions.csv": reports[0].name},
        "models": [r.to_json() for r in reports], "random_baselines": random_summary(reports),
    })
    if a.no_plots:
        return
    ckpts = [r for r in reports if r.kind == "checkpoint"]
    rnd = [r for r in reports if r.kind == "random"]
    shown = (ckpts[:1] + ckpts[-1:] if len(ckpts) > 1 else ckpts) + rnd[:1]
    curves = []
    for r in shown:
        have = np.isfinite(r.p)
        curves.append((f"{r.name} ({r.headline['selected_mode']}, AUC {r.headline['metrics']['roc_auc']['value']:.3f})",
                       data.labels[have], r.p[have], None if data.patient_ids is None else data.patient_ids[have]))
    plots.roc_pr_curves(out / "roc_pr.png", curves, protocol_label, n_boot=min(a.n_boot, 200), seed=a.seed)
    levels = [c["name"] for c in reports[0].candidates]
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
    df = pd.read_csv(p)
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
    ap.add_argument("--predictions", required=True)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the scores to this JSON file")
    a = ap.parse_args(argv)
    labels, probs, pids = read_predictions(a.predictions)
    m = score(labels, probs, pids, a.n_boot, a.seed)
    print(f"{a.predictions}: {m['n']} segments, {m['n_pos']} PVC (prevalence {100 * m['prevalence']:.2f} %), "
          f"{m['n_patients'] if m['n_patients'] is not None else 'no'} patients; 95 % CIs: patient bootstrap, {a.n_boot} resamples")
    for k, label in (("roc_auc", "ROC-AUC"), ("ap", "AP"), ("sens_at_spec90", "sensitivity at 90 % specificity"),
                     ("f1_at_spec90", "F1 at 90 % specificity")):
        ci = m[k]["ci95"]
        print(f"  {label:32} {m[k]['value']:.3f}" + (f"  [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    if a.json:
        write_json_atomic(a.json, m)
    return m


if __name__ == "__main__":
    main()
