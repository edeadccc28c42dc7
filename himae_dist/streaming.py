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
`verify`, also a sha256 mismatch) is skipped with a warning and counted in each batch's
`bad_shards`, or is fatal with `strict=True`. When a whole epoch's worth of reads fails in a row,
the reader stops with an error instead of spinning.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from data_prep.shard_format import MANIFEST, Manifest, ShardFormatError, ShardInfo, parse_manifest, read_shard_blocks
from data_prep.storage import Folder, StorageError, is_remote


def load_manifest(data: str, storage_options: dict | None = None) -> Manifest:
    """Read manifest.json given its path/URL or the folder holding it."""
    url = data if data.endswith(".json") else data.rstrip("/") + "/" + MANIFEST
    folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
    f = Folder(folder, storage_options)
    if not f.exists(name):
        raise FileNotFoundError(f"{url} does not exist; convert the data with himae-prep first")
    return parse_manifest(f.read_text(name), url)


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        return cls(**d)


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


class ShardStream(torch.utils.data.IterableDataset):
    """Endless batches {signal [B, C, L], key [B], shard [B], bad_shards} from this rank's readers."""

    def __init__(self, shards: list[ShardInfo], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_shards: int = 4, storage_options: dict | None = None, strict: bool = False,
                 start_batches: int = 0, verify: bool = False):
        if not shards:
            raise ValueError("no shards to read: the manifest lists none for this split")
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.shuffle_shards = rank, world_size, max(1, shuffle_shards)
        self.storage_options, self.strict, self.verify = storage_options, strict, verify
        self.start_batches = start_batches
        self.bad_shards = 0
        self._failed_in_a_row = 0

    def _read(self, idx: int) -> list | None:
        s = self.shards[idx]
        try:
            folder, name = s.url.rsplit("/", 1)
            data = Folder(folder, self.storage_options).read_bytes(name) if is_remote(s.url) else _read_local(s.url)
            if self.verify and hashlib.sha256(data).hexdigest() != s.sha256:
                raise ShardFormatError(f"{s.url}: sha256 differs from the manifest's (the shard was altered)")
            blocks = list(read_shard_blocks(data, s.url))
        except (OSError, ValueError, StorageError) as e:  # ShardFormatError is a ValueError
            if self.strict:
                raise
            self.bad_shards += 1
            self._failed_in_a_row += 1
            print(f"[himae-data] warning: skipping shard {s.url}: {e}", file=sys.stderr, flush=True)
            if self._failed_in_a_row >= len(self.shards):  # a whole epoch's worth: nothing left to train on
                raise RuntimeError(f"the last {self._failed_in_a_row} shard reads all failed (the split has "
                                   f"{len(self.shards)}); last error: {e}") from e
            return None
        self._failed_in_a_row = 0
        return blocks

    def _group_samples(self, group: list[int], reader: int, g: int):
        """The group's segments, concatenated ([n, C, L] etc.), and a seeded permutation of them."""
        sig, key, shard = [], [], []
        for idx in group:
            for b in self._read(idx) or []:
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
        order_ = reader_shards(len(self.shards), reader, n_readers, self.seed)
        g, group = 0, [next(order_) for _ in range(self.shuffle_shards)]
        while skip >= sum(sizes[i] for i in group):  # jump whole groups without reading them
            skip -= sum(sizes[i] for i in group)
            g, group = g + 1, [next(order_) for _ in range(self.shuffle_shards)]
        carry = None  # (signal, key, shard) rows left over from the previous group, in stream order
        B = self.batch_size
        while True:
            got = self._group_samples(group, reader, g)
            if got is not None:
                pool, order = got
                order, skip, pos = order[skip:], 0, 0
                if carry is not None:  # the stream goes on: the carried rows, then this group's permuted rows
                    pos = min(B - len(carry[0]), len(order))
                    carry = tuple(np.concatenate([c, a[order[:pos]]]) for a, c in zip(pool, carry))
                    if len(carry[0]) == B:
                        yield self._batch(carry)
                        carry = None
                if carry is None:
                    n_full = pos + (len(order) - pos) // B * B
                    for s in range(pos, n_full, B):
                        idx = order[s:s + B]
                        yield self._batch(tuple(a[idx] for a in pool))  # a gather: the one copy per batch
                    pos = n_full
                    if pos < len(order):
                        carry = tuple(a[order[pos:]] for a in pool)
            g, group = g + 1, [next(order_) for _ in range(self.shuffle_shards)]

    def _batch(self, rows: tuple) -> dict:
        return {
            "signal": torch.from_numpy(rows[0]),  # [B, C, L] in the stored dtype
            "key": rows[1],
            "shard": torch.from_numpy(rows[2]),
            "bad_shards": self.bad_shards,
        }


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
                    if k != "batches" and v != getattr(current, k)}
        if mismatch:
            raise ValueError(f"cannot continue the data stream exactly: saved vs now {mismatch}")
        start = state.batches
    ds = ShardStream(shards, batch_size, seed, rank, world_size, shuffle_shards, storage_options, strict, start, verify)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader, LoaderState(start, seed, world_size, num_workers, batch_size, shuffle_shards, len(shards), split)
