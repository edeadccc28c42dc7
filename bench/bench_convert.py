"""Conversion throughput, shard size and memory, each against its baseline from the same run.

- segments/s per worker of a whole `himae-prep` run in a fresh process, 1 and 2 workers (start-up,
  planning, verification included), against the h5py read floor: a fresh process reading every
  segment of the same files, in order, and nothing else;
- bytes per segment against raw float32 (4 * L), for float32 and float16 shards;
- peak RSS of a whole conversion (own process) at two index sizes 10x apart.

    .venv/bin/python bench/bench_convert.py [--n 40000] [--length 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.h5_inputs import write_h5, write_index  # noqa: E402


def make_inputs(folder: Path, n: int, length: int, per_file: int = 5000) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for f, s in enumerate(range(0, n, per_file)):
        keys = [f"{j:08d}" for j in range(s, min(n, s + per_file))]
        write_h5(folder / f"f{f}.h5", {k: (rng.standard_normal(length) * 100).astype(np.float32) for k in keys})
        rows += [(f"f{f}.h5", k, int(k) // 1000) for k in keys]
    write_index(folder / "index.csv", rows, ("local_path", "global_idx", "patient_id"))
    return folder / "index.csv"


FLOOR_CHILD = """
import h5py
n = 0
for f in range({n_files}):
    with h5py.File({folder!r} + f"/f{{f}}.h5", "r") as h:
        for k in sorted(h):
            h[k]["normalized_waveform"][()]
            n += 1
"""


def read_floor(folder: Path, n_files: int, n: int) -> float:
    """seg/s of a fresh process that only reads every segment in order (start-up included, as for the job)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_CHILD.format(n_files=n_files, folder=str(folder))], check=True)
    return n / (time.perf_counter() - t)


def timed_convert(index: Path, out: Path, workers: int, dtype: str) -> tuple[float, dict]:
    """Seconds of a whole `himae-prep` run in a fresh process (start-up, planning, verification included)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_prep.convert", "--index", str(index), "--out", str(out),
                    "--workers", str(workers), "--dtype", dtype, "--samples-per-shard", "1000"],
                   check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t, json.loads((out / "manifest.json").read_text())


def shard_bytes(m: dict) -> int:
    return sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])


RSS_CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
from data_prep.convert import ConvertParams, convert_pretrain
convert_pretrain({index!r}, ConvertParams({out!r}, samples_per_shard=1000, max_rows=20000))
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""


def peak_rss_mb(index: Path, out: Path) -> float:
    code = RSS_CHILD.format(root=str(ROOT), index=str(index), out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--rss-rows", type=int, default=20_000, help="smaller index for the RSS check (x10 for the larger)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        index = make_inputs(tmp, a.n, a.length)
        n_files = -(-a.n // 5000)
        read_floor(tmp, n_files, a.n)  # warm the page cache, as the conversion runs see it
        floor = read_floor(tmp, n_files, a.n)
        rows = []
        for workers, dtype in ((1, "float16"), (2, "float16"), (2, "float32")):
            t, m = timed_convert(index, tmp / f"o{workers}{dtype}", workers, dtype)
            rows.append((workers, dtype, a.n / t / workers, shard_bytes(m) / m["n_samples"]))
        rss = []
        for n in (a.rss_rows, 10 * a.rss_rows):
            d = tmp / f"rss{n}"
            d.mkdir()
            rss.append((n, peak_rss_mb(make_inputs(d, n, 25), d / "out")))

    raw = 4 * a.length
    print(f"\nrun: {time.strftime('%Y-%m-%d')} | {platform.machine()} | h5py {h5py.__version__} | numpy {np.__version__} | "
          f"L={a.length} | {a.n} segments in {n_files} files | 1000 segments per shard\n")
    print(f"h5py read floor: {floor:,.0f} seg/s (a fresh process reading every segment of the same files, in order)\n")
    print("| workers | dtype | seg/s per worker | of read floor | bytes/segment | vs raw float32 |")
    print("|---|---|---|---|---|---|")
    for workers, dtype, rate, bps in rows:
        print(f"| {workers} | {dtype} | {rate:,.0f} | {100 * rate / floor:.0f} % | {bps:,.0f} | {bps / raw:.3f}x |")
    print("\n| index rows | peak RSS (whole conversion, L=25) |")
    print("|---|---|")
    for n, mb in rss:
        print(f"| {n:,} | {mb:,.0f} MB |")
    print(f"\nconvert {rows[0][2]:,.0f} seg/s per worker ({100 * rows[0][2] / floor:.0f} % of the read floor), "
          f"float16 {rows[1][3] / raw:.3f}x raw, float32 {rows[2][3] / raw:.3f}x raw, "
          f"peak RSS {rss[0][1]:,.0f} MB at {rss[0][0]:,} rows vs {rss[1][1]:,.0f} MB at {rss[1][0]:,} rows")


if __name__ == "__main__":
    main()
