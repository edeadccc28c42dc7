"""Small HDF5 inputs in the seed's pretraining layout, for the conversion and loader tests."""

import csv

import h5py
import numpy as np


def write_h5(path, segments: dict):
    with h5py.File(path, "w") as f:
        for k, x in segments.items():
            f.create_group(k).create_dataset("normalized_waveform", data=x)


def write_index(path, rows, header=("local_path", "global_idx")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def random_index(folder, n=300, length=250, n_files=3, patients=6, seed=0):
    """n rows in n_files HDF5 files, consecutive rows from one patient (as recordings are)."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n_files):
        segs = {}
        for j in range(f * n // n_files, (f + 1) * n // n_files):
            segs[f"{j:06d}"] = (rng.standard_normal(length) * 3 + 10).astype(np.float32)
            rows.append((f"f{f}.h5", f"{j:06d}", j * patients // n))
        write_h5(folder / f"f{f}.h5", segs)
    write_index(folder / "index.csv", rows, ("local_path", "global_idx", "patient_id"))
    return folder / "index.csv"
