"""`himae-prep label`: WFDB records with beat annotations -> the labelled HDF5 that `himae-probe` reads.

A window is labelled 1 when an annotation whose symbol is in `--label-symbols` (default `V`,
PVC) falls inside it: start <= sample < start + window, at the record's own rate. Windows go in
record order (RECORDS, else sorted names), then time order; each is cut at the record's rate and
resampled to `--target-rate` by the conversion's own Preprocess (polyphase), in physical units,
not normalised: the probe applies each checkpoint's recorded preprocessing itself.

Output: `/ecg` (or `/ppg` for PLETH/PPG channels) [N, L] float32, `/labels` [N], `/patient_ids`
[N], `/records` [N] and `/starts` [N] (the window's first sample in the source), attrs `fs`.
Windows holding NaN (gaps) or a flat line are bad: counted per record, never written. Written
record by record (memory does not grow with the records) to a temp name, then renamed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from collections import Counter

import numpy as np

from data_prep.preprocess import Preprocess
from data_prep.storage import StorageError, is_remote, json_object
from data_prep.hdf5_sources import download
from data_prep.parent_death import pid_alive
from data_prep.wfdb_sources import (HeaderCache, NoChannel, WfdbError, WindowSpec, add_wfdb_options, channel_files,
                                    check_patients, list_records, open_record, patient_of, read_channel,
                                    read_subject_map, unmatched_subjects)

PPG_NAMES = ("PLETH", "PPG", "PLETH1", "PLETH2")
BLOCK = 1024  # windows cut, resampled and written at once


def _datasets(f, key: str, length: int) -> dict:
    """The output's resizable datasets; "signal" is written as `key` (/ecg or /ppg)."""
    import h5py

    return {
        "signal": f.create_dataset(key, (0, length), np.float32, maxshape=(None, length), chunks=(256, length)),
        "labels": f.create_dataset("labels", (0,), np.int64, maxshape=(None,)),
        "patient_ids": f.create_dataset("patient_ids", (0,), np.int64, maxshape=(None,)),
        "records": f.create_dataset("records", (0,), h5py.string_dtype(), maxshape=(None,)),
        "starts": f.create_dataset("starts", (0,), np.int64, maxshape=(None,)),
    }


def _fetch(root: str, name: str, headers: list[str], files: list[str], annotator: str, storage_options: dict | None,
           cache: HeaderCache, tmp: str) -> str:
    """A local base path for record `name` with its annotation file: the record itself if local."""
    if not is_remote(root):
        return f"{root}/{name}"
    try:
        return _download_record(root, name, headers, files, annotator, storage_options, cache, tmp)
    except FileNotFoundError as e:
        raise WfdbError(f"record {name}: {e.filename or e} does not exist") from None


def _download_record(root: str, name: str, headers: list[str], files: list[str], annotator: str,
                     storage_options: dict | None, cache: HeaderCache, tmp: str) -> str:
    local = os.path.join(tmp, "rec")
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    for rel in headers:
        shutil.copy(os.path.join(cache.dir, rel + ".hea"), local)
    for rel in files:
        download(f"{root}/{rel}", os.path.join(local, os.path.basename(rel)), storage_options)
    base = os.path.join(local, os.path.basename(name))
    try:
        download(f"{root}/{name}.{annotator}", f"{base}.{annotator}", storage_options)
    except FileNotFoundError:
        pass  # said below, as for a local record
    return base


def label_windows(root: str, out: str, spec: WindowSpec, target_rate: float | None, symbols: tuple[str, ...],
                  annotator: str = "atr", subject_map: dict[str, int] | None = None, signal_key: str | None = None,
                  storage_options: dict | None = None, on_bad: str = "error", log=print, overwrite: bool = False) -> dict:
    """Write the labelled HDF5 `out`; returns the counts (total and per record)."""
    if is_remote(out):
        raise ValueError(f"--out {out}: expected a local file (write it here, then copy it where it belongs)")
    if out.endswith(os.sep) or os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; expected the path of the HDF5 file to write")
    if os.path.lexists(out) and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace it, or choose another path")
    tmp_out = f"{out}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for stale in glob.glob(glob.escape(out) + ".tmp-*"):  # what a killed run (kill -9) left; a live run's stays
        pid = stale.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            os.unlink(stale)
    try:
        with tempfile.TemporaryDirectory(prefix="himae-label-") as tmp:
            folder, names = list_records(root, storage_options, tmp)  # remote headers: fetched once, into tmp
            if unmatched_subjects(subject_map, names):
                extra = unmatched_subjects(subject_map, names)
                log(f"[himae-prep] label: the subject map has {len(extra)} row(s) naming no record of {folder} "
                    f"(e.g. {', '.join(extra[:3])})")
            summary = _write(names, folder, root, tmp_out, spec, target_rate, symbols, annotator, subject_map,
                             signal_key, storage_options, on_bad, log, tmp)
    except BaseException:
        if os.path.exists(tmp_out):
            os.unlink(tmp_out)
        raise
    os.replace(tmp_out, out)
    n, positives = summary["windows"], summary["positives"]
    log(f"[himae-prep] label: {n} windows, {positives} positive ({100 * positives / n:.1f} %) from "
        f"{summary['records']} record(s) at {summary['fs']:g} Hz -> {out}"
        + (f"; skipped {len(summary['skipped_records'])} record(s)" if summary["skipped_records"] else "")
        + (f"; bad windows {summary['bad_windows']}" if sum(summary["bad_windows"].values()) else ""))
    return summary


