"""Stress the multi-node restart: the 2 x 1 kill scenario N times at random kill steps.

Two torchrun agents on loopback (one rank each, c10d rendezvous, --max-restarts=1, as
launch/train_slurm.sbatch), the rank of node 1 SIGKILLed at a random step. Whether node 0's
agent counts a restart (its worker failed on the lost peer) or not (still healthy when node 1
rejoined) is a race, so each run draws it afresh. A run passes when both agents exit 0 and the
final weights equal an uninterrupted 1 x 2 run's bitwise; hangs are cut at --timeout-s.

    .venv/bin/python bench/stress_restart.py [-n 20] [--timeout-s 180]

Ends with: `restarts: P passed, H hung, F failed of N`.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.ports import free_port  # noqa: E402
from tests.proc_tree import kill_tree  # noqa: E402

ARGS = ("--steps", "12", "--save-every", "4", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2",
        "--num-workers", "0")


def _shards(tmp: Path) -> Path:
    from data_prep.convert import ConvertParams, convert_pretrain
    from data_prep.synth_cohort import generate

    generate(tmp / "cohort", scale=0.01, seed=3, segments_per_shard=200)
    convert_pretrain(str(tmp / "cohort" / "pretrain_index.csv"), ConvertParams(str(tmp / "shards"), samples_per_shard=64))
    return tmp / "shards"


def _agents(shards: Path, out: Path, nodes: int, env_extra: dict, timeout_s: float) -> tuple[list[int] | None, str]:
    """(exit codes or None on a hang, stderr tail)."""
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)
    per = 2 // nodes
    rdzv = ([f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=s{port}"]
            if nodes > 1 else ["--master_addr=127.0.0.1", f"--master_port={port}"])
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc_per_node={per}",
                               "--max-restarts=1", "-m", "himae_dist.train", "--data", str(shards), "--out", str(out),
                               *ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(nodes)]
    deadline = time.monotonic() + timeout_s
    try:
        errs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[1] for p in procs]
    except subprocess.TimeoutExpired:
        return None, ""
    finally:
        kill_tree(*(p.pid for p in procs))
    return [p.returncode for p in procs], "".join(e[-1500:] for e in errs)


def _final(out: Path) -> dict:
    return torch.load(out / "himae_final.pt", map_location="cpu", weights_only=True)["state_dict"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--timeout-s", type=float, default=180)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        shards = _shards(tmp)
        codes, err = _agents(shards, tmp / "1x2", 1, {}, a.timeout_s)
        if codes != [0]:
            sys.exit(f"stress_restart: the uninterrupted 1 x 2 run failed ({codes}): {err}")
        ref = _final(tmp / "1x2")
        passed = hung = failed = 0
        print("| run | kill step | result | seconds |\n|---|---|---|---|", flush=True)
        for i in range(a.n):
            k = random.randrange(5, 11)
            t0 = time.monotonic()
            codes, err = _agents(shards, tmp / f"2x1_{i}", 2, {"HIMAE_FAULT": f"kill:1:{k}"}, a.timeout_s)
            if codes is None:
                hung, what = hung + 1, "hung"
            elif codes == [0, 0] and all(torch.equal(v, _final(tmp / f"2x1_{i}")[n]) for n, v in ref.items()):
                passed, what = passed + 1, "passed (bitwise)"
            else:
                failed, what = failed + 1, f"failed {codes}: {err.strip().splitlines()[-1:] if err else ''}"
            print(f"| {i + 1} | {k} | {what} | {time.monotonic() - t0:.0f} |", flush=True)
        print(f"restarts: {passed} passed, {hung} hung, {failed} failed of {a.n}")


if __name__ == "__main__":
    main()
