"""The trainer's start decisions and error lines, without starting it: --resume modes, --init-from
checks, the dry run's report, --out checks, manifest gaps, and the error line a failure becomes."""

import errno
import json
import os
import re

import pytest
import torch

from himae_dist.checkpoint import save_weights
from himae_dist.checkpointer import plan_resume, read_init_weights
from himae_dist.config import parse_config
from himae_dist.model import HiMAE
from data_prep.storage import out_problem
from himae_dist.run_state import RUN_STATE


def _fake_checkpoints(out, *steps, complete=True):
    for step in steps:
        tag = out / "checkpoints" / f"step{step:07d}"
        tag.mkdir(parents=True)
        if complete:
            torch.save({"step": step, "schedule": {}, "ranks": [{"loader": {}}]}, tag / RUN_STATE)
    return out / "checkpoints"


def test_resume_modes_pick_or_refuse_a_checkpoint(tmp_path):
    ckpt = _fake_checkpoints(tmp_path / "run", 10, 20)
    _fake_checkpoints(tmp_path / "run", 30, complete=False)  # an interrupted save: never resumed
    assert plan_resume(tmp_path / "fresh" / "checkpoints", "auto") is None
    assert plan_resume(ckpt, "auto") == ckpt / "step0000020"
    assert plan_resume(tmp_path / "fresh" / "checkpoints", "never") is None
    with pytest.raises(ValueError, match=r"--resume never: --out .*run already holds checkpoints \(newest "
                                         r"step0000020\); pick a fresh --out .* or --resume auto"):
        plan_resume(ckpt, "never")
    assert plan_resume(ckpt, "never", restart=True) == ckpt / "step0000020"  # a torchrun restart of this job
    other = tmp_path / "new" / "checkpoints"
    assert plan_resume(other, str(ckpt / "step0000010")) == ckpt / "step0000010"  # into a fresh --out
    assert plan_resume(ckpt, str(ckpt / "step0000020")) == ckpt / "step0000020"
    with pytest.raises(ValueError, match=r"holds later checkpoints \['step0000020'\], which a restart would resume"):
        plan_resume(ckpt, str(ckpt / "step0000010"))
    assert plan_resume(ckpt, str(ckpt / "step0000010"), restart=True) == ckpt / "step0000020"
    with pytest.raises(ValueError, match=r"not a complete checkpoint tag folder; .* such as .*step0000020"):
        plan_resume(other, str(ckpt))  # the checkpoints folder, not a tag
    with pytest.raises(ValueError, match=r"step0000030: not a complete checkpoint tag folder"):
        plan_resume(other, str(ckpt / "step0000030"))


def test_init_from_checks_the_architecture(tmp_path):
    torch.manual_seed(1)
    save_weights(HiMAE(1, (8, 16)), tmp_path / "w.pt", step=7)
    sd, what = read_init_weights(parse_config(["--data", "d", "--channels", "8,16", "--init-from",
                                               str(tmp_path / "w.pt")]))
    assert what == f"{tmp_path / 'w.pt'}, step 7 of its run" and sd["final_deconv.bias"].shape[0] == 1
    with pytest.raises(ValueError, match=r"--init-from .*w\.pt: weights of HiMAE\(in_chans=1, channels=\[8, 16\]\), "
                                         r"but this run builds in_chans=1, channels=\[16, 32, 64, 128, 256\]; pass "
                                         r"--in-chans 1 --channels 8,16"):
        read_init_weights(parse_config(["--data", "d", "--init-from", str(tmp_path / "w.pt")]))
    sd = torch.load(tmp_path / "w.pt", weights_only=True)
    sd["state_dict"]["final_deconv.bias"][0] = float("nan")  # a diverged run's weights: not a NaN loss at step 1
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"--init-from .*nan\.pt: .*nan\.pt: 1 tensor\(s\) hold NaN or inf \(first: "
                                         r"final_deconv\.bias\)"):
        read_init_weights(parse_config(["--data", "d", "--channels", "8,16", "--init-from", str(tmp_path / "nan.pt")]))
    with pytest.raises(ValueError, match=r"--init-from .*nope\.pt: checkpoint .*nope\.pt does not exist"):
        read_init_weights(parse_config(["--data", "d", "--init-from", str(tmp_path / "nope.pt")]))


def test_out_that_is_a_file_or_read_only_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    assert out_problem(tmp_path / "new" / "run") is None
    assert out_problem(tmp_path / "f") == f"--out {tmp_path / 'f'} is a file; expected a folder (created if missing)"
    assert "cannot be created: " + str(tmp_path / "f") + " is a file" in out_problem(tmp_path / "f" / "run")
    assert "is not writable" in (out_problem(__import__("pathlib").Path("/proc/self")) or "")


def test_manifest_split_without_shards_is_named(tmp_path, tiny_shards):
    from himae_dist.streaming import load_manifest

    m = json.loads((tiny_shards / "manifest.json").read_text())
    del m["splits"]["val"]["shards"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json: splits\.val has no 'shards' list; was it written by "
                                         r"himae-prep\?"):
        load_manifest(str(tmp_path))
    m["splits"]["val"] = {"shards": [{"url": "val/x.tar", "n_samples": 3}]}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json: splits\.val\.shards\[0\]\.bytes = None: expected a whole "
                                         r"number >= 0"):
        load_manifest(str(tmp_path))


