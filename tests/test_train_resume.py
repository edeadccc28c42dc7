"""bf16 numerics, exact resume and fault tolerance of the trainer: real 2-rank DeepSpeed runs on CPU (gloo)."""

import json
import os
import random
import re
import shutil

import pytest
import torch

from himae_dist.checkpoint import load_himae
from himae_dist.streaming import load_manifest, reader_shards
from tests.ports import free_port
from tests.proc_tree import communicate_all
from tests.test_train_distributed import _run_trainer, _spawn_trainer

pytestmark = pytest.mark.slow

ARGS = ("--micro-batch", "8", "--log-every", "5", "--shuffle-shards", "2")
TWO_NODE_ARGS = ("--steps", "12", "--save-every", "4", *ARGS, "--log-every", "2")


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _hist(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final(out):
    return torch.load(out / "himae_final.pt", map_location="cpu", weights_only=True)["state_dict"]


def _ds_states(out):
    tag = (out / "checkpoints" / "latest").read_text().strip()
    return torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


@pytest.mark.xdist_group("one_node_run")  # one worker makes the shared reference run (pyproject addopts)
def test_bf16_autocast_trains_over_fp32_masters(tiny_shards, tmp_path, one_node_run):
    bf = tmp_path / "bf16"  # as the fp32 one_node_run, plus bf16 and validation (which does not change training)
    log = _ok(_run_trainer(tiny_shards, bf, (*TWO_NODE_ARGS, "--precision", "bf16", "--val-every", "6",
                                             "--plot-every", "6", "--val-batches", "1")))
    assert "bf16=True" in log
    assert "himae-train: 100%" in log and "12/12" in log  # the progress bar (rank 0, stderr)
    hb, hf = _hist(bf), _hist(one_node_run)
    assert '"precision": "auto"' in (one_node_run / "config.json").read_text()  # fp32 on CPU
    assert hb[-1]["loss"] < 0.7 * hb[0]["loss"], hb
    assert [h["loss"] for h in hb] != [h["loss"] for h in hf]  # autocast did run the forward in bf16
    assert abs(hb[-1]["loss"] - hf[-1]["loss"]) < 0.05 * hf[-1]["loss"]  # ...and tracks fp32 closely
    for h in hb:  # per log step: throughput, data wait, memory, gradient norm
        assert h["segments_per_s"] > 0 and 0 <= h["data_wait_frac"] <= 1 and h["peak_mem_mb"] > 10, h
        assert 0 < h["grad_norm"] < 100, h
    assert len({h["grad_norm"] for h in hb}) == len(hb)
    assert [h["step"] for h in hb if "val_loss" in h] == [6, 12]
    for png in (bf / "loss_curve.png", bf / "plots" / "recon_0000006.png", bf / "plots" / "recon_0000012.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    exported, masters = _final(bf), _ds_states(bf)["module"]
    assert set(exported) == set(masters)
    for k, v in masters.items():  # the engine's module is fp32 (the masters), BatchNorm buffers included
        if v.is_floating_point():
            assert v.dtype == torch.float32 and exported[k].dtype == torch.float32, k
        assert torch.equal(exported[k], v), k
    # BatchNorm: every rank holds the same statistics after the save, pooled from both ranks' own estimates
    # (at step 8: no validation, which also pools them, right before it)
    ranks = torch.load(bf / "checkpoints" / "step0000008" / "himae_run_state.pt", weights_only=True)["ranks"]
    exported = torch.load(bf / "weights" / "step_0000008.pt", weights_only=True)["state_dict"]
    assert ranks[0]["bn_digest"] == ranks[1]["bn_digest"]
    own = [r["bn_before_sync"] for r in ranks]
    for k in own[0]:
        if k.endswith("running_mean"):
            assert not torch.equal(own[0][k], own[1][k]), k  # the ranks had drifted apart
            assert torch.allclose(exported[k], (own[0][k] + own[1][k]) / 2, atol=1e-6), k
        else:
            m = k.replace("running_var", "running_mean")
            pooled = (own[0][k] + own[0][m] ** 2 + own[1][k] + own[1][m] ** 2) / 2 - exported[m] ** 2
            assert torch.allclose(exported[k], pooled, rtol=1e-4, atol=1e-6), k
    ds = json.loads((bf / "ds_config.json").read_text())  # recorded as used: an fp32 engine
    assert "bf16" not in ds and ds["zero_optimization"]["stage"] == 0


def _kill_step(lo: int, hi: int) -> int:
    """A random step in [lo, hi); HIMAE_TEST_KILL_AT replays a failure's step."""
    return int(os.environ.get("HIMAE_TEST_KILL_AT") or random.Random().randrange(lo, hi))


def test_killed_rank_restarts_and_ends_bitwise_equal_to_uninterrupted_run(tiny_shards, tmp_path):
    # log windows (3) straddle saves (5); grad-accum 2, a loader worker, --deterministic, and a shard whose reads
    # fail (rank 1's first): all continue exactly (the resumed stream skips what was actually read)
    steps, args = 24, ("--steps", "24", "--save-every", "5", "--keep-checkpoints", "2", "--val-every", "10",
                       "--val-batches", "2", *ARGS, "--log-every", "3", "--grad-accum", "2", "--num-workers", "1",
                       "--deterministic", "true", "--max-bad-data", "0.5")
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    m = load_manifest(str(shards))
    victim = shards / m.shards()[next(reader_shards(len(m.shards()), 1, 2, 0))].name
    data = bytearray(victim.read_bytes())
    data[148:150] = b"9x"  # the first tar header's checksum: same size, so only a read finds it
    victim.write_bytes(bytes(data))
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    kill_at = _kill_step(6, steps - 1)  # any step after the first checkpoint
    runs = communicate_all([_spawn_trainer(shards, clean, args),  # both at once: each loads the other's machine
                            _spawn_trainer(shards, faulty, args, env_extra={"HIMAE_FAULT": f"kill:1:{kill_at}"},
                                           torchrun_args=("--max-restarts=1",))], timeout=300)
    _, log = _ok(runs[0]), _ok(runs[1])
    resumed_at = kill_at // 5 * 5
    assert f"at step {resumed_at}" in log, (kill_at, log[-3000:])
    a, b = _final(clean), _final(faulty)
    for k in a:
        assert torch.equal(a[k], b[k]), (kill_at, k, (a[k] - b[k]).abs().max())
    for out in (clean, faulty):  # exactly `steps` optimizer updates, counted by AdamW itself
        st = _ds_states(out)
        assert st["global_steps"] == steps
        assert {int(s["step"]) for s in st["optimizer"]["state"].values()} == {steps}
    assert [h["step"] for h in _hist(faulty)] == [3, 6, 9, 12, 15, 18, 21, 24], kill_at  # no step logged twice
    assert _hist(clean)[0]["failed_shard_reads"] >= 1 and '"deterministic": true' in log
    for key in ("loss", "grad_norm", "lr", "failed_shard_reads", "lost_segments"):  # a window cut by the kill is logged as if uninterrupted
        assert [h[key] for h in _hist(faulty)] == [h[key] for h in _hist(clean)], (kill_at, key)
    val = [(h["step"], h["val_loss"]) for h in _hist(faulty) if "val_loss" in h]
    assert val == [(h["step"], h["val_loss"]) for h in _hist(clean) if "val_loss" in h]
    assert [s for s, _ in val] == [12, 21, 24] and val[-1][1] < val[0][1], val  # held-out loss falls
    kept = sorted(p.name for p in (faulty / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step0000020", "step0000024"]  # --keep-checkpoints 2


def test_stalled_rank_is_a_clear_timeout_error(tiny_shards, tmp_path):
    proc = _run_trainer(tiny_shards, tmp_path / "stall", ("--steps", "10", "--collective-timeout-s", "5", *ARGS),
                        env_extra={"HIMAE_FAULT": "stall:1:3"})
    assert proc.returncode != 0
    # the stalled rank or the one waiting for it, whichever watchdog looks first; the other names the lost peer
    assert re.search(r"rank [01] made no progress for \d+ s after step 3", proc.stderr), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("made no progress")[0], proc.stderr[-3000:]
    assert "(--collective-timeout-s=5)" in proc.stderr


def _two_agents(shards, outs, args, env_extra=None, torchrun_args=()):
    """Two torchrun agents on loopback, one rank each, c10d rendezvous (as launch/train_slurm.sbatch):
    a 2-node x 1 job; node i writes to outs[i]."""
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
         f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}", *torchrun_args, "-m", "himae_dist.train",
         "--data", str(shards), "--out", str(out), "--num-workers", "0", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for out in outs]
    return communicate_all(procs, timeout=300)


# Which node's torchrun agent counts the restart decides whether the nodes' restart counts agree:
# - "race": node 1's rank is killed; node 0's rank fails on the lost peer or is still healthy when node 1
#   rejoins (then its agent restarts it as a membership change, not counted): either may happen;
# - "both fail": both ranks die at the same step, so both agents count a restart (counts agree);
# - "healthy rejoined": node 0's rank is stalled (healthy) while node 1's dies, so node 0's agent restarts
#   it only because node 1 is waiting: counts 0 and 1 (this hung before the attempt handshake).
@pytest.mark.xdist_group("one_node_run")  # one worker makes the shared reference run (pyproject addopts)
@pytest.mark.parametrize("order", ["both fail", "healthy rejoined"])  # "race": bench/stress_restart.py
def test_two_nodes_with_a_failed_rank_restart_together_and_match_one_node_bitwise(tiny_shards, tmp_path,
                                                                                 one_node_run, order):
    kill_at = _kill_step(5, 11)
    fault = {"race": f"kill:1:{kill_at}", "both fail": f"kill:0:{kill_at},kill:1:{kill_at}",
             "healthy rejoined": f"stall:0:{kill_at},kill:1:{kill_at}"}[order]
    shared = tmp_path / "2x1"  # both "nodes" see the same --out
    runs = _two_agents(tiny_shards, [shared, shared], TWO_NODE_ARGS, env_extra={"HIMAE_FAULT": fault},
                       torchrun_args=("--max-restarts=1",))
    logs = [_ok(r) for r in runs]
    assert f"resumed from {shared / 'checkpoints'}" in logs[0] + logs[1], (fault, logs[0][-3000:])
    assert f"at step {kill_at // 4 * 4}" in logs[0] + logs[1], fault
    a, b = _final(one_node_run), _final(shared)
    for k in a:
        assert torch.equal(a[k], b[k]), (fault, k)
    assert _ds_states(shared)["global_steps"] == 12
    assert [h["loss"] for h in _hist(one_node_run)] == [h["loss"] for h in _hist(shared)], fault


def test_node_local_out_is_refused_at_start(tiny_shards, tmp_path):
    # node-local --out: refused at start, before any step (not at the first resume, days later)
    local = [tmp_path / "node0", tmp_path / "node1"]
    refused = _two_agents(tiny_shards, local, ("--steps", "4", "--collective-timeout-s", "8", *ARGS))
    assert all(r.returncode != 0 for r in refused)
    err = refused[0].stderr + refused[1].stderr
    assert f"--out {local[0]} is not the same folder on every node: rank 1 on" in err, err[-3000:]
    assert "shared filesystem" in err
    assert not (local[0] / "checkpoints").exists() and not (local[0] / "metrics.jsonl").exists()
