"""Real PhysioNet records for the tests (../shared/real: MIT-BIH Arrhythmia, BIDMC; ODC-BY 1.0) and small
WFDB records written with `wfdb` itself (a multi-segment record, broken headers)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REAL = Path(os.environ.get("HIMAE_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "real"))


def real(db: str) -> Path:
    """The real database folder, or a skip that says where it was looked for (CI has it)."""
    path = REAL / db
    if not (path / ("RECORDS" if db == "mitdb" else "bidmc01.hea")).exists():
        if os.environ.get("CI"):  # CI has ../shared/real: a skip there would hide every real-data test
            pytest.fail(f"real PhysioNet data not found at {path} under CI")
        pytest.skip(f"real PhysioNet data not found at {path} (set HIMAE_REAL_DATA to the folder holding mitdb/ and "
                    f"bidmc/)")
    return path


def record_subset(src: Path, dst: Path, names: list[str], exts: tuple[str, ...] = (".hea", ".dat")) -> Path:
    """A folder holding copies of some records of a database (no RECORDS file: the headers are listed)."""
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        for ext in exts:
            if (src / f"{n}{ext}").exists():
                shutil.copy(src / f"{n}{ext}", dst / f"{n}{ext}")
    return dst


def write_record(folder: Path, name: str, signals: dict[str, np.ndarray], fs: float, fmt: str = "16") -> None:
    """A single-segment record with wfdb.wrsamp: signal name -> physical samples [n]."""
    import wfdb

    names = list(signals)
    p = np.stack([signals[k] for k in names], axis=1).astype(np.float64)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(names), sig_name=names, p_signal=p, fmt=[fmt] * len(names),
                adc_gain=[200.0] * len(names), baseline=[0] * len(names), write_dir=str(folder))


def write_multisegment(folder: Path, name: str = "ms01", fs: float = 125.0) -> dict:
    """A MIMIC-III-style multi-segment record (variable layout) written with wfdb: segment 1 holds II and
    PLETH (2,500 samples), then an empty `~` gap of 300, segment 2 only PLETH (1,250), segment 3 only II
    (2,500). Returns the segments' physical II samples by segment name, and the layout."""
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    t = np.arange(2500) / fs
    s1 = {"II": np.round(np.sin(2 * np.pi * 1.2 * t) * 200) / 200, "PLETH": np.round(np.cos(t) * 200) / 200}
    s2 = {"PLETH": np.round(rng.standard_normal(1250) * 200) / 200}
    s3 = {"II": np.round(rng.standard_normal(2500) * 200) / 200}
    write_record(folder, f"{name}_0001", s1, fs)
    write_record(folder, f"{name}_0002", s2, fs)
    write_record(folder, f"{name}_0003", s3, fs)
    # the layout header names every signal of the record; wfdb writes no '~' file names, so it is text
    (folder / f"{name}_layout.hea").write_text(
        f"{name}_layout 2 {fs:g} 0\n~ 16 200/mV 16 0 0 0 0 II\n~ 16 200/mV 16 0 0 0 0 PLETH\n")
    m = wfdb.MultiRecord(record_name=name, fs=fs, n_sig=2, sig_len=2500 + 300 + 1250 + 2500,
                         seg_name=[f"{name}_layout", f"{name}_0001", "~", f"{name}_0002", f"{name}_0003"],
                         seg_len=[0, 2500, 300, 1250, 2500])
    m.n_seg = 5  # wfdb 4.3's constructor does not take it; wrheader needs it
    m.wrheader(write_dir=str(folder))
    (folder / "RECORDS").write_text(f"{name}\n")
    return {"II": {0: s1["II"], 4050: s3["II"]}, "sig_len": 6550}


def write_fixed_layout(folder: Path, name: str = "fx01", fs: float = 100.0) -> dict:
    """A fixed-layout multi-segment record (no layout header): segment 1 holds II and PLETH (1,000 samples),
    a `~` gap of 300, segment 2 only PLETH (500), segment 3 II and PLETH again (1,000). wfdb itself would read
    segment 2's PLETH as II (it reads every segment by the first one's channel index)."""
    import wfdb

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    sig = {k: {c: np.round(rng.standard_normal(n) * 200) / 200 for c in chans}
           for k, n, chans in (("1", 1000, ("II", "PLETH")), ("2", 500, ("PLETH",)), ("3", 1000, ("II", "PLETH")))}
    for k, chans in sig.items():
        write_record(folder, f"{name}_{k}", chans, fs)
    m = wfdb.MultiRecord(record_name=name, fs=fs, n_sig=2, sig_len=2800,
                         seg_name=[f"{name}_1", "~", f"{name}_2", f"{name}_3"], seg_len=[1000, 300, 500, 1000])
    m.n_seg = 4
    m.wrheader(write_dir=str(folder))
    (folder / "RECORDS").write_text(f"{name}\n")
    return {"II": {0: sig["1"]["II"], 1800: sig["3"]["II"]}}
