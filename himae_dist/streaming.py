"""Streams converted tar shards into training batches with stock webdataset.

Each epoch the shard list is shuffled with a seed shared by every rank, then split by node
(rank) and by DataLoader worker, so ranks read disjoint shards and see a new partition every
epoch. The stream repeats forever; the trainer decides how many steps to take, so no rank can
run out of data before another (which would hang a collective).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    url: str  # where manifest.json lives
    shard_urls: list[str]
    n_samples: int
    length: int
    channels: int
    kind: str


def _fs_open_text(url: str, storage_options: dict | None) -> str:
    import fsspec

    with fsspec.open(url, "r", **(storage_options or {})) as fh:
        return fh.read()


def load_manifest(data: str, storage_options: dict | None = None) -> Manifest:
    """Read manifest.json given its path/URL or the folder holding it."""
    import fsspec

    url = data if data.endswith(".json") else data.rstrip("/") + "/" + MANIFEST
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} does not exist; convert the data with himae-prep first")
    m = json.loads(_fs_open_text(url, storage_options))
    for k in ("shards", "length", "channels", "n_samples"):
        if k not in m:
            raise ValueError(f"{url}: manifest lacks key {k!r}; was it written by himae-prep?")
    base = url.rsplit("/", 1)[0]
    return Manifest(
        url=url, shard_urls=[f"{base}/{s['url']}" for s in m["shards"]], n_samples=int(m["n_samples"]),
        length=int(m["length"]), channels=int(m["channels"]), kind=m.get("kind", "pretrain"),
    )


def register_fsspec_scheme(scheme: str, storage_options: dict | None) -> None:
    """Let webdataset open `scheme://` shards through fsspec (s3fs for s3://)."""
    import fsspec
    import webdataset as wds

    def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
        return fsspec.open(url, mode, **(storage_options or {})).open()

    wds.gopen_schemes[scheme] = gopen_fsspec


def _to_tensor(expected: tuple[int, int]):
    def convert(sample: tuple) -> torch.Tensor:
        (signal,) = sample
        arr = np.asarray(signal, dtype=np.float32)
        if arr.shape != expected:
            raise ValueError(f"sample signal has shape {arr.shape}, the manifest promises {expected}")
        return torch.from_numpy(arr)

    return convert


def check_shard_split(n_shards: int, world_size: int, num_workers: int) -> None:
    readers = world_size * max(1, num_workers)
    if n_shards < readers:
        raise ValueError(
            f"{n_shards} shard(s) cannot feed {world_size} rank(s) x {max(1, num_workers)} worker(s) = "
            f"{readers} readers; convert with a smaller --samples-per-shard or use fewer workers"
        )


def make_loader(
    manifest: Manifest, batch_size: int, seed: int, num_workers: int = 1, shuffle_buffer: int = 1000,
    world_size: int = 1, storage_options: dict | None = None,
):
    """Infinite loader of [B, C, L] float32 batches from this rank's share of the shards."""
    import webdataset as wds

    check_shard_split(len(manifest.shard_urls), world_size, num_workers)
    for url in manifest.shard_urls[:1]:
        if "://" in url and not url.startswith("file://"):
            register_fsspec_scheme(url.split("://", 1)[0], storage_options)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(manifest.shard_urls),
        wds.detshuffle(bufsize=len(manifest.shard_urls), initial=len(manifest.shard_urls), seed=seed),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),
        wds.decode(),
        wds.to_tuple("signal.npy"),
        wds.map(_to_tensor((manifest.channels, manifest.length))),
        wds.batched(batch_size, collation_fn=torch.stack, partial=False),  # [B, C, L]
    ).repeat()
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
