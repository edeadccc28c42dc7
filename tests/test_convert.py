import csv
import json

import h5py
import numpy as np
import pytest
import webdataset as wds

from data_prep.convert import ConvertParams, convert_downstream, convert_pretrain, main as prep_main
from data_prep.hdf5_sources import BadSampleError


def _read_back(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / s["url"]) for s in manifest["shards"]]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    return manifest, samples


def test_pretrain_conversion_reads_back_equal_through_stock_webdataset(tiny_cohort, tiny_shards):
    manifest, samples = _read_back(tiny_shards)
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert manifest["n_samples"] == len(rows) == len(samples)
    assert (manifest["length"], manifest["channels"]) == (250, 1)
    assert len(manifest["shards"]) == -(-len(rows) // 64)
    for r in rows:
        with h5py.File(tiny_cohort / r["local_path"]) as f:
            expected = f[r["global_idx"]]["normalized_waveform"][()]
        s = samples[r["global_idx"]]
        assert s["signal.npy"].shape == (1, 250) and s["signal.npy"].dtype == np.float32
        np.testing.assert_array_equal(s["signal.npy"][0], expected)
        assert s["json"]["global_idx"] == r["global_idx"]


def test_downstream_conversion_keeps_labels_and_patients(tiny_cohort, tmp_path):
    convert_downstream(str(tiny_cohort / "downstream.h5"), "ppg", ConvertParams(str(tmp_path), samples_per_shard=100))
    manifest, samples = _read_back(tmp_path)
    with h5py.File(tiny_cohort / "downstream.h5") as f:
        ppg, labels, pids = f["ppg"][()], f["labels"][()], f["patient_ids"][()]
    assert manifest["kind"] == "downstream" and len(samples) == len(labels)
    for key, s in samples.items():
        row = int(key)
        np.testing.assert_array_equal(s["signal.npy"][0], ppg[row])
        assert (s["json"]["label"], s["json"]["patient_id"]) == (labels[row], pids[row])


def _make_shard(path, keys, length=250, bad=None):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for k in keys:
            x = rng.standard_normal(length).astype(np.float32)
            if bad and k in bad:
                x = bad[k]
            f.create_group(k).create_dataset("normalized_waveform", data=x)


def _write_index(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["local_path", "global_idx"])
        w.writerows(rows)


def test_zero_padded_global_idx_is_kept_as_a_string(tmp_path):
    keys = ["000007", "000123", "004567"]
    _make_shard(tmp_path / "a.h5", keys)
    _write_index(tmp_path / "index.csv", [("a.h5", k) for k in keys])
    with h5py.File(tmp_path / "a.h5") as f:
        assert str(int("000123")) not in f  # the seed's int() reading would find nothing
    manifest = convert_pretrain(str(tmp_path / "index.csv"), ConvertParams(str(tmp_path / "out")))
    assert manifest["n_samples"] == 3 and manifest["skipped"] == {}
    assert set(_read_back(tmp_path / "out")[1]) == set(keys)


@pytest.fixture
def bad_index(tmp_path):
    nan = np.full(250, np.nan, dtype=np.float32)
    _make_shard(tmp_path / "a.h5", ["000001", "000002", "000003"], bad={"000002": nan, "000003": np.zeros(200, np.float32)})
    with h5py.File(tmp_path / "a.h5", "a") as f:
        f.create_group("000004").create_dataset("other", data=np.zeros(250))
    rows = [("a.h5", "000001"), ("a.h5", "000002"), ("a.h5", "000003"), ("a.h5", "000004"),
            ("a.h5", "000099"), ("missing.h5", "000005")]
    _write_index(tmp_path / "index.csv", rows)
    return tmp_path


@pytest.mark.parametrize("row,match", [
    (1, r"a\.h5 \['000002'\] \(index row 2\): segment has 250 NaN"),
    (2, r"a\.h5 \['000003'\].*length 200, expected 250"),
    (3, r"a\.h5 \['000004'\].*no dataset 'normalized_waveform'"),
    (4, r"a\.h5 \['000099'\].*no group '000099'"),
    (5, r"missing\.h5 \['000005'\].*does not exist"),
])
def test_bad_input_errors_name_file_and_key(bad_index, row, match):
    with open(bad_index / "index.csv") as fh:
        lines = fh.read().splitlines()
    (bad_index / "one.csv").write_text("\n".join([lines[0], lines[1], lines[row + 1]]) + "\n")
    with pytest.raises(BadSampleError, match=match):
        convert_pretrain(str(bad_index / "one.csv"), ConvertParams(str(bad_index / f"out{row}"), length=250))
    assert not (bad_index / f"out{row}" / "manifest.json").exists()


def test_skip_policy_counts_every_bad_row(bad_index):
    manifest = convert_pretrain(str(bad_index / "index.csv"), ConvertParams(str(bad_index / "out"), length=250, on_bad="skip"))
    assert manifest["n_samples"] == 1
    assert manifest["skipped"] == {"non_finite": 1, "wrong_length": 1, "missing_key": 2, "missing_file": 1}


def test_index_without_required_columns_is_rejected(tmp_path):
    (tmp_path / "i.csv").write_text("path,idx\na.h5,1\n")
    with pytest.raises(SystemExit, match=r"i\.csv: header \['path', 'idx'\] lacks column\(s\) \['local_path', 'global_idx'\]"):
        prep_main(["--index", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o")])


def test_downstream_missing_dataset_is_named(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["ppg"] = np.zeros((3, 250), np.float32)
    with pytest.raises(KeyError, match=r"d\.h5: missing dataset '/labels'"):
        convert_downstream(str(tmp_path / "d.h5"), "ppg", ConvertParams(str(tmp_path / "o")))


def test_downstream_skips_are_counted_in_the_manifest_file(tmp_path):
    ppg = np.random.default_rng(0).standard_normal((4, 250)).astype(np.float32)
    ppg[2, 7] = np.nan
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["ppg"], f["labels"], f["patient_ids"] = ppg, np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2])
    returned = convert_downstream(str(tmp_path / "d.h5"), "ppg", ConvertParams(str(tmp_path / "o"), on_bad="skip"))
    on_disk, samples = _read_back(tmp_path / "o")
    assert on_disk == returned
    assert on_disk["skipped"] == {"non_finite": 1} and on_disk["n_samples"] == 3
    assert sorted(samples) == ["00000000", "00000001", "00000003"]


def test_rerun_resumes_instead_of_redoing(tiny_cohort, tmp_path):
    p = ConvertParams(str(tmp_path), samples_per_shard=100, workers=2)
    first = convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p)
    shard0, shard1 = tmp_path / "shard-000000.tar", tmp_path / "shard-000001.tar"
    m0 = shard0.stat().st_mtime_ns
    shard1.unlink()
    (tmp_path / "_parts" / "shard-000001.json").unlink()  # as if the job died mid-way
    assert convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p) == first
    assert shard0.stat().st_mtime_ns == m0 and shard1.exists()
    assert not list(tmp_path.glob(".shard-*"))  # no temp files left behind
