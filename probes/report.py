"""Outputs of a probe run: terminal and Markdown tables, results.json, predictions CSVs.

Every output names the protocol: the default (nested, patient-grouped) or the seed's (random
segment split), so a number is never read without how it was made.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.atomic_write import atomic_path
from data_prep.storage import is_remote

HEADLINE_METRICS = (("roc_auc", "ROC-AUC"), ("ap", "AP"), ("sens_at_spec90", "sens@spec90"), ("f1_at_spec90", "F1@spec90"))


@dataclass
class ModelReport:
    """One probed encoder: per-candidate scores and the headline."""

    name: str  # unique in every output
    kind: str  # "checkpoint", "random" or "minirocket"
    path: str | None
    step: int | None
    seed: int | None  # random baselines
    input_note: str
    candidates: list[dict]  # {"name", "dim", "metrics": score(), "chosen_c": [...], "inner_auc": [...]}
    headline: dict  # {"metrics": score(), "selected": [...], "selected_mode": str}
    p: np.ndarray = field(repr=False)  # headline P(PVC) [N]; NaN where a row is not a test row
    bottleneck: np.ndarray | None = field(default=None, repr=False)  # pooled bottleneck, for --seed-probe
    paired: dict = field(default_factory=dict)  # baseline name -> paired_difference() (checkpoints only)
    label_efficiency: dict = field(default_factory=dict)  # fraction (str) -> label-efficiency entry

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "path", "step", "seed", "input_note", "candidates",
                                              "headline", "paired", "label_efficiency")}


def _v(m: dict, key: str) -> float:
    return m[key]["value"]


def _ci(m: dict, key: str) -> str:
    ci = m[key]["ci95"]
    return f"{_v(m, key):.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{_v(m, key):.3f}"


def random_summary(reports: list[ModelReport]) -> dict | None:
    """Mean and sd over random seeds of every candidate's ROC-AUC/AP and of the headline metrics."""
    rnd = [r for r in reports if r.kind == "random"]
    if not rnd:
        return None

    def agg(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "values": [float(v) for v in values]}

    return {
        "seeds": [r.seed for r in rnd],
        "candidates": {c["name"]: {k: agg([_v(r.candidates[i]["metrics"], k) for r in rnd]) for k in ("roc_auc", "ap")}
                       for i, c in enumerate(rnd[0].candidates)},
        "headline": {k: agg([_v(r.headline["metrics"], k) for r in rnd]) for k, _ in HEADLINE_METRICS},
    }


def _grid(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows]


def format_table(reports: list[ModelReport], protocol_label: str, markdown: bool = False) -> str:
    """Rows: checkpoints, the random baselines (mean +- sd), MiniRocket; columns: each level's ROC-AUC, then the headline."""
    encoders = [r for r in reports if r.kind != "minirocket"] or reports
    cands = [c["name"] for c in encoders[0].candidates]
    head = ["model"] + [f"{c}" for c in cands] + [f"{lbl}" for _, lbl in HEADLINE_METRICS] + ["selected"]
    rows = []
    for r in reports:
        if r.kind != "checkpoint":
            continue
        m = r.headline["metrics"]
        rows.append([r.name] + [f"{_v(c['metrics'], 'roc_auc'):.3f}" for c in r.candidates]
                    + [_ci(m, k) for k, _ in HEADLINE_METRICS] + [r.headline["selected_mode"]])
    rs = random_summary(reports)
    if rs:
        n = len(rs["seeds"])
        rows.append([f"random init ({n} seed{'s' if n > 1 else ''})"]
                    + [f"{rs['candidates'][c]['roc_auc']['mean']:.3f}±{rs['candidates'][c]['roc_auc']['sd']:.3f}" for c in cands]
                    + [f"{rs['headline'][k]['mean']:.3f}±{rs['headline'][k]['sd']:.3f}" for k, _ in HEADLINE_METRICS] + ["-"])
    for r in reports:
        if r.kind == "minirocket":
            m = r.headline["metrics"]
            rows.append([r.name] + ["-" for _ in cands] + [_ci(m, k) for k, _ in HEADLINE_METRICS] + ["-"])
    note = (f"{protocol_label}. Level columns: out-of-fold ROC-AUC of each level (C chosen inside the folds); "
            f"headline columns: the level selected inside each training fold, with patient-bootstrap 95 % CIs.")
    return "\n".join(_grid(head, rows, markdown)) + "\n" + note


def _signed(d: dict) -> str:
    ci = d["ci95"]
    return f"{d['value']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{d['value']:+.3f} (no CI)"


def verdict_phrase(diff: dict, baseline: str, metric: str = "roc_auc") -> str:
    """'ahead of B by d [lo, hi]', 'behind B by ...' or 'not distinguishable from B', read from the paired CI."""
    d = diff[metric]
    ci = d["ci95"]
    if ci is None:
        return f"not comparable with {baseline} (no paired CI: fewer than 3 patients or --n-boot 0)"
    span = f"{abs(d['value']):.3f} [{min(abs(ci[0]), abs(ci[1])):.3f}, {max(abs(ci[0]), abs(ci[1])):.3f}]"
    if ci[0] > 0:
        return f"ahead of {baseline} by {span}"
    if ci[1] < 0:
        return f"behind {baseline} by {span}"
    return f"not distinguishable from {baseline} ({d['value']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}])"


