"""Shard format v2: the one definition the conversion job writes and the loader reads.

A shard is a plain ustar tar. Each *block* of up to `block_size` segments is one webdataset
sample, i.e. four members sharing the key `<split>-<shard>-<block>`:

  <key>.signal.npy   [n, C, L]  float16 (default) or float32, preprocessed (see preprocess.py)
  <key>.key.npy      [n]        unicode: the source key of each segment (global_idx, or row)
  <key>.patient.npy  [n]        int64: patient id, -1 where the source has none
  <key>.label.npy    [n]        int8: label 0/1, -1 where the source has none

So stock `webdataset.WebDataset(urls).decode()` reads a shard (one sample per block), and a
block costs four 512-byte headers instead of two headers and a JSON per segment. Headers carry
a fixed mtime, owner and mode: the same rows and options give byte-identical shards.

Layout of an output folder: `train/shard-000000.tar`, `val/shard-000000.tar`, ...,
`_parts/` (one JSON record per finished shard, plus `plan.json`), and `manifest.json`, written
last, listing every shard with its sample count, bytes and sha256.
"""

from __future__ import annotations

import functools
import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

FORMAT = "himae-wds-v2"
MANIFEST = "manifest.json"
PARTS = "_parts"
PLAN = f"{PARTS}/plan.json"
SPLITS = ("train", "val")
MEMBERS = {"signal": "signal.npy", "key": "key.npy", "patient": "patient.npy", "label": "label.npy"}
DTYPES = ("float16", "float32")


def shard_name(split: str, i: int) -> str:
    return f"{split}/shard-{i:06d}.tar"


def part_name(split: str, i: int) -> str:
    return f"{PARTS}/{split}-{i:06d}.json"


