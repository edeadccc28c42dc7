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

def where():
    '''Where a host read happens: None for the loader's host tensors (before the copy to the device),
    "save" inside a save (which syncs anyway), else (in the step loop) "log" inside the log step's read, or the frames.'''
    stack = traceback.extract_stack()[:-2]
    if any("/torch/utils/data/" in f.filename or "/streaming.py" in f.filename or f.name == "next_batch"
           for f in stack):
        return None
    names = {f.name for f in stack}
    if "train" not in names or names & {"_session", "_start"}:  # the start (engine, resume, loader): once
        return None
    if names & {"save", "finish"}:
        return "save"
    if "read_log_step" in names:
        return "log"
    return " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}:{f.name}" for f in reversed(stack[-6:]))

reads = []
class Rec(TorchDispatchMode):  # .item(), float(t), int(t), bool(t), `if t:` of any tensor
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item"):
            w = where()
            if w:
                reads.append((str(func.overloadpacket.__name__), w))
        return func(*args, **(kwargs or {}))

def counted(name, real, only=None):  # Python-level copies to the host: .cpu(), .tolist(), .numpy(), .to("cpu")
    def wrapper(self, *a, **k):
        if only is None or only(a, k):
            w = where()
            if w:
                reads.append((name, w))
        return real(self, *a, **k)
    return wrapper

def to_cpu(a, k):  # .to(X) where the code names the host (on CPU, every device is named "cpu")
    line = traceback.extract_stack()[-3].line or ""
    return "cpu" in line and "device_name" not in line and any(str(v) == "cpu" for v in (*a, *k.values()))
for name, only in (("cpu", None), ("tolist", None), ("numpy", None), ("to", to_cpu)):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name), only))

# Every device synchronize DeepSpeed or the trainer asks for (a cudaDeviceSynchronize on a GPU; a no-op
# counted here on CPU), DeepSpeed's own frames included.
from deepspeed.accelerator import get_accelerator
acc, syncs = get_accelerator(), []
real_sync = acc.synchronize
def counted_sync(*a, **k):
    w = where()
    if w and w != "save":
        syncs.append(w)
    return real_sync(*a, **k)
acc.synchronize = counted_sync

cfg = parse_config(sys.argv[1:])
with Rec():
    train(cfg)
print("READS " + json.dumps(reads))
print("SYNCS " + json.dumps(syncs))
"""


@pytest.mark.parametrize("zero_stage,sources", [(0, 1), (1, 1), (0, 2)], ids=["zero0", "zero1", "two-sources"])
def test_trainer_reads_the_device_once_per_log_step(tiny_shards, tmp_path, zero_stage, sources):
    """Host reads of tensors (item/float/bool, .cpu/.tolist/.numpy/.to("cpu")) and device synchronizes over
    real engine steps, DeepSpeed's and torch's own frames included."""
    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 4 steps x 3 micro-steps, logged and validated at steps 2 and 4, saved at step 3 (off the log step) and 4
    args = ["--data", str(tiny_shards), "--out", str(tmp_path / "run"), "--num-workers", "0", "--steps", "4",
            "--grad-accum", "3", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2",
            "--loss-impl", "reference", "--val-every", "2", "--val-batches", "1", "--save-every", "3",
            "--zero-stage", str(zero_stage)]
    if sources == 2:  # per-source training and validation sums ride in the log step's one all-reduce too
        from data_prep.convert import ConvertParams, convert_pretrain
        from tests.h5_inputs import random_index

        small = tmp_path / "small"  # another source of another size (the same segment shape)
        small.mkdir()
        convert_pretrain(str(random_index(small, n=120, patients=6, seed=5)),
                         ConvertParams(str(small / "shards"), samples_per_shard=40))
        args += ["--data", str(small / "shards"), "--weights", "0.75,0.25"]  # a second --data: two sources
    proc = subprocess.run([sys.executable, "-c", _TRAIN_UNDER_RECORDER, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("READS ")]
    reads = json.loads(line[len("READS "):])
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("SYNCS ")]
    syncs = json.loads(line[len("SYNCS "):])
    # the log step: one copy of the all-reduced values to the host, then a list of that host copy
    log = [r[0] for r in reads if r[1] == "log"]
    assert log == ["cpu", "tolist"] * 2, [r for r in reads if r[1] != "save"]
    elsewhere = [r for r in reads if r[1] not in ("log", "save")]
    if zero_stage == 0:
        assert elsewhere == [], elsewhere  # nothing per micro-step or per step, in any frame
        # DeepSpeed's throughput timer (two synchronizes per micro-step by default) is off in the config
        assert syncs == [], syncs
    else:  # ZeRO's price, documented in the README: DeepSpeed checks the gradient norm on the host every step
        kinds = sorted({(r[0], r[1].split(" <- ")[0]) for r in elsewhere})
        assert len(elsewhere) == 4 and all("stage_1_and_2.py" in r[1] for r in elsewhere), kinds
    hist = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [2, 4] and all(h["loss"] > 0 and h["val_loss"] > 0 for h in hist)
    if sources == 2:  # per source: its loss and val loss, and exact samples (global batch 24 at 0.75 / 0.25: 18 + 6)
        from himae_dist.streaming import load_manifest

        n_a, n_b = (load_manifest(str(d)).n_samples("train") for d in (tiny_shards, small / "shards"))
        assert n_a != n_b
        for h in hist:
            assert list(h["sources"]) == [Path(tiny_shards).name, "shards"], h
            (a, b) = h["sources"].values()
            assert (a["samples"], b["samples"]) == (18 * h["step"], 6 * h["step"]), h
            assert (a["epochs"], b["epochs"]) == (pytest.approx(18 * h["step"] / n_a), pytest.approx(6 * h["step"] / n_b))
            assert 0 < a["loss"] < 1 and 0 < b["loss"] < 1 and a["val_loss"] > 0 and b["val_loss"] > 0, h
            assert a["loss"] != b["loss"] and a["val_loss"] != b["val_loss"], h  # each source's own rows
        # the per-source part of the log line at step 4: samples and epochs of each
        assert f" 72 seen ({72 / n_a:.2f} ep)" in proc.stdout and f" 24 seen ({24 / n_b:.2f} ep)" in proc.stdout
        state = torch.load(tmp_path / "run" / "checkpoints" / "step0000004" / "himae_run_state.pt", weights_only=True)
        assert [src[1] for src in state["ranks"][0]["loader"]["sources"]] == [18, 6]  # each source's position
