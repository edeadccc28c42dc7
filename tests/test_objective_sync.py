"""No host synchronisation per micro-step: neither objective (mask, loss, backward) nor the
trainer's own code copies a value to the host, except the loss read once per log step.

A host sync is `aten._local_scalar_dense` (what .item(), float(t) and `if t:` call); on a GPU it
waits for the stream. Recorded with a dispatch mode, attributed to the innermost project frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from himae_dist.objective import make_objective
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("HIMAE_TEST_DEVICE", "cpu")  # cuda: compiled kernels on a GPU (bench/gpu_check.sh)
SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item"}


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_mask_loss_and_backward_do_not_sync(impl):
    if impl == "fused":
        pytest.importorskip("triton")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("HIMAE_TEST_DEVICE=cuda but no GPU is visible")
    obj = make_objective(impl, torch.device(DEVICE), patch_size=5, ratio=0.8, base_seed=0, rank=1, world_size=2)
    x = torch.rand(4, 1, 250, device=DEVICE) * 2 - 1
    z = torch.randn(4, 1, 250, device=DEVICE, requires_grad=True)
    with _SyncRecorder() as rec:
        for micro in range(2):
            xm, mask = obj.mask(x, step=3, micro=micro, out_dtype=torch.bfloat16)
            recon = torch.tanh(z) if obj.apply_tanh else z
            loss = obj.loss(recon, x, mask)
            loss.backward()
    assert xm.dtype == torch.bfloat16
    assert rec.ops == []
    assert torch.isfinite(loss) and z.grad.abs().sum() > 0  # the recorder saw real work


_TRAIN_UNDER_RECORDER = r"""
import json, sys, traceback
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from himae_dist.config import parse_config
from himae_dist.train import train

class Rec(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.sites = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item"):
            site = None
            for f in reversed(traceback.extract_stack()[:-1]):  # innermost first
                if "/deepspeed/" in f.filename:
                    break  # DeepSpeed's own step: not the trainer's code
                if "/himae_dist/" in f.filename or "/kernels/" in f.filename:
                    site = f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.line}"
                    break
            if site:
                self.sites.append(site)
        return func(*args, **(kwargs or {}))

# Every device synchronize DeepSpeed or the trainer asks for (a cudaDeviceSynchronize on a GPU; a no-op
# counted here on CPU), DeepSpeed's own frames included; those under a save (which syncs anyway) aside.
from deepspeed.accelerator import get_accelerator
acc, syncs = get_accelerator(), []
real_sync = acc.synchronize
def counted_sync(*a, **k):
    stack = traceback.extract_stack()[:-1]
    if not any(f.name in ("save", "_save") and f.filename.endswith("train.py") for f in stack):
        syncs.append(" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reversed(stack[-4:])))
    return real_sync(*a, **k)
acc.synchronize = counted_sync

cfg = parse_config(sys.argv[1:])
with Rec() as rec:
    train(cfg)
print("SITES " + json.dumps(rec.sites))
print("SYNCS " + json.dumps(syncs))
"""


def test_trainer_reads_the_loss_once_per_log_step(tiny_shards, tmp_path):
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 4 steps x 3 micro-steps, logged and validated at steps 2 and 4
    args = ["--data", str(tiny_shards), "--out", str(tmp_path / "run"), "--num-workers", "0", "--steps", "4",
            "--grad-accum", "3", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2",
            "--loss-impl", "reference", "--val-every", "2", "--val-batches", "1"]
    proc = subprocess.run([sys.executable, "-c", _TRAIN_UNDER_RECORDER, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("SITES ")]
    sites = json.loads(line[len("SITES "):])
    # the loader's set-up and fetch work on host tensors before the copy to the device: not a GPU sync
    in_loop = [s for s in sites if any(f in s for f in ("train.py", "kernels/", "objective.py", "validation.py",
                                                        "train_log.py"))
               and "next(batches)" not in s and "iter(loader)" not in s
               and '{"loss_sum": float(self.loss_sum)' not in s]  # the log window kept in a checkpoint: at saves
    # per log step: loss, val loss, grad norm, skipped batches, stop and save-due flags, failed and all shard
    # reads, lost segments: nine host reads of the one copy `host = stats.cpu()`; none per micro-step
    assert len(in_loop) == 2 * 9, in_loop
    assert all("(float(v) for v in host)" in s for s in in_loop), in_loop
    # DeepSpeed asks for no device sync outside saves at ZeRO 0: its throughput timer (two per
    # micro-step by default) is off in the config the trainer builds
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCS ")]
    assert json.loads(line[len("SYNCS "):]) == []
    hist = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [2, 4] and all(h["loss"] > 0 and h["val_loss"] > 0 for h in hist)
