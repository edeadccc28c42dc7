"""--compile on CPU (torch.compile's aot_eager backend: dynamo's graph capture and AOT autograd, no
code generation, so no C++ toolchain is needed): the loss follows eager's, nothing recompiles after
the first step (validation in eval mode included), bf16 autocast works, and a resume is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ports import free_port
from tests.proc_tree import communicate_all

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

_TRAIN = r"""
import json, sys
import torch._dynamo
torch._dynamo.config.error_on_recompile = True  # a recompilation after the first compile fails the run
from torch._dynamo.utils import counters
from himae_dist.config import parse_config
from himae_dist.train import train
out = train(parse_config(sys.argv[1:]))
print("HIST " + json.dumps(out["history"]))
print("GRAPHS " + json.dumps(counters["stats"]["unique_graphs"]))
"""


def _spawn(shards, out, *extra) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = ["--data", str(shards), "--out", str(out), "--num-workers", "0", "--steps", "8", "--micro-batch", "8",
            "--log-every", "1", "--shuffle-shards", "2", "--precision", "bf16", "--val-every", "4",
            "--val-batches", "1", "--save-every", "4", *extra]
    return subprocess.Popen([sys.executable, "-c", _TRAIN, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _result(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines() if ln.startswith(("HIST ", "GRAPHS ")))
    return json.loads(lines["HIST"]), json.loads(lines["GRAPHS"])


def _train(shards, out, *extra):
    return _result(communicate_all([_spawn(shards, out, *extra)], timeout=300)[0])


def _final(out):
    return torch.load(out / "himae_final.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_compiled_training_follows_eager_never_recompiles_and_resumes_exactly(tiny_shards, tmp_path):
    both = communicate_all([_spawn(tiny_shards, tmp_path / "eager"),  # at once: 2 cores, one process each
                            _spawn(tiny_shards, tmp_path / "compiled", "--compile", "true", "--compile-backend",
                                   "aot_eager")], timeout=300)
    (eager, graphs), (compiled, cgraphs) = (_result(p) for p in both)
    assert graphs == 0
    assert cgraphs >= 1  # the model ran compiled (and error_on_recompile held over 8 steps and 2 validations)
    a, b = [h["loss"] for h in eager], [h["loss"] for h in compiled]
    assert len(a) == len(b) == 8
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=2e-2, atol=0)  # bf16 autocast, 8 updates
    assert [h["val_loss"] for h in compiled if "val_loss" in h] == pytest.approx(
        [h["val_loss"] for h in eager if "val_loss" in h], rel=2e-2)
    # resume: keep the step-4 checkpoint only and run the same command again
    out = tmp_path / "compiled"
    first = _final(out)
    for p in [out / "himae_final.pt", *out.glob("checkpoints/step0000008"), *out.glob("weights/step_0000008.pt")]:
        subprocess.run(["rm", "-rf", str(p)], check=True)
    resumed, _ = _train(tiny_shards, out, "--compile", "true", "--compile-backend", "aot_eager")
    assert [h["step"] for h in resumed] == list(range(5, 9))
    assert [h["loss"] for h in resumed] == b[4:]
    again = _final(out)
    assert all(torch.equal(first[k], again[k]) for k in first)
