"""Guard rails on real 2-rank runs: a NaN in the data aborts naming shard and key, or is dropped (counted)."""

import json
import shutil

import numpy as np
import pytest

from data_prep.shard_format import read_shard_blocks
from tests.test_train_distributed import _run_trainer

pytestmark = pytest.mark.slow

ARGS = ("--steps", "6", "--micro-batch", "8", "--log-every", "3", "--shuffle-shards", "2")


@pytest.fixture(scope="module")
def nan_shards(tiny_shards, tmp_path_factory):
    """tiny_shards with NaN in the first 8 segments of every train shard and 4 of the val shard's
    (same sizes: the manifest still fits)."""
    out = tmp_path_factory.mktemp("nan") / "shards"
    shutil.copytree(tiny_shards, out)
    for f in sorted((out / "train").glob("*.tar")) + sorted((out / "val").glob("*.tar")):
        data = bytearray(f.read_bytes())
        block = next(read_shard_blocks(data, str(f)))  # arrays view `data`
        block.signal[:8 if "train" in f.parent.name else 4, 0, 3] = np.nan
        f.write_bytes(bytes(data))
    return out


def test_nan_batch_aborts_naming_shard_and_key(nan_shards, tmp_path):
    # a save at step 2, between log steps: the samples dropped since the last read are settled first
    proc = _run_trainer(nan_shards, tmp_path / "abort", (*ARGS, "--save-every", "2"))
    assert proc.returncode != 0
    assert "steps 1..2: rank " in proc.stderr and "sample(s) with NaN/inf, shard(s) ['train/shard-" in proc.stderr, \
        proc.stderr[-3000:]
    assert "key(s) ['" in proc.stderr and "--on-nonfinite skip" in proc.stderr
    assert not (tmp_path / "abort" / "himae_final.pt").exists() and not (tmp_path / "abort" / "weights").exists()
    assert not list((tmp_path / "abort").glob("checkpoints/step*/himae_run_state.pt"))
    proc = _run_trainer(nan_shards, tmp_path / "abort_val", (*ARGS, "--val-every", "3", "--val-batches", "2"))
    assert proc.returncode != 0  # the val batches are read at start, before the first step
    assert "validation: " in proc.stderr and "sample(s) with NaN/inf, shard(s) ['val/shard-" in proc.stderr, \
        proc.stderr[-3000:]


def test_nan_samples_are_dropped_with_a_warning_and_training_stays_finite(nan_shards, tmp_path):
    proc = _run_trainer(nan_shards, tmp_path / "skip", (*ARGS, "--on-nonfinite", "skip", "--val-every", "3",
                                                        "--val-batches", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: dropped " in proc.stderr and "non-finite sample(s) (steps 1..3: rank " in proc.stderr, \
        proc.stderr[-3000:]
    assert "warning: skipped a val batch" in proc.stderr
    assert "wrote" in proc.stdout  # final weights were checked finite before writing
    hist = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    counts = [h["nonfinite_samples"] for h in hist]  # all ranks, since step 0
    assert counts[0] >= 2 and counts == sorted(counts), counts  # every rank met a NaN block in its first shard
    assert [h["step"] for h in hist if "val_loss" in h] == [3, 6] and all(0 < h["val_loss"] < 1 for h in hist[:2])
    # resumed on 1 rank: the count goes on from all ranks' total
    proc = _run_trainer(nan_shards, tmp_path / "skip", (*ARGS, "--on-nonfinite", "skip", "--steps", "9",
                                                        "--allow-schedule-change", "true"), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    more = [json.loads(line)["nonfinite_samples"] for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert len(more) == 3 and more[:2] == counts and more[2] > counts[-1], (counts, more)


@pytest.mark.parametrize("log_every,save_every,where", [
    ("2", "0", "loss is nan at steps 1..2"),  # caught at the log step
    ("4", "2", "non-finite weights at step 2"),  # caught by the save, before anything is written
])
def test_diverged_run_fails_and_never_saves_non_finite_weights(tiny_shards, tmp_path, log_every, save_every, where):
    out = tmp_path / "diverged"  # lr 1e30: the step-2 forward overflows (finite data), NaN gradients follow
    proc = _run_trainer(tiny_shards, out, ("--steps", "6", "--micro-batch", "8", "--log-every", log_every, "--lr", "1e30",
                                           "--warmup-frac", "0", "--save-every", save_every, "--shuffle-shards", "2"))
    assert proc.returncode != 0
    assert where in proc.stderr, proc.stderr[-3000:]
    assert not (out / "himae_final.pt").exists() and not (out / "weights").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step*/himae_run_state.pt"))


def test_unwritable_export_url_and_a_damaged_val_shard_are_named_before_the_first_step(tiny_shards, tmp_path):
    """The start checks (`_start`, before the loader and the first step; the CLI prints them as one
    `himae-train: error:` line, tests/test_train_cli.py)."""
    from himae_dist.checkpointer import Checkpointer
    from himae_dist.config import parse_config
    from himae_dist.streaming import load_manifest
    from himae_dist.train import _start_checks

    (tmp_path / "afile").write_text("")
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)

    def checks(*argv):
        cfg = parse_config(["--data", str(shards), "--out", str(tmp_path / "run"), *argv])
        return _start_checks([load_manifest(str(shards))], cfg, Checkpointer(None, None, None, cfg, tmp_path / "run",
                                                                            0, 1, {}, {}, {}))

    assert checks("--val-every", "3") == ([], None)
    export = tmp_path / "afile" / "export"
    broken, problem = checks("--export-url", str(export))
    assert problem.startswith(f"--export-url={export}: cannot write there"), problem
    (val,) = sorted((shards / "val").glob("*.tar"))
    val.write_bytes(val.read_bytes()[:1000])  # truncated
    broken, problem = checks("--val-every", "3")
    assert "val shard(s) missing or damaged: ['val/shard-" in problem and "re-run himae-prep" in problem, problem
    assert checks() == ([], None)  # not validating: the val split is not read
