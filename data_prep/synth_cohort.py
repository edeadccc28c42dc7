"""Synthetic PVC cohort: beat-by-beat PPG with premature ventricular contractions.

The authors' HDF5 is not public, so this is the project's embedded default. Each patient gets
its own pulse morphology (systolic and diastolic Gaussian waves), heart rate, heart-rate
variability, respiration (amplitude modulation, sinus arrhythmia, baseline), baseline wander,
noise and motion artifacts. A PVC comes early (coupling 0.45-0.7 of the RR interval) with a
weak or absent pulse, followed by a full compensatory pause and a potentiated next beat.
PVC segments cluster in episodes. The cohort shape (patients, segments per patient, PVC
segments per patient) is the authors' metadata, embedded as `cohort_shape.csv`, scalable.

Pretraining and downstream segments come from disjoint patients, so a probe never scores an
encoder on patients it was pretrained on (no transduction). The downstream set keeps the seed's
cohort shape (patient ids 0-17); the pretraining set is a second, unlabelled cohort from the same
generator: the same shape again (scaled by `pretrain_scale`) under patient ids starting at
PRETRAIN_ID_OFFSET, so every pretraining patient has its own physiology.

Writes both HDF5 layouts of the seed README:
  pretraining: `pretrain_index.csv` (local_path,global_idx,patient_id; paths relative to the
               CSV) into `pretrain/shard_XXXX.h5` where h5[global_idx]['normalized_waveform']
               is a segment
  downstream:  `downstream.h5` with /ppg [N, L], /labels [N], /patient_ids [N] (attrs fs)
plus `metadata.csv` (downstream, the seed's columns), `examples.png` with PVC beats marked, and
`cohort.json` recording both cohorts' patients (written last: the completion marker).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from data_prep.atomic_write import atomic_path, write_json_atomic

SEGMENT_SECONDS = 10.0
DEFAULT_FS = 25
COMPLETE_MARKER = "cohort.json"
PRETRAIN_ID_OFFSET = 1000  # pretraining patient ids start here; downstream ids are the seed's 0-17


@dataclass(frozen=True)
class PatientShape:
    patient_id: int
    n_segments: int
    n_pvc_segments: int


def embedded_cohort_shape() -> list[PatientShape]:
    """The authors' cohort: 18 patients, 55,861 segments, 4.66 % PVC segments."""
    text = resources.files("data_prep").joinpath("cohort_shape.csv").read_text()
    return [
        PatientShape(int(r["patient_id"]), int(r["n_segments"]), int(r["n_pvc_segments"]))
        for r in csv.DictReader(text.splitlines())
    ]


def scale_cohort(shape: list[PatientShape], scale: float) -> list[PatientShape]:
    """Scale segments per patient (at least 1), keeping each patient's PVC rate."""
    if scale <= 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    out = []
    for p in shape:
        n = max(1, round(p.n_segments * scale))
        k = min(n, round(p.n_pvc_segments * n / p.n_segments))
        if p.n_pvc_segments > 0 and k == 0 and scale >= 0.05:
            k = 1  # keep every PVC patient a PVC patient at moderate scales
        out.append(PatientShape(p.patient_id, n, k))
    return out


@dataclass(frozen=True)
class Physiology:
    """One patient's cardiovascular and sensor parameters."""

    hr_bpm: float
    hrv_frac: float  # beat-to-beat RR jitter, fraction of RR
    resp_hz: float
    resp_am: float  # respiratory amplitude modulation
    rsa_frac: float  # respiratory sinus arrhythmia, fraction of RR
    wander_amp: float
    noise_sd: float
    motion_prob: float  # chance a segment has a motion artifact
    sys_delay: float  # s from beat onset to systolic peak
    sys_width: float
    dia_ratio: float  # diastolic / systolic amplitude
    dia_delay: float  # s from systolic to diastolic peak
    dia_width: float
    pvc_pulse: float  # PVC pulse amplitude relative to a normal beat (weak or absent)
    potentiation: float  # post-PVC beat amplitude factor


def sample_physiology(rng: np.random.Generator) -> Physiology:
    return Physiology(
        hr_bpm=rng.uniform(55, 95),
        hrv_frac=rng.uniform(0.02, 0.06),
        resp_hz=rng.uniform(0.18, 0.33),
        resp_am=rng.uniform(0.05, 0.2),
        rsa_frac=rng.uniform(0.01, 0.05),
        wander_amp=rng.uniform(0.05, 0.4),
        noise_sd=rng.uniform(0.02, 0.08),
        motion_prob=rng.uniform(0.02, 0.15),
        sys_delay=rng.uniform(0.12, 0.2),
        sys_width=rng.uniform(0.05, 0.09),
        dia_ratio=rng.uniform(0.25, 0.6),
        dia_delay=rng.uniform(0.2, 0.32),
        dia_width=rng.uniform(0.08, 0.14),
        pvc_pulse=rng.uniform(0.0, 0.45),
        potentiation=rng.uniform(1.15, 1.5),
    )


