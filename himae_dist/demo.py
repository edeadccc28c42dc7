"""`himae-demo`: the whole system end to end on the embedded synthetic PVC cohort, as a user runs it.

cohort (`himae-synth`: a downstream cohort in the seed's shape and a pretraining cohort of other
patients) -> `himae-prep` shards of the pretraining cohort only -> 2-rank DeepSpeed pretraining
(torchrun) -> `himae-probe` of every saved checkpoint and of random-init baselines on the
downstream cohort, whose patients the encoder never saw. Each stage is the job's own CLI run as
a subprocess, and each resumes: a re-run skips what is already complete.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("[himae-demo] $", " ".join(cmd[2:] if cmd[1] == "-m" else cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)


def pretrain(shards: Path, run_dir: Path, nproc: int, steps: int, micro_batch: int, seed: int, save_every: int) -> Path:
    """Launch the trainer under torchrun exactly as a user would."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "himae_dist.train", "--data", str(shards), "--out", str(run_dir),
        "--steps", str(steps), "--micro-batch", str(micro_batch), "--num-workers", "0",
        "--log-every", str(max(1, steps // 10)), "--seed", str(seed), "--save-every", str(save_every),
    ]
    _run(cmd, env)
    return run_dir


def verdict(res: dict) -> str:
    """Is the last checkpoint's headline ahead of the random baselines, beyond their spread and its CI?"""
    ckpts = [m for m in res["models"] if m["kind"] == "checkpoint"]
    last = max(ckpts, key=lambda m: m["step"] or 0)
    auc = last["headline"]["metrics"]["roc_auc"]
    rnd = res["random_baselines"]["headline"]["roc_auc"]
    lo = auc["ci95"][0] if auc["ci95"] else auc["value"]
    if lo > max(rnd["values"]):
        word = "AHEAD of"  # even the lower end of its CI beats every random seed
    elif auc["value"] > max(rnd["values"]):
        word = "ahead, by its point estimate only (its 95 % CI reaches the random seeds), of"
    else:
        word = "NOT ahead of"
    return (f"Pretrained encoder ({last['name']}, headline level {last['headline']['selected_mode']}, ROC-AUC "
            f"{auc['value']:.3f} [{lo:.3f}, {auc['ci95'][1] if auc['ci95'] else auc['value']:.3f}]) is {word} the "
            f"random-init encoders (ROC-AUC {rnd['mean']:.3f} ± {rnd['sd']:.3f} over {len(rnd['values'])} seeds), "
            f"on patients it was not pretrained on.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="himae_demo_run")
    ap.add_argument("--scale", type=float, default=0.1, help="each cohort's size vs the authors' 55,861 segments")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--checkpoints", type=int, default=4, help="checkpoints saved during pretraining and probed")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2, help="trainer ranks")
    ap.add_argument("--random-baselines", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    work, t0 = Path(a.workdir), time.time()
    py = sys.executable

    cohort, shards, run_dir, probe_out = work / "cohort", work / "shards", work / "run", work / "probe"
    _run([py, "-m", "data_prep.synth_cohort", "--out", str(cohort), "--scale", str(a.scale), "--seed", str(a.seed),
          "--segments-per-shard", "2000"])
    _run([py, "-m", "data_prep.convert", "--index", str(cohort / "pretrain_index.csv"), "--out", str(shards),
          "--workers", "2", "--samples-per-shard", "250"])
    pretrain(shards, run_dir, a.nproc, a.steps, a.micro_batch, a.seed, max(1, a.steps // a.checkpoints))
    manifest = json.loads((shards / "manifest.json").read_text())
    # the shards' recorded preprocessing, for checkpoints that do not carry their own
    manifest_flag = ["--manifest", str(shards / "manifest.json")] if "preprocess" in manifest else []
    _run([py, "-m", "probes.evaluate", "--run", str(run_dir), "--h5", str(cohort / "downstream.h5"),
          "--out", str(probe_out), "--random-baselines", str(a.random_baselines), "--n-boot", str(a.n_boot),
          "--seed", str(a.seed), *manifest_flag])

    res = json.loads((probe_out / "results.json").read_text())
    coh = json.loads((cohort / "cohort.json").read_text())
    print(f"\n[himae-demo] pretrained on {coh['pretrain']['n_segments']} unlabelled segments of "
          f"{coh['pretrain']['n_patients']} patients; probed on {res['n_segments']} segments ({res['n_pvc']} PVC) of "
          f"{res['n_patients']} other patients")
    print((probe_out / "table.txt").read_text())
    print("\n" + verdict(res))
    print(f"[himae-demo] done in {time.time() - t0:.0f} s; outputs in {work}/ (tables: {probe_out}/results.md, "
          f"figures: {probe_out}/*.png)")


if __name__ == "__main__":
    main()
