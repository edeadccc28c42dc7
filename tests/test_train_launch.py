"""The launch scripts on one CPU node: SLURM (srun replaced by `env`; ZERO_STAGE=1, wandb offline) and the DeepSpeed
launcher (its default, ZeRO 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ports import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


SECRETS = {"key": "AKIA-SECRET-1", "secret": "SECRET-2", "client_kwargs": {"aws_session_token": "SECRET-3"}}


def test_slurm_script_trains_with_the_zero_stage_it_says_and_keeps_secrets_out(tiny_shards, tmp_path):
    """...and credentials in --storage-options reach no output: stdout, stderr, config.json, checkpoints,
    the offline W&B run (its config and recorded command line)."""
    port = free_port()
    env = dict(os.environ, SRUN="env", SLURM_NNODES="1", SLURM_JOB_ID="t1", HEAD_NODE="127.0.0.1",
               MASTER_PORT=str(port), GPUS_PER_NODE="2", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHON=str(Path(os.sys.executable)), SLURM_SUBMIT_DIR=str(ROOT), ZERO_STAGE="1")
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "train_slurm.sbatch"), str(tiny_shards), str(out),
                           "--steps", "4", "--micro-batch", "8", "--log-every", "2", "--num-workers", "0",
                           "--shuffle-shards", "2", "--wandb", "offline", "--storage-options", json.dumps(SECRETS)],
                          env={**env, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world=2" in proc.stdout
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
    tag = out / "checkpoints" / "step0000004"  # every file DeepSpeed wrote, each rank's ZeRO partition included,
    files = torch.load(tag / "himae_run_state.pt", weights_only=True)["files"]  # has its size and sha256 recorded
    assert sorted(files) == sorted(p.name for p in tag.iterdir() if p.name != "himae_run_state.pt")
    assert len(files) == 3 and all(files[p.name]["bytes"] == p.stat().st_size for p in tag.glob("*_states.pt"))
    assert (out / "himae_final.pt").is_file()
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [2, 4]
    assert all(0 < h["grad_norm"] < 100 for h in hist), hist  # ZeRO 1 holds the gradients: DeepSpeed's norm
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # --wandb offline: rank 0's local run log
    assert len(runs) == 1 and runs[0].stat().st_size > 0, list((out / "wandb").glob("*"))
    assert b"<redacted>" in runs[0].read_bytes()  # the config and command line it recorded
    assert json.loads((out / "config.json").read_text())["storage_options"] == {
        "key": "<redacted>", "secret": "<redacted>", "client_kwargs": {"aws_session_token": "<redacted>"}}
    for where, data in [("stdout", proc.stdout.encode()), ("stderr", proc.stderr.encode())] + [
            (f, f.read_bytes()) for f in out.rglob("*") if f.is_file()]:
        assert b"SECRET-" not in data, where


def test_deepspeed_launcher_script_trains_two_ranks(tiny_shards, tmp_path):
    port = free_port()
    env = dict(os.environ, NPROC="2", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               DEEPSPEED=str(Path(sys.executable).parent / "deepspeed"))
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(ROOT / "launch" / "train_deepspeed.sh"), str(tiny_shards), str(out),
                           "--steps", "4", "--micro-batch", "8", "--log-every", "2", "--num-workers", "0",
                           "--shuffle-shards", "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "world=2" in proc.stdout and "--local_rank=1" in proc.stdout + proc.stderr  # the launcher's own ranks
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True}  # the default: ZeRO 0
    assert ds["timers"] == {"throughput": {"enabled": False}}  # no device sync per micro-step
    assert (out / "himae_final.pt").is_file()


def test_deepspeed_launcher_script_without_gpus_or_nproc_names_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "HOSTFILE")}
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"  # a failing nvidia-smi (driver mismatch) first on the PATH
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "launch" / "train_deepspeed.sh"), "shards", "out"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "set HOSTFILE (several nodes) or NPROC (ranks on this machine)" in proc.stderr, proc.stderr
