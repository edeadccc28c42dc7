"""What clusters do to a run: preemption, a killed launcher, a second job on the same folder, lost shards.

Real 2-rank DeepSpeed runs under torchrun on CPU (gloo); every test reaps the whole process tree it started.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from himae_dist.streaming import load_manifest, reader_shards
from tests.ports import free_port
from tests.proc_tree import alive_after, communicate_all, kill_tree
from tests.test_train_resume import TWO_NODE_ARGS, _final, _hist, _kill_step, _ok

pytestmark = pytest.mark.slow


def _launch(shards, out, args, env_extra=None, launcher="himae_dist.torchrun", nproc=2):
    cmd = [sys.executable, "-m", launcher, f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "himae_dist.train", "--data", str(shards), "--out", str(out),
           "--num-workers", "0", *args]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run(shards, out, args, env_extra=None):
    return communicate_all([_launch(shards, out, args, env_extra)], timeout=300)[0]


@pytest.mark.xdist_group("one_node_run")  # one worker makes the shared reference run (pyproject addopts)
def test_sigterm_saves_exits_75_and_the_rerun_ends_bitwise_equal(tiny_shards, tmp_path, one_node_run):
    out = tmp_path / "preempted"
    term_at = _kill_step(1, 10)  # rank 0 sends SIGTERM to its torchrun agent before step term_at (SLURM's preemption)
    first = _run(tiny_shards, out, TWO_NODE_ARGS, env_extra={"HIMAE_FAULT": f"term:0:{term_at}"})
    saved = term_at + 2 - term_at % 2  # honoured at the next log step (--log-every 2): after step term_at + 1
    assert first.returncode == 128 + signal.SIGTERM, (term_at, first.stderr[-3000:])
    assert f"himae-train: SIGTERM: saved step {saved}; run the same command to resume" in first.stderr, first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    assert (out / "checkpoints" / f"step{saved:07d}" / "himae_run_state.pt").is_file()
    second = _run(tiny_shards, out, TWO_NODE_ARGS)
    assert f"at step {saved}" in _ok(second), term_at
    a, b = _final(one_node_run), _final(out)
    for k in a:
        assert torch.equal(a[k], b[k]), (term_at, k)
    assert [h["loss"] for h in _hist(one_node_run)] == [h["loss"] for h in _hist(out)], term_at


def _wait_for(pred, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_one_run_per_folder_and_no_rank_outlives_a_killed_launcher(tiny_shards, tmp_path):
    out = tmp_path / "run"
    args = ("--steps", "16", "--save-every", "4", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2")
    first = _launch(tiny_shards, out, args, env_extra={"HIMAE_FAULT": "stall:0:8"})  # holds the folder at step 8
    try:
        _wait_for(lambda: (out / "checkpoints" / "step0000008" / "himae_run_state.pt").is_file(), "the step-8 save")
        config = (out / "config.json").read_bytes()
        metrics = (out / "metrics.jsonl").read_bytes()
        # a second trainer on the same --out: one line naming the holder, nothing in --out rewritten
        second = _run(tiny_shards, out, args)
        assert second.returncode != 0
        holder = json.loads((out / ".himae_lease.json").read_text())
        assert f"is in use by the trainer on host {holder['host']}, pid {holder['pid']}" in second.stderr, \
            second.stderr[-3000:]
        assert (out / "config.json").read_bytes() == config and (out / "metrics.jsonl").read_bytes() == metrics

        # kill -9 of the torchrun agent: every process of the run is gone within 10 s (no orphan trains on)
        agent = psutil.Process(first.pid)
        pids = [p.pid for p in agent.children(recursive=True)]
        assert len(pids) >= 2, pids
        agent.kill()
        first.wait(10)
        assert alive_after(pids, 10) == [], [psutil.Process(p).cmdline() for p in pids if psutil.pid_exists(p)]
    finally:
        kill_tree(first.pid)
        first.communicate()

    # the dead holder's lease is taken over; a resume that then fails its checks leaves --out as it was
    refused = _run(tiny_shards, out, (*args, "--lr", "5e-3"))
    assert refused.returncode != 0 and "--allow-schedule-change" in refused.stderr, refused.stderr[-3000:]
    assert f"took over the lease on --out {out} from host {holder['host']}, pid {holder['pid']}" in refused.stdout
    assert "is no longer running on this host" in refused.stdout
    assert (out / "config.json").read_bytes() == config
    # the same command again resumes and finishes
    third = _ok(_run(tiny_shards, out, args))
    assert "at step 8" in third
    assert not (out / ".himae_lease.json").exists()  # released at the end
    assert [h["step"] for h in _hist(out)] == list(range(2, 17, 2))


def _garble_header(path):
    """Same size, unreadable first tar header: only a read finds it (not the start check)."""
    data = bytearray(path.read_bytes())
    data[148:150] = b"9x"
    path.write_bytes(bytes(data))


def test_failed_shard_reads_are_on_the_record_and_past_the_limit_stop_the_run(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    m = load_manifest(str(shards))
    first = next(reader_shards(len(m.shards()), 0, 2, 0))  # rank 0's first read (--seed 0, no loader workers)
    victim = shards / m.shards()[first].name
    _garble_header(victim)
    args = ("--steps", "6", "--micro-batch", "8", "--log-every", "2", "--shuffle-shards", "2")
    # both at once: the default --max-bad-data 0.01 stops, 0.5 trains on, on the record
    stopped, lenient = communicate_all([_launch(shards, tmp_path / "strict", args),
                                        _launch(shards, tmp_path / "lenient", (*args, "--max-bad-data", "0.5"))], 300)
    assert stopped.returncode != 0
    line = [ln for ln in stopped.stderr.splitlines() if ln.startswith("himae-train: error:")]
    assert line and "shard reads failed by step 2" in line[0] and m.shards()[first].name in line[0], stopped.stderr[-3000:]
    assert "more than --max-bad-data=0.01" in line[0] and "Traceback" not in stopped.stderr

    ok = _ok(lenient)
    hist = _hist(tmp_path / "lenient")
    assert all(h["failed_shard_reads"] >= 1 and h["lost_segments"] > 0 and h["shard_reads"] > h["failed_shard_reads"]
               for h in hist), hist
    last = hist[-1]
    assert f"LOST {hist[0]['failed_shard_reads']} shard reads ({hist[0]['lost_segments']} segments)" in ok  # the log
    assert (f"done at step 6: {last['failed_shard_reads']} of {last['shard_reads']} shard reads failed "
            f"({last['lost_segments']} segments lost)") in ok

    victim.unlink()  # missing at start: refused before the first step, the shard named
    gone = _run(shards, tmp_path / "missing", args)
    assert gone.returncode != 0 and f"{m.shards()[first].name} (missing)" in gone.stderr, gone.stderr[-3000:]
    assert not (tmp_path / "missing" / "metrics.jsonl").exists()
