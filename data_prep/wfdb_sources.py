"""PhysioNet WFDB records (MIT-BIH, BIDMC, MIMIC-III waveforms...) as rows of windows, read with `wfdb`.

One row is one window of one channel of one record: `--window-s` seconds every `--stride-s`,
cut at the record's own rate (the conversion's Preprocess then resamples and normalises it, as
for HDF5 input). A record is the unit that is read once, like an HDF5 file: its row `path` is the
record's path without extension, its key `NAME:START` (START: the window's first sample at the
record's rate). Records come from a folder (its `RECORDS` file, else every header that is not a
segment of another), a `RECORDS` file, or an `s3://` prefix: remote headers are fetched once
each (one GET) at planning into a local cache, and a record's signal files once each (one GET)
when it is read; `wfdb` only ever opens local files (it would pass no storage options to fsspec).

A record's channel is the first of `channels` (e.g. MLII, then V5) that it has. Multi-segment
records (MIMIC-III layout) are assembled into one signal segment by segment, each read by `wfdb`
by the channel's name: a segment that lacks the channel, or an empty `~` segment, is NaN, and a
window touching NaN is a bad (non-finite) row. The patient of a record comes from a
`--subject-map` CSV (`record,patient_id`: mitdb's 201 and 202 are one subject), else from its
`p<digits>` folder (MIMIC layouts), else from the number ending its name (`bidmc07` -> 7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np
import pandas as pd

from data_prep.hdf5_sources import checked_segment, download
from data_prep.storage import is_remote, retrying

NO_LABEL = -1


class WfdbError(ValueError):
    """A record that cannot be used; the message names the record or file and what was expected."""


class NoChannel(WfdbError):
    """A record with none of the channels asked for: a selection, always skipped, never an error."""


@dataclass(frozen=True)
class WindowSpec:
    """Which channel and which windows of each record become rows."""

    channels: tuple[str, ...]  # signal names, first match wins
    window_s: float
    stride_s: float

    def __post_init__(self) -> None:
        if not self.channels or any(not c for c in self.channels):
            raise ValueError(f"--channel {','.join(self.channels)!r}: expected signal names, e.g. MLII,II")
        for name in ("window_s", "stride_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"--{name.replace('_', '-')}={v!r}: expected a positive number of seconds")

    @classmethod
    def from_flags(cls, channel: str | None, window_s: float, stride_s: float | None) -> "WindowSpec":
        """From --channel (comma-separated alternatives), --window-s and --stride-s (None: consecutive windows)."""
        return cls(tuple(c.strip() for c in (channel or "").split(",")), window_s,
                   stride_s if stride_s is not None else window_s)

    def samples(self, fs: float, record: str) -> tuple[int, int]:
        """(window, stride) in samples at rate fs; a clear error when either is not whole."""
        out = []
        for name, sec in (("window", self.window_s), ("stride", self.stride_s)):
            n = Fraction(sec).limit_denominator(10_000) * Fraction(fs).limit_denominator(10_000)
            if n.denominator != 1:
                raise WfdbError(f"record {record}: a {sec:g}-s {name} at {fs:g} Hz is {float(n):g} samples, not a "
                                f"whole number; pick a --{name}-s that is")
            if n < 1:
                raise WfdbError(f"record {record}: a {sec:g}-s {name} at {fs:g} Hz is {float(n):g} samples; expected "
                                f"at least one")
            out.append(int(n))
        return out[0], out[1]


@dataclass(frozen=True)
class RecordInfo:
    """What a record's headers say, for planning: nothing of its signal is read."""

    name: str  # relative to the root, without extension: "100", "p00/p000020/3000003"
    path: str  # root + "/" + name (local path or URL): the rows' `path`
    fs: float
    sig_len: int
    channel: str
    patient: int
    dat_files: tuple[str, ...]  # signal files (relative to the root) that hold the channel
    headers: tuple[str, ...]  # its header and its segments' headers (relative to the root, no extension)
    dat_ids: tuple = ()  # (size, mtime or ETag) of each signal file, for the source's fingerprint


