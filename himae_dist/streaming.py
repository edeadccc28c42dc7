"""Streams format-v2 shards (data_prep/shard_format.py) into training batches.

Every reader (rank x DataLoader worker) walks one deterministic, endless sequence of shards:
the epochs' seeded shard permutations laid end to end, reader r taking items r, r + R, r + 2R...
(R readers). So every rank yields batches forever: equal batch counts on every rank whatever
the shard count or sizes, even with fewer shards than readers (then a shard feeds several
readers in one epoch); the trainer decides how many steps to take.

Shuffle: a reader loads `shuffle_shards` shards at once (whole shards, thousands of segments,
each already a seeded global sample of the corpus), permutes their segments with a seed of its
own and cuts batches from them. Because that pool is a pure function of (seed, reader, group),
the stream position is just the number of batches a rank has consumed: `LoaderState` holds it,
and a loader built with a state skips straight there using the manifest's shard sizes, without
reading the skipped data.

Faults: shards listed in the manifest but missing or of the wrong size are found at start
(`check_shards`, one listing per split); a shard that fails mid-run (after retries; with
`verify`, also a sha256 mismatch) is skipped with a warning, or is fatal with `strict=True`.
A skipped read is on the record, not only on stderr: every batch names its reader, the reads that
reader has made (a pure function of position), the positions of its failed reads and the segments
they held, so the trainer can report the loss and abort past a failure rate (`StreamProgress`
folds the consumed batches into those numbers). The saved `LoaderState.failed` keeps each
reader's failed positions: a failed read delivered nothing, so the skip-ahead counts it as 0
samples, and a resumed reader does not read a recorded-failed position again (even if the shard
has been repaired since), so the resumed stream is exactly the uninterrupted one. When a whole
epoch's worth of reads fails in a row, the reader stops with `DataLostError` instead of spinning.
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


@dataclass(frozen=True)
class LoaderState:
    """Where a rank's stream stands: batches consumed, and what must match to continue it exactly."""

    batches: int
    seed: int
    world_size: int
    num_workers: int
    batch_size: int
    shuffle_shards: int
    n_shards: int
    split: str = "train"
    # reader id -> positions k (group * shuffle_shards + slot) of its reads that failed: the
    # skip-ahead needs what was actually read, not the manifest's sizes. Plain ints, lists and a
    # dict, so it survives torch.load(weights_only=True).
    failed: dict = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        """Also takes a dict saved before `failed` existed, or one whose keys went through JSON (str)."""
        d = dict(d)
        d["failed"] = {int(r): sorted(int(k) for k in ks) for r, ks in (d.get("failed") or {}).items()}
        return cls(**d)


class DataLostError(ValueError):
    """Every shard read in a whole epoch's worth failed: there is nothing left to train on.

    One str argument, so it pickles and a DataLoader worker re-raises it as this type.
    """


def reader_shards(n_shards: int, reader: int, n_readers: int, seed: int, start: int = 0):
    """Endless shard indices for one reader: epoch permutations end to end, every n_readers-th item."""
    k = reader + start * n_readers
    cache: dict[int, np.ndarray] = {}
    while True:
        epoch, i = divmod(k, n_shards)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n_shards)
        yield int(cache[epoch][i])
        k += n_readers


