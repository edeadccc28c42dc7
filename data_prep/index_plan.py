"""Which source row goes to which shard: a seeded global shuffle and a patient-disjoint split.

Read in chunks, so memory does not grow with the number of rows (29 M rows at a few hundred
bytes each would not fit): every decision below is a function of one row and a few small
tables (per-patient counts, the duplicate rows), recomputed on each pass over the index.

- Split: with patient ids, whole patients go to validation (patients ordered by a seeded hash,
  taken until `val_fraction` of the rows), so no patient is on both sides; without, a row goes to
  validation when a seeded hash of its key falls below `val_fraction`.
- Shuffle: within each split, a row's rank r (its order of appearance) maps through a seeded
  bijection of [0, n) (a cycle-walking Feistel network) to its position; shard i holds
  positions [i*n, (i+1)*n). Patients and recordings are interleaved across all shards, and
  each shard is built by any worker, task or machine from the same rows.
- Duplicate keys: found with one pass per `max_rows` rows (each pass checks one hash bucket), so
  the check too runs in bounded memory; the later occurrence is the bad row.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd

from data_prep.atomic_write import atomic_path
from data_prep.hdf5_sources import BadSamplePolicy, H5Reader, check_labels, check_patient_ids, download
from data_prep.storage import is_remote, retrying

INDEX_COLUMNS = ("local_path", "global_idx")
PATIENT_COLUMN = "patient_id"
NO_PATIENT = -1
NO_LABEL = -1


def _hash_key(seed: int, salt: str) -> str:
    return f"{salt}{seed:010d}"[-16:].rjust(16, "0")


def key_hashes(keys: np.ndarray, seed: int, salt: str = "hk") -> np.ndarray:
    """Stable 64-bit hashes [n] of string keys (pandas' SipHash, keyed by the seed)."""
    return pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=_hash_key(seed, salt), categorize=False)


def _mix(x: np.ndarray, k: np.uint64) -> np.ndarray:
    """A 64-bit mixing function (splitmix64 finaliser) of x ^ k."""
    with np.errstate(over="ignore"):
        z = (x ^ k) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(29))