# ----------------------------------------------------------------------------------------------
# listing and headers


def _fs(root: str, storage_options: dict | None):
    import fsspec

    return fsspec.core.url_to_fs(root, **(storage_options or {}))


def list_records(root: str, storage_options: dict | None = None, cache_dir: str | None = None) -> tuple[str, list[str]]:
    """(folder, record names) for a folder, a RECORDS file or an s3:// prefix.

    A RECORDS line ending in `/` is a subfolder with its own RECORDS (MIMIC-III's layout). Without
    RECORDS: every `.hea` in the folder (not below), sorted, less those that are segments of another
    (remote headers go into the HeaderCache at `cache_dir`, so each is fetched once).
    """
    root = root.rstrip("/")
    fs, p = _fs(root, storage_options)
    info = retrying(lambda: _info(fs, p), "reading info of", root)
    if info is None:
        raise FileNotFoundError(f"--wfdb {root} does not exist")
    if info.get("type") != "directory":
        if os.path.basename(p) != "RECORDS":
            raise WfdbError(f"--wfdb {root}: expected a folder of WFDB records, a RECORDS file or an s3:// prefix")
        folder = root.rsplit("/", 1)[0] if "/" in root else "."
        return folder, _read_records_file(folder, fs, p.rsplit("/", 1)[0] if "/" in p else ".", "")
    if retrying(lambda: fs.exists(f"{p}/RECORDS"), "checking", f"{root}/RECORDS"):
        return root, _read_records_file(root, fs, p, "")
    names = sorted(os.path.basename(f)[:-4] for f in retrying(lambda: fs.ls(p, detail=False), "listing", root)
                   if f.endswith(".hea"))
    if not names:
        raise WfdbError(f"--wfdb {root}: no RECORDS file and no .hea headers in it; expected a folder of WFDB records")
    return root, _drop_segments(HeaderCache(root, storage_options, cache_dir), names)


def _info(fs, p: str) -> dict | None:
    try:
        return fs.info(p)
    except FileNotFoundError:
        return None


def _read_records_file(url_folder: str, fs, p: str, prefix: str) -> list[str]:
    where = f"{url_folder}/{prefix}RECORDS"
    if prefix.count("/") > 8:
        raise WfdbError(f"{where}: subfolders nest deeper than 8 levels (a link loop?)")
    text = retrying(lambda: fs.cat_file(f"{p}/RECORDS"), "reading", where).decode("utf-8", "replace")
    names = []
    for line in text.split():
        parts = line.rstrip("/").split("/")
        if line.startswith("/") or any(x in ("", ".", "..") for x in parts):
            raise WfdbError(f"{where}: line {line!r} is not a record name or subfolder below {url_folder} (no /, ., "
                            f".. parts)")
        if line.endswith("/"):  # a subfolder with its own RECORDS
            names += _read_records_file(url_folder, fs, f"{p}/{line.rstrip('/')}", f"{prefix}{line}")
        else:
            names.append(prefix + line)
    if not prefix:
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise WfdbError(f"{where}: record {n} is listed twice")
            seen.add(n)
        if not names:
            raise WfdbError(f"{where} lists no record")
    return names


