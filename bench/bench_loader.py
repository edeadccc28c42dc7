"""Loader throughput: format-v2 block shards vs a seed-style per-sample Dataset, same run.

Segments/s per loader process (num_workers=0, the work one DataLoader worker does) at L=1000,
float16 and float32 shards, batch 256. Baseline: the seed-style path, a map-style Dataset whose
__getitem__ min-max scales one segment of an in-memory array, batched by the default collate.

    .venv/bin/python bench/bench_loader.py [--n 40000] [--batches 400] [--mixed] [--repeats 3]

--mixed also converts a second, smaller source (--n / 4 segments, same length, float16) and measures,
in the same process and settings, make_loader over the float16 source alone vs over both sources
mixed at weights 0.7, 0.3 (every global batch of --batch holds them in exact counts). The two are
measured as a pair: both loaders live side by side and take turns in chunks of 10 batches (which goes
first swaps each chunk) for --batches each, --repeats times on fresh loaders. This host's speed drifts
by +-20 % within seconds (the same loader alone measured 357 k to 834 k seg/s in nine runs), so
separate runs compare noise; turns of ~5 ms see the same machine. Rates are pooled over all repeats
(segments / summed time); the table also shows each repeat's ratio. Its last line:
`mixed sources: M seg/s, one source: S seg/s (R x)`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.convert import ConvertParams, convert_pretrain  # noqa: E402
from himae_dist.streaming import load_manifest, make_loader  # noqa: E402
from tests.h5_inputs import write_h5, write_index  # noqa: E402


class SeedStyleDataset(torch.utils.data.Dataset):
    """Per-sample __getitem__ with min-max scaling over an in-memory array, as the seed's loader does."""

    def __init__(self, signals: np.ndarray):
        self.signals = signals  # [N, L] float32

    def __len__(self) -> int:
        return len(self.signals)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.signals[i]
        x = (x - x.min()) / (x.max() - x.min()) * 2 - 1
        return torch.tensor(x, dtype=torch.float32).unsqueeze(0)  # [1, L]


