"""Two-pass external shuffle: each input file is read once, whole and in order; shards come from spill.

The plan (index_plan) scatters every file's rows over nearly every shard, so building each shard
straight from the inputs read every file once per shard (about 4,600x the input at 29 M rows on
S3). Instead, with the plan unchanged:

- pass 1, spill: a task takes its share of the input files (file j of the sorted list goes to task
  j % num_tasks) in waves of whole files, at most `--max-rows` index rows each. It opens each file
  once (a remote one is downloaded with one GET into the spill folder), reads, checks and
  length-fits the rows in key order and appends them, about `FLUSH_BYTES` at a time, to one chunk
  per destination group of shards: `<split>-g<group>/t<task>-w<wave>-f<flush>.npz`, each written
  under a temp name, then renamed. A marker `done/t<task>-w<wave>.json` finishes the wave.
- pass 2, build: a group (consecutive shards of one split, about `GROUP_BYTES` of spill) is
  loaded from its chunks and each shard is written as before (shard_writer.write_shard): the
  same rows in the same planned order, so the same bytes for any --workers or --num-tasks.

Spill costs about rows x (C x L_in x 4 + 40 + 4 x key length) bytes of disk (float32 at the
input length, ids, UTF-32 keys); it is checked against the free space before pass 1 and
removed with manifest.json.
A re-run skips finished waves (markers) and finished shards (verified records); a wave killed
midway is read again, and its chunks, named by wave and flush, are rewritten with the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.hdf5_sources import BadSamplePolicy

FLUSH_BYTES = int(os.environ.get("HIMAE_SPILL_FLUSH_MB", "256")) * 2**20  # segment bytes buffered per worker
GROUP_BYTES = int(os.environ.get("HIMAE_SPILL_GROUP_MB", "512")) * 2**20  # spill a pass-2 worker loads at once
ROW_OVERHEAD = 40  # bytes of a spilled row besides its samples and key: row, shard, pos, patient, label
SPLITS = ("train", "val")
_TMP = ".tmp-"


@dataclass(frozen=True)
class SpillLayout:
    """Where a conversion's spill lives and how its work is cut; every task derives the same one."""

    root: str
    num_tasks: int
    row_bytes: int  # spill bytes per row
    wave_rows: int  # index rows per pass-1 wave (whole files; a file larger than this is its own wave)
    group_shards: int  # shards per pass-2 group
    samples_per_shard: int
    n_split: tuple[int, int]  # planned rows (train, val)

    @property
    def n_shards(self) -> tuple[int, int]:
        return tuple(-(-n // self.samples_per_shard) for n in self.n_split)

    def groups(self) -> list[tuple[str, int]]:
        return [(s, g) for s, n in zip(SPLITS, self.n_shards) for g in range(-(-n // self.group_shards))]

    def group_of(self, split: str, shard: int) -> tuple[str, int]:
        return split, shard // self.group_shards

    def shards_of(self, split: str, group: int) -> list[tuple[str, int]]:
        n = self.n_shards[SPLITS.index(split)]
        return [(split, i) for i in range(group * self.group_shards, min(n, (group + 1) * self.group_shards))]

    def task_of_group(self, split: str, group: int) -> int:
        return self.groups().index((split, group)) % self.num_tasks

    def task_groups(self, task: int) -> list[tuple[str, int]]:
        return [g for i, g in enumerate(self.groups()) if i % self.num_tasks == task]

    def marker(self, task: int, wave: int) -> Path:
        return Path(self.root) / "done" / f"t{task}-w{wave}.json"


def make_layout(spill_dir: str, plan_id: str, num_tasks: int, channels: int, length_in: int, samples_per_shard: int,
                key_chars: int, max_rows: int, n_split: tuple[int, int]) -> SpillLayout:
    row_bytes = channels * length_in * 4 + ROW_OVERHEAD + 4 * key_chars  # keys are stored as UTF-32
    n_shards = tuple(-(-n // samples_per_shard) for n in n_split)
    # at most GROUP_BYTES of spill, and at least 8 groups a task, so a task's workers share its shards
    spread = -(-sum(n_shards) // (8 * num_tasks))
    group_shards = max(1, min(GROUP_BYTES // (samples_per_shard * row_bytes), spread))
    root = os.path.join(spill_dir, f"{plan_id[:16]}-n{num_tasks}-w{max_rows}-g{group_shards}")
    return SpillLayout(root, num_tasks, row_bytes, max_rows, group_shards, samples_per_shard, n_split)


def task_waves(file_rows: dict[str, int], layout: SpillLayout, task: int) -> list[list[str]]:
    """This task's input files in waves: consecutive files of its share, <= wave_rows rows each."""
    waves, cur, n = [], [], 0
    for f in sorted(file_rows)[task::layout.num_tasks]:
        if cur and n + file_rows[f] > layout.wave_rows:
            waves.append(cur)
            cur, n = [], 0
        cur.append(f)
        n += file_rows[f]
    return waves + ([cur] if cur else [])


def missing_waves(file_rows: dict[str, int], layout: SpillLayout) -> dict[int, list[int]]:
    """task -> its waves without a marker, over all tasks."""
    out = {}
    for t in range(layout.num_tasks):
        todo = [w for w in range(len(task_waves(file_rows, layout, t))) if not layout.marker(t, w).exists()]
        if todo:
            out[t] = todo
    return out


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def check_disk(layout: SpillLayout, rows: int, flag: str = "--spill-dir") -> None:
    """A clear error before pass 1 when the spill folder cannot be made or its disk cannot hold
    `rows` more rows. Names the folder the user gave (the base above this output's own)."""
    base = os.path.dirname(os.path.dirname(layout.root))
    try:
        Path(layout.root).mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(layout.root).free
    except OSError as e:
        raise OSError(f"{flag} {base}: cannot make the spill folder there ({e.strerror or e}); expected a "
                      f"writable local folder") from e
    need = int(rows * layout.row_bytes * 1.05)
    if need > free:
        raise OSError(f"{flag} {base}: {_size(free)} free, but this conversion spills about {_size(need)} ({rows} rows "
                      f"x {layout.row_bytes} bytes: float32 at the input length); point {flag} at a disk with more room")


def clean_temp_files(layout: SpillLayout, task: int) -> int:
    """Remove this task's temp files left by a killed run (chunks, markers, downloads)."""
    n = 0
    for p in Path(layout.root).glob(f"**/{_TMP}t{task}-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _save_atomic(path: Path, write, task: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP}t{task}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # a marker must never outlive its data in a crash
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class ReadParams:
    reader: object  # fetch/open/read of one input file: the source's (H5Reader, WfdbReader)
    channels: int
    fit_length: object  # Preprocess.fit_length
    on_bad: str
    storage_options: dict | None

    def for_files(self, files: list[str]) -> "ReadParams":
        """These params for a job that reads only `files`: a reader that knows every record of a large
        source is cut to those, so what is pickled to a worker does not grow with the source."""
        if not hasattr(self.reader, "subset"):  # an HDF5 reader knows no files
            return self
        return dataclasses.replace(self, reader=self.reader.subset(files))


class _Chunks:
    """Pass-1 buffers per group, flushed to chunk files every FLUSH_BYTES of segments."""

    def __init__(self, layout: SpillLayout, task: int, wave: int) -> None:
        self.layout, self.task, self.wave, self.flushes, self.spilled = layout, task, wave, 0, 0
        self.rows: dict = defaultdict(list)  # group -> [DataFrame of good rows]
        self.segs: dict = defaultdict(list)  # group -> [segment [C, L]]
        self.counts: dict = defaultdict(dict)  # group -> {shard: {"rows", "skipped", "noted"}}
        self.bytes = 0

    def add(self, group: tuple[str, int], shard: int, rows: pd.DataFrame, segs: list[np.ndarray],
            policy: BadSamplePolicy) -> None:
        c = self.counts[group].setdefault(shard, {"rows": 0, "skipped": Counter(), "noted": Counter()})
        c["rows"] += len(rows)
        c["skipped"].update(policy.skipped)
        c["noted"].update(policy.noted)
        if segs:
            got = rows.iloc[pd.Index(rows["row"]).get_indexer([r for r, _ in segs])]  # aligned with segs
            self.rows[group].append(got[["row", "shard", "pos", "key", "patient", "label"]])
            self.segs[group].extend(s for _, s in segs)
            self.bytes += sum(s.nbytes for _, s in segs)
        if self.bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        for group in sorted(self.counts):
            split, g = group
            rows = pd.concat(self.rows[group]) if self.rows[group] else empty_rows()
            segs = np.stack(self.segs[group]) if self.segs[group] else np.zeros((0, 1, 1), np.float32)
            meta = {str(k): {"rows": v["rows"], "skipped": dict(v["skipped"]), "noted": dict(v["noted"])}
                    for k, v in self.counts[group].items()}
            arrays = {
                "row": rows["row"].to_numpy(np.int64), "shard": rows["shard"].to_numpy(np.int64), "pos": rows["pos"].to_numpy(np.int64),
                "key": np.asarray(rows["key"].to_numpy(), dtype=str), "patient": rows["patient"].to_numpy(np.int64),
                "label": rows["label"].to_numpy(np.int8), "seg": segs,
                "meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8),
            }
            path = Path(self.layout.root) / f"{split}-g{g}" / f"t{self.task}-w{self.wave}-f{self.flushes}.npz"
            _save_atomic(path, lambda fh, a=arrays: np.savez(fh, **a), self.task)
        self.flushes += 1
        self.rows.clear()
        self.segs.clear()
        self.counts.clear()
        self.bytes = 0


def spill_wave(task: int, wave: int, files: list[str], rows: pd.DataFrame, layout: SpillLayout, rp: ReadParams) -> int:
    """Pass 1 for one wave: read each file once, spill its rows by group, then mark the wave done.

    rows: the wave's planned rows (row, path, key, patient, label, split, pos, shard), split >= 0.
    Returns the number of rows spilled (usable ones).
    """
    for old in Path(layout.root).glob(f"*-g*/t{task}-w{wave}-f*.npz"):  # a killed try of this wave: its
        old.unlink(missing_ok=True)  # flushes are rewritten, and none of a different count may stay
    chunks = _Chunks(layout, task, wave)
    downloads = os.path.join(layout.root, "downloads", f"t{task}-w{wave}")  # remote files while read
    shutil.rmtree(downloads, ignore_errors=True)  # what a killed try of this wave left
    os.makedirs(downloads, exist_ok=True)
    rows = rows.sort_values(["path", "key"], kind="stable")
    by_file = list(rows.groupby("path", sort=False))
    reader = rp.reader
    try:
        _spill_files(by_file, reader, downloads, chunks, layout, rp)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)  # an error too: whole records must not stay in the spill
    chunks.flush()
    record = {"files": len(files), "rows": int(len(rows)), "spilled": chunks.spilled, "flushes": chunks.flushes}
    _save_atomic(layout.marker(task, wave), lambda fh: fh.write(json.dumps(record).encode()), task)
    return chunks.spilled


def _spill_files(by_file: list, reader, downloads: str, chunks: "_Chunks", layout: SpillLayout, rp: ReadParams) -> None:
    """Read each file of a wave once, in order, into the chunk buffers. The next file downloads (one thread, one
    file ahead) while this one is read: the wave's time is its bytes, not its bytes plus one request latency per file."""
    with ThreadPoolExecutor(1) as fetcher:
        ahead = {}

        def fetch(i: int) -> None:
            if i < len(by_file) and i not in ahead:
                ahead[i] = fetcher.submit(reader.fetch, by_file[i][0], rp.storage_options, downloads)

        try:
            for i, (path, in_file) in enumerate(by_file):
                fetch(i)
                fetch(i + 1)
                chunks.spilled += _spill_file(path, in_file, lambda i=i, path=path: reader.open(ahead.pop(i).result(),
                                                                                                 path), chunks, layout, rp)
        finally:
            for i, fut in ahead.items():  # an error or interrupt: drop the downloads made ahead
                if not fut.cancel() and fut.exception() is None and fut.result() != by_file[i][0]:
                    with contextlib.suppress(OSError):
                        os.unlink(fut.result())  # a WFDB download (a folder) goes with `downloads`


def _spill_file(path: str, in_file: pd.DataFrame, opened, chunks: "_Chunks", layout: SpillLayout,
                rp: ReadParams) -> int:
    """Read one input file's rows, shard by shard, into the chunk buffers; rows spilled. Only one
    shard's share of the file is held before it goes to the buffers (which flush by size)."""
    spilled = 0
    parts = []
    for (split, shard), grp in in_file.groupby(["split", "shard"], sort=True):
        parts.append(((SPLITS[split], int(shard)), grp, BadSamplePolicy(rp.on_bad)))
    by_part = {part: (grp, policy) for part, grp, policy in parts}
    segs: list = []
    for part, r, seg in rp.reader.read(path, parts, rp.fit_length, rp.channels, opened):
        if r is not None:
            segs.append((r, seg))
            continue
        grp, policy = by_part[part]  # the end of this part's rows
        spilled += len(segs)
        chunks.add(layout.group_of(*part), part[1], grp, segs, policy)
        segs = []
    return spilled


def load_group(layout: SpillLayout, split: str, group: int) -> dict[int, tuple[pd.DataFrame, np.ndarray, dict]]:
    """Pass 2: shard -> (usable rows (row, shard, pos, key, patient, label), segments [n, C, L], counts)
    from every finished wave's chunks of the group."""
    folder = Path(layout.root) / f"{split}-g{group}"
    rows, segs, counts = [], [], defaultdict(lambda: {"rows": 0, "skipped": Counter(), "noted": Counter()})
    for path in sorted(folder.glob("t*-w*-f*.npz")):
        task, wave = (int(x[1:]) for x in path.stem.split("-")[:2])
        if not layout.marker(task, wave).exists():
            continue  # a wave still being spilled (or killed): its chunks are not complete
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if len(z["row"]):
                    rows.append(pd.DataFrame({k: z[k] for k in ("row", "shard", "pos", "key", "patient", "label")}))
                    segs.append(z["seg"])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            layout.marker(task, wave).unlink(missing_ok=True)  # so the next run reads that wave again
            raise ValueError(f"spill chunk {path} is unreadable ({type(e).__name__}: {e}); run again: task {task} "
                             f"reads its wave {wave} again") from e
        for shard, c in meta.items():
            acc = counts[int(shard)]
            acc["rows"] += c["rows"]
            acc["skipped"].update(c["skipped"])
            acc["noted"].update(c["noted"])
    all_rows = pd.concat(rows, ignore_index=True) if rows else empty_rows()
    all_segs = np.concatenate(segs) if segs else np.zeros((0, 1, 1), np.float32)
    shard = all_rows["shard"].to_numpy()
    out = {}
    for i, c in counts.items():
        sel = np.flatnonzero(shard == i)
        out[i] = (all_rows.iloc[sel], all_segs[sel], c)
    return out


def empty_rows() -> pd.DataFrame:
    return pd.DataFrame({"row": np.zeros(0, np.int64), "shard": np.zeros(0, np.int64), "pos": np.zeros(0, np.int64),
                         "key": np.zeros(0, str), "patient": np.zeros(0, np.int64), "label": np.zeros(0, np.int8)})
