"""Streams format-v2 shards (data_prep/shard_format.py) into training batches, in an order that
does not depend on the world size or the DataLoader worker count.

The stream is a sequence of *global* batches of `global_batch` samples. Its rows come from a fixed
number of canonical readers (`readers`, fixed for a run like the seed): reader c of source s walks
one deterministic, endless sequence of that source's shards (the epochs' seeded permutations laid
end to end, items c, c + R, c + 2R... of R readers), loads its share of `shuffle_shards` shards at once
(`shuffle_widths`: by its weight, max(shuffle_shards, number of sources) shards in all; recorded in
the state),
permutes their segments with a seed of its own and hands out its next rows. Each global batch
holds every source's exact share (`source_counts`, largest remainder of the weights), striped over
the readers (`batch_layout`), in row order reader-major then source. Rank r of W takes rows
[r G/W, (r + 1) G/W) and cuts them into micro-batches; its DataLoader workers each build a
contiguous run of the rank's (source, reader) parts. A reader whose part straddles two ranks is
read by both (each keeps its own rows); its reads are counted on the first. So the samples of
global batch b, and their order, are a pure function of (seed, readers, shuffle_shards,
global_batch, the sources and their weights): the world size, the micro-batch and the worker count
may change between runs and on resume. The stream position is the number of global batches
consumed (`LoaderState.batches`); a resumed reader skips straight there using the manifest's shard
sizes, without reading the skipped data. Each source runs its own epochs: a small source repeats,
a large one need not finish.

Faults: shards listed in the manifest but missing or of the wrong size are found at start
(`check_shards`, one listing per split); a shard that fails mid-run (after retries; with
`verify`, also a sha256 mismatch) is skipped with a warning, or is fatal with `strict=True`.
A skipped read is on the record, not only on stderr: every batch carries, for the readers this
rank counts, the reads made (a pure function of position), the positions of the failed reads and
the segments they held, so the trainer can report the loss and abort past a failure rate
(`StreamProgress`). The saved `LoaderState.failed` keeps each reader's failed positions: a failed
read delivered nothing, so the skip-ahead counts it as 0 samples, and a resumed reader does not
read a recorded-failed position again (even if the shard has been repaired since), so the resumed
stream is exactly the uninterrupted one. When a whole epoch's worth of reads fails in a row, the
reader stops with `DataLostError` instead of spinning.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from data_prep.shard_format import MANIFEST, Manifest, ShardFormatError, ShardInfo, parse_manifest, read_shard_blocks
from data_prep.storage import Folder, StorageError, is_remote, redact_secrets


def load_manifest(data: str, storage_options: dict | None = None) -> Manifest:
    """Read manifest.json given its path/URL or the folder holding it."""
    url = data if data.endswith(".json") else data.rstrip("/") + "/" + MANIFEST
    folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
    f = Folder(folder, storage_options)
    if not f.exists(name):
        raise FileNotFoundError(f"{url} does not exist; convert the data with himae-prep first")
    return parse_manifest(f.read_text(name), url)  # a malformed one: a ValueError naming it and the key


def load_sources(urls: list[str], storage_options: dict | None, in_chans: int) -> list[Manifest]:
    """Every source's manifest, each refused with one line when its segments have another channel count."""
    manifests = [load_manifest(url, storage_options) for url in urls]
    for m in manifests:
        if m.channels != in_chans:
            raise ValueError(f"--in-chans={in_chans} but {redact_secrets(m.url)} holds {m.channels}-channel segments")
    return manifests


def check_shards(manifest: Manifest, split: str = "train", storage_options: dict | None = None) -> list[str]:
    """Shards of `split` that are missing or not the size the manifest records (one listing)."""
    listed = Folder(manifest.base, storage_options).listing(split)
    problems = []
    for s in manifest.shards(split):
        if s.name not in listed:
            problems.append(f"{s.name} (missing)")
        elif int(listed[s.name].get("size") or 0) != s.bytes:
            problems.append(f"{s.name} ({listed[s.name].get('size')} bytes, expected {s.bytes})")
    return problems