@pytest.mark.parametrize("exc,match", [
    (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0"),
     r"writing under --out (\S+) failed: the disk is full or failing \(.* GiB free .*\); free space or pick "
     r"another --out, then run the same command to resume .*inline_container"),
    (OSError(errno.ENOSPC, "No space left on device"), r"writing under --out \S+ failed: the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "RUN/config.json"),
     r"--out (\S+): cannot write \1/config\.json: Permission denied \(PermissionError\); pick a writable --out"),
    (FileExistsError(errno.EEXIST, "File exists", "RUN"),
     r"--out (\S+): cannot write \1: File exists \(FileExistsError\)"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.tar"), r"error: /data/x\.tar: Permission denied"),
    (RuntimeError("Connection closed by peer [127.0.0.1]:1234"), r"a peer rank exited or died mid-collective"),
])
def test_failures_become_one_clear_line(tmp_path, exc, match):
    from himae_dist.train import error_line

    if isinstance(exc, OSError) and exc.filename and exc.filename.startswith("RUN"):
        exc.filename = exc.filename.replace("RUN", str(tmp_path / "run"))
    line = error_line(exc, parse_config(["--data", "d", "--out", str(tmp_path / "run")]))
    assert line.startswith("himae-train: error: ") and "\n" not in line
    assert re.search(match, line), line
    assert error_line(RuntimeError("an internal bug"), None) is None  # a bug keeps its traceback


def test_dry_run_reports_the_plan_and_writes_nothing(tmp_path, tiny_shards, capsys, monkeypatch):
    from himae_dist.dry_run import dry_run
    from himae_dist.streaming import load_manifest

    m = load_manifest(str(tiny_shards))
    n_train = m.n_samples("train")
    out = tmp_path / "run"
    ckpt = _fake_checkpoints(out, 5)
    before = sorted(os.walk(out))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    dry_run(parse_config(["--data", str(tiny_shards), "--out", str(out), "--steps", "30", "--micro-batch", "16",
                          "--storage-options", '{"secret": "SECRET-DRY"}']))
    text = capsys.readouterr().out
    assert "SECRET-DRY" not in text and '"secret": "<redacted>"' in text  # the resolved config, redacted
    assert "global batch 64 = --micro-batch 16 x --grad-accum 1 x 4 rank(s)" in text
    assert f"{30 * 64 / n_train:.2f} epochs of the train split" in text and f"{n_train} segments" in text
    assert f"{len(m.shards('train'))} train shard(s)" in text and m.shards("train")[0].name in text
    assert f"resume: from {ckpt / 'step0000005'} (--resume auto)" in text and '"steps": 30' in text
    assert sorted(os.walk(out)) == before
    # two sources: each one's weight, samples per global batch, shuffle width and epochs at --steps
    dry_run(parse_config(["--data", str(tiny_shards), "--data", str(tiny_shards), "--weights", "3,1", "--out",
                          str(tmp_path / "two"), "--steps", "30", "--micro-batch", "16", "--shuffle-shards", "4"]))
    text, k = capsys.readouterr().out, len(m.shards("train"))
    for w, n, width in (("3", 48, 3), ("1", 16, 1)):
        assert (f"source {m.url}: weight {w}, {n} of 64 samples per global batch, shuffled {width} shard(s) at a "
                f"time, {k} train shard(s), {n_train} segments: {n * 30 / n_train:.2f} epochs at --steps 30") in text
    monkeypatch.setenv("RANK", "1")  # another rank prints nothing and does not wait for rank 0
    dry_run(parse_config(["--data", str(tiny_shards), "--out", str(out)]))
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="--resume never: --out .* already holds checkpoints"):
        dry_run(parse_config(["--data", str(tiny_shards), "--out", str(out), "--resume", "never"]))
    fresh = tmp_path / "fresh" / "run"
    dry_run(parse_config(["--data", str(tiny_shards), "--out", str(fresh), "--resume", "never"]))
    assert f"resume: none, a new run at step 0 in {fresh}" in capsys.readouterr().out
    assert not fresh.parent.exists()


def test_torchrun_names_the_root_cause_not_a_peers_death():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from himae_dist.torchrun import root_cause

    def failure(rank, line, ts):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=1, error_file="<N/A>")
        f.message, f.timestamp = {"message": line}, ts
        return f

    peer = ("himae-train: error: a peer rank exited or died mid-collective (the first failing rank's own error "
            "names the cause): x")
    failures = {0: failure(0, peer, 5), 1: failure(1, "himae-train: error: the real cause", 5)}
    assert root_cause(failures)[0] == 1
    failures[1].timestamp = 6
    assert root_cause(failures)[0] == 0  # earlier wins
    failures = {0: failure(0, "himae-train: error: x", 5), 1: failure(1, "himae-train: error: x", 5)}
    failures[0].exitcode = -15  # stopped by torchrun after rank 1 failed
    assert root_cause(failures)[0] == 1
