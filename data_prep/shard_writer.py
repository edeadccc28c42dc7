"""Writes WebDataset tar shards to a local folder or an fsspec URL (s3://...), atomically.

Each shard is written to a local temp file by webdataset's own TarWriter, then renamed into
place (local) or uploaded with one PUT (S3), so a shard that exists is complete. A small
sidecar under `_parts/` records each finished shard's sample count and skips, and is what a
re-run checks to resume instead of redo.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


class ShardOutput:
    """An output folder, local or remote, with atomic file placement."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.is_local = "://" not in self.url or self.url.startswith("file://")
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def read_text(self, name: str) -> str:
        with self.fs.open(self.path(name), "r") as fh:
            return fh.read()

    def place(self, local_tmp: str, name: str) -> None:
        """Move a finished local temp file to `name`: rename locally, a single PUT remotely."""
        if self.is_local:
            Path(self.path(name)).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local_tmp, self.path(name))
        else:
            self.fs.put_file(local_tmp, self.path(name))
            os.unlink(local_tmp)

    def write_text(self, name: str, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=self._tmp_dir())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        self.place(tmp, name)

    def _tmp_dir(self) -> str | None:
        return self.root if self.is_local else None  # same filesystem, so rename is atomic


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def part_name(i: int) -> str:
    return f"_parts/shard-{i:06d}.json"


def write_shard(
    out: ShardOutput, index: int, samples: list[tuple[str, np.ndarray, dict]], stats: dict
) -> dict:
    """Write samples (key, signal [C, L] float32, metadata) as one tar shard plus its sidecar."""
    import webdataset as wds

    for key, _, _ in samples:
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/' (webdataset splits on them)")
    fd, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tar", dir=out._tmp_dir())
    with os.fdopen(fd, "wb") as fh:
        with wds.TarWriter(fh) as sink:
            for key, signal, meta in samples:
                sink.write({"__key__": key, "signal.npy": signal, "json": meta})
    out.place(tmp, shard_name(index))
    record = {"shard": shard_name(index), "n_samples": len(samples), **stats}
    out.write_text(part_name(index), json.dumps(record))  # written last: marks the shard done
    return record
