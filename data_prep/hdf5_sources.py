"""Readers for the seed's two HDF5 layouts, with every segment checked before it is used.

Pretraining: a CSV index `local_path,global_idx`; `h5py.File(local_path)[global_idx]
['normalized_waveform']` is one 1-D segment. `global_idx` stays a string: the documented keys
are zero-padded (`000123`) and int() would turn them into keys that do not exist. Relative
`local_path`s are resolved against the CSV's folder; `s3://` paths are opened through s3fs.

Downstream: one HDF5 with `/ppg` or `/ecg` [N, L], `/labels` [N], optionally `/patient_ids` [N].

Bad input policy (`on_bad`): "error" (default) raises BadSampleError naming the file and key;
"skip" drops the segment and counts it by reason. Nothing is ever zero-filled.
"""

from __future__ import annotations

import collections
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

WAVEFORM_KEY = "normalized_waveform"
INDEX_COLUMNS = ("local_path", "global_idx")


class BadSampleError(ValueError):
    """A segment that cannot be used; the message names the file and key."""


@dataclass
class BadSamplePolicy:
    on_bad: str = "error"
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")

    def reject(self, reason: str, message: str) -> None:
        if self.on_bad == "error":
            raise BadSampleError(message)
        self.skipped[reason] += 1


@dataclass(frozen=True)
class IndexRow:
    row: int  # 1-based data row number in the CSV, for error messages
    path: str  # resolved local path or URL
    key: str  # global_idx exactly as written


def read_index(index_csv: str | os.PathLike) -> list[IndexRow]:
    """Read the pretraining index; keys are kept as strings."""
    index_csv = Path(index_csv)
    if not index_csv.is_file():
        raise FileNotFoundError(f"pretraining index {index_csv} does not exist")
    base = index_csv.parent
    rows = []
    with open(index_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{index_csv}: header {reader.fieldnames} lacks column(s) {missing}; "
                f"expected a CSV with columns local_path,global_idx"
            )
        for i, r in enumerate(reader, start=1):
            path, key = (r["local_path"] or "").strip(), (r["global_idx"] or "").strip()
            if not path or not key:
                raise ValueError(f"{index_csv}: row {i} has an empty local_path or global_idx: {r}")
            if "://" not in path and not os.path.isabs(path):
                path = str(base / path)
            rows.append(IndexRow(i, path, key))
    if not rows:
        raise ValueError(f"pretraining index {index_csv} has no rows")
    return rows


def check_segment(
    arr: np.ndarray, where: str, expected_length: int | None, policy: BadSamplePolicy
) -> np.ndarray | None:
    """Return arr as float32 [C, L], or None if the policy skipped it."""
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        policy.reject("bad_shape", f"{where}: expected a 1-D segment [L] or [C, L], got shape {arr.shape}")
        return None
    if expected_length is not None and arr.shape[-1] != expected_length:
        policy.reject(
            "wrong_length", f"{where}: segment has length {arr.shape[-1]}, expected {expected_length}"
        )
        return None
    if not np.issubdtype(arr.dtype, np.number):
        policy.reject("bad_dtype", f"{where}: segment dtype {arr.dtype} is not numeric")
        return None
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        policy.reject("non_finite", f"{where}: segment has {n} NaN/inf value(s)")
        return None
    return arr


class H5FileCache:
    """Keeps recently used HDF5 files open: index rows usually walk one shard at a time."""

    def __init__(self, storage_options: dict | None = None, max_open: int = 8):
        self.storage_options = storage_options or {}
        self.max_open = max_open
        self._open: collections.OrderedDict[str, object] = collections.OrderedDict()

    def __contains__(self, path: str) -> bool:
        return path in self._open

    def get(self, path: str):
        import h5py

        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        if "://" in path:
            import fsspec

            fh = fsspec.open(path, "rb", **self.storage_options).open()
            f = h5py.File(fh, "r")
        else:
            f = h5py.File(path, "r")
        self._open[path] = f
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return f

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _file_exists(path: str, storage_options: dict | None) -> bool:
    if "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        return fs.exists(p)
    return os.path.isfile(path)


def iter_index_rows(
    rows: list[IndexRow], expected_length: int | None, policy: BadSamplePolicy,
    storage_options: dict | None = None,
) -> Iterator[tuple[IndexRow, np.ndarray]]:
    """Yield (row, segment [C, L]) for each usable index row, in order."""
    cache = H5FileCache(storage_options)
    known_missing: set[str] = set()
    try:
        for r in rows:
            where = f"{r.path} [{r.key!r}] (index row {r.row})"
            if r.path in known_missing or (
                r.path not in cache and not _file_exists(r.path, storage_options)
            ):
                known_missing.add(r.path)
                policy.reject("missing_file", f"{where}: HDF5 file does not exist")
                continue
            f = cache.get(r.path)
            if r.key not in f:
                policy.reject("missing_key", f"{where}: HDF5 file has no group {r.key!r}")
                continue
            grp = f[r.key]
            if not hasattr(grp, "keys") or WAVEFORM_KEY not in grp:
                policy.reject("missing_key", f"{where}: group has no dataset {WAVEFORM_KEY!r}")
                continue
            seg = check_segment(np.asarray(grp[WAVEFORM_KEY][()]), where, expected_length, policy)
            if seg is not None:
                yield r, seg
    finally:
        cache.close()


