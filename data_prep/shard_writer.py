"""Writes one shard: preprocess its rows (read and checked by external_shuffle), write a v2 tar atomically.

A shard's bytes depend only on its rows (chosen by index_plan) and the options, never on which
worker, task or machine builds it. The tar is written to a temp file, given mode 0644 and
renamed into place (or PUT once to S3), then a record under `_parts/` (sample count, bytes,
sha256, md5, the ETag the PUT returned, skips) marks it finished: a shard without a record is not trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from data_prep.hdf5_sources import BadSamplePolicy
from data_prep.preprocess import Preprocess
from data_prep.shard_format import Block, part_name, shard_name, write_shard_tar
from data_prep.storage import Folder


@dataclass(frozen=True)
class WriteParams:
    out: str
    storage_options: dict | None
    kind: str  # pretrain | downstream
    signal_keys: tuple[str, ...]
    channels: int
    preprocess: Preprocess
    dtype: str
    block_size: int
    on_bad: str
    plan_id: str  # identifies plan + options; a record with another plan_id is stale
    tmp_prefix: str  # per task, so a task cleans only its own orphans


def _drop_non_finite(y: np.ndarray, rows: pd.DataFrame, policy: BadSamplePolicy, where: str,
                     pre: Preprocess) -> tuple[np.ndarray, pd.DataFrame]:
    """Rows whose preprocessed values are NaN/inf, though their input was finite (checked when read):
    resampling can overshoot the float32 range. Bad rows (`non_finite_output`), never written."""
    bad = ~np.isfinite(y).all(axis=(1, 2))
    if not bad.any():
        return y, rows
    for key in rows["key"].to_numpy()[bad]:
        policy.reject("non_finite_output", f"{where}: key {key!r}: its finite input values give NaN/inf after "
                                           f"preprocessing ({pre.describe()}); values near the float32 limit "
                                           f"(3.4e38) overflow: scale the input down, or skip it with --on-bad skip")
    return y[~bad], rows[~bad]


def write_shard(split: str, index: int, rows: pd.DataFrame, segs: np.ndarray, n_rows: int, policy: BadSamplePolicy,
                p: WriteParams) -> dict:
    """Preprocess and write one shard; returns its record.

    rows: the shard's usable rows (pos, key, patient, label), in any order; segs [n, C, L_in]
    float32, aligned with rows; n_rows: the shard's planned rows, bad ones included; policy: the
    skips and notes of its bad rows so far.
    """
    order = np.argsort(rows["pos"].to_numpy(), kind="stable")  # the planned (shuffled) order
    ordered = rows.iloc[order]
    if len(ordered):
        y, kept = p.preprocess.apply(segs[order])  # [n', C, L_out]
        ordered = ordered[kept]
        if (~kept).any():
            policy.skipped["constant"] += int((~kept).sum())
        y, ordered = _drop_non_finite(y, ordered, policy, f"shard {split}/{index}", p.preprocess)
    else:
        y = np.zeros((0, p.channels, p.preprocess.output_length()), np.float32)
    if p.dtype == "float16" and len(y) and np.abs(y).max() > np.finfo(np.float16).max:
        raise ValueError(
            f"shard {split}/{index}: values up to {np.abs(y).max():.4g} do not fit float16 (max 65504); "
            f"with --normalize {p.preprocess.normalize} use --dtype float32"
        )
    keys = ordered["key"].to_numpy(dtype=str)
    patients, labels = ordered["patient"].to_numpy(np.int64), ordered["label"].to_numpy(np.int8)
    blocks = [Block(y[s:s + p.block_size], keys[s:s + p.block_size], patients[s:s + p.block_size],
                    labels[s:s + p.block_size]) for s in range(0, len(y), p.block_size)]
    buf = io.BytesIO()
    write_shard_tar(buf, split, index, blocks, p.dtype)
    data = buf.getvalue()
    out = Folder(p.out, p.storage_options)
    fd, tmp = out.temp_file(p.tmp_prefix, ".tar")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        etag = out.place(tmp, shard_name(split, index))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record = {
        "split": split, "index": index, "url": shard_name(split, index), "n_samples": int(len(y)),
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest(),
        "etag": etag,  # what the store's listing will report for these bytes (not always their md5)
        "n_rows": int(n_rows), "skipped": dict(policy.skipped), "noted": dict(policy.noted), "plan_id": p.plan_id,
    }
    out.write_text(part_name(split, index), json.dumps(record, sort_keys=True), p.tmp_prefix)  # last: marks it done
    return record