def _beats(phys: Physiology, rng: np.random.Generator, n_pvc: int, duration: float):
    """Beat onset times, amplitudes and PVC flags covering [-2, duration + 1] s."""
    rr_mean = 60.0 / phys.hr_bpm
    resp_phase = rng.uniform(0, 2 * np.pi)
    # PVC targets: early beats inside the window, at least 1.2 RR apart (bigeminy-like at minimum).
    targets = sorted(rng.uniform(0.5, duration - 1.0, size=n_pvc)) if n_pvc else []
    t, jitter = -2.0 - rng.uniform(0, rr_mean), 0.0
    times, amps, is_pvc = [], [], []
    potentiate = False
    while t < duration + 1.0:
        jitter = 0.6 * jitter + rng.normal(0, phys.hrv_frac)  # AR(1) HRV
        rsa = phys.rsa_frac * np.sin(2 * np.pi * phys.resp_hz * t + resp_phase)
        rr = rr_mean * (1 + jitter + rsa)
        if targets and t + rr >= targets[0] and t > -1.0:
            targets.pop(0)
            coupling = rng.uniform(0.45, 0.7)
            times.append(t + coupling * rr)
            amps.append(phys.pvc_pulse * rng.uniform(0.6, 1.0))
            is_pvc.append(True)
            t += 2 * rr  # full compensatory pause: next sinus beat on the original schedule
            potentiate = True
            while targets and targets[0] < t + 0.3 * rr:
                targets.pop(0)  # too close to the pause to be a separate early beat
        else:
            t += rr
        times.append(t)
        amps.append(phys.potentiation if potentiate else 1.0)
        is_pvc.append(False)
        potentiate = False
    return np.asarray(times), np.asarray(amps), np.asarray(is_pvc)


def synth_segment(
    phys: Physiology, rng: np.random.Generator, fs: int, n_pvc: int, duration: float = SEGMENT_SECONDS
) -> tuple[np.ndarray, np.ndarray]:
    """One normalized segment [L] in [-1, 1] and the onset times (s) of its PVC beats."""
    n = int(round(fs * duration))
    t = np.arange(n) / fs
    times, amps, is_pvc = _beats(phys, rng, n_pvc, duration)
    tau = t[None, :] - times[:, None]  # [beats, L]
    # A PVC ejects little and late: weaker, wider systolic wave, almost no dicrotic wave.
    sys_w = np.where(is_pvc, phys.sys_width * 1.4, phys.sys_width)[:, None]
    dia_r = np.where(is_pvc, 0.1, phys.dia_ratio)[:, None]
    pulses = np.exp(-0.5 * ((tau - phys.sys_delay) / sys_w) ** 2)
    pulses += dia_r * np.exp(-0.5 * ((tau - phys.sys_delay - phys.dia_delay) / phys.dia_width) ** 2)
    x = (amps[:, None] * pulses).sum(axis=0)

    phase = rng.uniform(0, 2 * np.pi, size=3)
    x *= 1 + phys.resp_am * np.sin(2 * np.pi * phys.resp_hz * t + phase[0])
    x += 0.5 * phys.resp_am * np.sin(2 * np.pi * phys.resp_hz * t + phase[1])
    x += phys.wander_amp * np.sin(2 * np.pi * rng.uniform(0.03, 0.12) * t + phase[2])
    x += rng.normal(0, phys.noise_sd, size=n)
    if rng.random() < phys.motion_prob:
        start, length = rng.uniform(0, duration - 1), rng.uniform(0.8, 3.0)
        env = np.clip(np.minimum(t - start, start + length - t) / 0.3, 0, 1)
        walk = np.cumsum(rng.normal(0, 1, size=n))
        walk = np.convolve(walk - walk.mean(), np.ones(3) / 3, mode="same")
        x += env * rng.uniform(0.5, 2.0) * walk / (np.abs(walk).max() + 1e-9)

    lo, hi = x.min(), x.max()
    x = 2 * (x - lo) / (hi - lo) - 1  # the seed's normalized_waveform lives in [-1, 1]
    pvc_times = times[is_pvc]
    return x.astype(np.float32), pvc_times[(pvc_times >= 0) & (pvc_times < duration)]