def _rate(it, n_batches: int, batch: int) -> float:
    next(it)  # start-up (first shards read) excluded for both paths
    t = time.perf_counter()
    for _ in range(n_batches):
        b = next(it)
    _ = b
    return n_batches * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40_000, help="segments")
    ap.add_argument("--length", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--mixed", action="store_true", help="also: one source vs two mixed at 0.7, 0.3 (float16)")
    ap.add_argument("--repeats", type=int, default=3, help="with --mixed: paired measurements of --batches each")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    signals = (rng.standard_normal((a.n, a.length)) * 100 + 500).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_file = 5000
        rows = []
        for f, s in enumerate(range(0, a.n, per_file)):
            write_h5(tmp / f"f{f}.h5", {f"{j:08d}": signals[j] for j in range(s, min(a.n, s + per_file))})
            rows += [(f"f{f}.h5", f"{j:08d}") for j in range(s, min(a.n, s + per_file))]
        write_index(tmp / "index.csv", rows)
        rates = {}
        for dtype in ("float16", "float32"):
            out = tmp / dtype
            convert_pretrain(str(tmp / "index.csv"), ConvertParams(str(out), samples_per_shard=4096, dtype=dtype,
                                                                   val_fraction=0, workers=2))
            loader, _ = make_loader(load_manifest(str(out)), a.batch, seed=0, num_workers=0, shuffle_shards=4)
            rates[dtype] = _rate(iter(loader), a.batches, a.batch)
        seed_loader = torch.utils.data.DataLoader(SeedStyleDataset(signals), batch_size=a.batch, shuffle=True,
                                                  num_workers=0, drop_last=True)
        seed_rate = _rate(iter(seed_loader), min(a.batches, a.n // a.batch - 2), a.batch)
        if a.mixed:
            mixed = _mixed_rates(tmp, a, np.random.default_rng(1))

    print(f"\nrun: {time.strftime('%Y-%m-%d')} | {platform.machine()} | torch {torch.__version__} | "
          f"numpy {np.__version__} | L={a.length} | batch {a.batch} | {a.n} segments\n")
    print("| path | seg/s per process | vs seed-style |")
    print("|---|---|---|")
    for dtype, r in rates.items():
        print(f"| v2 shards, {dtype} | {r:,.0f} | {r / seed_rate:.1f}x |")
    print(f"| seed-style Dataset (per-sample min-max, default collate) | {seed_rate:,.0f} | 1.0x |")
    print(f"\nloader {rates['float16']:,.0f} seg/s per process, seed-style {seed_rate:,.0f} seg/s, "
          f"ratio {rates['float16'] / seed_rate:.1f}")
    if a.mixed:
        one, two, n2 = mixed  # seconds per repeat, each for --batches batches
        segs = a.repeats * a.batches * a.batch
        s, m = segs / sum(one), segs / sum(two)
        print(f"\nmixed sources (float16, weights 0.7 / 0.3 of every batch of {a.batch}; second source {n2} "
              f"segments); {a.repeats} paired repeats of {a.batches} batches each, in alternating turns\n")
        print("| path | seg/s per process (pooled) | each repeat | vs one source (each repeat) |")
        print("|---|---|---|---|")
        print(f"| one source (float16) | {s:,.0f} | {', '.join(f'{a.batches * a.batch / t:,.0f}' for t in one)} "
              f"| 1.00x |")
        print(f"| two sources mixed 0.7 / 0.3 | {m:,.0f} | "
              f"{', '.join(f'{a.batches * a.batch / t:,.0f}' for t in two)} | {m / s:.2f}x "
              f"({', '.join(f'{t1 / t2:.2f}' for t1, t2 in zip(one, two))}) |")
        print(f"\nmixed sources: {m:.0f} seg/s, one source: {s:.0f} seg/s ({m / s:.2f} x)")


def _take(it, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t


def _mixed_rates(tmp: Path, a, rng) -> tuple[list[float], list[float], int]:
    """(one-source seconds, mixed seconds, second source's segments): --repeats paired measurements of
    --batches batches each, over the float16 shards already in tmp / "float16" and a second source
    converted here; the two loaders take turns in chunks of 10 batches, who goes first swapping."""
    n2 = max(a.batch, a.n // 4)
    signals = (rng.standard_normal((n2, a.length)) * 50 + 300).astype(np.float32)
    src = tmp / "second"
    src.mkdir()
    per_file = 5000
    rows = []
    for f, s in enumerate(range(0, n2, per_file)):
        write_h5(src / f"g{f}.h5", {f"{j:08d}": signals[j] for j in range(s, min(n2, s + per_file))})
        rows += [(f"g{f}.h5", f"{j:08d}") for j in range(s, min(n2, s + per_file))]
    write_index(src / "index.csv", rows)
    convert_pretrain(str(src / "index.csv"), ConvertParams(str(src / "float16"), samples_per_shard=4096,
                                                           dtype="float16", val_fraction=0, workers=2))
    first, second = load_manifest(str(tmp / "float16")), load_manifest(str(src / "float16"))
    chunk = 10
    one, two = [], []
    for _ in range(a.repeats):
        it_one = iter(make_loader(first, a.batch, seed=0, num_workers=0, shuffle_shards=4)[0])
        it_two = iter(make_loader([first, second], a.batch, seed=0, num_workers=0, shuffle_shards=4,
                                  weights=[0.7, 0.3])[0])
        next(it_one), next(it_two)  # start-up (first shards read) excluded for both
        t_one = t_two = 0.0
        for k in range(0, a.batches, chunk):
            n = min(chunk, a.batches - k)
            if (k // chunk) % 2:
                t_two += _take(it_two, n)
                t_one += _take(it_one, n)
            else:
                t_one += _take(it_one, n)
                t_two += _take(it_two, n)
        one.append(t_one)
        two.append(t_two)
    return one, two, n2

if __name__ == "__main__":
    main()