def _drop_segments(cache: "HeaderCache", names: list[str]) -> list[str]:
    """Names that are not segments (or the layout) of a multi-segment record among them."""
    segs: set[str] = set()
    for n in names:
        try:
            with open(cache.local(n) + ".hea", "rb") as fh:
                lines = [ln for ln in fh.read(1 << 20).decode("utf-8", "replace").splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError:
            if cache.remote:
                raise
            continue  # a local header that is not a readable file: read_header names it (or skips it) later
        if lines and "/" in lines[0].split()[0]:  # "name/n_segments ...": a multi-segment header lists its segments
            segs |= {ln.split()[0] for ln in lines[1:]}
    return [n for n in names if n not in segs]


_OPENED: set[str] = set()  # header cache folders this process has opened (and emptied once)


class HeaderCache:
    """Local copies of a remote source's headers, fetched once each (one GET) by this process; local
    sources are read in place. The folder is this process's own (in the conversion's spill folder, removed
    with it), so no run reads a header another run fetched, perhaps before the header changed."""

    def __init__(self, root: str, storage_options: dict | None, cache_dir: str | None):
        self.root, self.storage_options = root, storage_options or {}
        self.remote = is_remote(root)
        key = hashlib.sha256(root.encode()).hexdigest()[:12]
        self.dir = (os.path.join(cache_dir or tempfile.gettempdir(), f"wfdb-headers-{key}-{os.getpid()}")
                    if self.remote else root)
        if self.remote and self.dir not in _OPENED:  # once per process: a dead run's, whose pid this one reuses
            shutil.rmtree(self.dir, ignore_errors=True)
            _OPENED.add(self.dir)

    def local(self, rel_no_ext: str) -> str:
        """The local path (no extension) of a header; fetched first if remote and not cached. A missing
        header is FileNotFoundError; a storage failure (after retries) passes through as it is."""
        base = os.path.join(self.dir, rel_no_ext)
        if self.remote and not os.path.exists(base + ".hea"):
            os.makedirs(os.path.dirname(base), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hea-", dir=os.path.dirname(base))
            os.close(fd)
            try:
                download(f"{self.root}/{rel_no_ext}.hea", tmp, self.storage_options)
                os.replace(tmp, base + ".hea")
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return base


def read_header(cache: HeaderCache, name: str) -> tuple[object, list[str]]:
    """(wfdb's header of record `name`, with its segments' headers, and the names of those header
    files relative to the root); WfdbError naming the file otherwise."""
    import wfdb

    where = f"{cache.root}/{name}.hea"
    headers = [name]

    def parse(base: str, rd_segments: bool):
        try:
            return wfdb.rdheader(base, rd_segments=rd_segments)
        except FileNotFoundError as e:
            raise WfdbError(f"{where}: header {os.path.basename(str(e.filename or e))} not found") from None
        except Exception as e:  # wfdb's parser raises many types on a malformed header
            raise WfdbError(f"{where}: not a readable WFDB header ({type(e).__name__}: {e})") from None

    try:
        base = cache.local(name)  # download errors (StorageError, PermissionError) are not bad records
        h = parse(base, False)
        if getattr(h, "seg_name", None):
            folder = os.path.dirname(name)
            for s in h.seg_name:
                if s != "~":
                    if "/" in s or s in (".", ".."):
                        raise WfdbError(f"{where}: segment name {s!r} is not a record in its folder")
                    headers.append(f"{folder}/{s}" if folder else s)
                    cache.local(headers[-1])
            h = parse(base, True)
    except FileNotFoundError as e:
        raise WfdbError(f"{where}: header not found ({os.path.basename(str(e.filename or e))} is missing)") from None
    _check_record_line(base + ".hea", where)
    if not h.fs or not (0 < h.fs <= MAX_RATE):
        raise WfdbError(f"{where}: sampling rate {h.fs!r} Hz; expected a rate in (0, {MAX_RATE:g}] Hz")
    if not h.sig_len or h.sig_len < 0:
        raise WfdbError(f"{where}: sample count {h.sig_len!r} (0 or none: unknown to WFDB); expected the record's "
                        f"length in samples")
    multi = bool(getattr(h, "seg_name", None))
    if multi and sum(h.seg_len) != h.sig_len:
        raise WfdbError(f"{where}: its segments hold {sum(h.seg_len)} samples, the record line says {h.sig_len}")
    for s, n in _segments(h):
        if s is None:
            continue
        if s.sig_len is None or (multi and s.sig_len != n):
            raise WfdbError(f"{where}: segment {s.record_name} has {s.sig_len} samples, the record's header says {n}")
        if len(s.sig_name or []) != s.n_sig:
            seg_hea = "/".join(x for x in (cache.root, os.path.dirname(name), s.record_name) if x) + ".hea"
            raise WfdbError(f"{seg_hea}: says {s.n_sig} signals but describes {len(s.sig_name or [])}")
        if multi and s.fs != h.fs:
            raise WfdbError(f"{where}: segment {s.record_name} is at {s.fs:g} Hz, the record at {h.fs:g} Hz")
    return h, headers


MAX_RATE = 1e6  # Hz: above any physiological waveform


def _check_record_line(path: str, where: str) -> None:
    """The header's record line as WFDB defines it (`name[/segments] n_sig [fs[/counter[(base)]] [length ...]]`):
    wfdb's parser falls back to 250 Hz where it cannot read the rate (a negative or `nan` one), so the rate
    and the counts are checked here, in the text."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(1 << 16).decode("utf-8", "replace")
    except OSError as e:
        raise WfdbError(f"{where}: cannot read the header ({e.strerror or e})") from None
    line = next((ln.split("#", 1)[0].split() for ln in text.splitlines() if ln.split("#", 1)[0].strip()), [])
    fields = {"signal count": line[1] if len(line) > 1 else None,
              "rate": re.split(r"[/(]", line[2])[0] if len(line) > 2 else "250",  # WFDB's default when absent
              "sample count": line[3] if len(line) > 3 else None}
    if fields["signal count"] is None or not fields["signal count"].isdigit():
        raise WfdbError(f"{where}: record line {' '.join(line)!r}: expected 'name n_signals [rate [samples]]'")
    try:
        ok = 0 < float(fields["rate"]) <= MAX_RATE
    except ValueError:
        ok = False
    if not ok:
        raise WfdbError(f"{where}: record line {' '.join(line)!r}: rate {fields['rate']!r}; expected a rate in "
                        f"(0, {MAX_RATE:g}] Hz")
    if fields["sample count"] is not None and not fields["sample count"].isdigit():
        raise WfdbError(f"{where}: record line {' '.join(line)!r}: sample count {fields['sample count']!r}; "
                        f"expected a whole number")


def _segments(h) -> list:
    """[(segment header or None for '~', length)]: one entry for a single-segment record."""
    if getattr(h, "seg_name", None):
        return [(s, n) for s, n in zip(h.segments, h.seg_len) if n]  # the layout (length 0) holds no samples
    return [(h, h.sig_len)]


def record_channels(h) -> list[str]:
    names: list[str] = []
    for s, _ in _segments(h):
        for c in (s.sig_name or []) if s is not None else []:
            if c not in names:
                names.append(c)
    return names


def open_record(cache: HeaderCache, name: str, channels: tuple[str, ...]) -> tuple[object, list[str], str]:
    """(header, its header files, the first of `channels` it has) of record `name`, its signal formats
    checked; NoChannel when it has none of them, WfdbError for a bad header."""
    h, headers = read_header(cache, name)
    check_formats(h, f"{cache.root}/{name}.hea")
    have = record_channels(h)
    channel = next((c for c in channels if c in have), None)
    if channel is None:
        raise NoChannel(f"record {name} has none of the channels {','.join(channels)} (it has "
                        f"{','.join(have) or 'none'})")
    return h, headers, channel


def check_formats(h, where: str) -> None:
    from wfdb.io._signal import DAT_FMTS

    for s, _ in _segments(h):
        for fmt in (s.fmt or []) if s is not None else []:
            if str(fmt) not in DAT_FMTS:
                raise WfdbError(f"{where}: signal format {fmt!r} is not a WFDB format ({', '.join(DAT_FMTS)})")


def channel_files(h, channel: str, folder: str) -> list[tuple[str, int]]:
    """[(signal file relative to the root, bytes its header implies)] of the segments holding `channel`."""
    from wfdb.io._signal import BYTES_PER_SAMPLE

    out = []
    for s, n in _segments(h):
        if s is None or channel not in (s.sig_name or []):
            continue
        i = s.sig_name.index(channel)
        fname = s.file_name[i]
        in_file = [j for j, f in enumerate(s.file_name) if f == fname]
        spf = sum(int((s.samps_per_frame or [1] * len(s.file_name))[j] or 1) for j in in_file)
        fmts = {str(s.fmt[j]) for j in in_file}
        per = BYTES_PER_SAMPLE.get(fmts.pop(), 0) if len(fmts) == 1 else 0
        offset = int((s.byte_offset or [0] * len(s.file_name))[i] or 0)
        want = offset + int(n * spf * per) if per else 0  # 0: compressed or mixed formats: size not checked
        rel = f"{folder}/{fname}" if folder else fname
        if rel not in [r for r, _ in out]:
            out.append((rel, want))
    return out


def patient_of(name: str, subject_map: dict[str, int] | None) -> int:
    """The record's subject: from --subject-map (by full name, then base name); else the nearest folder named
    `p` + digits (PhysioNet's MIMIC-III/IV layouts: p00/p000020/3000003 -> 20); else the number that ends the
    record's name (`100` -> 100, `bidmc07` -> 7). Anything else is one line asking for a --subject-map."""
    parts = name.rstrip("/").split("/")
    if subject_map is not None:
        for k in (name, parts[-1]):
            if k in subject_map:
                return subject_map[k]
    for folder in reversed(parts[:-1]):
        if re.fullmatch(r"p\d{1,18}", folder):
            return int(folder[1:])
    m = re.fullmatch(r"[A-Za-z_-]*(\d{1,18})", parts[-1])
    if not m:
        raise WfdbError(f"record {name}: its name is not letters then a number (e.g. 100, bidmc07), so it gives no "
                        f"patient id; give a --subject-map CSV (columns record,patient_id)")
    return int(m.group(1))


def unmatched_subjects(subject_map: dict[str, int] | None, names: list[str]) -> list[str]:
    """Subject-map rows that name no record (by full or base name): said, since they change nothing."""
    known = set(names) | {n.rsplit("/", 1)[-1] for n in names}
    return sorted(k for k in (subject_map or {}) if k not in known)


def read_subject_map(path: str) -> dict[str, int]:
    """record -> patient id from a CSV with columns record,patient_id."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"--subject-map {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"--subject-map {path}: not a readable CSV ({e})") from None
    if not {"record", "patient_id"} <= set(df.columns):
        raise ValueError(f"--subject-map {path}: header {list(df.columns)}; expected columns record,patient_id")
    out = {}
    for i, (r, pid) in enumerate(zip(df["record"].str.strip(), df["patient_id"].str.strip()), start=2):
        if not re.fullmatch(r"-?\d{1,18}", pid):
            raise ValueError(f"--subject-map {path}: line {i}: patient_id {pid!r} is not an integer of at most 18 digits")
        if r in out:
            raise ValueError(f"--subject-map {path}: line {i}: record {r!r} is listed twice")
        out[r] = int(pid)
    return out


def add_wfdb_options(ap, label: bool = False) -> None:
    """--channel, --window-s, --stride-s, --subject-map: shared by --wfdb and `himae-prep label`."""
    ap.add_argument("--channel", default=None if not label else "MLII", metavar="NAMES",
                    help="with --wfdb: the signal to read, by name, with alternatives in order (MLII,V5: MLII, else "
                         "V5); a record with none of them is skipped, named and counted" +
                         (" (default: MLII)" if label else " (default: none; required with --wfdb)"))
    ap.add_argument("--window-s", type=float, default=10.0, metavar="S",
                    help="window length in seconds; it must be a whole number of samples at the records' rate "
                         "(default: 10)")
    ap.add_argument("--stride-s", type=float, default=None, metavar="S",
                    help="seconds between window starts (default: --window-s: consecutive windows)")
    ap.add_argument("--subject-map", default=None, metavar="CSV",
                    help="CSV with columns record,patient_id (e.g. mitdb's 201 and 202 are one subject) (default: "
                         "the p<digits> folder of PhysioNet's MIMIC layouts, else the number ending the record's name)")


# ----------------------------------------------------------------------------------------------
# the source: records -> rows of windows


class WfdbSource:
    """WFDB records as the conversion's row source (same interface as IndexSource).

    Records that cannot be used (none of the channels; an unreadable header, an unknown signal
    format, a missing signal file) are named and counted in `skipped_records`; under on_bad
    "error" all but a missing channel stop the job with that line.
    """

    kind = "pretrain"

    def __init__(self, root: str, spec: WindowSpec, storage_options: dict | None = None, chunk_rows: int = 1_000_000,
                 cache_dir: str | None = None, subject_map: dict[str, int] | None = None, on_bad: str = "error"):
        self.spec, self.storage_options, self.chunk_rows = spec, storage_options or {}, chunk_rows
        self.url, names = list_records(root, storage_options, cache_dir)
        self.unmatched_subjects = unmatched_subjects(subject_map, names)
        self.cache = HeaderCache(self.url, storage_options, cache_dir)
        self.skipped_records: dict[str, str] = {}
        self.skipped: Counter = Counter()
        self.records: list[RecordInfo] = []
        listing = _Listing(self.url, self.storage_options)
        for name in names:
            try:
                self.records.append(self._plan_record(name, subject_map, listing))
            except NoChannel as e:
                self._skip(name, "record_no_channel", str(e), False)
            except WfdbError as e:
                self._skip(name, "record_unreadable", str(e), on_bad == "error")
        if not self.records:
            why = "; ".join(list(self.skipped_records.values())[:3])
            raise WfdbError(f"--wfdb {self.url}: none of its {len(names)} record(s) is usable ({why})")
        rates = Counter(r.fs for r in self.records)
        self.rate = rates.most_common(1)[0][0]
        for r in [r for r in self.records if r.fs != self.rate]:  # one conversion, one input rate
            msg = (f"record {r.name}: {r.fs:g} Hz, but the other records of {self.url} are at {self.rate:g} Hz; convert "
                   f"records of each rate separately")
            self._skip(r.name, "record_other_rate", msg, on_bad == "error")
        self.records = [r for r in self.records if r.fs == self.rate]
        self.window, self.stride = spec.samples(self.rate, self.records[0].name)
        self.shape = (1, self.window)
        for r in [r for r in self.records if r.sig_len < self.window]:  # no window: named, not silently empty
            self._skip(r.name, "record_too_short", f"record {r.name}: {r.sig_len} samples, shorter than one "
                                                   f"{spec.window_s:g}-s window ({self.window})", False)
        self.records = [r for r in self.records if r.sig_len >= self.window]
        if not self.records:
            raise WfdbError(f"--wfdb {self.url}: no record is as long as one {self.spec.window_s:g}-s window")
        if subject_map is None:
            check_patients([(r.name, r.patient) for r in self.records])

    def _skip(self, name: str, reason: str, message: str, fatal: bool) -> None:
        if fatal:
            raise WfdbError(message)
        self.skipped_records[name] = message
        self.skipped[reason] += 1

    def _plan_record(self, name: str, subject_map: dict[str, int] | None, listing: "_Listing") -> RecordInfo:
        h, headers, channel = open_record(self.cache, name, self.spec.channels)
        where = f"{self.url}/{name}.hea"
        folder = os.path.dirname(name)
        files = channel_files(h, channel, folder)
        ids = []
        for rel, want in files:
            found = listing.info(rel)
            if found is None:
                raise WfdbError(f"{where} names {self.url}/{rel}, which does not exist")
            if want and found[0] < want:
                raise WfdbError(f"{self.url}/{rel}: {found[0]} bytes, shorter than the {want} its header implies "
                                f"({h.sig_len} samples); truncated?")
            ids.append(found)
        return RecordInfo(name, f"{self.url}/{name}", float(h.fs), int(h.sig_len), channel,
                          patient_of(name, subject_map), tuple(r for r, _ in files), tuple(headers), tuple(ids))

    def fingerprint(self) -> list:
        """Every record's headers (sha256 of their bytes) and signal files (size and mtime or ETag): a
        changed file changes the plan, and a re-run over an output made from other data is refused."""
        def sha(rel: str) -> str:
            with open(os.path.join(self.cache.dir, rel + ".hea"), "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()[:16]

        return [[r.name, r.channel, [sha(h) for h in r.headers], list(zip(r.dat_files, r.dat_ids))]
                for r in self.records]

    def starts(self, r: RecordInfo) -> np.ndarray:
        n = (r.sig_len - self.window) // self.stride + 1 if r.sig_len >= self.window else 0
        return np.arange(n, dtype=np.int64) * self.stride

    def chunks(self) -> Iterator[pd.DataFrame]:
        row, buf = 0, []
        for r in self.records:
            s = self.starts(r)
            if not len(s):
                continue
            buf.append(pd.DataFrame({
                "row": np.arange(row, row + len(s), dtype=np.int64), "path": np.full(len(s), r.path, dtype=object),
                "key": np.array([f"{r.name}:{x}" for x in s], dtype=object),
                "patient": np.full(len(s), r.patient, np.int64), "label": np.full(len(s), NO_LABEL, np.int8),
            }))
            row += len(s)
            if sum(map(len, buf)) >= self.chunk_rows:
                yield pd.concat(buf, ignore_index=True)
                buf = []
        if buf:
            yield pd.concat(buf, ignore_index=True)

    def reader(self) -> "WfdbReader":
        return WfdbReader(self.url, {r.path: r for r in self.records}, self.window, self.cache.dir)

    def describe(self) -> dict:
        """For the plan record and the manifest: what was read, and which records were not."""
        return {"records": len(self.records), "channels": sorted(Counter(r.channel for r in self.records).items()),
                "rate": self.rate, "window_s": self.spec.window_s, "stride_s": self.spec.stride_s,
                "skipped_records": dict(list(sorted(self.skipped_records.items()))[:100])}


class _Listing:
    """(size, mtime or ETag) of files below the root, listing one folder at a time (remote: one LIST
    per folder, the last folder kept): memory is one folder's, not the whole source's."""

    def __init__(self, root: str, storage_options: dict | None):
        self.root, self.remote = root, is_remote(root)
        self.fs, self.path = _fs(root, storage_options)
        self.folder: str | None = None
        self.files: dict[str, tuple] = {}

    def info(self, rel: str) -> tuple | None:
        if not self.remote:
            try:
                st = os.stat(os.path.join(self.path, rel))
            except OSError:
                return None
            return int(st.st_size), int(st.st_mtime_ns)
        folder = os.path.dirname(rel)
        if folder != self.folder:
            where = f"{self.path}/{folder}" if folder else self.path

            def ls() -> list:
                try:
                    return self.fs.ls(where, detail=True)
                except FileNotFoundError:
                    return []

            self.files = {os.path.basename(i["name"]): (int(i.get("size") or 0), str(i.get("ETag") or i.get("mtime") or
                                                                                         i.get("LastModified") or ""))
                          for i in retrying(ls, "listing", f"{self.root}/{folder}")}
            self.folder = folder
        return self.files.get(os.path.basename(rel))


def check_patients(records: list[tuple[str, int]]) -> None:
    """Records whose names give one patient id but differ in more than the number's padding (`a7`, `b7`)
    are probably two subjects: one line asking for a --subject-map rather than a silent merge."""
    seen: dict[int, str] = {}
    for name, pid in records:
        other = seen.setdefault(pid, name)
        if other != name and re.sub(r"\d", "", other) != re.sub(r"\d", "", name) and \
                not re.search(r"(^|/)p\d+/", name):
            raise WfdbError(f"records {other} and {name} both give patient id {pid} from their names; give a "
                            f"--subject-map CSV (columns record,patient_id)")


# ----------------------------------------------------------------------------------------------
# reading one record's channel


def read_channel(base: str, name: str, channel: str, sig_len: int) -> np.ndarray:
    """The physical signal [sig_len] float64 of `channel` of the local record `base` (NaN in gaps).

    A multi-segment record is assembled here, segment by segment, each read by the channel's *name*:
    wfdb's own assembly of a fixed-layout record reads every segment by the first segment's channel
    index, so a segment that lacks the channel would give another channel's samples.
    """
    import wfdb

    h = wfdb.rdheader(base, rd_segments=True)
    if not getattr(h, "seg_name", None):
        return _read_segment(base, name, channel, sig_len)
    out = np.full(sig_len, np.nan)
    folder, start = os.path.dirname(base), 0
    for seg, n in zip(h.segments, h.seg_len):
        if seg is not None and n and channel in (seg.sig_name or []):
            out[start:start + n] = _read_segment(os.path.join(folder, seg.record_name),
                                                 f"{name} (segment {seg.record_name})", channel, n)
        start += n
    return out


def _read_segment(base: str, name: str, channel: str, sig_len: int) -> np.ndarray:
    import wfdb

    try:
        rec = wfdb.rdrecord(base, channel_names=[channel], physical=True)
    except FileNotFoundError as e:
        raise WfdbError(f"record {name}: signal file {os.path.basename(str(e.filename or e))} is missing") from None
    except Exception as e:
        raise WfdbError(f"record {name}: cannot read channel {channel} ({type(e).__name__}: {e}); is a signal file "
                        f"shorter than its header says ({sig_len} samples)?") from None
    sig = None if rec.p_signal is None else np.asarray(rec.p_signal[:, 0], dtype=np.float64)
    if sig is None or len(sig) != sig_len:
        got = 0 if sig is None else len(sig)
        raise WfdbError(f"record {name}: channel {channel} has {got} samples, its header says {sig_len}")
    return sig


@dataclass(frozen=True)
class WfdbReader:
    """external_shuffle's reader for WFDB rows (picklable: pool workers get it): fetch, open, read."""

    root: str
    records: dict  # path -> RecordInfo
    window: int
    header_dir: str  # the local copies of a remote source's headers

    def subset(self, paths: list[str]) -> "WfdbReader":
        """This reader for the given records only (what one wave's job needs)."""
        return dataclasses.replace(self, records={p: self.records[p] for p in paths if p in self.records})

    def fetch(self, path: str, storage_options: dict | None, tmp_dir: str | None) -> str:
        """A local base path of record `path`: itself, or a folder with its cached headers and its
        signal files downloaded (one GET each)."""
        r = self.records[path]
        if not is_remote(self.root):
            return path
        local = tempfile.mkdtemp(prefix=".rec-", dir=tmp_dir)
        try:
            for rel in r.headers:  # segments sit in the record's folder, as wfdb expects
                shutil.copy(os.path.join(self.header_dir, rel + ".hea"), local)
            for rel in r.dat_files:
                download(f"{self.root}/{rel}", os.path.join(local, os.path.basename(rel)), storage_options)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        return os.path.join(local, os.path.basename(r.name))

    def open(self, local: str, path: str) -> np.ndarray:
        """The record's channel as [sig_len] float64; a download is removed once read."""
        r = self.records[path]
        try:
            return read_channel(local, r.name, r.channel, r.sig_len)
        finally:
            if local != path:
                shutil.rmtree(os.path.dirname(local), ignore_errors=True)

    def read(self, path: str, parts: list, fit_length, channels: int | None, opened) -> Iterator[tuple]:
        """Yield (part, row, window [1, W] float32) for usable rows, (part, None, None) after each part;
        see hdf5_sources.read_file."""
        name = self.records[path].name
        try:
            sig = opened()
        except (WfdbError, FileNotFoundError) as e:
            for part, grp, policy in parts:
                for r in grp["row"]:
                    policy.reject("unreadable_record", f"{e} (window row {int(r) + 1})")
                yield part, None, None
            return
        for part, grp, policy in parts:
            for r, k in zip(grp["row"].to_numpy(), grp["key"].to_numpy()):
                start = int(str(k).rsplit(":", 1)[1])
                seg = checked_segment(sig[start:start + self.window], lambda k=k: f"record {name} window {k!r}",
                                      policy, fit_length, channels, self.window)
                if seg is not None:
                    yield part, int(r), seg
            yield part, None, None

