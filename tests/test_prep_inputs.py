"""himae-prep on inputs that used to give unclear errors or silently wrong shards: each is a line
naming the file, line, key or flag, or a counted skip in the manifest (issue 17)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_prep.convert import ConvertParams, convert_pretrain, main as prep_main
from tests.h5_inputs import write_h5, write_index

LENGTH = 64


def _segments(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{j:06d}": (rng.standard_normal(LENGTH) * 3 + 10).astype(np.float32) for j in range(n)}


def _read_back(out: Path) -> dict[str, np.ndarray]:
    """key -> stored signal [C, L], read from the real tar shards by stock webdataset."""
    urls = sorted(str(p) for p in out.glob("*/shard-*.tar"))
    got = {}
    for block in wds.WebDataset(urls, shardshuffle=False).decode():
        got.update({str(k): s for k, s in zip(block["key.npy"], block["signal.npy"])})
    return got


def test_values_near_the_float32_limit_are_scaled_not_written_as_nan(tmp_path):
    segs = _segments(6)
    segs["000002"] = np.linspace(-3e38, 3e38, LENGTH, dtype=np.float32)  # finite; hi - lo overflows float32
    segs["000003"] = np.full(LENGTH, 3.3e38, np.float32)
    segs["000003"][::2] = -3.3e38
    write_h5(tmp_path / "a.h5", segs)
    write_index(tmp_path / "i.csv", [("a.h5", k) for k in segs])
    m = convert_pretrain(str(tmp_path / "i.csv"), ConvertParams(str(tmp_path / "o"), val_fraction=0, dtype="float32"))
    got = _read_back(tmp_path / "o")
    assert m["n_samples"] == 6 and m["skipped"] == {} and all(np.isfinite(s).all() for s in got.values())
    np.testing.assert_allclose(got["000002"][0], np.linspace(-1, 1, LENGTH), atol=1e-6)
    assert set(np.unique(got["000003"])) == {-1.0, 1.0}


def test_resampling_that_overflows_float32_is_a_counted_bad_row(tmp_path):
    """normalize=none keeps raw values; a step between +-3.3e38 overshoots past float32's max when
    resampled. Such rows are bad rows: named under --on-bad error, counted under skip, never written."""
    segs = _segments(5)
    step = np.full(LENGTH, 3.3e38, np.float32)
    step[LENGTH // 2:] = -3.3e38
    segs["000004"] = step
    write_h5(tmp_path / "a.h5", segs)
    write_index(tmp_path / "i.csv", [("a.h5", k) for k in segs])
    args = ["--index", str(tmp_path / "i.csv"), "--val-fraction", "0", "--normalize", "none", "--dtype", "float32",
            "--source-rate", "100", "--target-rate", "50"]
    with pytest.raises(SystemExit, match=r"^himae-prep: error: shard train/0: key '000004': its finite input values "
                                         r"give NaN/inf after preprocessing \(normalize=none, 100 -> 50 Hz\)"):
        prep_main([*args, "--out", str(tmp_path / "err")])
    prep_main([*args, "--out", str(tmp_path / "o"), "--on-bad", "skip"])
    got = _read_back(tmp_path / "o")
    import json

    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["skipped"] == {"non_finite_output": 1} and m["n_samples"] == 4
    assert sorted(got) == ["000000", "000001", "000002", "000003"]
    assert all(np.isfinite(s).all() for s in got.values())