def format_paired(reports: list[ModelReport], markdown: bool = False) -> str:
    """Each checkpoint minus each baseline: ROC-AUC and AP differences with paired patient-bootstrap 95 % CIs."""
    head = ["checkpoint", "vs", "ΔROC-AUC [95 % CI]", "ΔAP [95 % CI]", "verdict (ROC-AUC)"]
    rows = [[r.name, base, _signed(d["roc_auc"]), _signed(d["ap"]), verdict_phrase(d, base)]
            for r in reports if r.kind == "checkpoint" for base, d in r.paired.items()]
    if not rows:
        return ""
    note = ("Paired differences: every model is scored on the same patient resamples and the difference is taken "
            "per resample (random init: the mean over its seeds per resample), so the CI is that of the difference.")
    return "\n".join(_grid(head, rows, markdown)) + "\n" + note


def label_efficiency_curves(reports: list[ModelReport]) -> dict[str, list[tuple[float, list[float], list[float]]]]:
    """model (random seeds pooled) -> [(labelled patients, ROC-AUCs, APs)] over the fractions that ran."""
    per: dict[str, dict[str, list[dict]]] = {}
    for r in reports:
        key = "random init" if r.kind == "random" else r.name
        for frac, e in r.label_efficiency.items():
            if e["draws"]:
                per.setdefault(key, {}).setdefault(frac, []).append(e)
    return {m: [(float(np.mean([e["n_patients"] for e in es])), [d["roc_auc"] for e in es for d in e["draws"]],
                 [d["ap"] for e in es for d in e["draws"]]) for _, es in sorted(fr.items(), key=lambda kv: float(kv[0]))]
            for m, fr in per.items()}


def format_label_efficiency(reports: list[ModelReport], markdown: bool = False) -> str:
    """Headline ROC-AUC and AP against the number of labelled training patients, per model (random seeds pooled)."""
    rows_by_model: dict[str, dict] = {}
    for r in reports:
        if not r.label_efficiency:
            continue
        key = "random init" if r.kind == "random" else r.name
        for frac, e in r.label_efficiency.items():
            rows_by_model.setdefault(key, {}).setdefault(frac, []).append(e)
    if not rows_by_model:
        return ""
    fracs = sorted({f for m in rows_by_model.values() for f in m}, key=float)
    head = ["model"] + [f"{float(f):.0%} of training patients" for f in fracs]
    rows = []
    for model, per in rows_by_model.items():
        cells = [model]
        for f in fracs:
            if f not in per:
                cells.append("-")
                continue
            auc = [d["roc_auc"] for e in per[f] for d in e["draws"]]
            ap = [d["ap"] for e in per[f] for d in e["draws"]]
            if not auc:
                cells.append("skipped (< 2 PVC patients in a fold's draw)")
                continue
            n_pat = float(np.mean([e["n_patients"] for e in per[f] if e["draws"]]))
            sd = lambda v: f"±{np.std(v, ddof=1):.3f}" if len(v) > 1 else ""  # noqa: E731
            cells.append(f"n={n_pat:.1f}: AUC {np.mean(auc):.3f}{sd(auc)}, AP {np.mean(ap):.3f}{sd(ap)}")
        rows.append(cells)
    note = ("Label efficiency: the headline probe (level chosen inside the folds) trained on a PVC-stratified draw of "
            "each outer fold's training patients (n: mean labelled patients per fold), scored on the same test "
            "patients; mean ± sd over draws (and random seeds). A fraction runs only where every fold's draw keeps "
            ">= 2 patients with PVC.")
    return "\n".join(_grid(head, rows, markdown)) + "\n" + note


def markdown_report(reports: list[ModelReport], protocol_label: str, data_line: str) -> str:
    """results.md: the summary table, then per model every level's ROC-AUC and AP with 95 % CIs."""
    out = [f"# PVC probe results\n\n{data_line}\n\n{protocol_label}\n", format_table(reports, protocol_label, markdown=True), ""]
    for extra in (format_paired(reports, markdown=True), format_label_efficiency(reports, markdown=True)):
        if extra:
            out += [extra, ""]
    for r in reports:
        out.append(f"## {r.name}\n\n{r.input_note}\n")
        out.append("| level | dim | ROC-AUC [95 % CI] | AP [95 % CI] |\n|---|---|---|---|")
        for c in r.candidates:
            out.append(f"| {c['name']} | {c['dim']} | {_ci(c['metrics'], 'roc_auc')} | {_ci(c['metrics'], 'ap')} |")
        m = r.headline["metrics"]
        out.append(f"| **headline ({r.headline['selected_mode']})** | | {_ci(m, 'roc_auc')} | {_ci(m, 'ap')} |\n")
    return "\n".join(out) + "\n"


def write_predictions(path: str | Path, labels: np.ndarray, patient_ids: np.ndarray | None, rows: np.ndarray,
                      p: np.ndarray) -> None:
    """CSV in the seed's columns (patient_id,label,p_pvc) plus `row`, the segment's row in the HDF5.

    Only rows with a prediction (a test row of the protocol) are written.
    """
    pids = patient_ids if patient_ids is not None else np.full(len(p), -1)
    have = np.isfinite(p)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", "p_pvc", "row"])
        for pid, y, pp, row in zip(pids[have], labels[have], p[have], rows[have]):
            w.writerow([int(pid), int(y), f"{pp:.6g}", int(row)])


def _url_parts(url: str) -> tuple[str, ...]:
    scheme, rest = url.split("://", 1)
    first, *more = [x for x in rest.split("/") if x]
    return (f"{scheme}://{first}", *more)


def unique_names(paths: list[str]) -> list[str]:
    """Shortest trailing path parts that tell the checkpoints apart (`runA/himae_final.pt`, ...).

    A URL's scheme and bucket stay one part (`s3://b`), so the longest name is the URL itself.
    """
    parts = [_url_parts(p) if is_remote(str(p)) else Path(p).parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(names)) == len(names) or depth >= max(len(pp) for pp in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same file given twice: number the repeats
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
