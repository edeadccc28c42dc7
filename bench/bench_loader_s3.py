"""Loader throughput from object storage, through a latency proxy, beside local disk in the same run.

moto's S3 server on loopback (tests/s3_loopback.py) answers every request 30 ms late (time to
first byte) and streams each response at 100 MB/s, roughly S3 seen from a GPU node. One loader
process (`make_loader`, num_workers=0, micro-batch 256, shuffle_shards 4) reads L=1000 float16
shards of two sizes; seg/s is measured over 2,000 batches after 200 warm-up batches, and the same shards are read from
local disk. Rows: each shard read when the stream needs it (the loader before read-ahead), and
the default read-ahead (8 reads / 256 MB in flight). moto shares this machine's
cores: its CPU seconds are printed beside.

    .venv/bin/python bench/bench_loader_s3.py [--n 40000] [--batches 2000]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.convert import ConvertParams, convert_pretrain  # noqa: E402
from himae_dist.streaming import load_manifest, make_loader  # noqa: E402
from tests.h5_inputs import write_h5, write_index  # noqa: E402
from tests.s3_loopback import S3Loopback  # noqa: E402

TARGET = 150_000


def make_inputs(folder: Path, n: int, length: int) -> Path:
    rng = np.random.default_rng(0)
    rows, per_file = [], 5000
    for f, s in enumerate(range(0, n, per_file)):
        keys = [f"{j:08d}" for j in range(s, min(n, s + per_file))]
        write_h5(folder / f"f{f}.h5", {k: rng.standard_normal(length).astype(np.float32) for k in keys})
        rows += [(f"f{f}.h5", k, int(k) // 1000) for k in keys]
    write_index(folder / "index.csv", rows, ("local_path", "global_idx", "patient_id"))
    return folder / "index.csv"


def seg_per_s(data: str, opts: dict | None, batches: int, in_flight: int | None) -> float:
    loader, _ = make_loader(load_manifest(data, opts), batch_size=256, seed=0, storage_options=opts)
    if in_flight == 0:
        loader.loader.dataset.prefetch_reads = 0  # each shard read when the stream needs it: the loader before
    it = iter(loader)
    for _ in range(200):  # warm-up: the first groups, threads, connections, the reads ahead filled
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 256 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 8000], help="samples per shard")
    a = ap.parse_args()
    import s3fs
    import torch

    print(f"# bench_loader_s3 {time.strftime('%Y-%m-%d')} | {platform.node()} | "
          f"{platform.processor() or platform.machine()} | python {platform.python_version()} | torch {torch.__version__}"
          f" | s3fs {s3fs.__version__} | proxy: 30 ms to first byte, 100 MB/s per stream")
    rows = []
    with tempfile.TemporaryDirectory() as d, S3Loopback(latency_ms=30, stream_mbps=100) as s3:
        d = Path(d)
        (d / "in").mkdir()
        index = make_inputs(d / "in", a.n, 1000)
        fs = s3.fs()
        for sps in a.shards:
            out = d / f"shards{sps}"
            convert_pretrain(str(index), ConvertParams(str(out), samples_per_shard=sps, val_fraction=0))
            for f in sorted(out.rglob("*")):
                if f.is_file():
                    fs.put_file(str(f), f"{s3.bucket}/shards{sps}/{f.relative_to(out)}")
            mb = load_manifest(str(out)).shards()[0].bytes / 2**20
            local = seg_per_s(str(out), None, a.batches, None)
            for in_flight in (0, None):
                cpu0 = s3.cpu_s()
                got = seg_per_s(f"s3://{s3.bucket}/shards{sps}", s3.opts, a.batches, in_flight)
                rows.append((sps, mb, "read when needed (before)" if in_flight == 0 else "read-ahead (8 reads, 256 MB)",
                             got, local, s3.cpu_s() - cpu0))
    print("\n| samples / shard | shard MB | S3 reads | S3 seg/s per process | local seg/s | S3 / local | "
          "workers per 150k seg/s | moto CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for sps, mb, mode, got, local, cpu in rows:
        print(f"| {sps} | {mb:.1f} | {mode} | {got:,.0f} | {local:,.0f} | {got / local:.2f} | "
              f"{math.ceil(TARGET / got)} | {cpu:.1f} |")
    best = max((r for r in rows if r[2].startswith("read-ahead")), key=lambda r: r[3])
    print(f"s3 loader: {best[3]:,.0f} seg/s per process, local {best[4]:,.0f} seg/s, "
          f"{math.ceil(TARGET / best[3])} workers per 150k (shards of {best[0]} samples, {best[1]:.0f} MB)")


if __name__ == "__main__":
    main()
