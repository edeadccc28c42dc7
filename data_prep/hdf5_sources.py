"""Readers for the seed's two HDF5 layouts, with every segment checked before it is used.

Pretraining: a CSV index `local_path,global_idx`; `h5py.File(local_path)[global_idx]
['normalized_waveform']` is one 1-D segment. `global_idx` stays a string: the documented keys
are zero-padded (`000123`) and int() would turn them into keys that do not exist. Relative
`local_path`s are resolved against the CSV's folder; an `s3://` file is downloaded whole (one GET)
and opened natively.

Downstream: one HDF5 with `/ppg` or `/ecg` [N, L], `/labels` [N], optionally `/patient_ids` [N].

Bad input policy (`on_bad`): "error" (default) raises BadSampleError naming the file and key;
"skip" drops the segment and counts it by reason. Nothing is ever zero-filled.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gc
import itertools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

WAVEFORM_KEY = "normalized_waveform"


class BadSampleError(ValueError):
    """A segment that cannot be used; the message names the file and key."""


@dataclass
class BadSamplePolicy:
    on_bad: str = "error"
    skipped: collections.Counter = field(default_factory=collections.Counter)
    noted: collections.Counter = field(default_factory=collections.Counter)  # kept but changed: cropped, padded

    def __post_init__(self) -> None:
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"on_bad must be 'error' or 'skip', got {self.on_bad!r}")

    def reject(self, reason: str, message: str) -> None:
        if self.on_bad == "error":
            raise BadSampleError(message)
        self.skipped[reason] += 1


def check_segment(
    arr: np.ndarray, where: str | Callable[[], str], expected_length: int | None, policy: BadSamplePolicy,
    expected_channels: int | None = None,
) -> np.ndarray | None:
    """Return arr as float32 [C, L], or None if the policy skipped it.

    `where` names the segment in messages; a callable is only formatted when one is needed.
    """
    def w() -> str:
        return where() if callable(where) else where

    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (expected_channels is not None and arr.shape[0] != expected_channels):
        want = f"[{expected_channels}, L]" if expected_channels else "[L] or [C, L]"
        policy.reject("bad_shape", f"{w()}: expected a segment {want}, got shape {arr.shape}")
        return None
    if expected_length is not None and arr.shape[-1] != expected_length:
        policy.reject("wrong_length", f"{w()}: segment has length {arr.shape[-1]}, expected {expected_length}")
        return None
    if arr.dtype.kind not in "biuf":
        policy.reject("bad_dtype", f"{w()}: segment dtype {arr.dtype} is not numeric")
        return None
    arr = arr.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):  # the sum is the cheap test; overflow falls through
        suspect = not np.isfinite(arr.sum())
    if suspect and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        policy.reject("non_finite", f"{w()}: segment has {n} NaN/inf value(s)")
        return None
    return arr


class UnreadableFile(Exception):
    """An input file that exists but cannot be opened as HDF5 (truncated, not HDF5, bad permissions)."""


def download(url: str, local_path: str, storage_options: dict | None = None) -> None:
    """Copy a remote object to a local file with one streaming GET (no HEAD, no readahead).

    s3fs's get_file would otherwise split objects over its 50 MB block into concurrent ranged
    GETs after already opening the whole body once.
    """
    import fsspec

    from data_prep.storage import retrying

    fs, p = fsspec.core.url_to_fs(url, **(storage_options or {}))
    kw = {"max_concurrency": 1} if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) else {}
    retrying(lambda: fs.get_file(p, local_path, **kw), "downloading", url)  # FileNotFoundError passes through


def fetch_h5(path: str, storage_options: dict | None = None, tmp_dir: str | None = None) -> str:
    """A local path to read `path` from: itself if local, else a download of it (the caller unlinks it)."""
    from data_prep.storage import is_remote

    if not is_remote(path):
        return path
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".h5-", suffix=".tmp", dir=tmp_dir)
    os.close(fd)
    try:
        download(path, tmp, storage_options)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def open_fetched(local: str, path: str):
    """Open `local`, the file fetch_h5 gave for `path` (itself or its download); errors name `path`.
    A download is unlinked at once: the open handle keeps it readable until it is closed."""
    import h5py

    try:
        if not os.path.isfile(local):
            raise FileNotFoundError(path)
        try:
            return h5py.File(local, "r")
        except OSError as e:
            raise UnreadableFile(f"{path}: not a readable HDF5 file ({e})") from e
    finally:
        if local != path:
            os.unlink(local)


def open_h5(path: str, storage_options: dict | None = None, tmp_dir: str | None = None):
    """Open an HDF5 file, local or remote. FileNotFoundError if it is absent, UnreadableFile if it is broken.

    A remote file is downloaded whole into `tmp_dir` (default: the system's temp folder), opened
    natively and unlinked at once. Never hand h5py an fsspec file object: h5py holds its global
    lock while it calls the object's read(), which waits on fsspec's IO thread, and a garbage
    collection on that thread that frees any h5py object needs the same lock, a deadlock that
    hung CI (h5py#2019). It also read each file five times over through s3fs's readahead.
    """
    return open_fetched(fetch_h5(path, storage_options, tmp_dir), path)


def read_file(
    path: str, parts: list, kind: str, fit_length, signal_keys: tuple[str, ...], channels: int | None, opened,
) -> Iterator[tuple[object, int | None, np.ndarray | None]]:
    """Yield (part, row, segment [C, L] float32) for the usable rows of one file, opened once by
    `opened()`, and (part, None, None) after each part's rows, so a caller can hand them on.

    parts: [(part, rows DataFrame (row, key) in key order, policy)], e.g. one per destination
    shard, so that a bad row is counted by the policy of the shard it was planned for.
    `fit_length(seg) -> (seg | None, note)` applies the length policy.
    """
    try:
        f = opened()
    except (FileNotFoundError, UnreadableFile) as e:
        missing = isinstance(e, FileNotFoundError)
        for part, grp, policy in parts:
            for r, k in zip(grp["row"], grp["key"]):
                if missing:
                    policy.reject("missing_file", f"{path} [{k!r}] (row {r + 1}): HDF5 file does not exist")
                else:
                    policy.reject("unreadable_file", f"{e} [{k!r}] (row {r + 1})")
            yield part, None, None
        return
    with f:
        for part, grp, policy in parts:
            for r, seg in _read_rows(f, path, grp, kind, policy, fit_length, signal_keys, channels):
                yield part, r, seg
            yield part, None, None


@dataclass(frozen=True)
class H5Reader:
    """external_shuffle's reader for HDF5 rows: fetch (download if remote), open, read (see WfdbReader)."""

    kind: str  # pretrain | downstream
    signal_keys: tuple[str, ...]

    def fetch(self, path: str, storage_options: dict | None, tmp_dir: str | None) -> str:
        return fetch_h5(path, storage_options, tmp_dir)

    def open(self, local: str, path: str):
        return open_fetched(local, path)

    def read(self, path: str, parts: list, fit_length, channels: int | None, opened) -> Iterator[tuple]:
        return read_file(path, parts, self.kind, fit_length, self.signal_keys, channels, opened)


def _read_rows(f, path: str, grp, kind: str, policy: BadSamplePolicy, fit_length, signal_keys: tuple[str, ...],
               channels: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """The usable rows of one open file, in order; bad ones go to `policy`."""
    if kind == "downstream":
        idx = grp["row"].to_numpy()
        try:
            stacked = np.stack([np.asarray(f[k][idx]) for k in signal_keys], axis=1)  # [n, C, L]
        except (OSError, KeyError) as e:
            for r in idx:
                policy.reject("unreadable_file", f"{path} (row {r}): cannot read ({e})")
            return
        name = "+".join(signal_keys)
        items = [(int(r), functools.partial("{} ['/{}' row {}]".format, path, name, int(r)), a)
                 for r, a in zip(idx, stacked)]
    else:
        items = []
        for r, k in zip(grp["row"].to_numpy(), grp["key"].to_numpy()):
            where = functools.partial("{} [{!r}] (index row {})".format, path, k, int(r) + 1)
            try:
                arr = f[f"{k}/{WAVEFORM_KEY}"][()]  # one path lookup: the common case costs what the floor does
            except KeyError:  # say what is missing
                missing = (f"HDF5 file has no group {k!r}{_padding_hint(f, k)}" if k not in f
                           else f"group has no dataset {WAVEFORM_KEY!r}")
                policy.reject("missing_key", f"{where()}: {missing}")
                continue
            except (OSError, TypeError, AttributeError) as e:  # truncated file, or the key names a dataset
                policy.reject("unreadable_file" if isinstance(e, OSError) else "missing_key",
                              f"{where()}: cannot read {WAVEFORM_KEY!r} ({e})")
                continue
            items.append((int(r), where, np.asarray(arr)))
    for r, where, arr in items:
        seg = checked_segment(arr, where, policy, fit_length, channels)
        if seg is not None:
            yield r, seg


def checked_segment(arr: np.ndarray, where: Callable[[], str], policy: BadSamplePolicy, fit_length,
                    channels: int | None, expected_length: int | None = None) -> np.ndarray | None:
    """check_segment, then the length policy: a segment [C, L] float32 to spill, or None (counted by policy)."""
    seg = check_segment(arr, where, expected_length, policy, channels)
    if seg is None:
        return None
    seg, note = fit_length(seg)
    if seg is None:
        policy.reject(note, f"{where()}: segment has length {arr.shape[-1]}, expected the data's length")
        return None
    if note:
        policy.noted[note] += 1
    return seg


@contextlib.contextmanager
def _metadata_reader(path: str, storage_options: dict | None = None) -> Iterator:
    """An open HDF5 file for reading shapes (None if absent or broken). A remote file is read in
    32 KB blocks, each fetched once (its metadata, not its data) through an fsspec file object, with the cyclic GC
    off meanwhile: see open_h5 for the deadlock that a GC on fsspec's IO thread causes."""
    import h5py

    from data_prep.storage import is_remote, retrying

    if not is_remote(path):
        try:
            f = open_h5(path)
        except (FileNotFoundError, UnreadableFile):
            yield None
            return
        with f:
            yield f
        return
    import fsspec

    gc_on = gc.isenabled()
    gc.disable()
    try:
        fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
        try:
            fh = retrying(lambda: fs.open(p, "rb", block_size=32 * 1024, cache_type="blockcache",
                                                 cache_options={"maxblocks": 64}), "opening", path)
        except FileNotFoundError:
            yield None
            return
        with fh:
            try:
                f = h5py.File(fh, "r")
            except OSError:
                yield None
                return
            with f:
                yield f
    finally:
        if gc_on:
            gc.enable()


def segment_shape(rows, kind: str, signal_keys: tuple[str, ...], storage_options: dict | None = None) -> Counter:
    """Counter of (C, L) over the readable rows given: shapes only, no data is read."""
    shapes: Counter = Counter()
    for path, grp in rows.sort_values(["path", "key"]).groupby("path", sort=False):
        with _metadata_reader(path, storage_options) as f:
            if f is None:
                continue
            try:
                if kind == "downstream":
                    shapes[(len(signal_keys), int(f[signal_keys[0]].shape[1]))] += len(grp)
                    continue
                for k in grp["key"]:
                    if k in f and hasattr(f[k], "keys") and WAVEFORM_KEY in f[k]:
                        shp = f[k][WAVEFORM_KEY].shape
                        if len(shp) in (1, 2):
                            shapes[(1 if len(shp) == 1 else int(shp[0]), int(shp[-1]))] += 1
            except OSError:
                continue
    return shapes


def _padding_hint(f, key: str) -> str:
    """A note when `key` is a group name of f without its zero padding ('12' for '000012')."""
    first = next(iter(f), "")
    if key.isdigit() and len(key) < len(first) and first.isdigit() and key.zfill(len(first)) in f:
        return f" (it has {key.zfill(len(first))!r}: keys must be the group names exactly, zero-padded)"
    return ""


def why_unreadable(rows, kind: str, signal_keys: tuple[str, ...], storage_options: dict | None = None) -> str:
    """What is wrong with rows (path, key) that segment_shape found none readable, from the first
    file that says: missing, not HDF5, or keys that are not the file's group names (e.g. not zero-padded)."""
    for path, grp in rows.sort_values(["path", "key"]).groupby("path", sort=False):
        with _metadata_reader(path, storage_options) as f:
            if f is None:
                from data_prep.storage import is_remote

                if is_remote(path) or os.path.exists(path):
                    return f"{path} is not a readable HDF5 file"
                return f"{path} does not exist (relative paths are resolved against the index's folder)"
            if kind == "downstream":
                continue
            keys = list(grp["key"])
            k = next((k for k in keys if k in f), None)
            if k is not None:
                if not hasattr(f[k], "keys") or WAVEFORM_KEY not in f[k]:
                    return f"{path} [{k!r}]: the group has no dataset {WAVEFORM_KEY!r}"
                return f"{path} [{k!r}]: {WAVEFORM_KEY!r} has shape {f[k][WAVEFORM_KEY].shape}, expected [L] or [C, L]"
            names = list(itertools.islice(iter(f), 3))
            hint = ""
            padded = next((k for k in keys if _padding_hint(f, k)), None)
            if padded is not None:
                width = len(names[0])
                hint = (f"; the index's keys are not zero-padded like the file's group names: key {padded!r} is "
                        f"group {padded.zfill(width)!r}. global_idx must be the group name exactly: write the "
                        f"keys zero-padded to {width} digits (and keep the column as text)")
            return (f"{path} has no group named like the index's keys (e.g. {keys[0]!r}; the file's groups are "
                    f"{', '.join(map(repr, names)) or 'none'}{', ...' if len(names) == 3 else ''}){hint}")
    return "the sampled rows' files could not be read"


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
            raise ValueError(f"{h5_path}: '/labels' has {len(labels)} rows but '/{k}' has {s.shape[0]}; expected "
                             f"one label per segment")
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
