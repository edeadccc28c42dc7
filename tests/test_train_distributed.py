"""A real 2-rank DeepSpeed run on CPU (gloo) under torchrun."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from himae_dist.checkpoint import load_himae
from himae_dist.config import TrainConfig, lr_lambda, parse_config
from tests.ports import free_port
from tests.proc_tree import communicate_all

pytestmark = pytest.mark.slow


def _spawn_trainer(shards, out, args=(), nproc=2, env_extra=None, drop_env=(), torchrun_args=()) -> subprocess.Popen:
    """A torchrun of the trainer, started; `communicate_all` collects it (with others run at the same time)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={port}", *torchrun_args, "-m", "himae_dist.train", "--data", str(shards), "--out", str(out),
           "--num-workers", "0", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _run_trainer(shards, out, args=(), nproc=2, env_extra=None, drop_env=(), torchrun_args=()):
    p = _spawn_trainer(shards, out, args, nproc, env_extra, drop_env, torchrun_args)
    return communicate_all([p], timeout=300)[0]  # on a timeout, the whole tree is killed


def _torchrun(shards, out, steps, extra=(), env_extra=None, nproc=2):
    args = ("--steps", str(steps), "--micro-batch", "16", "--log-every", "5", "--shuffle-shards", "2", *extra)
    proc = _run_trainer(shards, out, args, env_extra=env_extra, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_two_rank_deepspeed_run_loss_falls_and_resumes(tiny_shards, tmp_path):
    out, ext = tmp_path / "run", tmp_path / "torch_extensions"
    log = _torchrun(tiny_shards, out, steps=20, env_extra={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert "world=2 device=cpu" in log
    assert not ext.exists() and "built successfully" not in log  # no JIT build of DeepSpeed's CPU shm op
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [5, 10, 15, 20]
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], hist
    assert hist[-1]["lr"] < hist[1]["lr"]  # decayed after the warmup
    model, info = load_himae(out / "himae_final.pt")
    assert info["step"] == 20
    ds_model, _ = load_himae(out / "checkpoints")  # the DeepSpeed checkpoint holds the same weights
    for (k, a), b in zip(model.state_dict().items(), ds_model.state_dict().values()):
        assert torch.equal(a.float(), b.float()), k

    # a restart after the last checkpoint whose final weights are from an earlier step (a run resumed to
    # more steps, killed before its last write; a lost final: test_final_weights_are_rewritten_when_...)
    # writes them again, leaving the checkpoint as it is
    tag = out / "checkpoints" / "step0000020"
    before = {f.name: f.stat().st_mtime_ns for f in tag.iterdir()}
    final_bytes = (out / "himae_final.pt").read_bytes()
    stale = torch.load(out / "himae_final.pt", weights_only=True)
    torch.save({**stale, "step": 10}, out / "himae_final.pt")
    log = _torchrun(tiny_shards, out, steps=20)
    assert "nothing to train" in log and (out / "himae_final.pt").read_bytes() == final_bytes
    assert {f.name: f.stat().st_mtime_ns for f in tag.iterdir()} == before

    # the saved stream was read by 0 workers per rank: the order does not depend on them, so it goes on
    # (a changed stream option is refused without --allow-schedule-change: test_a_changed_loader_is_refused_...)
    log = _torchrun(tiny_shards, out, steps=20, extra=("--num-workers", "1"))
    assert "the data stream goes on at global batch 20" in log and "new data stream" not in log
    # allowed: more steps, a new lr and weight decay, and 3 ranks instead of 2: another global batch, so a new stream
    log = _torchrun(tiny_shards, out, steps=30, nproc=3,
                    extra=("--allow-schedule-change", "true", "--lr", "5e-4", "--weight-decay", "0.01"))
    assert "resumed from" in log and "at step 20" in log and "world size 2 -> 3" in log
    assert "a new data stream starts (seed 20)" in log and "the global batch 32 -> 48" in log
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist][-2:] == [25, 30]
    f = lr_lambda(TrainConfig(data="d", steps=30, lr=5e-4))
    assert hist[-2]["lr"] == pytest.approx(5e-4 * f(24)) and hist[-1]["lr"] == pytest.approx(5e-4 * f(29))
    groups = torch.load(out / "checkpoints" / "step0000030" / "mp_rank_00_model_states.pt",
                        weights_only=True)["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.01}
    assert load_himae(out / "himae_final.pt")[1]["step"] == 30


def test_fused_objective_trains_under_the_triton_interpreter(tiny_shards, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "fused"  # the interpreter runs the kernels in Python: few, small steps
    proc = _run_trainer(tiny_shards, out, ("--steps", "8", "--micro-batch", "8", "--grad-accum", "2", "--log-every",
                                           "4", "--shuffle-shards", "2", "--loss-impl", "fused", "--lr", "3e-3"),
                        env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "objective=FusedObjective" in proc.stdout
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [4, 8] and hist[-1]["loss"] < 0.9 * hist[0]["loss"], hist


def test_fused_objective_without_cuda_is_a_clear_error(monkeypatch):
    from himae_dist.objective import make_objective

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="--loss-impl=fused needs a CUDA device .* use --loss-impl=reference"):
        make_objective("fused", torch.device("cpu"), 5, 0.8, 0, 0, 1)


def test_a_fresh_start_drops_records_of_a_run_that_never_saved(tiny_shards, tmp_path):
    """A restart before the first checkpoint starts at step 0: the dead attempt's records must not stay.
    That start is also --resume never (no checkpoints yet: allowed) with --init-from weights (a new schedule
    from step 0); then --resume PATH continues exactly that checkpoint into another --out."""
    from himae_dist.checkpoint import save_weights
    from himae_dist.model import HiMAE

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n{"step": 10, "loss": 9.0}\n{"step": 15, "loss": 9.0}\n')
    torch.manual_seed(5)
    init = HiMAE()
    save_weights(init, tmp_path / "init.pt", step=123)
    log = _torchrun(tiny_shards, out, steps=10, extra=("--init-from", str(tmp_path / "init.pt"), "--resume", "never",
                                                       "--save-every", "5"))
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [5, 10] and all(h["loss"] != 9.0 for h in hist)
    assert f"initialised from {tmp_path / 'init.pt'}, step 123 of its run; a new schedule starts at step 0" in log
    torch.manual_seed(0)
    scratch, final = HiMAE().state_dict(), load_himae(out / "himae_final.pt")[0].state_dict()
    for name, p in init.named_parameters():  # 10 small updates away from the given weights, not from a seed-0 start
        if p.dim() > 1:  # convolutions (BatchNorm starts at 1, 0 whatever the seed)
            assert (final[name] - p).abs().max() < 0.2 * (final[name] - scratch[name]).abs().max(), name

    chosen = out / "checkpoints" / "step0000005"
    log = _torchrun(tiny_shards, tmp_path / "second", steps=10, extra=("--resume", str(chosen)))
    assert f"resumed from {chosen} at step 5" in log
    resumed = [json.loads(line) for line in (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()]
    assert [(h["step"], h["loss"]) for h in resumed] == [(10, hist[1]["loss"])]  # the same step 10, exactly


def test_an_error_on_every_rank_reaches_the_user_once_and_last(tiny_shards, tmp_path):
    """himae-torchrun (the launch scripts): the failing rank's one line, last; no tracebacks, no ChildFailedError."""
    (tmp_path / "file").write_text("not a folder")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "himae_dist.torchrun", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={free_port()}", "-m", "himae_dist.train", "--data", str(tiny_shards),
                           "--out", str(tmp_path / "file")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    want = f"himae-train: error: --out {tmp_path / 'file'} is a file; expected a folder (created if missing)"
    assert lines[-1] == want and re.match(r"himae-torchrun: rank [01] failed \(exit code 1\):$", lines[-2]), proc.stderr
    assert proc.stderr.count("himae-train: error:") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]


def test_final_weights_are_rewritten_when_missing_or_from_another_step(tmp_path):
    from himae_dist.checkpointer import Checkpointer

    cfg = TrainConfig(data="d", out=str(tmp_path), steps=40)
    ckpt = Checkpointer(None, None, None, cfg, tmp_path, 0, 1, {}, {}, {})
    assert ckpt._needs_final(40)  # lost
    torch.save({"step": 30}, tmp_path / "himae_final.pt")
    assert ckpt._needs_final(40)  # stale
    torch.save({"step": 40}, tmp_path / "himae_final.pt")
    assert not ckpt._needs_final(40) and ckpt._needs_final(39)  # this step's: kept; steps left: trained
    (tmp_path / "himae_final.pt").write_bytes(b"torn")
    assert ckpt._needs_final(40)  # unreadable


def test_a_changed_loader_is_refused_unless_allowed(tiny_shards):
    from himae_dist.checkpointer import Resumed
    from himae_dist.streaming import load_manifest, make_loader
    from himae_dist.train import _loader

    manifest = load_manifest(str(tiny_shards))
    _, state = make_loader(manifest, 16, seed=0, rank=0, world_size=2, num_workers=0, shuffle_shards=2)
    res = Resumed(start=40, loader={**state.to_dict(), "batches": 40}, stream_seed=0)
    argv = ["--data", str(tiny_shards), "--micro-batch", "16", "--num-workers", "1"]
    cpu = torch.device("cpu")
    _, same = _loader([manifest], [1.0], parse_config([*argv, "--shuffle-shards", "2"]), res, 0, 2, cpu)
    assert same.batches == 40 and same.readers == 2  # other workers: the same stream goes on (its saved readers)
    with pytest.raises(ValueError, match=r"cannot continue the data stream exactly.*--shuffle-shards 2 -> 3.*"
                                         r"--allow-schedule-change"):
        _loader([manifest], [1.0], parse_config([*argv, "--shuffle-shards", "3"]), res, 0, 2, cpu)
    _, new = _loader([manifest], [1.0], parse_config([*argv, "--shuffle-shards", "3", "--allow-schedule-change",
                                                      "true"]), res, 0, 2, cpu)
    assert new.seed == 40 and new.batches == 0 and new.readers == 2  # a new stream, seed + step
