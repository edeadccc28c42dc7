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
    kind: str  # "checkpoint" or "random"
    path: str | None
    step: int | None
    seed: int | None  # random baselines
    input_note: str
    candidates: list[dict]  # {"name", "dim", "metrics": score(), "chosen_c": [...], "inner_auc": [...]}
    headline: dict  # {"metrics": score(), "selected": [...], "selected_mode": str}
    p: np.ndarray = field(repr=False)  # headline P(PVC) [N]; NaN where a row is not a test row
    bottleneck: np.ndarray | None = field(default=None, repr=False)  # pooled bottleneck, for --seed-probe

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "kind", "path", "step", "seed", "input_note", "candidates", "headline")}


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


def format_table(reports: list[ModelReport], protocol_label: str, markdown: bool = False) -> str:
    """Rows: checkpoints, then the random baselines (mean +- sd); columns: each level's ROC-AUC, then the headline."""
    cands = [c["name"] for c in reports[0].candidates]
    head = ["model"] + [f"{c}" for c in cands] + [f"{lbl}" for _, lbl in HEADLINE_METRICS] + ["selected"]
    rows = []
    for r in reports:
        if r.kind == "random":
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
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
        fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        lines = [fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows]
    note = (f"{protocol_label}. Level columns: out-of-fold ROC-AUC of each level (C chosen inside the folds); "
            f"headline columns: the level selected inside each training fold, with patient-bootstrap 95 % CIs.")
    return "\n".join(lines) + "\n" + note


def markdown_report(reports: list[ModelReport], protocol_label: str, data_line: str) -> str:
    """results.md: the summary table, then per model every level's ROC-AUC and AP with 95 % CIs."""
    out = [f"# PVC probe results\n\n{data_line}\n\n{protocol_label}\n", format_table(reports, protocol_label, markdown=True), ""]
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
