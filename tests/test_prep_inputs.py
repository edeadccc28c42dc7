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


@pytest.fixture
def one_file(tmp_path) -> tuple[Path, list[tuple[str, str, str]]]:
    """An HDF5 of 12 zero-padded segments and the index rows (path, key, patient) that name them."""
    segs = _segments(12)
    write_h5(tmp_path / "a.h5", segs)
    return tmp_path, [("a.h5", k, str(i % 3)) for i, k in enumerate(segs)]


def _prep(index: Path, out: Path, *extra: str) -> None:
    prep_main(["--index", str(index), "--out", str(out), *extra])


def test_a_row_with_an_extra_field_names_the_file_and_line(one_file):
    folder, rows = one_file
    with open(folder / "i.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("local_path", "global_idx", "patient_id"))
        w.writerows(rows[:10] + [(*rows[10], "oops")] + rows[11:])  # data row 11: file line 12
    with pytest.raises(SystemExit, match=r"^himae-prep: error: \S+/i\.csv: line 12 has 4 fields, but the header "
                                         r"\(local_path,global_idx,patient_id\) has 3; a path or key holding a comma"):
        _prep(folder / "i.csv", folder / "o")
    assert not (folder / "o").exists()


def test_a_key_that_is_not_utf8_names_the_file_and_line(one_file):
    folder, rows = one_file
    write_index(folder / "i.csv", rows, ("local_path", "global_idx", "patient_id"))
    raw = (folder / "i.csv").read_bytes().replace(b"000005", b"0000\xff5")  # on file line 7
    (folder / "i.csv").write_bytes(raw)
    with pytest.raises(SystemExit, match=r"^himae-prep: error: \S+/i\.csv: line 7 is not UTF-8 text \(byte 0xff at "
                                         r"column 10: .*\); keys and paths must be UTF-8"):
        _prep(folder / "i.csv", folder / "o")


def test_keys_without_zero_padding_say_so_not_check_the_paths(one_file):
    folder, rows = one_file
    write_index(folder / "i.csv", [(p, str(int(k)), pid) for p, k, pid in rows], ("local_path", "global_idx", "patient_id"))
    with pytest.raises(SystemExit, match=r"^himae-prep: error: \S+/i\.csv: none of 12 sampled rows is readable: \S+/a\.h5 "
                                         r"has no group named like the index's keys .*key '0' is group '000000'\. "
                                         r"global_idx must be the group name exactly: write the keys zero-padded to 6"):
        _prep(folder / "i.csv", folder / "o")
    # one unpadded key among padded ones: its bad-row line says what the file has
    write_index(folder / "j.csv", rows[:5] + [("a.h5", "5", "0")] + rows[6:], ("local_path", "global_idx", "patient_id"))
    with pytest.raises(SystemExit, match=r"a\.h5 \['5'\] \(index row 6\): HDF5 file has no group '5' \(it has '000005': "
                                         r"keys must be the group names exactly, zero-padded\)"):
        _prep(folder / "j.csv", folder / "o2")
