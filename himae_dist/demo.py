"""`himae-demo`: the whole system end to end on the embedded synthetic PVC cohort.

cohort -> HDF5 -> WebDataset shards -> 2-rank DeepSpeed pretraining (torchrun) -> probe of
the pretrained and a randomly initialised encoder, side by side, per encoder level.
Every stage resumes: a re-run skips what is already complete.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_prep.convert import ConvertParams, convert_pretrain
from data_prep.hdf5_sources import read_downstream
from data_prep.synth_cohort import generate
from himae_dist.checkpoint import load_himae
from probes.evaluate import format_table, probe_model, random_encoder, write_predictions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(shards: Path, run_dir: Path, nproc: int, steps: int, micro_batch: int, seed: int) -> Path:
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
        "--log-every", str(max(1, steps // 10)), "--seed", str(seed),
    ]
    print("[himae-demo] $", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, check=True)
    return run_dir / "himae_final.pt"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="himae-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="himae_demo_run")
    ap.add_argument("--scale", type=float, default=0.1, help="cohort size vs the authors' 55,861 segments")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2, help="trainer ranks")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    work, t0 = Path(a.workdir), time.time()

    cohort = work / "cohort"
    generate(cohort, scale=a.scale, seed=a.seed)
    shards = work / "shards"
    convert_pretrain(str(cohort / "pretrain_index.csv"), ConvertParams(str(shards), samples_per_shard=250, workers=2))
    ckpt = pretrain(shards, work / "run", a.nproc, a.steps, a.micro_batch, a.seed)

    data = read_downstream(cohort / "downstream.h5", "ppg")
    pretrained = probe_model(load_himae(ckpt)[0], data, "pretrained", a.folds, a.seed)
    random = probe_model(random_encoder(data.signals.shape[1], a.seed), data, "random init", a.folds, a.seed)
    write_predictions(work / "pvc_predictions.csv", data, pretrained.oof[pretrained.best.level])

    print(f"\nPVC probe, {len(data.labels)} segments, {int(data.labels.sum())} PVC, "
          f"{len(set(data.patient_ids.tolist()))} patients, {a.folds}-fold patient-grouped CV:")
    print(format_table([pretrained, random]))
    verdict = "ahead of" if pretrained.best.auroc > random.best.auroc else "NOT ahead of"
    print(f"\nPretrained encoder (best level {pretrained.best.level}, ROC-AUC {pretrained.best.auroc:.3f}) is "
          f"{verdict} the random encoder (best level {random.best.level}, ROC-AUC {random.best.auroc:.3f}).")
    print(f"[himae-demo] done in {time.time() - t0:.0f} s; outputs in {work}/")


if __name__ == "__main__":
    main()
