"""`himae-prep --dry-run`: what a conversion would do, without doing it.

It plans exactly as a real run does (rows, split, shards: the same code), then converts a small
sample of rows of one input file in memory and a temp folder, timing each stage, and extrapolates
bytes and time from it. Nothing is written to --out (local or remote): the plan's spill layout and
a remote index's copy go to a temp folder that is removed at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_prep.conversion_plan import check_against_existing, log, open_source, prepare
from data_prep.hdf5_sources import BadSamplePolicy
from data_prep.shard_format import MANIFEST, PARTS, PLAN, Block, write_shard_tar
from data_prep.storage import Folder, is_remote

SAMPLE_ROWS = 512  # rows converted to time the job: enough to average per-row costs, small enough to be quick
SHARD_BUILD_MAX_BYTES = 256 * 2**20  # largest shard built in memory to measure its size


@dataclass
class SampleTiming:
    """What converting `rows` sample rows of `file` cost, stage by stage (seconds), and gave."""

    file: str
    rows: int
    usable: int  # rows that would be written (not bad, not dropped as constant)
    fetch_s: float  # download (remote) and open of the file
    read_s: float  # reading and checking the rows
    spill_s: float  # writing and reading back the rows between the passes
    write_s: float  # preprocessing, tar writing and hashing
    skipped: dict
    first_bad: str | None  # the first bad row's message (what --on-bad error would stop at)
    segments: np.ndarray = dataclasses.field(repr=False)  # the usable rows preprocessed [usable, C, L_out]
    keys: np.ndarray = dataclasses.field(repr=False)  # [usable] their keys


def _sample_rows(source, file_rows: dict[str, int], n: int) -> tuple[str, pd.DataFrame]:
    """Up to n rows (row, key) of the input file with the median row count, from the first index pass
    that has them, in key order (the order a real run reads them in)."""
    files = sorted(file_rows, key=lambda f: (file_rows[f], f))
    path = files[len(files) // 2]
    got: list[pd.DataFrame] = []
    for chunk in source.chunks():
        mine = chunk[chunk["path"] == path]
        got.append(mine.head(n - sum(len(g) for g in got)))
        if sum(len(g) for g in got) >= n:
            break
    return path, pd.concat(got).sort_values("key", kind="stable")


@dataclass
class _FirstBad(BadSamplePolicy):
    """Counts bad rows like --on-bad skip, and keeps the first one's message (where an error stops)."""

    first: str | None = None

    def reject(self, reason: str, message: str) -> None:
        if self.first is None:
            self.first = message
        super().reject(reason, message)


def _tar(y: np.ndarray, keys: np.ndarray, block_size: int, dtype: str) -> bytes:
    """The shard tar of rows y [n, C, L] with their keys, as the job writes it."""
    n = len(y)
    blocks = [Block(y[s:s + block_size], keys[s:s + block_size], np.zeros(min(block_size, n - s), np.int64),
                    np.zeros(min(block_size, n - s), np.int8)) for s in range(0, n, block_size)]
    buf = io.BytesIO()
    write_shard_tar(buf, "train", 0, blocks, dtype)
    return buf.getvalue()


