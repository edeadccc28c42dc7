"""Guard rails on real 2-rank runs: a NaN in the data aborts naming shard and key, or is skipped."""

import shutil

import numpy as np
import pytest

from data_prep.shard_format import read_shard_blocks
from tests.test_train_distributed import _run_trainer

pytestmark = pytest.mark.slow

ARGS = ("--steps", "6", "--micro-batch", "8", "--log-every", "3", "--shuffle-shards", "2")


@pytest.fixture(scope="module")
def nan_shards(tiny_shards, tmp_path_factory):
    """tiny_shards with NaN in the first 8 segments of every train shard (same sizes: the manifest still fits)."""
    out = tmp_path_factory.mktemp("nan") / "shards"
    shutil.copytree(tiny_shards, out)
    for f in sorted((out / "train").glob("*.tar")):
        data = bytearray(f.read_bytes())
        block = next(read_shard_blocks(data, str(f)))  # arrays view `data`
        block.signal[:8, 0, 3] = np.nan
        f.write_bytes(bytes(data))
    return out


def test_nan_batch_aborts_naming_shard_and_key(nan_shards, tmp_path):
    proc = _run_trainer(nan_shards, tmp_path / "abort", ARGS)
    assert proc.returncode != 0
    assert "sample(s) with NaN/inf, shard(s) ['train/shard-" in proc.stderr, proc.stderr[-3000:]
    assert "key(s) ['" in proc.stderr and "--on-nonfinite skip" in proc.stderr
    assert not (tmp_path / "abort" / "himae_final.pt").exists()


def test_nan_batch_is_skipped_with_a_warning_and_training_stays_finite(nan_shards, tmp_path):
    proc = _run_trainer(nan_shards, tmp_path / "skip", (*ARGS, "--on-nonfinite", "skip"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: skipped batch 1 of this rank" in proc.stderr
    assert "wrote" in proc.stdout  # final weights were checked finite before writing