def episode_labels(n_segments: int, n_pvc: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly n_pvc positive segments, clustered into episodes of consecutive segments."""
    labels = np.zeros(n_segments, dtype=np.int64)
    if n_pvc == 0:
        return labels
    n_episodes = max(1, min(n_pvc, int(rng.poisson(n_pvc / 2.0)) or 1))
    # Split positives into episode lengths and negatives into the gaps around them.
    run = np.ones(n_episodes, dtype=int) + np.bincount(
        rng.integers(0, n_episodes, n_pvc - n_episodes), minlength=n_episodes
    )
    n_neg = n_segments - n_pvc
    inner_min = 1 if n_neg >= n_episodes - 1 else 0  # keep episodes apart where negatives allow
    free = n_neg - inner_min * (n_episodes - 1)
    gaps = np.bincount(rng.integers(0, n_episodes + 1, free), minlength=n_episodes + 1)
    gaps[1:-1] += inner_min
    pos = gaps[0]
    for i in range(n_episodes):
        labels[pos : pos + run[i]] = 1
        pos += run[i] + gaps[i + 1]
    return labels


def pvc_beats_for_segment(rng: np.random.Generator) -> int:
    """Most PVC segments hold one ectopic beat; some hold couplets or bigeminy runs."""
    return int(rng.choice([1, 1, 1, 2, 2, 3]))


def synth_patients(
    shape: list[PatientShape], seed: int, fs: int, examples: list | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Segments of every patient in `shape`: (ppg [N, L], labels [N], patient_ids [N], segment_idx).

    Each patient's stream is seeded by (seed, patient_id) alone, so a patient's segments do not
    depend on which other patients are generated.
    """
    signals, labels, patients, seg_idx = [], [], [], []
    for p in shape:
        rng = np.random.default_rng([seed, p.patient_id])
        phys = sample_physiology(rng)
        for i, lab in enumerate(episode_labels(p.n_segments, p.n_pvc_segments, rng)):
            x, pvc_t = synth_segment(phys, rng, fs, pvc_beats_for_segment(rng) if lab else 0)
            signals.append(x)
            labels.append(int(lab))
            patients.append(p.patient_id)
            seg_idx.append(i)
            # Examples for the PNG: 4 PVC and 2 normal segments, each from a different patient.
            if examples is not None and sum(e[3] == lab for e in examples) < (4 if lab else 2) and all(
                e[0] != p.patient_id or e[3] != lab for e in examples
            ):
                examples.append((p.patient_id, x, pvc_t, int(lab)))
    return (np.stack(signals), np.asarray(labels, dtype=np.int64),
            np.asarray(patients, dtype=np.int64), seg_idx)


def pretrain_cohort_shape(scale: float) -> list[PatientShape]:
    """The seed's cohort shape under new patient ids (PRETRAIN_ID_OFFSET + i): disjoint from downstream."""
    return [PatientShape(PRETRAIN_ID_OFFSET + p.patient_id, p.n_segments, p.n_pvc_segments)
            for p in scale_cohort(embedded_cohort_shape(), scale)]


def generate(
    out_dir: str | Path, scale: float = 1.0, seed: int = 0, fs: int = DEFAULT_FS,
    segments_per_shard: int = 5000, overwrite: bool = False, pretrain_scale: float | None = None,
) -> dict:
    """Generate the downstream and the (disjoint) pretraining cohort into out_dir.

    A no-op when the same cohort is already complete. `pretrain_scale` (default: `scale`) sizes
    the pretraining cohort against the seed's 55,861 segments.
    """
    out = Path(out_dir)
    pretrain_scale = scale if pretrain_scale is None else pretrain_scale
    params = {"scale": scale, "seed": seed, "fs": fs, "segments_per_shard": segments_per_shard,
              "pretrain_scale": pretrain_scale}
    marker = out / COMPLETE_MARKER
    if marker.exists() and not overwrite:
        done = json.loads(marker.read_text())
        if done.get("params") == params:
            print(f"[himae-synth] {out} already holds this cohort ({done['n_segments']} segments); skipping")
            return done
        raise FileExistsError(
            f"{marker} holds a cohort made with {done.get('params')}, not {params}; "
            f"pass --overwrite or choose another --out"
        )
    shape = scale_cohort(embedded_cohort_shape(), scale)
    pre_shape = pretrain_cohort_shape(pretrain_scale)
    examples: list = []
    ppg, y, pid, seg_idx = synth_patients(shape, seed, fs, examples)
    pre_ppg, pre_y, pre_pid, _ = synth_patients(pre_shape, seed, fs)
    assert not set(pid.tolist()) & set(pre_pid.tolist())  # disjoint patients, by construction
    out.mkdir(parents=True, exist_ok=True)
    _write_downstream(out / "downstream.h5", ppg, y, pid, fs)
    _write_pretrain(out, pre_ppg, pre_pid, segments_per_shard)
    _write_metadata(out / "metadata.csv", y, pid, seg_idx, fs)
    _plot_examples(out / "examples.png", examples, fs)
    summary = {
        "params": params, "n_segments": int(len(y)), "n_patients": len(shape),
        "n_pvc_segments": int(y.sum()), "pvc_rate": float(y.mean()), "length": int(ppg.shape[1]),
        "patients": [asdict(p) for p in shape],
        "pretrain": {
            "n_segments": int(len(pre_y)), "n_patients": len(pre_shape), "n_pvc_segments": int(pre_y.sum()),
            "labels_written": False, "patients": [asdict(p) for p in pre_shape],
        },
    }
    write_json_atomic(marker, summary)  # written last: its presence means the cohort is complete
    print(
        f"[himae-synth] wrote downstream: {len(y)} segments of {ppg.shape[1]} samples at {fs} Hz from "
        f"{len(shape)} patients, {int(y.sum())} with PVC ({100 * y.mean():.2f} %); pretraining: "
        f"{len(pre_y)} unlabelled segments from {len(pre_shape)} other patients (ids {pre_shape[0].patient_id}+) to {out}"
    )
    return summary


def _write_downstream(path: Path, ppg: np.ndarray, y: np.ndarray, pid: np.ndarray, fs: int) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ppg", data=ppg, chunks=(min(len(ppg), 1024), ppg.shape[1]))
        f.create_dataset("labels", data=y)
        f.create_dataset("patient_ids", data=pid)
        f.attrs["fs"] = fs


def _write_pretrain(out: Path, ppg: np.ndarray, pid: np.ndarray, per_shard: int) -> None:
    import h5py

    rows = []
    for s, start in enumerate(range(0, len(ppg), per_shard)):
        rel = f"pretrain/shard_{s:04d}.h5"
        with atomic_path(out / rel) as tmp, h5py.File(tmp, "w") as f:
            for gidx in range(start, min(start + per_shard, len(ppg))):
                key = f"{gidx:06d}"  # zero-padded, as the seed README documents
                f.create_group(key).create_dataset("normalized_waveform", data=ppg[gidx])
                rows.append((rel, key, int(pid[gidx])))
    with atomic_path(out / "pretrain_index.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx", "patient_id"])
        w.writerows(rows)