def source_counts(weights: list[float], global_batch: int) -> list[int]:
    """Samples of each source in every global batch: weight x global batch, rounded by largest
    remainder (ties to the earlier source), so the counts sum to the global batch exactly."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"source weights {list(weights)}: expected one positive number per source")
    w = w / w.max()  # in (0, 1]: the sum cannot overflow
    raw = w / w.sum() * global_batch
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[:global_batch - int(counts.sum())]:
        counts[i] += 1
    return [int(n) for n in counts]


def batch_layout(counts: list[int], readers: int) -> list[tuple[int, int, int]]:
    """(source, reader, rows) parts of a global batch in row order: reader-major, then source.

    Source s holds slots [sum(counts[:s]), sum(counts[:s + 1])) of the batch; slot t goes to reader
    t % readers, so every reader carries about counts[s] / readers of each source and the readers'
    totals differ by at most one row.
    """
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    parts = []
    for c in range(readers):
        for s in range(len(counts)):
            lo, hi = int(starts[s]), int(starts[s + 1])
            n = (hi - 1 - c) // readers - (lo - 1 - c) // readers  # slots t in [lo, hi) with t % readers == c
            if n:
                parts.append((s, c, n))
    return parts


def shuffle_widths(shuffle_shards: int, counts: list[int]) -> list[int]:
    """Each source's shuffle width: its share of `shuffle_shards` by its samples per batch (largest
    remainder, at least one shard each), so the widths sum to max(shuffle_shards, number of sources):
    a reader's memory stays that of one source unless there are more sources than shards (a bigger
    window also costs throughput: its gathers miss the caches more). One source: `shuffle_shards`.
    Recorded in LoaderState.widths: a resume uses the saved widths, whatever this function becomes."""
    total = max(shuffle_shards, len(counts))
    w = source_counts([float(n) for n in counts], total)
    for i in [i for i, x in enumerate(w) if x == 0]:  # a tiny source still reads whole shards: take one
        w[int(np.argmax(w))] -= 1                        # from the widest (sum >= sources, so one is > 1)
        w[i] = 1
    return w


@dataclass(frozen=True)
class Part:
    """One (source, reader) stream as a rank sees it: `rows` per global batch, of which it keeps [lo, hi);
    `counted`: this rank holds the part's first row, so its reads count here (each read counts once)."""

    source: int
    reader: int
    rows: int
    lo: int
    hi: int
    counted: bool

    @property
    def key(self) -> str:
        return f"{self.source}:{self.reader}"


def rank_parts(counts: list[int], readers: int, rank: int, world_size: int) -> list[Part]:
    """The parts rank `rank` reads, in row order: those overlapping its rows [r G/W, (r + 1) G/W)."""
    G = sum(counts)
    if G % world_size:
        raise ValueError(f"a global batch of {G} samples does not split evenly over {world_size} ranks")
    mine_lo, mine_hi = rank * G // world_size, (rank + 1) * G // world_size
    parts, row = [], 0
    for s, c, n in batch_layout(counts, readers):
        lo, hi = max(row, mine_lo), min(row + n, mine_hi)
        if lo < hi:
            parts.append(Part(s, c, n, lo - row, hi - row, counted=row >= mine_lo))
        row += n
    return parts


class OlderStreamError(ValueError):
    """A saved data position that an older himae-dist wrote and this one cannot continue exactly, whatever the
    options: only --allow-schedule-change (a new data stream from that step) goes on."""


@dataclass(frozen=True)
class LoaderState:
    """Where the stream stands (global batches consumed) and what must match to continue it exactly.

    Nothing here depends on the world size, the micro-batch or the worker count. `sources` holds,
    per source, [shard count, samples per global batch, preprocessing record, content fingerprint];
    `widths`, each source's shuffle width; `failed`, per
    reader key "source:reader", the read positions k (group * width + slot) that failed:
    the skip-ahead needs what was actually read, not the manifest's sizes. Plain ints, strs, lists
    and dicts, so it survives torch.load(weights_only=True).
    """

    batches: int
    seed: int
    readers: int
    global_batch: int
    shuffle_shards: int
    sources: list
    split: str = "train"
    failed: dict = field(default_factory=dict, hash=False)
    widths: list | None = None  # None only in a state saved before widths were recorded (see from_dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def stream(self) -> dict:
        """What identifies the stream (all but the position and the failed reads)."""
        return {k: v for k, v in asdict(self).items() if k not in ("batches", "failed")}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        """A saved state (keys through JSON too); one saved before global order (per-rank streams) is refused."""
        if not isinstance(d, dict) or "readers" not in d:
            raise OlderStreamError("the saved data position is a per-rank stream of an older himae-dist, which the "
                             "world-size-independent order cannot continue (pass --allow-schedule-change for a new "
                             "data stream from this step)")
        d = dict(d)
        d["failed"] = {str(r): sorted(int(k) for k in ks) for r, ks in (d.get("failed") or {}).items()}
        d["sources"] = [list(x) for x in d["sources"]]
        if d.get("widths") is None and len(d["sources"]) == 1:  # saved before widths were recorded: one
            d["widths"] = [max(1, int(d["shuffle_shards"]))]    # source always read shuffle_shards at once
        elif d.get("widths") is not None:
            d["widths"] = [int(w) for w in d["widths"]]
        return cls(**d)

    @staticmethod
    def merge_failed(states: list[dict]) -> dict:
        """The failed reads of every rank's saved state (a part two ranks read is recorded by both)."""
        out: dict[str, set] = {}
        for st in states:
            for r, ks in (st.get("failed") or {}).items():
                out.setdefault(str(r), set()).update(int(k) for k in ks)
        return {r: sorted(ks) for r, ks in sorted(out.items())}