def _groups(n_shards: int, reader: int, n_readers: int, seed: int,
            shuffle_shards: int) -> Iterator[tuple[int, list[int]]]:
    """(g, shard indices) of a reader's groups: slot j of group g is read position g * shuffle_shards + j."""
    order = reader_shards(n_shards, reader, n_readers, seed)
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


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches from this rank's readers.

    Each is {signal [B, C, L], key [B], shard [B], reader, reads, failed, lost_segments}: the reader
    that cut it, the shard reads that reader made up to and including the batch's group
    ((g + 1) * shuffle_shards), the positions of its failed reads so far (a tuple, ascending,
    restored ones included) and the manifest's segment count over them.
    `failed` (LoaderState.failed) holds the failed read positions recorded by the run resumed from.
    """

    def __init__(self, shards: list[ShardInfo], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_shards: int = 4, storage_options: dict | None = None, strict: bool = False,
                 start_batches: int = 0, verify: bool = False, failed: dict | None = None, base: str | None = None,
                 prefetch_mb: int = 256, prefetch_reads: int = 8):
        if not shards:
            raise ValueError("no shards to read: the manifest lists none for this split")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.shuffle_shards = rank, world_size, max(1, shuffle_shards)
        self.storage_options, self.strict, self.verify = storage_options, strict, verify
        self.start_batches = start_batches
        self.failed = {int(r): frozenset(int(k) for k in ks) for r, ks in (failed or {}).items()}
        self.base = base  # the manifest's folder, named when everything fails
        # remote shards: reads kept in flight per reader, within this many bytes (at least one shard);
        # prefetch_reads=0 reads each shard when it is needed
        self.prefetch_bytes, self.prefetch_reads = prefetch_mb * 2**20, max(0, prefetch_reads)

    def _fetch(self, idx: int):
        """The shard's bytes: remotely one GET of the manifest's size, locally a read-only mapping."""
        s = self.shards[idx]
        if is_remote(s.url):
            folder, name = s.url.rsplit("/", 1)
            return Folder(folder, self.storage_options).read_bytes(name, s.bytes)
        return _read_local(s.url)

    def _read(self, idx: int, losses: _Losses, fetched=None) -> list | None:
        """The shard's blocks, or None when it cannot be read (warned; raised with `strict`).
        `fetched`: a callable giving the bytes fetched ahead (raising what the fetch raised)."""
        s = self.shards[idx]
        try:
            data = fetched() if fetched is not None else self._fetch(idx)
            if self.verify and hashlib.sha256(data).hexdigest() != s.sha256:
                raise ShardFormatError(f"{s.url}: sha256 differs from the manifest's (the shard was altered)")
            blocks = list(read_shard_blocks(data, s.url))
        except (OSError, ValueError, StorageError) as e:  # ShardFormatError is a ValueError
            if self.strict:
                raise
            losses.in_a_row += 1
            print(redact_secrets(f"[himae-data] warning: skipping shard {s.url}: {e}"), file=sys.stderr, flush=True)
            if losses.in_a_row >= len(self.shards):  # a whole epoch's worth: nothing left to train on
                where = f" in {self.base}" if self.base else ""
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"{s.url}: ")
                last = f"{s.url}: {why}"
                raise DataLostError(f"the last {losses.in_a_row} shard reads all failed (the split has "
                                    f"{len(self.shards)} shards{where}); last: {last}; re-run himae-prep "
                                    f"to rebuild the shards") from e
            return None
        losses.in_a_row = 0
        return blocks

    def _group_samples(self, group: list[int], reader: int, g: int, recorded: frozenset, losses: _Losses,
                       ahead: "_ReadAhead | None" = None):
        """The group's segments, concatenated ([n, C, L] etc.), and a seeded permutation of them.

        A position in `recorded` failed in the run resumed from: it is not read again, so the
        stream stays that run's even if the shard has been repaired since.
        """
        sig, key, shard = [], [], []
        for j, idx in enumerate(group):
            k = g * self.shuffle_shards + j
            blocks = None if k in recorded else self._read(idx, losses, ahead.take if ahead is not None else None)
            if blocks is None:
                losses.failed.append(k)
                losses.lost += self.shards[idx].n_samples
                continue
            for b in blocks:
                sig.append(b.signal)
                key.append(b.key)
                shard.append(np.full(len(b), idx, np.int32))
        if not sig:
            return None
        pool = (np.concatenate(sig), np.concatenate(key), np.concatenate(shard))  # one copy out of the shard bytes
        return pool, np.random.default_rng([self.seed, 1, reader, g]).permutation(len(pool[0]))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader hands out batches round-robin from worker 0: batch j of the original stream came from
        # worker j % nw. Resumed at batch `start`, this loader's worker i plays original worker (i + start) % nw.
        wid = (wid + self.start_batches) % nw
        reader, n_readers = self.rank * nw + wid, self.world_size * nw
        mine = max(0, (self.start_batches - wid + nw - 1) // nw)
        skip = mine * self.batch_size  # samples this reader already delivered
        sizes = [s.n_samples for s in self.shards]
        S, recorded, losses = self.shuffle_shards, self.failed.get(reader, frozenset()), _Losses()
        groups = _groups(len(self.shards), reader, n_readers, self.seed, S)
        g, group = next(groups)
        # Jump whole groups without reading them; a read that failed in the saved run delivered nothing.
        while skip >= (n := sum(sizes[i] for j, i in enumerate(group) if g * S + j not in recorded)):
            skip -= n
            for j, i in enumerate(group):
                if g * S + j in recorded:
                    losses.failed.append(g * S + j)
                    losses.lost += sizes[i]
            g, group = next(groups)
        carry = None  # (signal, key, shard) rows left over from the previous group, in stream order
        B = self.batch_size
        ahead = None
        if self.prefetch_reads and any(is_remote(s.url) for s in self.shards):  # object storage: reads ahead
            upcoming = ((g2 * S + j, i) for g2, grp in _groups(len(self.shards), reader, n_readers, self.seed, S)
                        if g2 >= g for j, i in enumerate(grp))
            ahead = _ReadAhead(((k, i) for k, i in upcoming if k not in recorded), self._fetch,
                               lambda i: self.shards[i].bytes, self.prefetch_bytes, self.prefetch_reads)
        try:
            yield from self._batches(groups, g, group, reader, recorded, losses, ahead, carry, skip, B, S)
        finally:
            if ahead is not None:
                ahead.close()

    def _batches(self, groups, g, group, reader, recorded, losses, ahead, carry, skip, B, S):
        """The batches from group g on (see __iter__)."""
        while True:
            got = self._group_samples(group, reader, g, recorded, losses, ahead)
            # what every batch cut in this group carries (small: it goes through the worker pipe)
            info = {"reader": reader, "reads": (g + 1) * S, "failed": tuple(sorted(losses.failed)),
                    "lost_segments": losses.lost}
            if got is not None:
                pool, order = got
                order, skip, pos = order[skip:], 0, 0
                if carry is not None:  # the stream goes on: the carried rows, then this group's permuted rows
                    pos = min(B - len(carry[0]), len(order))
                    carry = tuple(np.concatenate([c, a[order[:pos]]]) for a, c in zip(pool, carry))
                    if len(carry[0]) == B:
                        yield self._batch(carry, info)
                        carry = None
                if carry is None:
                    n_full = pos + (len(order) - pos) // B * B
                    for s in range(pos, n_full, B):
                        idx = order[s:s + B]
                        yield self._batch(tuple(a[idx] for a in pool), info)  # a gather: the one copy per batch
                    pos = n_full
                    if pos < len(order):
                        carry = tuple(a[order[pos:]] for a in pool)
            g, group = next(groups)

    def _batch(self, rows: tuple, info: dict) -> dict:
        return {
            "signal": torch.from_numpy(rows[0]),  # [B, C, L] in the stored dtype
            "key": rows[1],
            "shard": torch.from_numpy(rows[2]),
            **info,
        }


class StreamProgress:
    """This rank's view of its readers' data loss, from the batches it consumed (not prefetched ones).

    `sizes` are the split's shard sizes, [s.n_samples for s in manifest.shards(split)]. Feed every
    consumed batch to `update`; save `state(batches consumed)` instead of the bare LoaderState, so a
    resume continues the stream exactly and these counts go on from where they were.
    """

    def __init__(self, state: LoaderState, sizes: list[int]):
        if len(sizes) != state.n_shards:
            raise ValueError(f"{len(sizes)} shard sizes for a stream over {state.n_shards} shards")
        self._state, self._sizes = state, list(sizes)
        self._readers: dict[int, tuple[int, tuple[int, ...], int]] = {}  # reader -> (reads, failed, lost)
        for r, ks in state.failed.items():
            self._readers[int(r)] = self._restored(int(r), sorted(int(k) for k in ks))

    def _restored(self, reader: int, failed: list[int]) -> tuple[int, tuple[int, ...], int]:
        """A saved reader's (reads, failed, lost): replays its position like the stream's skip-ahead.

        Exact, not approximated: the reader delivered its share of `batches` samples, and its last
        batch came from the first group where the samples actually read reach that count.
        """
        st, sizes = self._state, self._sizes
        nw, S = max(1, st.num_workers), max(1, st.shuffle_shards)
        wid = reader % nw  # reader = rank * nw + (original) worker
        delivered = max(0, (st.batches - wid + nw - 1) // nw) * st.batch_size
        recorded, last = set(failed), max(failed, default=-1)
        reads = lost = end = 0
        for g, group in _groups(len(sizes), reader, st.world_size * nw, st.seed, S):
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
        """Take a consumed batch's record for its reader (it is cumulative: the latest one holds)."""
        self._readers[int(batch["reader"])] = (int(batch["reads"]), tuple(int(k) for k in batch["failed"]),
                                                int(batch["lost_segments"]))

    def reads(self) -> int:
        """Shard reads this rank's readers made, up to the groups of the batches consumed."""
        return sum(r for r, _, _ in self._readers.values())

    def failed(self) -> int:
        """How many of those reads failed (a shard read twice and failing twice counts twice)."""
        return sum(len(f) for _, f, _ in self._readers.values())

    def lost_segments(self) -> int:
        """Segments the failed reads would have delivered, by the manifest."""
        return sum(n for _, _, n in self._readers.values())

    def failed_shards(self) -> list[int]:
        """Shard indices (distinct, sorted) of the failed reads: to name them when the run stops over them."""
        st = self._state
        nw, S = max(1, st.num_workers), max(1, st.shuffle_shards)
        found: set[int] = set()
        for reader, (_, failed, _) in self._readers.items():
            want, last = set(failed), max(failed, default=-1)
            for g, group in _groups(len(self._sizes), reader, st.world_size * nw, st.seed, S):
                if g * S > last:
                    break
                found.update(i for j, i in enumerate(group) if g * S + j in want)
        return sorted(found)

    def state(self, batches: int) -> LoaderState:
        """The LoaderState to save after `batches` consumed: the position plus every reader's failed reads."""
        return replace(self._state, batches=batches,
                       failed={r: list(f) for r, (_, f, _) in sorted(self._readers.items())})


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
    manifest: Manifest, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
    shuffle_shards: int = 4, split: str = "train", storage_options: dict | None = None, strict: bool = False,
    state: LoaderState | dict | None = None, pin_memory: bool = False, verify: bool = False,
) -> tuple[torch.utils.data.DataLoader, LoaderState]:
    """Endless loader of this rank's batches, and its state at the start (advance `.batches` as you consume).

    With `state` (from a previous run), the stream continues exactly where that run stopped; the
    seed, world size, workers, batch size and shuffle width must match, or this refuses.
    Give it the state `StreamProgress.state` made, so reads that failed are not read again.
    `verify=True` checks every shard read against the manifest's sha256 (costs a hash of the bytes,
    about as much CPU as the rest of the loader), so a shard altered without a change of size is
    skipped (or fatal with `strict`) instead of read.
    """
    shards = manifest.shards(split)
    start = 0
    current = LoaderState(0, seed, world_size, num_workers, batch_size, shuffle_shards, len(shards), split)
    if state is not None:
        state = LoaderState.from_dict(state) if isinstance(state, dict) else state
        mismatch = {k: (v, getattr(current, k)) for k, v in asdict(state).items()
                    if k not in ("batches", "failed") and v != getattr(current, k)}
        if mismatch:
            raise ValueError(f"cannot continue the data stream exactly: saved vs now {mismatch}")
        start = state.batches
    failed = dict(state.failed) if state is not None else {}
    ds = ShardStream(shards, batch_size, seed, rank, world_size, shuffle_shards, storage_options, strict, start, verify,
                     failed, manifest.base)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, collate_fn=_as_is,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader, replace(current, batches=start, failed=failed)


def _as_is(batch: dict) -> dict:
    """The batch unchanged: the default conversion would turn the `failed` tuple into a list."""
    return batch