@dataclass
class Block:
    signal: np.ndarray  # [n, C, L]
    key: np.ndarray  # [n] str
    patient: np.ndarray  # [n] int64
    label: np.ndarray  # [n] int8

    def __len__(self) -> int:
        return len(self.key)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard_tar(fileobj, split: str, shard: int, blocks: list[Block], dtype: str) -> None:
    """Write blocks as one deterministic ustar tar (no PAX headers, fixed mtime/owner/mode)."""
    if dtype not in DTYPES:
        raise ValueError(f"shard dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for b, blk in enumerate(blocks):
            stem = f"{split}-{shard:06d}-{b:05d}"
            _add_member(tar, f"{stem}.{MEMBERS['signal']}", _npy_bytes(blk.signal.astype(dtype)))
            _add_member(tar, f"{stem}.{MEMBERS['key']}", _npy_bytes(np.asarray(blk.key, dtype=str)))
            _add_member(tar, f"{stem}.{MEMBERS['patient']}", _npy_bytes(blk.patient.astype(np.int64)))
            _add_member(tar, f"{stem}.{MEMBERS['label']}", _npy_bytes(blk.label.astype(np.int8)))


class ShardFormatError(ValueError):
    """A shard that does not parse as format v2; the message names the shard."""


_SUFFIX_FIELD = {v: k for k, v in MEMBERS.items()}


@functools.lru_cache(maxsize=256)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an .npy header; cached, since every full block has the same one."""
    f = io.BytesIO(head)
    version = np.lib.format.read_magic(f)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unsupported .npy version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject or fortran or dtype.itemsize == 0:
        raise ValueError("object, zero-size or Fortran-order arrays are not part of the format")
    return shape, dtype, f.tell()


def _npy_view(data: bytes, offset: int, size: int, where: str) -> np.ndarray:
    """The .npy member at data[offset:offset+size] as a read-only array viewing `data` (no copy)."""
    if size < 10 or data[offset:offset + 6] != b"\x93NUMPY":
        raise ShardFormatError(f"{where}: not an .npy array")
    hlen = (int.from_bytes(data[offset + 8:offset + 10], "little") + 10 if data[offset + 6] == 1
            else int.from_bytes(data[offset + 8:offset + 12], "little") + 12)
    try:
        shape, dtype, start = _npy_header(bytes(data[offset:offset + hlen]))
    except ValueError as e:
        raise ShardFormatError(f"{where}: {e}") from e
    count = math.prod(shape)  # Python ints: a forged shape cannot overflow past the size check
    if any(d < 0 for d in shape) or start + count * dtype.itemsize > size:
        raise ShardFormatError(f"{where}: truncated array data")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset + start).reshape(shape)


def _tar_members(data: bytes, where: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar held in memory.

    Plain ustar (what write_shard_tar writes) is parsed directly, 512-byte header by header;
    anything else (PAX or GNU long names, from re-packing with another tool) goes through tarfile.
    """
    off, n = 0, len(data)
    while off + 512 <= n:
        header = data[off:off + 512]
        if header.count(0) == 512:  # end-of-archive marker
            return
        typeflag = header[156:157]
        if typeflag not in (b"0", b"\0") or header[257:262] != b"ustar":
            yield from _tarfile_members(data, where)
            return
        try:
            checksum = int(header[148:156].split(b"\0")[0].strip() or b"0", 8)
            size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode()
        except ValueError as e:  # a garbled octal field or name
            raise ShardFormatError(f"{where}: damaged tar header at byte {off} ({e})") from e
        if sum(header[:148]) + 8 * 32 + sum(header[156:]) != checksum:
            raise ShardFormatError(f"{where}: bad tar header checksum at byte {off}")
        if off + 512 + size > n:
            raise ShardFormatError(f"{where}: truncated: member {name!r} needs {size} bytes past byte {off + 512}")
        yield (f"{prefix}/{name}" if prefix else name), off + 512, size
        off += 512 + -(-size // 512) * 512
    raise ShardFormatError(f"{where}: truncated: no end-of-archive marker")


def _tarfile_members(data: bytes, where: str) -> Iterator[tuple[str, int, int]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, m.offset_data, m.size
    except tarfile.TarError as e:
        raise ShardFormatError(f"{where}: not a readable tar ({e})") from e


def read_shard_blocks(data: bytes, where: str) -> Iterator[Block]:
    """Parse a whole shard held in memory into its blocks, in order (arrays view `data`, no copy)."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    order: list[str] = []
    for name, offset, size in _tar_members(data, where):
        stem, _, suffix = name.partition(".")
        field_name = _SUFFIX_FIELD.get(suffix)
        if field_name is None:
            raise ShardFormatError(f"{where}: unexpected member {name!r}")
        if stem not in parts:
            parts[stem] = {}
            order.append(stem)
        parts[stem][field_name] = _npy_view(data, offset, size, f"{where} member {name!r}")
    for stem in order:
        p = parts[stem]
        missing = set(MEMBERS) - set(p)
        if missing:
            raise ShardFormatError(f"{where}: block {stem!r} lacks member(s) {sorted(missing)}")
        n = len(p["key"])
        if p["signal"].ndim != 3 or p["signal"].shape[0] != n or len(p["patient"]) != n or len(p["label"]) != n:
            raise ShardFormatError(f"{where}: block {stem!r} arrays disagree in length")
        yield Block(p["signal"], p["key"], p["patient"], p["label"])


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute URL or path
    name: str  # relative to the manifest's folder, e.g. train/shard-000000.tar
    n_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What the loader needs from manifest.json."""

    url: str  # where manifest.json lives
    base: str  # the folder holding it
    kind: str
    length: int  # segment length as stored (after preprocessing)
    channels: int
    dtype: str
    block_size: int
    preprocess: dict
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    def shards(self, split: str = "train") -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"{self.url}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def n_samples(self, split: str = "train") -> int:
        return sum(s.n_samples for s in self.shards(split))


_SHARD_FIELDS = {"url": str, "n_samples": int, "bytes": int, "sha256": str}


def _shard_info(s: object, base: str, where: str) -> ShardInfo:
    """One entry of a split's `shards`, checked: the error names the file and the entry."""
    if not isinstance(s, dict):
        raise ValueError(f"{where} is a {type(s).__name__}, expected an object with {sorted(_SHARD_FIELDS)}")
    for k, typ in _SHARD_FIELDS.items():
        v = s.get(k)
        if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v < 0):
            expected = "a string" if typ is str else "a whole number >= 0"
            raise ValueError(f"{where}.{k} = {v!r}: expected {expected}")
    return ShardInfo(f"{base}/{s['url']}", s["url"], s["n_samples"], s["bytes"], s["sha256"])


def parse_manifest(text: str, url: str) -> Manifest:
    """Validate and parse manifest.json text; the error names the file and the key."""
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: not valid JSON ({e})") from e
    except RecursionError:
        raise ValueError(f"{url}: nested too deeply to be a manifest") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise ValueError(f"{url}: format {found!r}, expected {FORMAT!r}; re-run himae-prep to convert to format v2")
    for k in ("kind", "length", "channels", "dtype", "block_size", "preprocess", "splits"):
        if k not in m:
            raise ValueError(f"{url}: manifest lacks key {k!r}; was it written by himae-prep?")
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if not isinstance(m["splits"], dict):
        raise ValueError(f"{url}: 'splits' is a {type(m['splits']).__name__}, expected an object "
                         f"{{\"train\": {{\"shards\": [...]}}, ...}}")
    splits = {}
    for name, sp in m["splits"].items():
        shards = sp.get("shards") if isinstance(sp, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"{url}: splits.{name} has no 'shards' list; was it written by himae-prep?")
        splits[name] = [_shard_info(s, base, f"{url}: splits.{name}.shards[{j}]") for j, s in enumerate(shards)]
    for k in ("length", "channels", "block_size"):
        if not isinstance(m[k], int) or isinstance(m[k], bool) or m[k] < 1:
            raise ValueError(f"{url}: {k} = {m[k]!r}: expected a whole number >= 1")
    for k, typ in (("kind", str), ("dtype", str), ("preprocess", dict)):
        if not isinstance(m[k], typ):
            raise ValueError(f"{url}: {k} = {m[k]!r}: expected {'a string' if typ is str else 'an object'}")
    return Manifest(url, base, m["kind"], m["length"], m["channels"], m["dtype"], m["block_size"], m["preprocess"],
                    splits, m)