def _write_metadata(path: Path, y: np.ndarray, pid: np.ndarray, seg_idx: list[int], fs: int) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["global_idx", "case_id_num", "segment_idx", "pvc", "fs"])
        for g, (lab, p, s) in enumerate(zip(y, pid, seg_idx)):
            w.writerow([g, p, s, f"[{lab}]", fs])


def _plot_examples(path: Path, examples: list, fs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    examples = sorted(examples, key=lambda e: -e[3])
    fig, axes = plt.subplots(len(examples), 1, figsize=(11, 1.8 * len(examples)), sharex=True)
    for ax, (pid, x, pvc_t, lab) in zip(np.atleast_1d(axes), examples):
        t = np.arange(len(x)) / fs
        ax.plot(t, x, lw=1.0, color="tab:blue")
        for pt in pvc_t:
            ax.axvspan(pt, pt + 0.4, color="tab:red", alpha=0.25)
        ax.set_ylabel(f"pt {pid}\n{'PVC' if lab else 'normal'}", fontsize=8)
        ax.set_ylim(-1.1, 1.1)
    np.atleast_1d(axes)[-1].set_xlabel("time (s); red: PVC beats")
    fig.suptitle(f"Synthetic PPG segments ({fs} Hz, 10 s)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--scale", type=float, default=1.0, help="segments per patient x this factor")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fs", type=int, default=DEFAULT_FS, help="sampling rate (Hz); L = 10 * fs")
    ap.add_argument("--pretrain-scale", type=float, default=None,
                    help="pretraining cohort (other patients) size vs 55,861 segments; default: --scale")
    ap.add_argument("--segments-per-shard", type=int, default=5000, help="segments per pretraining HDF5")
    ap.add_argument("--overwrite", action="store_true", help="replace a different cohort in --out")
    a = ap.parse_args(argv)
    generate(a.out, a.scale, a.seed, a.fs, a.segments_per_shard, a.overwrite, a.pretrain_scale)


if __name__ == "__main__":
    main()