class DataLostError(ValueError):
    """Every shard read in a whole epoch's worth failed: there is nothing left to train on.

    One str argument, so it pickles and a DataLoader worker re-raises it as this type.
    """


def reader_shards(n_shards: int, reader: int, n_readers: int, seed: int, start: int = 0, source: int = 0):
    """Endless shard indices for one reader of a source: epoch permutations end to end, every n_readers-th item."""
    k = reader + start * n_readers
    cache: dict[int, np.ndarray] = {}
    while True:
        epoch, i = divmod(k, n_shards)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch, source] if source else [seed, epoch]).permutation(n_shards)
        yield int(cache[epoch][i])
        k += n_readers


def _groups(n_shards: int, reader: int, n_readers: int, seed: int, shuffle_shards: int,
            source: int = 0) -> Iterator[tuple[int, list[int]]]:
    """(g, shard indices) of a reader's groups: slot j of group g is read position g * shuffle_shards + j."""
    order = reader_shards(n_shards, reader, n_readers, seed, source=source)
    g = 0
    while True:
        yield g, [next(order) for _ in range(shuffle_shards)]
        g += 1


class _Losses:
    """One reader's failed reads in one pass over its stream."""

    def __init__(self):
        self.failed: list[int] = []  # read positions, ascending (reads happen in position order)
        self.lost = 0  # the manifest's n_samples over them
        self.in_a_row = 0  # failed reads since the last good one (recorded ones are not reads)


