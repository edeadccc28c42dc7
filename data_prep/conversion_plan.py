"""The conversion's plan: its options, its row source and what every task derives from both.

`himae-prep` (convert.py) and its dry run (dry_run.py) both stand on this module; neither imports
the other's internals. The plan is a function of the source and the options only: every task,
on any machine, derives the same one (and so the same shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.external_shuffle import make_layout
from data_prep.hdf5_sources import BadSamplePolicy, segment_shape, why_unreadable
from data_prep.index_plan import DownstreamSource, IndexSource, find_duplicate_rows, make_plan, scan
from data_prep.preprocess import Preprocess
from data_prep.shard_format import DTYPES, FORMAT, MANIFEST, PLAN
from data_prep.storage import Folder, file_fingerprints, is_remote, out_problem, redact_secrets
from data_prep.wfdb_sources import WindowSpec

@dataclass(frozen=True)
class ConvertParams:
    out: str
    samples_per_shard: int | None = None  # None: as many as fit in shard_mb
    block_size: int = 256
    dtype: str = "float16"
    length: int | None = None
    length_policy: str = "strict"
    normalize: str = "minmax"
    source_rate: float | None = None
    target_rate: float | None = None
    constant: str = "drop"
    val_fraction: float = 0.05
    seed: int = 0
    on_bad: str = "error"
    workers: int = 1
    num_tasks: int = 1
    task_index: int = 0
    overwrite: bool = False
    max_rows: int = 2_000_000  # index rows held in memory at once (one wave of input files per worker)
    storage_options: dict | None = None
    signal_key: str = "ppg"  # downstream only
    spill_dir: str | None = None  # pass-1 spill (external_shuffle); default <out>/.spill, or the temp folder
    shard_mb: float = 32.0  # target shard size when samples_per_shard is not given
    channel: str | None = None  # WFDB only: signal names in order of preference, comma-separated
    window_s: float = 10.0  # WFDB only: window length in seconds
    stride_s: float | None = None  # WFDB only: seconds between window starts (None: window_s)
    subject_map: str | None = None  # WFDB only: CSV record,patient_id

    def spill_base(self) -> str:
        """The folder that holds this conversion's spill and its copy of a remote index."""
        if self.spill_dir:
            return self.spill_dir
        if not is_remote(self.out):
            return os.path.join(self.out, ".spill")
        if self.num_tasks > 1:
            raise ValueError(f"--out {self.out} is remote and --num-tasks={self.num_tasks}: pass --spill-dir, a "
                             f"folder on a filesystem every task can read (the tasks exchange rows through it)")
        return os.path.join(tempfile.gettempdir(), "himae-spill")

    def spill_home(self) -> str:
        """This output's own folder under the spill base (its layouts and its index copy): two
        conversions sharing a base never read or remove each other's spill."""
        return os.path.join(self.spill_base(), "out-" + hashlib.sha256(self.out.rstrip("/").encode()).hexdigest()[:12])

    def validate(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: expected {want}")

        for name in ("samples_per_shard", "block_size", "workers", "num_tasks", "max_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not 0 < self.shard_mb <= 1e6:
            bad("shard_mb", "a size in MB, > 0 and <= 1e6")
        if self.samples_per_shard is not None and self.samples_per_shard > 2**31:
            bad("samples_per_shard", "an integer <= 2**31")
        if not 0 <= self.task_index < self.num_tasks:
            bad("task_index", f"an integer in [0, {self.num_tasks}) (--num-tasks={self.num_tasks})")
        if not 0.0 <= self.val_fraction < 1.0:
            bad("val_fraction", "a value in [0, 1)")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {', '.join(DTYPES)}")
        if self.on_bad not in ("error", "skip"):
            bad("on_bad", "error or skip")
        if not is_remote(self.out) and (problem := out_problem(Path(self.out.removeprefix("file://")))):
            raise ValueError(problem)

    def window_spec(self) -> WindowSpec:
        """WFDB only: the channel and windows the flags ask for."""
        return WindowSpec.from_flags(self.channel, self.window_s, self.stride_s)

    def byte_options(self, kind: str, samples_per_shard: int) -> dict:
        """The options that decide the shards' bytes (not workers, tasks or memory); samples_per_shard
        is the one in effect (given, or made from --shard-mb)."""
        keep = ("block_size", "dtype", "length", "length_policy", "normalize", "source_rate",
                "target_rate", "constant", "val_fraction", "seed")  # not on_bad: a finished shard is the same either way
        d = {"samples_per_shard": samples_per_shard, **{k: getattr(self, k) for k in keep}}
        if kind == "downstream":
            d["signal_key"] = self.signal_key
        if self.channel is not None:
            spec = self.window_spec()
            d.update(channel=self.channel, window_s=spec.window_s, stride_s=spec.stride_s, subject_map=self.subject_map)
        return d


def shard_samples(shard_mb: float, channels: int, length: int, dtype: str) -> int:
    """Segments per shard for a target shard size: object storage wants tens of MB per GET, so the
    ~30 ms to a first byte is small beside the transfer (a 2 MB shard spends half its time waiting)."""
    return max(1, int(shard_mb * 2**20) // (channels * length * np.dtype(dtype).itemsize))


def log(msg: str) -> None:
    print(redact_secrets(f"[himae-prep] {msg}"), flush=True)


def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def open_source(index: str | None, downstream: str | None, p: ConvertParams, wfdb: str | None = None):
    """The row source: a pretraining index, a labelled HDF5 or a folder of WFDB records."""
    if sum(x is not None for x in (index, downstream, wfdb)) != 1:
        raise ValueError("give exactly one of --index (pretraining CSV), --downstream (labelled HDF5) or --wfdb "
                         "(WFDB records)")
    chunk = min(p.max_rows, 1_000_000)
    if wfdb is not None:
        from data_prep.wfdb_sources import WfdbSource, read_subject_map

        spec = p.window_spec()
        smap = read_subject_map(p.subject_map) if p.subject_map else None
        source = WfdbSource(wfdb, spec, p.storage_options, chunk, cache_dir=p.spill_home(), subject_map=smap,
                            on_bad=p.on_bad)
        if source.unmatched_subjects:
            log(f"--subject-map {p.subject_map}: {len(source.unmatched_subjects)} row(s) name no record of "
                f"{source.url} (e.g. {', '.join(source.unmatched_subjects[:3])})")
        for name, why in list(source.skipped_records.items())[:20]:
            log(f"skipped record {name}: {why}")
        if len(source.skipped_records) > 20:
            log(f"... and {len(source.skipped_records) - 20} more skipped record(s) (counted in the manifest; the first "
                f"100 named in plan.json)")
        return source
    if index:
        return IndexSource(index, p.storage_options, chunk, cache_dir=p.spill_home())
    return DownstreamSource(downstream, p.signal_key, chunk)


def _infer_shape(source, stats, p: ConvertParams) -> tuple[int, int, str]:
    """(channels, input length, how) from a seeded sample of rows: the shape most rows have."""
    if getattr(source, "shape", None):  # WFDB: every row is one window of one channel
        if p.length is not None and p.length != source.shape[1]:
            raise ValueError(f"--length {p.length}: WFDB windows are --window-s x the records' rate = {source.shape[1]} "
                             f"samples; drop --length")
        return (*source.shape, f"{source.spec.window_s:g}-s windows at {source.rate:g} Hz")
    keys = tuple(k.strip() for k in p.signal_key.split("+"))
    sample = stats.sample
    if len(sample) and sample["path"].map(is_remote).any():
        # remote: 8 sampled rows of the file with most of them, read as metadata; the next file if
        # that one is missing or broken (each file costs a few small GETs, not a download)
        shapes, tried = Counter(), 0
        for path in sample["path"].value_counts(sort=True).index[:8]:
            rows = sample[sample["path"] == path].head(8)
            tried += len(rows)
            shapes = segment_shape(rows, source.kind, keys, p.storage_options)
            if shapes:
                break
    else:
        shapes, tried = segment_shape(sample, source.kind, keys, p.storage_options), len(sample)
    if not shapes:
        first = sample[sample["path"] == sample["path"].value_counts(sort=True).index[0]].head(8)
        raise ValueError(f"{source.url}: none of {tried} sampled rows is readable: "
                         f"{why_unreadable(first, source.kind, keys, p.storage_options)}")
    if p.length is not None:
        channels = Counter({c: n for (c, _), n in shapes.items()}).most_common(1)[0][0]
        return channels, p.length, "--length"
    (channels, length), n = shapes.most_common(1)[0]
    return channels, length, f"most common of {sum(shapes.values())} sampled rows ({n} have it)"


def prepare(source, p: ConvertParams) -> dict:
    """The plan every task derives identically from the source and the options."""
    stats = scan(source, p.seed)
    dup_policy = BadSamplePolicy(p.on_bad)
    dups = find_duplicate_rows(source, stats.n_rows, p.max_rows, dup_policy)
    channels, length_in, how = _infer_shape(source, stats, p)
    source_rate = p.source_rate
    if getattr(source, "rate", None):  # WFDB: the records' own rate
        if p.source_rate is not None and p.source_rate != source.rate:
            raise ValueError(f"--source-rate {p.source_rate:g}: the records of {source.url} are at {source.rate:g} Hz; "
                             f"drop --source-rate")
        source_rate = source.rate
    pre = Preprocess(p.normalize, source_rate, p.target_rate, length_in, p.length_policy, p.constant)
    try:
        pre.output_length()  # a clear error now if the rates do not divide the length
    except ValueError as e:
        if getattr(source, "rate", None):
            raise ValueError(f"record {source.records[0].name} (and every record at {source.rate:g} Hz): "
                             f"{p.window_s:g}-s windows: {e}") from None
        raise
    sps = p.samples_per_shard or shard_samples(p.shard_mb, channels, pre.output_length(), p.dtype)
    plan = make_plan(source, stats, sps, p.val_fraction, p.seed, dups)
    # a WFDB source's fingerprint covers its files itself (its rows' paths are records, not files)
    files = [] if hasattr(source, "records") else stats.files
    fingerprint = {"index": source.fingerprint(), "files": file_fingerprints(files, p.storage_options)}
    record = {
        "format": FORMAT, "kind": source.kind, "options": p.byte_options(source.kind, sps),
        "source": {"url": redact_secrets(source.url), "fingerprint": _sha(fingerprint), "n_files": len(stats.files)},
        **({"wfdb": source.describe()} if hasattr(source, "describe") else {}),  # records read and skipped
        "channels": channels, "length_inferred_from": how, "preprocess": pre.to_dict(),
        "n_rows": stats.n_rows, "split": plan.to_dict(),
        "n_shards": {"train": plan.n_shards("train"), "val": plan.n_shards("val")},
        "skipped_at_plan": dict(dup_policy.skipped + getattr(source, "skipped", Counter())),
    }
    record["plan_id"] = _sha(record)
    key_chars = int(stats.sample["key"].str.len().max()) if len(stats.sample) else 16
    layout = make_layout(p.spill_home(), record["plan_id"], p.num_tasks, channels, length_in, sps, key_chars,
                         p.max_rows, (plan.n_split["train"], plan.n_split["val"]))
    return {"record": record, "plan": plan, "preprocess": pre, "channels": channels, "layout": layout,
            "file_rows": stats.file_rows}


def check_against_existing(out: Folder, record: dict, overwrite: bool) -> None:
    """Refuse to mix shards of two different conversions in one folder, unless --overwrite."""
    old, name = None, None
    for name in (PLAN, MANIFEST):
        if out.exists(name):
            try:
                old = json.loads(out.read_text(name))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                old = {"unreadable": f"{out.child_url(name)} is not readable JSON ({e})"}
            break
    if old is None or old.get("plan_id") == record["plan_id"]:
        return
    if "unreadable" in old and not overwrite:
        raise ValueError(f"{old['unreadable']}; pass --overwrite to rebuild the folder, or choose another --out")
    what = []
    if old.get("format") != record["format"]:
        what.append(f"format {old.get('format')!r} -> {record['format']!r}")
    for k in sorted(set(old.get("options", {})) | set(record["options"])):
        if old.get("options", {}).get(k) != record["options"].get(k):
            what.append(f"{k} {old.get('options', {}).get(k)!r} -> {record['options'].get(k)!r}")
    if old.get("source") != record["source"]:
        what.append("the source changed (index or HDF5 files: size/mtime/ETag)")
    if old.get("length_inferred_from") != record["length_inferred_from"]:
        what.append(f"segment length from {old.get('length_inferred_from')!r} -> {record['length_inferred_from']!r}")
    if not overwrite:
        again = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(old.get("options", {}).items())
                         if v is not None and v != record["options"].get(k))
        raise ValueError(
            f"{out.url} holds shards from another conversion ({'; '.join(what) or 'different plan'}); "
            + (f"to go on with it, pass {again}; " if again else "")
            + "pass --overwrite to replace them, or choose another --out"
        )
    log(f"--overwrite: replacing the conversion in {out.url} ({'; '.join(what) or 'different plan'})")
    out.remove(MANIFEST)
