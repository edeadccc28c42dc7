import csv

import h5py
import numpy as np

import json

from data_prep.synth_cohort import (
    PRETRAIN_ID_OFFSET, _beats, embedded_cohort_shape, episode_labels, generate, pretrain_cohort_shape,
    sample_physiology, scale_cohort,
)


def test_embedded_shape_is_the_authors_cohort():
    shape = embedded_cohort_shape()
    assert len(shape) == 18
    n, k = sum(p.n_segments for p in shape), sum(p.n_pvc_segments for p in shape)
    assert (n, k) == (55_861, 2_604)
    assert round(100 * k / n, 2) == 4.66


def test_embedded_shape_matches_the_seed_metadata(seed_reference):
    counts: dict[int, list[int]] = {}
    with open(seed_reference / "pvc_10s_synth_metadata.csv") as fh:
        for r in csv.DictReader(fh):
            c = counts.setdefault(int(r["case_id_num"]), [0, 0])
            c[0] += 1
            c[1] += int(r["pvc"].strip("[]"))
    assert {p.patient_id: [p.n_segments, p.n_pvc_segments] for p in embedded_cohort_shape()} == counts


def test_generated_cohort_has_the_scaled_shape_and_both_layouts(tiny_cohort):
    expected = scale_cohort(embedded_cohort_shape(), 0.01)
    with h5py.File(tiny_cohort / "downstream.h5") as f:
        ppg, labels, pids = f["ppg"][()], f["labels"][()], f["patient_ids"][()]
    assert ppg.shape == (sum(p.n_segments for p in expected), 250)
    for p in expected:
        sel = pids == p.patient_id
        assert sel.sum() == p.n_segments and labels[sel].sum() == p.n_pvc_segments
    assert np.isfinite(ppg).all() and ppg.min() >= -1 and ppg.max() <= 1
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["local_path", "global_idx", "patient_id"] and rows[0]["global_idx"] == "000000"
    assert len(rows) == sum(p.n_segments for p in pretrain_cohort_shape(0.01))
    with h5py.File(tiny_cohort / rows[123]["local_path"]) as f:
        x = f[rows[123]["global_idx"]]["normalized_waveform"][()]
    assert x.shape == (250,) and x.min() == -1 and x.max() == 1
    assert (tiny_cohort / "examples.png").stat().st_size > 10_000


def test_generation_is_deterministic_and_resumes(tmp_path, tiny_cohort):
    summary = generate(tmp_path / "c", scale=0.01, seed=3, segments_per_shard=200)
    with h5py.File(tmp_path / "c" / "downstream.h5") as a, h5py.File(tiny_cohort / "downstream.h5") as b:
        np.testing.assert_array_equal(a["ppg"][()], b["ppg"][()])
    mtime = (tmp_path / "c" / "downstream.h5").stat().st_mtime_ns
    assert generate(tmp_path / "c", scale=0.01, seed=3, segments_per_shard=200) == summary
    assert (tmp_path / "c" / "downstream.h5").stat().st_mtime_ns == mtime  # skipped, not redone


def test_pvc_is_early_with_compensatory_pause():
    rng = np.random.default_rng(0)
    phys = sample_physiology(rng)
    for _ in range(50):
        times, amps, is_pvc = _beats(phys, rng, n_pvc=1, duration=10.0)
        (i,) = np.flatnonzero(is_pvc)
        prev_rr = times[i - 1] - times[i - 2]
        coupling = (times[i] - times[i - 1]) / prev_rr
        pause = (times[i + 1] - times[i - 1]) / prev_rr
        assert 0.35 < coupling < 0.85  # 0.45-0.7 of the (jittered) RR
        assert pause > 1.6  # compensatory: about two RR intervals
        assert amps[i] < 0.5 and amps[i + 1] > 1.1  # weak PVC pulse, potentiated next beat


def test_pvc_segments_cluster_in_episodes():
    labels = episode_labels(5000, 400, np.random.default_rng(0))
    assert labels.sum() == 400
    # P(next segment is PVC | this one is) far exceeds the base rate of 8 %
    follow = labels[1:][labels[:-1] == 1].mean()
    assert follow > 0.3


def test_pretraining_and_downstream_patients_are_disjoint(tiny_cohort):
    """No downstream patient, and no downstream segment, is in the pretraining set."""
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        rows = list(csv.DictReader(fh))
    pre_ids = {int(r["patient_id"]) for r in rows}
    with h5py.File(tiny_cohort / "downstream.h5") as f:
        down_ids, ppg = set(f["patient_ids"][()].tolist()), f["ppg"][()]
    assert down_ids == set(range(18)) and len(pre_ids) == 18 and min(pre_ids) == PRETRAIN_ID_OFFSET
    assert not pre_ids & down_ids
    down_rows = {seg.tobytes() for seg in ppg}
    by_file: dict[str, list[str]] = {}
    for r in rows:
        by_file.setdefault(r["local_path"], []).append(r["global_idx"])
    for path, keys in by_file.items():
        with h5py.File(tiny_cohort / path) as f:
            assert not any(f[k]["normalized_waveform"][()].tobytes() in down_rows for k in keys)
    cohort = json.loads((tiny_cohort / "cohort.json").read_text())
    assert {p["patient_id"] for p in cohort["pretrain"]["patients"]} == pre_ids
    assert {p["patient_id"] for p in cohort["patients"]} == down_ids
    assert cohort["pretrain"]["n_segments"] == len(rows)