class _ReadAhead:
    """Shard reads fetched by threads ahead of their use, in the order they will be used.

    `plan` yields (position k, shard index) in read order; at most `max_reads` fetches and
    `max_bytes` of shards (by the manifest, at least one shard) are in flight or waiting. An error
    of a fetch is raised by `take` for that read, so the stream handles it as it would inline.
    The data and its order are the inline reads' exactly: only their timing changes.
    """

    def __init__(self, plan, fetch, size, max_bytes: int, max_reads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.plan, self.fetch, self.size = plan, fetch, size
        self.max_bytes, self.max_reads = max_bytes, max_reads
        self.pool = ThreadPoolExecutor(max_reads, thread_name_prefix="himae-read-ahead")
        self.queue: list = []  # [(shard index, bytes, future)], in read order
        self.held = 0
        self._fill()

    def _fill(self) -> None:
        while len(self.queue) < self.max_reads:
            nxt = next(self.plan, None)
            if nxt is None:
                return
            _, idx = nxt
            n = self.size(idx)
            self.queue.append((idx, n, self.pool.submit(self.fetch, idx)))
            self.held += n
            if self.held >= self.max_bytes:
                return

    def take(self):
        """The next read's bytes (raises what its fetch raised); tops the reads ahead up again."""
        idx, n, fut = self.queue.pop(0)
        self.held -= n
        try:
            return fut.result()
        finally:
            self._fill()

    def close(self) -> None:
        for _, _, fut in self.queue:
            fut.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


class _PartReader:
    """One (source, reader) stream: its next `part.rows` samples for each global batch from `start` on.

    Yields (((signal, key, shard global index) arrays, row indices into them or None for all rows),
    (reads, failed positions, lost segments)): the gather is left to the item, so a batch is one copy.
    """

    def __init__(self, ds: "ShardStream", part: Part, start: int, prefetch_reads: int):
        self.ds, self.part, self.start = ds, part, start
        self.shards = ds.sources[part.source]
        self.offset = ds.offsets[part.source]  # this source's first index in the trainer's list of all shards
        self.recorded = ds.failed.get(part.key, frozenset())
        self.S = ds.widths[part.source]  # this source's shuffle width
        self.prefetch_reads = prefetch_reads

    def _groups(self):
        return _groups(len(self.shards), self.part.reader, self.ds.readers, self.ds.seed, self.S, self.part.source)

    def _fetch(self, idx: int):
        """The shard's bytes: remotely one GET of the manifest's size, locally a read-only mapping."""
        s = self.shards[idx]
        if is_remote(s.url):
            folder, name = s.url.rsplit("/", 1)
            return Folder(folder, self.ds.storage_options).read_bytes(name, s.bytes)
        return _read_local(s.url)

    def _read(self, idx: int, losses: _Losses, fetched=None) -> list | None:
        """The shard's blocks, or None when it cannot be read (warned; raised with `strict`).
        `fetched`: a callable giving the bytes fetched ahead (raising what the fetch raised)."""
        s = self.shards[idx]
        try:
            data = fetched() if fetched is not None else self._fetch(idx)
            if self.ds.verify and hashlib.sha256(data).hexdigest() != s.sha256:
                raise ShardFormatError(f"{s.url}: sha256 differs from the manifest's (the shard was altered)")
            blocks = list(read_shard_blocks(data, s.url))
        except (OSError, ValueError, StorageError) as e:  # ShardFormatError is a ValueError
            if self.ds.strict:
                raise
            losses.in_a_row += 1
            print(redact_secrets(f"[himae-data] warning: skipping shard {s.url}: {e}"), file=sys.stderr, flush=True)
            if losses.in_a_row >= len(self.shards):  # a whole epoch's worth: nothing left to train on
                base = self.ds.bases[self.part.source]
                where = f" in {base}" if base else ""
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"{s.url}: ")
                last = f"{s.url}: {why}"
                raise DataLostError(f"the last {losses.in_a_row} shard reads all failed (the split has "
                                    f"{len(self.shards)} shards{where}); last: {last}; re-run himae-prep "
                                    f"to rebuild the shards") from e
            return None
        losses.in_a_row = 0
        return blocks

    def _group_samples(self, group: list[int], g: int, losses: _Losses, ahead: "_ReadAhead | None"):
        """The group's segments, concatenated ([n, C, L] etc.), and a seeded permutation of them.

        A position in `recorded` failed in the run resumed from: it is not read again, so the
        stream stays that run's even if the shard has been repaired since.
        """
        sig, key, shard = [], [], []
        S = self.S
        for j, idx in enumerate(group):
            k = g * S + j
            blocks = None if k in self.recorded else self._read(idx, losses, ahead.take if ahead is not None else None)
            if blocks is None:
                losses.failed.append(k)
                losses.lost += self.shards[idx].n_samples
                continue
            for b in blocks:
                sig.append(b.signal)
                key.append(b.key)
                shard.append(np.full(len(b), self.offset + idx, np.int32))
        if not sig:
            return None
        pool = (np.concatenate(sig), np.concatenate(key), np.concatenate(shard))  # one copy out of the shard bytes
        p = self.part
        seed = [self.ds.seed, 1, p.reader, g, p.source] if p.source else [self.ds.seed, 1, p.reader, g]
        return pool, np.random.default_rng(seed).permutation(len(pool[0]))

    def __iter__(self):
        S, B, recorded, losses = self.S, self.part.rows, self.recorded, _Losses()
        sizes = [s.n_samples for s in self.shards]
        skip = self.start * B  # samples this reader already delivered
        groups = self._groups()
        g, group = next(groups)
        # Jump whole groups without reading them; a read that failed in the saved run delivered nothing.
        while skip >= (n := sum(sizes[i] for j, i in enumerate(group) if g * S + j not in recorded)):
            skip -= n
            for j, i in enumerate(group):
                if g * S + j in recorded:
                    losses.failed.append(g * S + j)
                    losses.lost += sizes[i]
            g, group = next(groups)
        ahead = None
        if self.prefetch_reads and any(is_remote(s.url) for s in self.shards):  # object storage: reads ahead
            upcoming = ((g2 * S + j, i) for g2, grp in self._groups() if g2 >= g for j, i in enumerate(grp))
            ahead = _ReadAhead(((k, i) for k, i in upcoming if k not in recorded), self._fetch,
                               lambda i: self.shards[i].bytes, self.ds.prefetch_bytes, self.prefetch_reads)
        try:
            yield from self._parts(groups, g, group, losses, ahead, skip, B, S)
        finally:
            if ahead is not None:
                ahead.close()

    def _parts(self, groups, g, group, losses, ahead, skip, B, S):
        """This reader's parts from group g on (see __iter__)."""
        carry = None  # (signal, key, shard) rows left over from the previous group, in stream order
        while True:
            got = self._group_samples(group, g, losses, ahead)
            info = ((g + 1) * S, tuple(sorted(losses.failed)), losses.lost)  # small: it goes through the worker pipe
            if got is not None:
                pool, order = got
                order, skip, pos = order[skip:], 0, 0
                if carry is not None:  # the stream goes on: the carried rows, then this group's permuted rows
                    pos = min(B - len(carry[0]), len(order))
                    carry = tuple(np.concatenate([c, a[order[:pos]]]) for a, c in zip(pool, carry))
                    if len(carry[0]) == B:
                        yield (carry, None), info
                        carry = None
                if carry is None:
                    n_full = pos + (len(order) - pos) // B * B
                    for s in range(pos, n_full, B):
                        yield (pool, order[s:s + B]), info  # rows pool[idx], gathered once where the item is built
                    pos = n_full
                    if pos < len(order):
                        carry = tuple(a[order[pos:]] for a in pool)
            g, group = next(groups)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless items, one per global batch and worker: the worker's run of this rank's parts, in row order.

    Each is {signal [n, C, L], key [n], shard [n] (index into all sources' shards, in order), source [n],
    readers: {reader key: (reads, failed positions, lost segments, counted here)} of the parts it read}.
    `sources`: each source's shard list; `counts`: each source's samples per global batch; `widths`: each
    source's shuffle width (LoaderState.widths). `failed` (LoaderState.failed) holds the failed read positions recorded by the run resumed from.
    """

    def __init__(self, sources: list[list[ShardInfo]], counts: list[int], widths: list[int], seed: int, readers: int,
                 rank: int = 0, world_size: int = 1, storage_options: dict | None = None,
                 strict: bool = False, start_batches: int = 0, verify: bool = False, failed: dict | None = None,
                 bases: list[str] | None = None, sample_shape: tuple = (), dtype: str = "float32",
                 prefetch_mb: int = 256, prefetch_reads: int = 8):
        for i, sh in enumerate(sources):
            if not sh:
                where = f" {redact_secrets(bases[i])}" if bases else (f" of source {i}" if len(sources) > 1 else "")
                raise ValueError(f"no shards to read: the manifest{where} lists none for this split")
        self.sources, self.counts, self.seed, self.readers = sources, counts, seed, readers
        self.offsets = list(np.cumsum([0] + [len(s) for s in sources])[:-1].astype(int))
        self.parts = rank_parts(counts, readers, rank, world_size)
        self.widths = list(widths)
        self.storage_options, self.strict, self.verify = storage_options, strict, verify
        self.start_batches = start_batches
        self.failed = {str(r): frozenset(int(k) for k in ks) for r, ks in (failed or {}).items()}
        self.bases = bases or [""] * len(sources)  # the manifests' folders, named when everything fails
        self.sample_shape, self.dtype = tuple(sample_shape), dtype  # [C, L]: an empty item's shape
        # remote shards: reads kept in flight per worker, within this many bytes (at least one shard);
        # prefetch_reads=0 reads each shard when it is needed
        self.prefetch_bytes, self.prefetch_reads = prefetch_mb * 2**20, max(0, prefetch_reads)

    def worker_parts(self, worker: int, n_workers: int) -> list[Part]:
        """The contiguous run of this rank's parts that DataLoader worker `worker` of `n_workers` builds."""
        n = len(self.parts)
        return self.parts[worker * n // n_workers:(worker + 1) * n // n_workers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.worker_parts(wid, nw)
        per_reader = max(1, self.prefetch_reads // max(1, len(mine))) if self.prefetch_reads else 0
        gens = [iter(_PartReader(self, p, self.start_batches, per_reader)) for p in mine]
        # every item's rows come from the same parts in the same order: its source column is a constant
        source = np.concatenate([np.full(p.hi - p.lo, p.source, np.int16) for p in mine] or [np.empty(0, np.int16)])
        try:
            while True:
                rows, readers = [], {}
                for p, gen in zip(mine, gens):
                    (arrays, idx), (reads, failed, lost) = next(gen)
                    if (p.lo, p.hi) != (0, p.rows):  # this rank's share of a part another rank reads too
                        arrays, idx = (arrays, idx[p.lo:p.hi]) if idx is not None else \
                            (tuple(a[p.lo:p.hi] for a in arrays), None)
                    rows.append((arrays, idx))
                    readers[p.key] = (reads, failed, lost, p.counted)
                yield self._item(rows, source, readers)
        finally:
            for gen in gens:
                gen.close()

    def _item(self, rows: list[tuple], source: np.ndarray, readers: dict) -> dict:
        if not rows:  # a worker with no part (more workers than parts): an empty item keeps the round-robin
            return {"signal": torch.empty((0, *self.sample_shape), dtype=getattr(torch, self.dtype)),
                    "key": np.empty(0, dtype=object), "shard": torch.empty(0, dtype=torch.int32),
                    "source": torch.empty(0, dtype=torch.int16), "readers": readers}
        n = [len(idx) if idx is not None else len(arrays[0]) for arrays, idx in rows]
        out = []
        for i in range(3):  # signal [n, C, L] stored dtype, key, shard: each part's rows gathered straight in
            first = rows[0][0][i]
            dtype = np.result_type(*(arrays[i].dtype for arrays, _ in rows))  # keys: the widest string
            buf, at = np.empty((sum(n), *first.shape[1:]), dtype), 0
            for (arrays, idx), k in zip(rows, n):
                if idx is None:
                    buf[at:at + k] = arrays[i]
                else:
                    np.take(arrays[i], idx, axis=0, out=buf[at:at + k], mode="clip")  # unbuffered: idx is in range
                at += k
            out.append(buf)
        return {"signal": torch.from_numpy(out[0]), "key": out[1], "shard": torch.from_numpy(out[2]),
                "source": torch.from_numpy(source), "readers": readers}  # shared, read-only: moved, never written


class RankBatches:
    """This rank's micro-batches: each global batch's rank slice (the workers' items, in worker order),
    cut into `micro` rows. `batches`: global batches fully handed out (the position to save)."""

    def __init__(self, loader: torch.utils.data.DataLoader, n_items: int, micro: int, start: int, pin: bool = False):
        self.loader, self.n_items, self.micro, self.batches = loader, max(1, n_items), micro, start
        self.pin = pin  # the DataLoader pins each item; a concatenation of items is written into pinned memory too
        self._it = None
        self._queue: list[dict] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            if self._it is None:
                self._it = iter(self.loader)
            items = [next(self._it) for _ in range(self.n_items)]
            whole = _concat(items, self.pin)
            n = len(whole["signal"])
            self._queue = [{**{k: v[s:s + self.micro] for k, v in whole.items() if k != "readers"},
                            "readers": whole["readers"] if s == 0 else {}} for s in range(0, n, self.micro)]
        batch = self._queue.pop(0)
        if not self._queue:
            self.batches += 1
        return batch


def _concat(items: list[dict], pin: bool = False) -> dict:
    """The workers' items of one global batch as one rank slice (no copy when one item holds it all). With
    `pin`, the tensors copied to the device are concatenated into pinned memory (from torch's caching host
    allocator, which reuses a block only after its copies completed), so their non-blocking copy stays async."""
    full = [it for it in items if len(it["signal"])]
    readers = {k: v for it in items for k, v in it["readers"].items()}
    if len(full) == 1:
        return {**full[0], "readers": readers}

    def cat(name: str) -> torch.Tensor:
        parts = [it[name] for it in full]
        out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=pin)
        return torch.cat(parts, out=out)

    return {"signal": cat("signal"), "key": np.concatenate([it["key"] for it in full]), "shard": cat("shard"),
            "source": cat("source"), "readers": readers}


class StreamProgress:
    """This rank's view of the data loss of the readers it counts, from the batches it consumed.

    `sizes`: per source, its split's shard sizes [s.n_samples for s in manifest.shards(split)].
    Feed every consumed batch to `update`; save `state(global batches consumed, ...)` instead of the
    bare LoaderState, so a resume continues the stream exactly and these counts go on.
    """

    def __init__(self, state: LoaderState, sizes: list[list[int]], rank: int = 0, world_size: int = 1):
        if [len(s) for s in sizes] != [int(src[0]) for src in state.sources]:
            raise ValueError(f"shard counts {[len(s) for s in sizes]} for a stream over "
                             f"{[int(src[0]) for src in state.sources]} shards")
        self._state, self._sizes = state, [list(s) for s in sizes]
        self._offsets = list(np.cumsum([0] + [len(s) for s in sizes])[:-1].astype(int))
        counts = [int(src[1]) for src in state.sources]
        self._widths = list(state.widths)
        self._parts = {p.key: p for p in rank_parts(counts, state.readers, rank, world_size)}
        self._readers: dict[str, tuple[int, tuple[int, ...], int]] = {}  # key -> (reads, failed, lost)
        self._shared: dict[str, tuple[int, tuple[int, ...], int]] = {}  # uncounted parts' failures here
        self._failed_read = {str(r): tuple(int(k) for k in ks) for r, ks in state.failed.items()}  # saved: all ranks'
        if state.batches:  # a resumed stream: every counted reader's numbers at the position, as if never stopped
            for key, p in self._parts.items():
                if p.counted:
                    self._readers[key] = self._restored(p, list(self._failed_read.get(key, ())))

    def _groups(self, source: int, reader: int):
        st = self._state
        return _groups(len(self._sizes[source]), reader, st.readers, st.seed, self._widths[source], source)

    def _restored(self, part: Part, failed: list[int]) -> tuple[int, tuple[int, ...], int]:
        """A saved reader's (reads, failed, lost): replays its position like the stream's skip-ahead.

        Exact, not approximated: the reader delivered `part.rows` per global batch, and its last
        part came from the first group where the samples actually read reach that count.
        """
        sizes, S = self._sizes[part.source], self._widths[part.source]
        delivered = self._state.batches * part.rows
        recorded, last = set(failed), max(failed, default=-1)
        reads = lost = end = 0
        for g, group in self._groups(part.source, part.reader):
            if end >= delivered and g * S > last:
                break
            for j, i in enumerate(group):
                if g * S + j in recorded:
                    lost += sizes[i]
                else:
                    end += sizes[i]
            reads = (g + 1) * S
        return reads, tuple(failed), lost

    def update(self, batch: dict) -> None:
        """Take a consumed batch's records for its readers (they are cumulative: the latest ones hold)."""
        for key, (reads, failed, lost, counted) in batch["readers"].items():
            failed = tuple(int(k) for k in failed)
            if counted:
                self._readers[key] = (int(reads), failed, int(lost))
            elif failed:  # a part another rank counts, whose read failed here only (a transient error):
                self._shared[key] = (len(failed), failed, int(lost))  # its failures count here too (reads = them)
            self._failed_read[key] = failed

    def _all(self) -> list[tuple[int, tuple, int]]:
        return [*self._readers.values(), *self._shared.values()]

    def reads(self) -> int:
        """Shard reads the readers this rank counts made, up to the groups of the batches consumed (plus
        the failed reads of parts it shares with a rank that counts them: a failure is never lost)."""
        return sum(r for r, _, _ in self._all())

    def failed(self) -> int:
        """How many of those reads failed (a shard read twice and failing twice counts twice)."""
        return sum(len(f) for _, f, _ in self._all())

    def lost_segments(self) -> int:
        """Segments the failed reads would have delivered, by the manifest."""
        return sum(n for _, _, n in self._all())

    def failed_shards(self) -> list[int]:
        """Indices into all sources' shards (distinct, sorted) of the failed reads: to name them."""
        found: set[int] = set()
        for key, (_, failed, _) in [*self._readers.items(), *self._shared.items()]:
            source, reader = (int(x) for x in key.split(":"))
            S = self._widths[source]
            want, last = set(failed), max(failed, default=-1)
            for g, group in self._groups(source, reader):
                if g * S > last:
                    break
                found.update(self._offsets[source] + i for j, i in enumerate(group) if g * S + j in want)
        return sorted(found)

    def state(self, batches: int) -> LoaderState:
        """The LoaderState to save after `batches` global batches: the position plus the failed reads
        (of every part this rank read, and those it was resumed with)."""
        return replace(self._state, batches=batches,
                       failed={k: list(f) for k, f in sorted(self._failed_read.items()) if f})


def _read_local(path: str):
    """A local shard mapped read-only: block arrays view the page cache, no read copy.

    Shards are never modified in place (a rebuild writes a new file and renames it), so a
    mapping stays valid while its arrays are in use.
    """
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return b""
        populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at once, not one by one
        return mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)


def make_loader(
    manifest: Manifest | list[Manifest], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
    num_workers: int = 0, shuffle_shards: int = 4, split: str = "train", storage_options: dict | None = None,
    strict: bool = False, state: LoaderState | dict | None = None, pin_memory: bool = False, verify: bool = False,
    global_batch: int = 0, readers: int = 0, weights: list[float] | None = None,
) -> tuple[RankBatches, LoaderState]:
    """Endless iterator of this rank's micro-batches of `batch_size`, and the stream's state at the start.

    `manifest`: one source or several (mixed by `weights`, default equal). `global_batch`: samples
    per global batch (default batch_size x world_size); it must split into whole micro-batches on
    every rank. `readers`: canonical readers (default world_size x max(1, num_workers)); with the
    seed, shuffle width, global batch and sources it fixes the sample order. With `state` (from a
    previous run, any world size or worker count), the stream continues exactly where that run
    stopped; if what fixes the order differs, this refuses. Give it the state `StreamProgress.state`
    made, so reads that failed are not read again. `verify=True` checks every shard read against the
    manifest's sha256 (a hash of the bytes), so a shard altered without a change of size is skipped
    (or fatal with `strict`) instead of read.
    """
    manifests = manifest if isinstance(manifest, list) else [manifest]
    for m in manifests[1:]:
        a, b = manifests[0], m
        if (a.channels, a.length, a.dtype) != (b.channels, b.length, b.dtype):
            raise ValueError(f"sources disagree: {redact_secrets(a.url)} holds {a.channels} x {a.length} {a.dtype} "
                             f"segments, {redact_secrets(b.url)} {b.channels} x {b.length} {b.dtype}; convert them "
                             f"with the same --length, channels and --dtype")
    sources = [m.shards(split) for m in manifests]
    G = global_batch or batch_size * world_size
    if G % (world_size * batch_size):
        raise ValueError(f"a global batch of {G} is not a whole number of micro-batches of {batch_size} on each of "
                         f"{world_size} rank(s)")
    counts = source_counts(weights or [1.0] * len(manifests), G)
    if 0 in counts:
        i = counts.index(0)
        raise ValueError(f"{redact_secrets(manifests[i].url)} gets 0 of the {G} samples of a global batch at weight "
                         f"{(weights or [1.0] * len(manifests))[i]:g}; raise its weight or the global batch")
    n_readers = readers or world_size * max(1, num_workers)
    if n_readers > G:
        raise ValueError(f"--stream-readers={n_readers} is more than the global batch of {G}: a reader would hand "
                         f"out no rows; use at most {G}")
    current = LoaderState(0, seed, n_readers, G, shuffle_shards,
                          [[len(sh), n, m.preprocess, _fingerprint(sh)] for sh, n, m in zip(sources, counts, manifests)],
                          split, widths=shuffle_widths(max(1, shuffle_shards), counts))
    start, failed = 0, {}
    if state is not None:
        state = LoaderState.from_dict(state) if isinstance(state, dict) else state
        if state.widths is None:  # from_dict fills them in for one source
            raise OlderStreamError("the saved data position mixes several sources but records no shuffle widths "
                                   "(saved by a development version of mixing, whose widths may differ from this "
                                   "one's): its order cannot be rebuilt exactly (pass --allow-schedule-change for a "
                                   "new data stream from this step)")
        if state.shuffle_shards == shuffle_shards and len(state.widths) == len(counts):
            current = replace(current, widths=list(state.widths))  # the saved widths go on, as they were computed
        changes = _stream_changes(state.stream(), current.stream())
        if changes:
            raise ValueError(f"cannot continue the data stream exactly: {'; '.join(changes)}")
        start, failed = state.batches, dict(state.failed)
    m0 = manifests[0]
    ds = ShardStream(sources, counts, current.widths, seed, n_readers, rank, world_size, storage_options, strict,
                     start, verify, failed, [m.base for m in manifests], (m0.channels, m0.length), m0.dtype)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
    )
    return (RankBatches(loader, num_workers, batch_size, start, pin_memory),
            replace(current, batches=start, failed=failed))