def permute(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to idx [m]: 4-round Feistel with cycle walking."""
    if n <= 1:  # [0, 1) has one position, 0 (and [0, 0) none: idx is empty then)
        return np.zeros(len(idx), np.int64)
    bits = max(2, int(np.ceil(np.log2(n))))
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.SeedSequence([seed, 0x5EED]).generate_state(4, dtype=np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << half) | right

    x = np.asarray(idx, dtype=np.uint64).copy()
    todo = np.arange(len(x))
    while len(todo):  # cycle walking: re-apply until the value lands in [0, n)
        x[todo] = feistel(x[todo])
        todo = todo[x[todo] >= np.uint64(n)]
    return x.astype(np.int64)


class IndexSource:
    """The pretraining CSV index: `local_path,global_idx[,patient_id]`, local or s3://.

    Keys stay strings (`000123` is not `123`). Relative paths are resolved against the CSV's
    folder. Yields chunks with columns row, path, key, patient, label.
    """

    kind = "pretrain"

    def __init__(self, index: str, storage_options: dict | None = None, chunk_rows: int = 1_000_000,
                 cache_dir: str | None = None):
        self.url, self.storage_options, self.chunk_rows = str(index), storage_options or {}, chunk_rows
        self.base = self.url.rsplit("/", 1)[0] if "/" in self.url else "."
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        try:
            info = retrying(lambda: fs.info(path), "reading info of", self.url)
        except FileNotFoundError:
            info = None
        if info is None:
            raise FileNotFoundError(f"pretraining index {self.url} does not exist")
        if info.get("type") == "directory":
            raise ValueError(f"--index {self.url} is a folder; expected the index CSV file (path,key[,patient_id] "
                             f"per row), or --wfdb for a folder of WFDB records")
        self._fingerprint = [int(info.get("size") or 0),
                             str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")]
        self._fs, self._path = fs, path
        if is_remote(self.url):  # read many times (plan, duplicates, waves): download it once
            import hashlib

            name = hashlib.sha256(json.dumps([self.url, self._fingerprint]).encode()).hexdigest()[:16]
            local = os.path.join(cache_dir or tempfile.gettempdir(), f"index-{name}.csv")
            if not os.path.exists(local) or os.path.getsize(local) != self._fingerprint[0]:
                with atomic_path(local) as tmp:
                    download(self.url, str(tmp), self.storage_options)
            self.local_copy: str | None = local
            self._fs, self._path = fsspec.filesystem("file"), local
        else:
            self.local_copy = None

    def fingerprint(self) -> list:
        return self._fingerprint

    def reader(self) -> H5Reader:
        """How pass 1 fetches, opens and reads one of the index's HDF5 files."""
        return H5Reader(self.kind, ())  # a pretraining row is its group's normalized_waveform: no signal keys

    def chunks(self) -> Iterator[pd.DataFrame]:
        try:
            yield from self._chunks()
        except pd.errors.ParserError as e:
            raise ValueError(self._parse_error(e)) from e
        except UnicodeDecodeError as e:
            raise ValueError(self._not_utf8()) from e

    def _parse_error(self, e: pd.errors.ParserError) -> str:
        """pandas' tokenizer message, with the file named and the fields said in words."""
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if not m:
            return f"{self.url}: not a readable CSV ({str(e).strip()})"
        want, line, have = m.groups()
        with self._fs.open(self._path, "rb") as fh:
            header = fh.readline().decode(errors="replace").strip()
        return (f"{self.url}: line {line} has {have} fields, but the header ({header}) has {want}; "
                f"a path or key holding a comma must be quoted (\"...\")")

    def _not_utf8(self) -> str:
        """Which line is not UTF-8: pandas only gives a byte offset inside its buffer."""
        with self._fs.open(self._path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (f"{self.url}: line {n} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                            f"{e.start + 1}: {raw.rstrip()!r}); keys and paths must be UTF-8: re-encode the index")
        return f"{self.url}: not UTF-8 text; keys and paths must be UTF-8: re-encode the index"

    def _chunks(self) -> Iterator[pd.DataFrame]:
        start = 0
        with retrying(lambda: self._fs.open(self._path, "rb"), "opening", self.url) as fh:
            try:
                reader = pd.read_csv(fh, dtype=str, keep_default_na=False, chunksize=self.chunk_rows)
            except pd.errors.EmptyDataError as e:
                raise ValueError(f"{self.url}: empty file; expected a CSV with columns local_path,global_idx") from e
            for chunk in reader:
                missing = [c for c in INDEX_COLUMNS if c not in chunk.columns]
                if missing:
                    raise ValueError(
                        f"{self.url}: header {list(chunk.columns)} lacks column(s) {missing}; "
                        f"expected a CSV with columns local_path,global_idx[,patient_id]"
                    )
                yield self._rows(chunk, start)
                start += len(chunk)
        if start == 0:
            raise ValueError(f"pretraining index {self.url} has no rows")

    def _rows(self, chunk: pd.DataFrame, start: int) -> pd.DataFrame:
        paths, keys = chunk["local_path"], chunk["global_idx"]  # verbatim: "  pad  " is a key like any other
        empty = (paths.str.strip() == "") | (keys.str.strip() == "")
        if empty.any():
            i = int(np.flatnonzero(empty.to_numpy())[0])
            raise ValueError(f"{self.url}: row {start + i + 1} has an empty local_path or global_idx")
        rel = ~paths.str.contains("://", regex=False) & ~paths.str.startswith("/")
        if rel.any():
            paths = paths.where(~rel, self.base + "/" + paths)
        if PATIENT_COLUMN in chunk.columns:
            raw = chunk[PATIENT_COLUMN].str.strip()
            num = pd.to_numeric(raw, errors="coerce")  # int64 when every id is an integer: exact beyond 2**53
            if num.isna().any():
                i = int(np.flatnonzero(num.isna().to_numpy())[0])
                raise ValueError(f"{self.url}: row {start + i + 1}: patient_id {raw.iloc[i]!r} is not an integer")
            num = num.to_numpy()
            if num.dtype.kind == "f" and (np.abs(num) >= 2.0**53).any():
                raise ValueError(f"{self.url}: column 'patient_id' (rows {start + 1}..{start + len(chunk)}): ids beyond "
                                 f"2**53 must be written as plain integers, not floats")
            patients = check_patient_ids(num, f"{self.url}: column 'patient_id' (rows {start + 1}..{start + len(chunk)})")
        else:
            patients = np.full(len(chunk), NO_PATIENT, np.int64)
        return pd.DataFrame({
            "row": np.arange(start, start + len(chunk), dtype=np.int64), "path": paths.to_numpy(dtype=object),
            "key": keys.to_numpy(dtype=object), "patient": patients, "label": np.full(len(chunk), NO_LABEL, np.int8),
        })


class DownstreamSource:
    """A labelled HDF5 (`/ppg` or `/ecg` [N, L], `/labels` [N], optional `/patient_ids` [N]).

    `signal_key` may stack channels (`ppg+ecg`). Keys are zero-padded row numbers.
    """

    kind = "downstream"

    def __init__(self, h5_path: str, signal_key: str = "ppg", chunk_rows: int = 1_000_000):
        import h5py

        self.url, self.chunk_rows = str(h5_path), chunk_rows
        self.signal_keys = [k.strip() for k in signal_key.split("+")]
        if not os.path.isfile(self.url):
            raise FileNotFoundError(f"downstream HDF5 {self.url} does not exist")
        try:
            f = h5py.File(self.url, "r")
        except OSError as e:
            raise ValueError(f"{self.url}: not a readable HDF5 file ({e})") from e
        with f:
            for k in self.signal_keys + ["labels"]:
                if k not in f:
                    raise KeyError(f"{self.url}: missing dataset '/{k}' (file has {sorted(f.keys())})")
            self.n = len(f["labels"])
            check_labels(np.broadcast_to(0, f["labels"].shape), f"{self.url}: '/labels'")  # shape only
            for k in self.signal_keys:
                if f[k].ndim >= 1 and f[k].shape[0] != self.n:  # the labels may be the wrong one: name both
                    raise ValueError(f"{self.url}: '/labels' has {self.n} rows but '/{k}' has {f[k].shape[0]}; "
                                     f"expected one label per segment")
                if f[k].ndim != 2 or f[k].shape != f[self.signal_keys[0]].shape:
                    shapes = ", ".join(f"'/{j}' {f[j].shape}" for j in self.signal_keys)
                    raise ValueError(f"{self.url}: signal datasets must all be [N={self.n}, L] with one L; found {shapes}")
            self.length = int(f[self.signal_keys[0]].shape[1])
            self.has_patients = "patient_ids" in f
            if self.has_patients and len(f["patient_ids"]) != self.n:
                raise ValueError(f"{self.url}: '/patient_ids' has {len(f['patient_ids'])} rows but '/labels' has {self.n}")
        if self.n == 0:
            raise ValueError(f"{self.url}: '/labels' is empty")

    def fingerprint(self) -> list:
        st = os.stat(self.url)
        return [st.st_size, st.st_mtime_ns]

    def reader(self) -> H5Reader:
        """How pass 1 reads this file's signal datasets."""
        return H5Reader(self.kind, tuple(self.signal_keys))

    def chunks(self) -> Iterator[pd.DataFrame]:
        import h5py

        with h5py.File(self.url, "r") as f:
            for s in range(0, self.n, self.chunk_rows):
                e = min(self.n, s + self.chunk_rows)
                labels = check_labels(f["labels"][s:e], f"{self.url}: '/labels'")
                pids = (check_patient_ids(f["patient_ids"][s:e], f"{self.url}: '/patient_ids'")
                        if self.has_patients else np.full(e - s, NO_PATIENT, np.int64))
                rows = np.arange(s, e, dtype=np.int64)
                yield pd.DataFrame({
                    "row": rows, "path": np.full(e - s, self.url, dtype=object),
                    "key": np.char.zfill(rows.astype(str), 8).astype(object), "patient": pids,
                    "label": labels.astype(np.int8),
                })


@dataclass
class IndexStats:
    n_rows: int
    patient_counts: dict[int, int]
    file_rows: dict[str, int]  # input file -> its index rows
    sample: pd.DataFrame  # a seeded sample of rows, to infer the segment shape from many rows

    @property
    def files(self) -> list[str]:
        return sorted(self.file_rows)


def scan(source, seed: int, sample_size: int = 256) -> IndexStats:
    """One pass: row count, rows per patient, distinct files, a seeded sample of rows."""
    n, counts, files, picked = 0, Counter(), Counter(), []
    for chunk in source.chunks():
        n += len(chunk)
        counts.update(chunk["patient"].value_counts().to_dict())
        files.update(chunk["path"].value_counts().to_dict())
        # Bottom-k by a seeded hash of the row number: a uniform sample without knowing n in advance.
        h = _mix(chunk["row"].to_numpy().astype(np.uint64), np.uint64(seed + 0xA5))
        take = np.argsort(h)[:sample_size]
        picked.append(chunk.iloc[take].assign(_h=h[take]))
        merged = pd.concat(picked)
        picked = [merged.nsmallest(sample_size, "_h")]
    counts.pop(NO_PATIENT, None)
    sample = picked[0].drop(columns="_h").sort_values("row") if picked else pd.DataFrame()
    return IndexStats(n, dict(counts), dict(files), sample)


def find_duplicate_rows(source, n_rows: int, max_rows: int, policy: BadSamplePolicy) -> set[int]:
    """Rows whose key already appeared earlier; one pass per hash bucket of <= max_rows rows."""
    n_buckets = max(1, -(-n_rows // max_rows))
    dups: set[int] = set()
    for bucket in range(n_buckets):
        keys, rows = [], []
        for chunk in source.chunks():
            h = key_hashes(chunk["key"].to_numpy(), 0, "dk")
            sel = (h % np.uint64(n_buckets)) == np.uint64(bucket)
            keys.append(chunk["key"].to_numpy()[sel])
            rows.append(chunk["row"].to_numpy()[sel])
        k, r = np.concatenate(keys), np.concatenate(rows)
        ser = pd.Series(r, index=k)
        seen = pd.Series(k).duplicated(keep="first").to_numpy()
        if seen.any():
            first = ser.groupby(level=0).transform("first").to_numpy()
            for row, key, first_row in sorted(zip(r[seen], k[seen], first[seen])):
                policy.reject("duplicate_key", f"{source.url}: key {key!r} at row {int(row) + 1} repeats "
                                               f"row {int(first_row) + 1}; keys must be unique")
                dups.add(int(row))
    return dups


def choose_val_patients(patient_counts: dict[int, int], val_fraction: float, seed: int) -> list[int]:
    """Whole patients, in seeded-hash order, until they hold >= val_fraction of the rows.

    Never every patient: at least one stays in training.
    """
    if val_fraction <= 0 or len(patient_counts) < 2:
        return []
    pids = np.array(sorted(patient_counts), dtype=np.int64)
    order = pids[np.argsort(_mix(pids.astype(np.uint64), np.uint64(seed + 0x7A1)), kind="stable")]
    total, target, chosen, acc = sum(patient_counts.values()), val_fraction * sum(patient_counts.values()), [], 0
    for p in order[:-1]:
        if acc >= target:
            break
        chosen.append(int(p))
        acc += patient_counts[int(p)]
    return sorted(chosen) if acc < total else []


@dataclass
class Plan:
    """Everything that fixes which rows land in which shard, in which order."""

    n_rows: int
    samples_per_shard: int
    seed: int
    split_by: str  # "patient" or "key_hash"
    val_fraction: float
    val_patients: list[int]
    train_patients: list[int]
    duplicates: set[int] = field(default_factory=set)
    n_split: dict[str, int] = field(default_factory=dict)  # rows per split, duplicates excluded

    def n_shards(self, split: str) -> int:
        return -(-self.n_split.get(split, 0) // self.samples_per_shard)

    def all_shards(self) -> list[tuple[str, int]]:
        return [(s, i) for s in ("train", "val") for i in range(self.n_shards(s))]

    def task_shards(self, task: int, num_tasks: int) -> list[tuple[str, int]]:
        return [sh for g, sh in enumerate(self.all_shards()) if g % num_tasks == task]

    def to_dict(self) -> dict:
        return {
            "by": self.split_by, "val_fraction": self.val_fraction, "seed": self.seed,
            "val_patients": self.val_patients, "train_patients": self.train_patients,
            "rows": self.n_split, "duplicate_rows": len(self.duplicates),
        }

    def split_of(self, chunk: pd.DataFrame) -> np.ndarray:
        """0 = train, 1 = val, -1 = dropped (duplicate), per row of the chunk."""
        if self.split_by == "patient":
            split = np.isin(chunk["patient"].to_numpy(), self.val_patients).astype(np.int64)
        else:
            h = key_hashes(chunk["key"].to_numpy(), self.seed, "vs")
            split = (h < np.uint64(min(self.val_fraction, 1.0) * 2.0**64 * (1 - 1e-12))).astype(np.int64)
        if self.duplicates:
            split[np.isin(chunk["row"].to_numpy(), list(self.duplicates))] = -1
        return split

    def assign(self, chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        """Add split, pos (shuffled position within the split) and shard columns, chunk by chunk."""
        counters = [0, 0]
        for chunk in chunks:
            split = self.split_of(chunk)
            pos = np.full(len(chunk), -1, np.int64)
            for s, name in enumerate(("train", "val")):
                sel = split == s
                rank = counters[s] + np.arange(int(sel.sum()))
                counters[s] += int(sel.sum())
                pos[sel] = permute(rank, self.n_split.get(name, 0), self.seed * 2 + s)
            yield chunk.assign(split=split, pos=pos, shard=np.where(pos >= 0, pos // self.samples_per_shard, -1))


def make_plan(source, stats: IndexStats, samples_per_shard: int, val_fraction: float, seed: int,
              duplicates: set[int]) -> Plan:
    by_patient = bool(stats.patient_counts)
    val = choose_val_patients(stats.patient_counts, val_fraction, seed) if by_patient else []
    plan = Plan(stats.n_rows, samples_per_shard, seed, "patient" if by_patient else "key_hash", val_fraction,
                val, sorted(set(stats.patient_counts) - set(val)), duplicates)
    if by_patient:
        n_unknown = stats.n_rows - sum(stats.patient_counts.values())
        if n_unknown:
            raise ValueError(f"{source.url}: {n_unknown} row(s) have no patient id while others do")
    plan.n_split = {"train": 0, "val": 0}
    for chunk in source.chunks():  # exact per-split counts, duplicates excluded
        split = plan.split_of(chunk)
        plan.n_split["train"] += int((split == 0).sum())
        plan.n_split["val"] += int((split == 1).sum())
    return plan


def rows_for_files(source, plan: Plan, files: set[str]) -> pd.DataFrame:
    """The planned rows (duplicates dropped) that live in the given input files, with split/pos/shard
    columns; one pass over the index."""
    keep = []
    for chunk in plan.assign(source.chunks()):
        sel = (chunk["split"].to_numpy() >= 0) & chunk["path"].isin(files).to_numpy()
        if sel.any():
            keep.append(chunk[sel])
    return pd.concat(keep, ignore_index=True) if keep else pd.DataFrame(
        columns=["row", "path", "key", "patient", "label", "split", "pos", "shard"])