def check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels must be a 1-D array of 0/1: a one-hot [N, 2] read as column 0 would invert every label."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"{where} has shape {labels.shape}; expected a 1-D array [N] of 0/1 "
            f"(one-hot or other 2-D labels are not accepted: convert them to 0/1 first)"
        )
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
        found = np.unique(labels)[:10] if np.issubdtype(labels.dtype, np.number) else labels.dtype
        raise ValueError(f"{where} must hold only 0 and 1, found {found}")
    return labels.astype(np.int64)


def check_patient_ids(pids: np.ndarray, where: str) -> np.ndarray:
    """Patient ids must be integers (a float id would be truncated into another patient's)."""
    pids = np.asarray(pids)
    if pids.ndim != 1:
        raise ValueError(f"{where} has shape {pids.shape}; expected a 1-D array [N] of integer patient ids")
    if np.issubdtype(pids.dtype, np.integer):
        return pids.astype(np.int64)
    if np.issubdtype(pids.dtype, np.floating) and np.isfinite(pids).all() and (pids == np.round(pids)).all():
        return pids.astype(np.int64)  # 3.0 is patient 3; 3.5 is an error below
    bad = pids[:10] if not np.issubdtype(pids.dtype, np.floating) else pids[~np.isfinite(pids) | (pids != np.round(pids))][:5]
    raise ValueError(f"{where} must be integers, found dtype {pids.dtype} with values such as {list(bad)}")


@dataclass(frozen=True)
class DownstreamSet:
    signals: np.ndarray  # [N, C, L] float32
    labels: np.ndarray  # [N] int64
    patient_ids: np.ndarray | None  # [N] int64 or None
    rows: np.ndarray  # [N] row numbers kept from the file


def read_downstream(
    h5_path: str | os.PathLike, signal_key: str = "ppg", expected_length: int | None = None,
    policy: BadSamplePolicy | None = None,
) -> DownstreamSet:
    """Read a downstream HDF5 (/ppg or /ecg [N, L], /labels [N], /patient_ids [N])."""
    import h5py

    policy = policy or BadSamplePolicy()
    h5_path = str(h5_path)
    if not os.path.isfile(h5_path):
        raise FileNotFoundError(f"downstream HDF5 {h5_path} does not exist")
    keys = [k.strip() for k in signal_key.split("+")]  # "ppg+ecg" stacks two channels
    with h5py.File(h5_path, "r") as f:
        for k in keys + ["labels"]:
            if k not in f:
                raise KeyError(f"{h5_path}: missing dataset '/{k}' (file has {sorted(f.keys())})")
        sig = [np.asarray(f[k][()]) for k in keys]
        labels = np.asarray(f["labels"][()])
        pids = np.asarray(f["patient_ids"][()]) if "patient_ids" in f else None
    for k, s in zip(keys, sig):
        if s.ndim != 2:
            raise ValueError(f"{h5_path}: '/{k}' has shape {s.shape}, expected [N, L]")
        if s.shape[0] != len(labels):
            raise ValueError(f"{h5_path}: '/{k}' has {s.shape[0]} rows but '/labels' has {len(labels)}")
    if pids is not None and len(pids) != len(labels):
        raise ValueError(f"{h5_path}: '/patient_ids' has {len(pids)} rows but '/labels' has {len(labels)}")
    labels = check_labels(labels, f"{h5_path}: '/labels'")
    if pids is not None:
        pids = check_patient_ids(pids, f"{h5_path}: '/patient_ids'")
    stacked = np.stack(sig, axis=1)  # [N, C, L]
    keep, out = [], []
    for i in range(len(labels)):
        seg = check_segment(stacked[i], f"{h5_path} ['/{signal_key}' row {i}]", expected_length, policy)
        if seg is not None:
            keep.append(i)
            out.append(seg)
    if not out:
        raise ValueError(f"{h5_path}: no usable segments ({dict(policy.skipped)} skipped)")
    keep = np.asarray(keep)
    return DownstreamSet(
        signals=np.stack(out), labels=labels[keep].astype(np.int64),
        patient_ids=None if pids is None else pids[keep], rows=keep,
    )
