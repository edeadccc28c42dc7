"""Conversion from S3: requests and bytes per input file and per segment, against the ideal.

The same cohort (2,794 segments, L=250, float32) is kept in 1, 12 and 100 HDF5 files. For each,
`himae-prep` runs once on local disk and once with its index, inputs and output on moto's S3 on
loopback (tests/s3_loopback.py counts every request and byte the server sends). Printed beside the
ideal (one GET per input file, the input bytes once): whole-object GETs per input file, bytes
downloaded / input bytes (all GETs of inputs), writes per shard, the fixed overhead (index,
listings, plan, manifest, and the plan's shape check: ranged GETs of one file's metadata), and
the S3 run's wall time over the local one's (best of two local runs). The shards of the two runs must be byte-identical.
The last lines extrapolate to the users' corpus: 29 M segments in 5,800 files of 12 MB (70 GB),
at 30 ms a request.

    .venv/bin/python bench/bench_convert_s3.py [--n 2794] [--files 1 12 100] [--scale 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.h5_inputs import write_h5, write_index  # noqa: E402
from tests.s3_loopback import S3Loopback  # noqa: E402

CORPUS_SEGMENTS, CORPUS_FILES, CORPUS_BYTES, REQUEST_S = 29_000_000, 5_800, 70e9, 0.030


def make_cohort(folder: Path, n: int, n_files: int, length: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for f in range(n_files):
        keys = [f"{j:08d}" for j in range(f * n // n_files, (f + 1) * n // n_files)]
        write_h5(folder / f"f{f:03d}.h5", {k: (rng.standard_normal(length) * 3 + 10).astype(np.float32) for k in keys})
        rows += [(f"f{f:03d}.h5", k, int(k) * 18 // n) for k in keys]
    write_index(folder / "index.csv", rows, ("local_path", "global_idx", "patient_id"))
    return folder / "index.csv"


def run_prep(index: str, out: str, opts: dict | None, spill: Path) -> float:
    cmd = [sys.executable, "-m", "data_prep.convert", "--index", index, "--out", out, "--samples-per-shard", "1000",
           "--spill-dir", str(spill)]
    if opts:
        cmd += ["--storage-options", json.dumps(opts)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t


def shard_hashes(manifest: dict) -> dict:
    return {s["url"]: s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]}


def one_case(s3: S3Loopback, tmp: Path, n: int, n_files: int, length: int) -> dict:
    tag = f"{n_files}-{n}"
    src = tmp / f"in{tag}"
    src.mkdir()
    index = make_cohort(src, n, n_files, length)
    input_bytes = sum(p.stat().st_size for p in src.glob("*.h5"))
    t_local = min(run_prep(str(index), str(tmp / f"local{tag}-{i}"), None, tmp / "spill") for i in range(2))
    local = json.loads((tmp / f"local{tag}-0" / "manifest.json").read_text())

    fs = s3.fs()
    prefix = f"{s3.bucket}/raw{tag}"
    for p in sorted(src.iterdir()):
        fs.put_file(str(p), f"{prefix}/{p.name}")
    s3.reset()
    out = f"s3://{s3.bucket}/shards{tag}"
    cpu0 = s3.cpu_s()
    t_s3 = run_prep(f"s3://{prefix}/index.csv", out, s3.opts, tmp / "spill")
    cpu = s3.cpu_s() - cpu0
    reqs = s3.requests()
    remote = json.loads(fs.cat_file(f"{s3.bucket}/shards{tag}/manifest.json"))
    assert shard_hashes(remote) == shard_hashes(local), "S3 and local shards differ"

    sizes = {f"raw{tag}/{p.name}": p.stat().st_size for p in src.glob("*.h5")}
    kinds = Counter(k for k, key, _ in reqs)
    input_gets = [(key, b) for k, key, b in reqs if k == "GET" and key in sizes]
    whole = [b for key, b in input_gets if b >= sizes[key]]  # pass 1: a whole object
    ranged = [b for key, b in input_gets if b < sizes[key]]  # the plan's shape check: one file's metadata
    n_shards = sum(len(sp["shards"]) for sp in remote["splits"].values())
    shard_puts = [key for k, key, _ in reqs if k == "PUT" and key.startswith(f"shards{tag}/")
                  and ("/train/" in key or "/val/" in key or "/_parts/" in key) and not key.endswith("plan.json")]
    fixed = len(reqs) - len(whole) - len(shard_puts)
    return {
        "files": n_files, "segments": n, "input_mb": input_bytes / 1e6, "shards": n_shards,
        "requests": len(reqs), "kinds": dict(kinds), "metadata_gets": len(ranged),
        "gets_per_file": len(whole) / n_files, "bytes_x": sum(b for _, b in input_gets) / input_bytes,
        "writes_per_shard": len(shard_puts) / n_shards, "fixed": fixed,
        "t_local": t_local, "t_s3": t_s3, "time_x": t_s3 / t_local, "server_cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2794)
    ap.add_argument("--length", type=int, default=250)
    ap.add_argument("--files", type=int, nargs="+", default=[1, 12, 100])
    ap.add_argument("--scale", type=int, default=10,
                    help="a last case of n x scale segments in the largest file count (0: none): the S3 run's fixed "
                         "costs (imports, listings) are a second or two, which dominate the small cases' time")
    a = ap.parse_args()
    import h5py
    import s3fs

    print(f"# bench_convert_s3 {time.strftime('%Y-%m-%d')} | {platform.node()} | {platform.processor() or platform.machine()}"
          f" | python {platform.python_version()} | h5py {h5py.__version__} | s3fs {s3fs.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as d, S3Loopback() as s3:
        cases = [(a.n, f) for f in a.files] + ([(a.n * a.scale, max(a.files))] if a.scale else [])
        for n, n_files in cases:
            rows.append(one_case(s3, Path(d), n, n_files, a.length))
    print("\n| input files | segments | input MB | shards | requests (by kind) | GETs / input file (ideal 1) | "
          "bytes down / input (ideal 1.0) | writes / shard (ideal 2) | fixed requests (of which shape-check GETs) | "
          "local s | S3 s | S3 / local | moto CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items()))
        print(f"| {r['files']} | {r['segments']} | {r['input_mb']:.2f} | {r['shards']} | {r['requests']} ({kinds}) | "
              f"{r['gets_per_file']:.2f} | {r['bytes_x']:.3f} | {r['writes_per_shard']:.2f} | {r['fixed']} ({r['metadata_gets']}) | "
              f"{r['t_local']:.2f} | {r['t_s3']:.2f} | {r['time_x']:.2f} | {r['server_cpu_s']:.2f} |")
    big = rows[-1]
    shards = CORPUS_SEGMENTS // 1000
    reqs = big["gets_per_file"] * CORPUS_FILES + big["writes_per_shard"] * shards + big["fixed"]
    print(f"\nat 29 M segments ({CORPUS_FILES} files, 70 GB, {shards} shards of 1000, from the "
          f"{big['files']}-file case of {big['segments']} segments): {reqs:,.0f} requests "
          f"({big['gets_per_file'] * CORPUS_FILES:,.0f} GETs of inputs), {big['bytes_x'] * CORPUS_BYTES / 1e9:,.0f} GB "
          f"downloaded, {reqs * REQUEST_S / 3600:.1f} h of request latency at 30 ms (before any parallelism)")
    print(f"s3 conversion: {big['gets_per_file']:.2f} GETs per input file, {big['bytes_x']:.3f} x input bytes, "
          f"{big['time_x']:.2f} x local time")


if __name__ == "__main__":
    main()