def shard_bytes(y: np.ndarray, keys: np.ndarray, n: int, block_size: int, dtype: str) -> int:
    """Bytes of a shard of n rows like the sample's y [k, C, L] (tiled): built in memory, exactly as the
    job writes it (its block headers and tar padding included), up to SHARD_BUILD_MAX_BYTES of rows."""
    if n <= 0 or not len(y):
        return 0
    if n * y[0].nbytes > SHARD_BUILD_MAX_BYTES:  # too big to build: scale a built one (padding is < 10 kB)
        k = max(1, SHARD_BUILD_MAX_BYTES // y[0].nbytes)
        return int(shard_bytes(y, keys, k, block_size, dtype) * n / k)
    take = np.resize(np.arange(len(y)), n)
    return len(_tar(y[take], keys[take], block_size, dtype))


def time_sample(source, prep: dict, p, tmp: str, n: int = SAMPLE_ROWS) -> SampleTiming:
    """Convert up to n rows of one input file as the job would, timing each stage. Bad rows are
    counted (and the first one kept), never raised: the dry run reports them."""
    pre, channels = prep["preprocess"], prep["channels"]
    reader = source.reader()
    path, rows = _sample_rows(source, prep["file_rows"], n)
    policy = _FirstBad("skip")
    t0 = time.perf_counter()
    try:
        local = reader.fetch(path, p.storage_options, tmp)
    except FileNotFoundError:
        local = path  # open says it is missing; the rows are counted as missing_file below
    t1 = time.perf_counter()
    segs, keep = [], []
    for _, r, seg in reader.read(path, [(0, rows, policy)], pre.fit_length, channels,
                                 lambda: reader.open(local, path)):
        if r is not None:
            segs.append(seg)
            keep.append(r)
    t2 = time.perf_counter()
    x = np.stack(segs) if segs else np.zeros((0, channels, pre.length or 1), np.float32)
    spill = os.path.join(tmp, "sample-spill.npz")
    np.savez(spill, seg=x, key=np.asarray(rows.set_index("row").loc[keep, "key"].to_numpy(), dtype=str))
    with np.load(spill) as z:
        x, sample_keys = z["seg"], z["key"]
    t3 = time.perf_counter()
    if len(x):
        y, kept = pre.apply(x)
        sample_keys = sample_keys[kept]
        if (~kept).any():
            policy.skipped["constant"] = policy.skipped.get("constant", 0) + int((~kept).sum())
        data = _tar(y, sample_keys, p.block_size, p.dtype)
        hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()  # noqa: B018 (the job hashes each shard)
    else:
        y = x
    t4 = time.perf_counter()
    return SampleTiming(path, len(rows), len(y), t1 - t0, t2 - t1, t3 - t2, t4 - t3, dict(policy.skipped),
                        policy.first, y, sample_keys)


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _human_time(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _existing(p, record: dict, n_shards: int) -> str:
    """What --out holds, read only: nothing, this conversion (how far), or another one."""
    out = Folder(p.out, p.storage_options)
    if not any(out.exists(name) for name in (PLAN, MANIFEST)):
        return "empty: every shard would be built"
    if p.overwrite:
        import json

        try:
            old = json.loads(out.read_text(PLAN if out.exists(PLAN) else MANIFEST))
        except (ValueError, UnicodeDecodeError):
            old = {}
        if old.get("plan_id") != record["plan_id"]:
            return "holds another (or an unreadable) conversion: --overwrite would replace it"
    else:
        try:
            check_against_existing(out, record, overwrite=False)
        except ValueError as e:
            return f"a real run would stop: {e}"
    if out.exists(MANIFEST):
        return "holds this conversion, finished: a real run would verify its shards and rebuild none that are intact"
    done = sum(1 for name in out.listing(PARTS) if name != PLAN)
    return f"holds this conversion, {done} of {n_shards} shard(s) finished: a real run verifies them and builds the rest"


def dry_run(index: str | None, downstream: str | None, p, wfdb: str | None = None) -> dict:
    """Plan the conversion and time a sample of it; print what a real run would do. Returns the numbers."""
    p.validate()
    p.spill_base()  # the error a real run gives for a remote --out with several tasks and no --spill-dir
    with tempfile.TemporaryDirectory(prefix="himae-prep-dry-") as tmp:
        q = dataclasses.replace(p, spill_dir=tmp)  # the plan's spill layout and a remote index's copy: here
        started = time.perf_counter()
        source = open_source(index, downstream, q, wfdb)
        prep = prepare(source, q)
        plan_s = time.perf_counter() - started  # every task plans once, as here
        record, plan, pre = prep["record"], prep["plan"], prep["preprocess"]
        sample = time_sample(source, prep, q, tmp)
        existing = _existing(p, record, len(plan.all_shards()))
    sps = plan.samples_per_shard
    usable = sample.usable / sample.rows if sample.rows else 0.0  # the sample's share of rows that are written

    def size(rows: int) -> int:
        return shard_bytes(sample.segments, sample.keys, round(rows * usable), p.block_size, p.dtype)

    full_shard = size(sps)
    shards, total_bytes = {}, 0
    for split in ("train", "val"):
        n = plan.n_split.get(split, 0)
        full, last = divmod(n, sps)
        b = full * full_shard + (size(last) if last else 0)
        shards[split] = {"rows": n, "shards": plan.n_shards(split), "bytes": b}
        total_bytes += b
    n_files = len(prep["file_rows"])
    per_row_s = (sample.read_s + sample.spill_s + sample.write_s) / max(1, sample.rows)
    work_s = n_files * sample.fetch_s + record["n_rows"] * per_row_s
    wall_s = plan_s + work_s / (p.workers * p.num_tasks)
    spill_bytes = record["n_rows"] * prep["layout"].row_bytes
    sizing = f"--samples-per-shard {sps}" if p.samples_per_shard else f"{sps} a shard from --shard-mb {p.shard_mb:g}"
    log(f"dry run: nothing is written to {p.out}")
    print(f"  input:    {source.url}: {record['n_rows']} rows in {n_files} file(s)"
          + (f"; {len(plan.duplicates)} duplicate key(s), each a bad row" if plan.duplicates else ""))
    print(f"  segments: [{prep['channels']}, {pre.length}] ({record['length_inferred_from']}) -> "
          f"[{prep['channels']}, {pre.output_length()}] {p.dtype} ({pre.describe()})")
    print(f"  shards:   train {shards['train']['rows']} rows in {shards['train']['shards']} shard(s), "
          f"val {shards['val']['rows']} rows in {shards['val']['shards']} shard(s) ({sizing}; split by "
          f"{plan.split_by})")
    print(f"  bytes:    ~{_human_bytes(total_bytes)} of shards (~{_human_bytes(full_shard)} a full shard); "
          f"~{_human_bytes(spill_bytes)} of spill between the passes")
    print(f"  time:     ~{_human_time(wall_s)} with {p.workers} worker(s) x {p.num_tasks} task(s) "
          f"(planning {plan_s:.1f} s, then ~{_human_time(work_s)} of work), from {sample.rows} timed row(s) of "
          f"{sample.file}: fetch+open {sample.fetch_s:.2f} s, read {sample.read_s:.2f} s, spill {sample.spill_s:.2f} s, "
          f"write {sample.write_s:.2f} s" + ("; the upload to storage is not included" if is_remote(p.out) else ""))
    bad = sum(sample.skipped.values())
    print(f"  sample:   {bad} of {sample.rows} row(s) bad" + (f" ({sample.skipped})" if bad else "")
          + (f"; with --on-bad error a real run stops at: {sample.first_bad}"
             if bad and p.on_bad == "error" and sample.first_bad else ""))
    print(f"  --out:    {existing}")
    timing = {k: v for k, v in dataclasses.asdict(sample).items() if k not in ("segments", "keys")}
    return {"n_rows": record["n_rows"], "shards": shards, "bytes": total_bytes, "seconds": wall_s, "plan_seconds": plan_s,
            "work_seconds": work_s, "sample": timing, "samples_per_shard": sps}