def _fingerprint(shards: list[ShardInfo]) -> str:
    """A source's identity by content: its shards' sha256 in order (the same data moved elsewhere matches)."""
    return hashlib.sha256("\n".join(s.sha256 for s in shards).encode()).hexdigest()[:16]


_FLAGS = {"seed": "--seed", "readers": "--stream-readers", "global_batch": "the global batch",
          "shuffle_shards": "--shuffle-shards", "split": "the split"}


def _stream_changes(saved: dict, now: dict) -> list[str]:
    """What differs between a saved stream and the one asked for now, each named by its flag (saved -> now)."""
    out = [f"{_FLAGS.get(k, k)} {_plain(v)} -> {_plain(now[k])}" for k, v in saved.items()
           if k not in ("sources", "widths") and _plain(v) != _plain(now[k])]
    old, new = _plain(saved["sources"]), _plain(now["sources"])
    if len(old) != len(new):
        out.append(f"{len(old)} source(s) -> {len(new)}")
        return out
    for i, (a, b) in enumerate(zip(old, new)):
        if len(a) > 3 and len(b) > 3 and a[3] != b[3]:
            out.append(f"source {i} is other data (its shards' sha256 differ: another source, another order "
                       f"of --data, or a re-conversion)")
        elif a[0] != b[0]:
            out.append(f"source {i}: {a[0]} -> {b[0]} shards")
        if a[1] != b[1]:
            out.append(f"source {i}: {a[1]} -> {b[1]} samples per global batch (--weights or the global batch)")
        if a[2] != b[2]:
            out.append(f"source {i}: its preprocessing record changed")
    return out


def _plain(v):
    """Tuples and lists alike (a state that went through JSON or torch.save)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _as_is(batch: dict) -> dict:
    """The batch unchanged: the default conversion would turn the `failed` tuple into a list."""
    return batch