def _write(names, folder, root, tmp_out, spec, target_rate, symbols, annotator, subject_map, signal_key,
           storage_options, on_bad, log, tmp) -> dict:
    import h5py
    import wfdb

    per_record: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    bad: Counter = Counter()
    found_symbols: Counter = Counter()
    fs_out: float | None = None
    patients: list[tuple[str, int]] = []
    with h5py.File(tmp_out, "w") as f:
        cache = HeaderCache(folder, storage_options, tmp)  # list_records' headers: the same folder
        datasets: dict = {}
        n = 0
        for name in names:
            try:
                try:
                    h, headers, channel = open_record(cache, name, spec.channels)
                except NoChannel as e:
                    skipped[name] = str(e)
                    log(f"[himae-prep] label: skipped record {name}: {e}")
                    continue
                fs = float(h.fs)
                window, stride = spec.samples(fs, name)
                pre = Preprocess(normalize="none", source_rate=fs, target_rate=target_rate if target_rate else None,
                                 constant="keep")
                try:
                    length_out = pre.output_length(window)
                except ValueError as e:
                    raise WfdbError(f"record {name}: {e}") from None
                rate = pre.output_rate
                if fs_out is not None and rate != fs_out:
                    raise WfdbError(f"record {name}: {fs:g} Hz, but earlier records are at {fs_out:g} Hz and no "
                                    f"--target-rate brings them to one rate; pass --target-rate")
                files = [r for r, _ in channel_files(h, channel, os.path.dirname(name))]
                base = _fetch(folder, name, headers, files, annotator, storage_options, cache, tmp)
                if not os.path.exists(f"{base}.{annotator}"):
                    raise WfdbError(f"record {name}: annotation file {folder}/{name}.{annotator} does not exist "
                                    f"(--annotator {annotator})")
                sig = read_channel(base, name, channel, int(h.sig_len))
                pid = patient_of(name, subject_map)
                with open(f"{base}.{annotator}", "rb") as fh:
                    fh.seek(0, os.SEEK_END)
                    size = fh.tell()
                    fh.seek(max(0, size - 2))
                    if size < 2 or fh.read(2) != b"\x00\x00":  # MIT format ends with a zero word
                        raise WfdbError(f"{folder}/{name}.{annotator}: {size} bytes without the end-of-file marker "
                                        f"of a WFDB annotation file; truncated?")
                try:
                    ann = wfdb.rdann(base, annotator)
                except Exception as e:
                    raise WfdbError(f"{folder}/{name}.{annotator}: not a readable annotation file "
                                    f"({type(e).__name__}: {e})") from None
            except WfdbError as e:
                if on_bad == "error":
                    raise
                skipped[name] = str(e)
                log(f"[himae-prep] label: skipped record {name}: {e}")
                continue
            fs_out = rate
            sym = np.asarray(ann.symbol, dtype=object)
            found_symbols.update(sym.tolist())
            hits = np.sort(np.asarray(ann.sample, dtype=np.int64)[np.isin(sym, symbols)])
            patients.append((name, pid))
            n_win = (len(sig) - window) // stride + 1 if len(sig) >= window else 0
            k = n_bad = n_pos = 0
            for b in range(0, n_win, BLOCK):  # a block of windows at a time: memory is BLOCK windows, not the record's
                starts = np.arange(b, min(n_win, b + BLOCK), dtype=np.int64) * stride
                x = sig[starts[:, None] + np.arange(window)[None, :]]  # [n, window] float64
                finite = np.isfinite(x).all(axis=1)
                flat = finite & (np.nanmax(x, axis=1, initial=-np.inf) == np.nanmin(x, axis=1, initial=np.inf))
                keep = finite & ~flat
                bad["non_finite"] += int((~finite).sum())
                bad["constant"] += int(flat.sum())
                n_bad += int((~keep).sum())
                starts, x = starts[keep], x[keep]
                if not len(x):
                    continue
                labels = (np.searchsorted(hits, starts + window) - np.searchsorted(hits, starts)) > 0  # any hit inside
                y, _ = pre.apply(x[:, None, :].astype(np.float32))  # [n, 1, length_out], cut at fs, then resampled
                datasets = datasets or _datasets(f, signal_key or ("ppg" if channel.upper() in PPG_NAMES else "ecg"),
                                                 length_out)
                m = len(starts)
                for ds in datasets.values():
                    ds.resize(n + m, axis=0)
                datasets["signal"][n:] = y[:, 0, :]
                datasets["labels"][n:] = labels.astype(np.int64)
                datasets["patient_ids"][n:] = pid
                datasets["records"][n:] = [name] * m
                datasets["starts"][n:] = starts
                n, k, n_pos = n + m, k + m, n_pos + int(labels.sum())
            per_record[name] = {"channel": channel, "windows": k, "positives": n_pos, "bad": n_bad, "fs": fs}
            log(f"[himae-prep] label: {name} ({channel}, {fs:g} Hz): {k} windows, {n_pos} positive"
                + (f", {n_bad} bad (NaN or flat)" if n_bad else ""))
        if subject_map is None:
            check_patients(patients)

        if n == 0:
            short = [k for k, r in per_record.items() if r["windows"] == 0 and r["bad"] == 0]
            raise WfdbError(f"{root}: no usable window in {len(names)} record(s)"
                            + (f"; {len(short)} are shorter than one {spec.window_s:g}-s window" if short else "")
                            + (f" ({'; '.join(f'{k}: {v}' for k, v in list(skipped.items())[:3])})" if skipped else ""))
        positives = sum(r["positives"] for r in per_record.values())
        if positives == 0:
            seen = ", ".join(f"{s} ({c})" for s, c in found_symbols.most_common(12))
            raise WfdbError(f"--label-symbols {','.join(symbols)} match no annotation in {len(per_record)} record(s) "
                            f"of {root} (their symbols: {seen}); refusing to write an all-negative file")
        f.attrs["fs"] = fs_out
        f.attrs["channels"] = ",".join(spec.channels)
        f.attrs["window_s"], f.attrs["stride_s"] = spec.window_s, spec.stride_s
        f.attrs["label_symbols"] = ",".join(symbols)
        f.attrs["source"] = folder
        summary = {"windows": n, "positives": positives, "records": len(per_record), "skipped_records": skipped,
                   "bad_windows": dict(bad), "fs": fs_out, "per_record": per_record}
        f.attrs["summary"] = json.dumps(summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="himae-prep label", description=__doc__.split("\n\n")[0])
    ap.add_argument("records", metavar="DIR_OR_URL", help="a folder of WFDB records, a RECORDS file or an s3:// prefix")
    ap.add_argument("--out", required=True, metavar="FILE.h5", help="the labelled HDF5 to write (a local file)")
    add_wfdb_options(ap, label=True)
    ap.add_argument("--target-rate", type=float, default=None, metavar="HZ",
                    help="resample each window to this rate (polyphase); default: the records' rate")
    ap.add_argument("--label-symbols", default="V", metavar="SYMS",
                    help="annotation symbols that make a window positive, comma-separated (default: V, PVC)")
    ap.add_argument("--annotator", default="atr", metavar="EXT", help="annotation file extension (default: atr)")
    ap.add_argument("--signal-key", choices=["ecg", "ppg"], default=None,
                    help="dataset name for the windows (default: ppg for PLETH/PPG channels, else ecg)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --out file (default: off: an existing file is refused)")
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="a record that cannot be read (missing file, unknown format, no annotations): error = stop "
                         "with a line naming it; skip = skip it, named and counted (default: error)")
    ap.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                    help="fsspec options for an s3:// source, as a JSON object (default: none)")
    return ap


def label_main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        spec = WindowSpec.from_flags(a.channel, a.window_s, a.stride_s)
        symbols = tuple(s.strip() for s in a.label_symbols.split(",") if s.strip())
        if not symbols:
            raise ValueError("--label-symbols is empty: expected annotation symbols, e.g. V")
        if a.target_rate is not None and not (a.target_rate > 0 and np.isfinite(a.target_rate)):
            raise ValueError(f"--target-rate {a.target_rate}: expected a positive number of Hz")
        smap = read_subject_map(a.subject_map) if a.subject_map else None
        label_windows(a.records, a.out, spec, a.target_rate, symbols, a.annotator, smap, a.signal_key,
                      a.storage_options, a.on_bad, overwrite=a.overwrite)
    except (ValueError, OSError, StorageError) as e:
        print(f"himae-prep label: error: {e}", file=sys.stderr)
        return 1
    return 0
