"""The shard conversion job (`himae-prep`): HDF5 -> WebDataset tar shards + manifest.json.

Each sample is `<key>.signal.npy` (float32 [C, L]) and `<key>.json` (source file, key, and for
downstream data label and patient id), so stock `webdataset.WebDataset(...).decode()` reads it.
Shard i holds input items [i * n, (i + 1) * n), so shards are independent: `--workers` converts
them in parallel, and a re-run skips every shard already finished (resume, not redo).
`manifest.json` is written last and lists shards, sample counts, length, channels and skips.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from data_prep.hdf5_sources import (
    BadSamplePolicy,
    IndexRow,
    iter_index_rows,
    read_downstream,
    read_index,
)
from data_prep.shard_writer import ShardOutput, part_name, write_shard
from himae_dist.streaming import MANIFEST

FORMAT = "himae-wds-v1"


@dataclass(frozen=True)
class ConvertParams:
    out: str
    samples_per_shard: int = 1000
    length: int | None = None
    on_bad: str = "error"
    workers: int = 1
    storage_options: dict | None = None


def _pretrain_shard(args: tuple[int, list[IndexRow], ConvertParams, int]) -> dict:
    i, rows, p, length = args
    out = ShardOutput(p.out, p.storage_options)
    policy = BadSamplePolicy(p.on_bad)
    samples = [
        (r.key, seg, {"source": r.path, "global_idx": r.key})
        for r, seg in iter_index_rows(rows, length, policy, p.storage_options)
    ]
    return write_shard(out, i, samples, {"skipped": dict(policy.skipped), "channels": _channels(samples)})


def _channels(samples: list) -> int | None:
    return int(samples[0][1].shape[0]) if samples else None


def _finished(out: ShardOutput, i: int) -> dict | None:
    return json.loads(out.read_text(part_name(i))) if out.exists(part_name(i)) else None


def convert_pretrain(index_csv: str, p: ConvertParams) -> dict:
    """Convert a pretraining index (local_path,global_idx) into shards."""
    if p.samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {p.samples_per_shard}")
    rows = read_index(index_csv)
    length = p.length or _first_length(rows, p)
    out = ShardOutput(p.out, p.storage_options)
    n = p.samples_per_shard
    jobs = [(i, rows[s : s + n], p, length) for i, s in enumerate(range(0, len(rows), n))]
    records = {i: rec for i, *_ in jobs if (rec := _finished(out, i)) is not None}
    todo = [j for j in jobs if j[0] not in records]
    if records:
        print(f"[himae-prep] resuming: {len(records)} of {len(jobs)} shards already done")
    if p.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(p.workers) as pool:
            for rec, job in zip(pool.map(_pretrain_shard, todo), todo):
                records[job[0]] = rec
    else:
        for job in todo:
            records[job[0]] = _pretrain_shard(job)
    return _write_manifest(out, [records[i] for i in range(len(jobs))], "pretrain", index_csv, length, p)


def _first_length(rows: list[IndexRow], p: ConvertParams) -> int:
    """Infer L from the first readable segment, so every shard is checked against the same L."""
    for _, seg in iter_index_rows(rows[:1000], None, BadSamplePolicy("skip"), p.storage_options):
        return int(seg.shape[-1])
    raise ValueError("none of the first 1000 index rows is readable; pass --length or fix the index")


def convert_downstream(h5_path: str, signal_key: str, p: ConvertParams) -> dict:
    """Convert a downstream HDF5 (/ppg, /labels, /patient_ids) into shards with labels."""
    policy = BadSamplePolicy(p.on_bad)
    ds = read_downstream(h5_path, signal_key, p.length, policy)
    out = ShardOutput(p.out, p.storage_options)
    length, n = int(ds.signals.shape[-1]), p.samples_per_shard
    records = []
    for i, s in enumerate(range(0, len(ds.labels), n)):
        rec = _finished(out, i)
        if rec is None:
            samples = [
                (
                    f"{int(ds.rows[j]):08d}", ds.signals[j],
                    {"source": str(h5_path), "row": int(ds.rows[j]), "label": int(ds.labels[j]),
                     "patient_id": None if ds.patient_ids is None else int(ds.patient_ids[j])},
                )
                for j in range(s, min(s + n, len(ds.labels)))
            ]
            rec = write_shard(out, i, samples, {"skipped": {}, "channels": _channels(samples)})
        records.append(rec)
    return _write_manifest(out, records, "downstream", h5_path, length, p, read_skipped=dict(policy.skipped))


def _write_manifest(
    out: ShardOutput, records: list[dict], kind: str, source: str, length: int, p: ConvertParams,
    read_skipped: dict[str, int] | None = None,
) -> dict:
    skipped: dict[str, int] = dict(read_skipped or {})
    for r in records:
        for reason, c in r.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + c
    channels = {r["channels"] for r in records if r.get("channels") is not None}
    if len(channels) > 1:
        raise ValueError(f"shards disagree on the channel count: {sorted(channels)}")
    manifest = {
        "format": FORMAT, "kind": kind, "source": str(source), "length": length,
        "channels": channels.pop() if channels else None,
        "n_samples": sum(r["n_samples"] for r in records),
        "shards": [{"url": r["shard"], "n_samples": r["n_samples"]} for r in records if r["n_samples"]],
        "skipped": skipped, "samples_per_shard": p.samples_per_shard, "on_bad": p.on_bad,
    }
    if manifest["n_samples"] == 0:
        raise ValueError(f"no usable samples in {source} (skipped: {skipped})")
    out.write_text(MANIFEST, json.dumps(manifest, indent=2))
    print(
        f"[himae-prep] {manifest['n_samples']} samples of length {length} in {len(manifest['shards'])} "
        f"shards -> {out.url}/{MANIFEST}" + (f"; skipped {skipped}" if skipped else "")
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-prep", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", help="pretraining CSV index (local_path,global_idx)")
    src.add_argument("--downstream", help="downstream HDF5 with /ppg|/ecg, /labels, /patient_ids")
    ap.add_argument("--signal-key", default="ppg", help="downstream signal dataset: ppg, ecg or ppg+ecg")
    ap.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--length", type=int, default=None, help="expected segment length (default: first segment's)")
    ap.add_argument("--on-bad", choices=["error", "skip"], default="error",
                    help="bad segment (missing file/key, wrong length, NaN): stop with an error, or skip and count it")
    ap.add_argument("--workers", type=int, default=1, help="processes converting shards in parallel")
    ap.add_argument("--storage-options", type=json.loads, default=None,
                    help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'')
    a = ap.parse_args(argv)
    p = ConvertParams(a.out, a.samples_per_shard, a.length, a.on_bad, a.workers, a.storage_options)
    try:
        if a.index:
            convert_pretrain(a.index, p)
        else:
            convert_downstream(a.downstream, a.signal_key, p)
    except (ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"himae-prep: error: {e}")


if __name__ == "__main__":
    main()
