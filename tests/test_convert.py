"""The conversion job: format v2 round trips, determinism, resume, tasks, integrity and bad input."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import webdataset as wds

from data_prep.convert import ConvertParams, convert, convert_downstream, convert_pretrain, main as prep_main
from data_prep.hdf5_sources import BadSampleError
from data_prep.preprocess import Preprocess
from tests.h5_inputs import random_index as _random_index, write_h5 as _write_h5, write_index as _write_index


def _manifest(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


def _stock_read(folder):
    """Every segment through stock webdataset: {key: (signal [C, L], patient, label)}."""
    m = _manifest(folder)
    urls = [str(Path(folder) / s["url"]) for sp in m["splits"].values() for s in sp["shards"]]
    out = {}
    for block in wds.WebDataset(urls, shardshuffle=False).decode():
        for sig, key, pid, lab in zip(block["signal.npy"], block["key.npy"], block["patient.npy"], block["label.npy"]):
            assert str(key) not in out, f"key {key} twice"
            out[str(key)] = (sig, int(pid), int(lab))
    return m, out


def _tree_hashes(folder):
    root = Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_float32_round_trip_is_exact_and_stock_webdataset_reads_it(tiny_cohort, tmp_path):
    p = ConvertParams(str(tmp_path), samples_per_shard=100, block_size=32, dtype="float32", normalize="none")
    m = convert_pretrain(str(tiny_cohort / "pretrain_index.csv"), p)
    m2, got = _stock_read(tmp_path)
    with open(tiny_cohort / "pretrain_index.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert m["n_samples"] == len(rows) == len(got) and m["format"] == "himae-wds-v2"
    assert (m["length"], m["channels"], m["dtype"]) == (250, 1, "float32")
    for r in rows:
        with h5py.File(tiny_cohort / r["local_path"]) as f:
            expected = f[r["global_idx"]]["normalized_waveform"][()]
        sig, pid, lab = got[r["global_idx"]]
        assert sig.dtype == np.float32 and sig.shape == (1, 250)
        np.testing.assert_array_equal(sig[0], expected)
        assert lab == -1


def test_float16_minmax_within_float16_precision(tmp_path):
    index = _random_index(tmp_path, n=120)
    m = convert_pretrain(str(index), ConvertParams(str(tmp_path / "out"), samples_per_shard=50))
    assert m["dtype"] == "float16" and m["preprocess"]["normalize"] == "minmax"
    _, got = _stock_read(tmp_path / "out")
    assert len(got) == 120
    pre = Preprocess(length=250)
    with h5py.File(tmp_path / "f0.h5") as f:
        for k in list(f)[:20]:
            ref, _ = pre.apply(f[k]["normalized_waveform"][()][None, None])
            sig = got[k][0]
            assert sig.dtype == np.float16
            assert np.abs(sig.astype(np.float32) - ref[0]).max() <= 2.0**-11  # fp16 rounding in [-1, 1]
            assert sig.min() == -1 and sig.max() == 1


def test_shards_are_byte_identical_for_any_workers_and_across_runs(tmp_path):
    index = _random_index(tmp_path, n=400)
    for name, workers in (("a", 1), ("b", 2), ("c", 1)):
        convert_pretrain(str(index), ConvertParams(str(tmp_path / name), samples_per_shard=60, block_size=16, workers=workers))
    a, b, c = (_tree_hashes(tmp_path / n) for n in "abc")
    assert a == b == c and any(k.startswith("train/") for k in a)
    with open(tmp_path / "a" / "train" / "shard-000000.tar", "rb") as fh:
        head = fh.read(512)
    assert head[257:263] == b"ustar\x00" and b"PaxHeader" not in (tmp_path / "a" / "train" / "shard-000000.tar").read_bytes()
    assert oct(os.stat(tmp_path / "a" / "train" / "shard-000000.tar").st_mode & 0o777) == "0o644"


def test_bounded_memory_waves_give_the_same_shards(tmp_path, monkeypatch):
    """max_rows smaller than the index forces several passes (waves, duplicate buckets): same bytes,
    and no index chunk, duplicate bucket or wave ever holds more than max_rows rows."""
    import data_prep.convert as conv
    import data_prep.index_plan as plan_mod

    index = _random_index(tmp_path, n=300, n_files=12)  # 25 rows a file: waves of two files
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "big"), samples_per_shard=40))
    held, waves = [], []
    chunks, rows_for = plan_mod.IndexSource.chunks, conv.rows_for_files
    monkeypatch.setattr(plan_mod.IndexSource, "chunks", lambda self: (held.append(len(c)) or c for c in chunks(self)))
    monkeypatch.setattr(conv, "rows_for_files", lambda *a: (lambda r: waves.append(len(r)) or r)(rows_for(*a)))
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "small"), samples_per_shard=40, max_rows=50))
    assert _tree_hashes(tmp_path / "big") == _tree_hashes(tmp_path / "small")
    assert max(held) <= 50 and len(held) > 20
    assert max(waves) <= 50 and len(waves) == 6


def test_split_is_by_patient_and_shards_mix_patients(tmp_path):
    index = _random_index(tmp_path, n=600, patients=12)
    m = convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=100, val_fraction=0.2))
    _, got = _stock_read(tmp_path / "o")
    val_keys = set()
    for s in m["splits"]["val"]["shards"]:
        for block in wds.WebDataset([str(tmp_path / "o" / s["url"])], shardshuffle=False).decode():
            val_keys |= {str(k) for k in block["key.npy"]}
    val_p = {got[k][1] for k in val_keys}
    train_p = {v[1] for k, v in got.items() if k not in val_keys}
    assert m["split"]["by"] == "patient" and not val_p & train_p
    assert sorted(val_p) == m["split"]["val_patients"] and sorted(train_p) == m["split"]["train_patients"]
    assert 0.15 <= len(val_keys) / 600 <= 0.35
    # rows of one patient are consecutive in the index, yet each train shard holds many patients
    first = wds.WebDataset([str(tmp_path / "o" / m["splits"]["train"]["shards"][0]["url"])], shardshuffle=False).decode()
    assert len({int(p) for b in first for p in b["patient.npy"]}) >= 6


def test_without_patient_ids_the_split_is_a_seeded_key_hash(tmp_path):
    index = _random_index(tmp_path, n=600)
    lines = index.read_text().splitlines()
    (tmp_path / "nopid.csv").write_text("\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")
    m = convert_pretrain(str(tmp_path / "nopid.csv"), ConvertParams(str(tmp_path / "o"), samples_per_shard=100, val_fraction=0.1))
    assert m["split"]["by"] == "key_hash"
    n_val = m["splits"]["val"]["n_samples"]
    assert 0.05 * m["n_samples"] < n_val < 0.15 * m["n_samples"]


def test_resampling_and_normalisation_are_recorded(tmp_path):
    index = _random_index(tmp_path, n=40)
    m = convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), source_rate=25, target_rate=100, val_fraction=0))
    assert m["length"] == 1000 and m["preprocess"]["output_rate"] == 100 and m["preprocess"]["length"] == 250
    _, got = _stock_read(tmp_path / "o")
    assert all(v[0].shape == (1, 1000) for v in got.values())
    with pytest.raises(SystemExit, match=r"resampling 250 samples from 24.0 Hz to 100.0 Hz gives 1041.67 samples"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "x"), "--source-rate", "24", "--target-rate", "100"])


def test_three_tasks_and_finalize_equal_one_run(tmp_path, capsys):
    index = _random_index(tmp_path, n=350)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "one"), samples_per_shard=40))
    common = ["--index", str(index), "--out", str(tmp_path / "multi"), "--samples-per-shard", "40"]
    prep_main(common + ["--num-tasks", "3", "--task-index", "0"])
    assert "task 0 of 3 spilled its input files; tasks [1, 2] have not yet" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"task\(s\) \[1, 2\] have not read their input files yet.*run every task again"):
        prep_main(common + ["--num-tasks", "3", "--finalize"])
    for _ in range(2):  # as a SLURM array submitted twice: the second round builds from every task's spill
        for t in range(3):
            prep_main(common + ["--num-tasks", "3", "--task-index", str(t)])
            assert not (tmp_path / "multi" / "manifest.json").exists()
    prep_main(common + ["--num-tasks", "3", "--finalize"])
    assert _tree_hashes(tmp_path / "one") == _tree_hashes(tmp_path / "multi")
    assert not (tmp_path / "multi" / ".spill").exists()


def test_finalize_names_the_missing_task(tmp_path, monkeypatch):
    index = _random_index(tmp_path, n=200)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "1")
    prep_main(["--index", str(index), "--out", str(tmp_path / "o"), "--samples-per-shard", "40"])
    with pytest.raises(SystemExit, match=r"not finished or not intact.*task\(s\) \[0\] have not read their input"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "o"), "--samples-per-shard", "40", "--finalize"])


@pytest.mark.parametrize("damage", ["delete", "truncate", "bitflip", "delete_record"])
def test_damaged_shard_is_rebuilt_on_rerun(tmp_path, damage, capsys):
    index = _random_index(tmp_path, n=200)
    p = ConvertParams(str(tmp_path / "o"), samples_per_shard=40)
    convert_pretrain(str(index), p)
    before = _tree_hashes(tmp_path / "o")
    victim = tmp_path / "o" / "train" / "shard-000002.tar"
    other = tmp_path / "o" / "train" / "shard-000001.tar"
    other_mtime = other.stat().st_mtime_ns
    data = victim.read_bytes()
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        victim.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    else:
        (tmp_path / "o" / "_parts" / "train-000002.json").unlink()
    capsys.readouterr()
    convert_pretrain(str(index), p)
    assert _tree_hashes(tmp_path / "o") == before
    assert other.stat().st_mtime_ns == other_mtime  # intact shards are verified, not rewritten
    if damage != "delete_record":
        assert "rebuilding 1: train/2" in capsys.readouterr().out


def test_shards_are_sized_by_shard_mb_and_an_old_default_output_names_its_flag(tmp_path):
    """Without --samples-per-shard, a shard holds what fits in --shard-mb (float16 [1, 250] = 500 B a
    segment); an output made with the old default of 1000 is refused with the flag that resumes it."""
    index = _random_index(tmp_path, n=400)
    m = convert_pretrain(str(index), ConvertParams(str(tmp_path / "mb"), shard_mb=0.05, val_fraction=0))
    assert m["options"]["samples_per_shard"] == int(0.05 * 2**20) // 500 == 104
    assert [s["n_samples"] for s in m["splits"]["train"]["shards"]] == [104, 104, 104, 88]
    out = str(tmp_path / "old")
    prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "1000"])
    with pytest.raises(SystemExit, match=r"samples_per_shard 1000 -> 67108\); to go on with it, pass --samples-per-shard "
                                         r"1000; pass --overwrite"):
        prep_main(["--index", str(index), "--out", out])
    prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "1000"])  # verified, not rebuilt


def test_a_spill_disk_too_small_is_one_line_naming_spill_dir(tmp_path, monkeypatch):
    from collections import namedtuple

    import data_prep.external_shuffle as shuffle

    index = _random_index(tmp_path, n=200)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shuffle.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 50_000, 50_000))
    with pytest.raises(SystemExit, match=r"^himae-prep: error: --spill-dir \S+/spill: 0.05 MB free, but this conversion "
                                         r"spills about 0.2\d MB \(200 rows x \d+ bytes"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "o"), "--spill-dir", str(tmp_path / "spill")])
    assert not list((tmp_path / "o").glob("*/*.tar"))


def test_changed_options_or_source_are_refused_unless_overwrite(tmp_path):
    index = _random_index(tmp_path, n=100)
    out = str(tmp_path / "o")
    prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "40"])
    with pytest.raises(SystemExit, match=r"holds shards from another conversion \(samples_per_shard 40 -> 30\); "
                                         r"to go on with it, pass --samples-per-shard 40; pass --overwrite"):
        prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "30"])
    with h5py.File(tmp_path / "f1.h5", "a") as f:  # the source changes under the same name
        f["000040"]["normalized_waveform"][0] = 99.0
    with pytest.raises(SystemExit, match=r"the source changed"):
        prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "40"])
    prep_main(["--index", str(index), "--out", out, "--samples-per-shard", "30", "--overwrite"])
    m = _manifest(out)
    assert m["options"]["samples_per_shard"] == 30 and m["n_samples"] == 100
    on_disk = {str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").glob("*/*.tar")}
    assert on_disk == {s["url"] for sp in m["splits"].values() for s in sp["shards"]}  # no stale shards


def test_v1_output_folder_is_refused(tmp_path):
    index = _random_index(tmp_path, n=50)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text(json.dumps({"format": "himae-wds-v1", "shards": []}))
    with pytest.raises(SystemExit, match=r"format 'himae-wds-v1' -> 'himae-wds-v2'"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "o")])


def test_resume_after_kill_9(tmp_path):
    index = _random_index(tmp_path, n=3000, n_files=6)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "data_prep.convert", "--index", str(index), "--out", str(out), "--samples-per-shard", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "_parts").glob("train-*.json"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    subprocess.run(cmd, check=True, capture_output=True)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "clean"), samples_per_shard=20))
    assert _tree_hashes(out) == _tree_hashes(tmp_path / "clean")
    assert not list(out.glob(".tmp-*"))


# ---- bad input: a clear error naming the file and key, or a counted skip ----

@pytest.fixture
def bad_index(tmp_path):
    rng = np.random.default_rng(0)
    good = {f"{i:06d}": rng.standard_normal(250).astype(np.float32) for i in range(1, 9)}
    segs = dict(good)
    segs["000090"] = np.full(250, np.nan, np.float32)
    segs["000091"] = np.linspace(0, 1, 200, dtype=np.float32)
    segs["000092"] = np.full(250, 3.0, np.float32)  # flat line
    _write_h5(tmp_path / "a.h5", segs)
    with h5py.File(tmp_path / "a.h5", "a") as f:
        f.create_group("000093").create_dataset("other", data=np.zeros(250))
    (tmp_path / "junk.h5").write_bytes(b"this is not HDF5" * 100)
    _write_h5(tmp_path / "b.h5", {f"{i:06d}": rng.standard_normal(250).astype(np.float32) for i in range(200, 260)})
    whole = (tmp_path / "b.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(whole[: len(whole) // 3])
    rows = [("a.h5", "000091")] + [("a.h5", k) for k in good] + [
        ("a.h5", "000090"), ("a.h5", "000092"), ("a.h5", "000093"), ("a.h5", "000099"), ("missing.h5", "000105"),
        ("junk.h5", "000106"), ("junk.h5", "000107"), ("cut.h5", "000201"), ("a.h5", "000003"),
    ]
    _write_index(tmp_path / "index.csv", rows)
    return tmp_path


@pytest.mark.parametrize("key,match", [
    ("000090", r"a\.h5 \['000090'\] \(index row \d+\): segment has 250 NaN"),
    ("000091", r"a\.h5 \['000091'\].*length 200"),
    ("000093", r"a\.h5 \['000093'\].*no dataset 'normalized_waveform'"),
    ("000099", r"a\.h5 \['000099'\].*no group '000099'"),
    ("000105", r"missing\.h5 \['000105'\].*does not exist"),
    ("000106", r"junk\.h5: not a readable HDF5 file"),
    ("cut", r"cut\.h5.*(not a readable HDF5 file|cannot read)"),
])
def test_bad_input_errors_name_file_and_key(bad_index, key, match):
    with open(bad_index / "index.csv") as fh:
        lines = fh.read().splitlines()
    pick = [ln for ln in lines[1:] if (key == "cut" and ln.startswith("cut")) or ln.endswith(key)][:1]
    (bad_index / "one.csv").write_text("\n".join([lines[0]] + [ln for ln in lines[2:6]] + pick) + "\n")
    with pytest.raises(SystemExit, match=match):
        prep_main(["--index", str(bad_index / "one.csv"), "--out", str(bad_index / "out"), "--length", "250"])
    assert not (bad_index / "out" / "manifest.json").exists()


def test_skip_policy_counts_every_bad_row_and_the_length_is_the_common_one(bad_index):
    """The first row is the outlier (length 200): the length comes from most rows, not the first."""
    m = convert_pretrain(str(bad_index / "index.csv"), ConvertParams(str(bad_index / "out"), on_bad="skip", val_fraction=0))
    assert m["length"] == 250 and "sampled rows" in m["length_inferred_from"]
    assert m["n_samples"] == 8
    assert m["skipped"] == {"wrong_length": 1, "non_finite": 1, "constant": 1, "missing_key": 2, "missing_file": 1,
                            "unreadable_file": 3, "duplicate_key": 1}


def test_duplicate_keys_are_an_error_naming_both_rows(bad_index):
    _write_index(bad_index / "dup.csv", [("a.h5", "000001"), ("a.h5", "000002"), ("a.h5", "000001")])
    with pytest.raises(BadSampleError, match=r"key '000001' at row 3 repeats row 1; keys must be unique"):
        convert_pretrain(str(bad_index / "dup.csv"), ConvertParams(str(bad_index / "o")))


def test_constant_segments_can_be_kept(bad_index):
    _write_index(bad_index / "c.csv", [("a.h5", "000001"), ("a.h5", "000092")])
    m = convert_pretrain(str(bad_index / "c.csv"), ConvertParams(str(bad_index / "o"), constant="keep", val_fraction=0))
    assert m["n_samples"] == 2 and m["skipped"] == {}


def test_crop_pad_policy_is_counted(bad_index):
    _write_index(bad_index / "c.csv", [("a.h5", "000001"), ("a.h5", "000091")])  # 250 and 200 samples
    m = convert_pretrain(str(bad_index / "c.csv"), ConvertParams(str(bad_index / "o"), length=220,
                                                                   length_policy="crop-pad", val_fraction=0))
    assert m["n_samples"] == 2 and m["noted"] == {"cropped": 1, "padded": 1} and m["length"] == 220


def test_index_problems_are_named(tmp_path):
    (tmp_path / "i.csv").write_text("path,idx\na.h5,1\n")
    with pytest.raises(SystemExit, match=r"i\.csv: header \['path', 'idx'\] lacks column\(s\) \['local_path', 'global_idx'\]"):
        prep_main(["--index", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o")])
    (tmp_path / "p.csv").write_text("local_path,global_idx,patient_id\na.h5,000001,7\na.h5,000002,7.5\n")
    with pytest.raises(SystemExit, match=r"p\.csv: column 'patient_id' .* must be integers"):
        prep_main(["--index", str(tmp_path / "p.csv"), "--out", str(tmp_path / "o")])
    (tmp_path / "q.csv").write_text("local_path,global_idx,patient_id\na.h5,000001,x7\n")
    with pytest.raises(SystemExit, match=r"q\.csv: row 1: patient_id 'x7' is not an integer"):
        prep_main(["--index", str(tmp_path / "q.csv"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"pretraining index .*nope\.csv does not exist"):
        prep_main(["--index", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"--task-index=3: expected an integer in \[0, 2\)"):
        prep_main(["--index", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o"), "--num-tasks", "2", "--task-index", "3"])


def _downstream(path, labels, pids, n=20):
    ppg = np.random.default_rng(0).standard_normal((n, 250)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["ppg"], f["labels"] = ppg, labels
        if pids is not None:
            f["patient_ids"] = pids
    return ppg


def test_downstream_conversion_keeps_labels_and_patients(tmp_path):
    labels, pids = np.arange(20) % 2, np.repeat(np.arange(5), 4)
    ppg = _downstream(tmp_path / "d.h5", labels, pids)
    m = convert_downstream(str(tmp_path / "d.h5"), "ppg",
                           ConvertParams(str(tmp_path / "o"), dtype="float32", normalize="none", val_fraction=0.2))
    _, got = _stock_read(tmp_path / "o")
    assert m["kind"] == "downstream" and len(got) == 20 and m["split"]["by"] == "patient"
    for key, (sig, pid, lab) in got.items():
        row = int(key)
        np.testing.assert_array_equal(sig[0], ppg[row])
        assert (lab, pid) == (labels[row], pids[row])


@pytest.mark.parametrize("labels,pids,match", [
    (np.eye(2)[np.arange(20) % 2], None, r"'/labels' has shape \(20, 2\); expected a 1-D array \[N\] of 0/1"),
    (np.arange(20) % 3, None, r"'/labels' must hold only 0 and 1"),
    (np.arange(20) % 2, np.linspace(0, 4.5, 20), r"'/patient_ids' must be integers"),
])
def test_downstream_bad_labels_and_patients_are_rejected(tmp_path, labels, pids, match):
    _downstream(tmp_path / "d.h5", labels, pids)
    with pytest.raises(SystemExit, match=match):
        prep_main(["--downstream", str(tmp_path / "d.h5"), "--out", str(tmp_path / "o")])


def test_downstream_missing_dataset_and_non_hdf5_are_named(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["ppg"] = np.zeros((3, 250), np.float32)
    with pytest.raises(SystemExit, match=r"d\.h5: missing dataset '/labels'"):
        prep_main(["--downstream", str(tmp_path / "d.h5"), "--out", str(tmp_path / "o")])
    (tmp_path / "x.h5").write_text("not hdf5")
    with pytest.raises(SystemExit, match=r"x\.h5: not a readable HDF5 file"):
        prep_main(["--downstream", str(tmp_path / "x.h5"), "--out", str(tmp_path / "o")])


def test_downstream_skips_are_counted(tmp_path):
    ppg = np.random.default_rng(0).standard_normal((4, 250)).astype(np.float32)
    ppg[2, 7] = np.nan
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["ppg"], f["labels"], f["patient_ids"] = ppg, np.array([0, 1, 0, 1]), np.array([1, 1, 2, 2])
    m = convert(None, str(tmp_path / "d.h5"), ConvertParams(str(tmp_path / "o"), on_bad="skip", val_fraction=0))
    assert m == _manifest(tmp_path / "o")
    assert m["skipped"] == {"non_finite": 1} and m["n_samples"] == 3
    assert sorted(_stock_read(tmp_path / "o")[1]) == ["00000000", "00000001", "00000003"]


def test_a_resubmitted_slurm_task_redoes_only_its_own_shards(tmp_path, monkeypatch):
    index = _random_index(tmp_path, n=200)
    common = ["--index", str(index), "--out", str(tmp_path / "o"), "--samples-per-shard", "40"]
    for t in range(3):
        prep_main(common + ["--num-tasks", "3", "--task-index", str(t)])
    victim = tmp_path / "o" / "train" / "shard-000002.tar"  # shard 2 belongs to task 2
    victim.unlink()
    others = {p: p.stat().st_mtime_ns for p in (tmp_path / "o" / "train").glob("*.tar")}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # sbatch --array=2: a partial array
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "1")
    with pytest.raises(SystemExit, match=r"partial array.*pass --num-tasks"):
        prep_main(common)
    prep_main(common + ["--num-tasks", "3"])
    assert victim.exists() and not (tmp_path / "o" / "manifest.json").exists()
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_float16_overflow_without_normalisation_is_refused(tmp_path):
    _write_h5(tmp_path / "a.h5", {f"{i:03d}": np.linspace(69000, 71000, 250, dtype=np.float32) + i for i in range(5)})
    _write_index(tmp_path / "i.csv", [("a.h5", f"{i:03d}") for i in range(5)])
    with pytest.raises(SystemExit, match=r"values up to 7\.1e\+04 do not fit float16.*--normalize none use --dtype float32"):
        prep_main(["--index", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o"), "--normalize", "none"])
    prep_main(["--index", str(tmp_path / "i.csv"), "--out", str(tmp_path / "o2"), "--normalize", "none", "--dtype", "float32"])
    assert _manifest(tmp_path / "o2")["n_samples"] == 5


def test_large_patient_ids_stay_exact(tmp_path):
    ids = [9007199254740993, 9007199254740992, 100000000000000001, 100000000000000000]
    _write_h5(tmp_path / "a.h5", {f"{i:03d}": np.random.default_rng(i).standard_normal(250) for i in range(8)})
    _write_index(tmp_path / "i.csv", [("a.h5", f"{i:03d}", ids[i % 4]) for i in range(8)],
                 ("local_path", "global_idx", "patient_id"))
    m = convert_pretrain(str(tmp_path / "i.csv"), ConvertParams(str(tmp_path / "o"), val_fraction=0.3))
    assert sorted(m["split"]["val_patients"] + m["split"]["train_patients"]) == sorted(ids)
    assert {p for _, p, _ in _stock_read(tmp_path / "o")[1].values()} == set(ids)


def test_a_record_naming_another_shard_is_rebuilt_not_trusted(tmp_path, capsys):
    index = _random_index(tmp_path, n=200)
    p = ConvertParams(str(tmp_path / "o"), samples_per_shard=40)
    convert_pretrain(str(index), p)
    before = _tree_hashes(tmp_path / "o")
    parts = tmp_path / "o" / "_parts"
    forged, other = json.loads((parts / "train-000001.json").read_text()), json.loads((parts / "train-000002.json").read_text())
    forged.update({k: other[k] for k in ("url", "bytes", "sha256", "md5", "etag")})  # all it says checks out...
    (parts / "train-000001.json").write_text(json.dumps(forged))
    (tmp_path / "o" / "manifest.json").unlink()
    capsys.readouterr()
    m = convert_pretrain(str(index), p)
    assert "rebuilding 1: train/1 (its record names 'train/shard-000002.tar')" in capsys.readouterr().out
    assert _tree_hashes(tmp_path / "o") == before  # ...but it is not shard 1's: rebuilt, nothing lost or doubled
    urls = [s["url"] for s in m["splits"]["train"]["shards"]]
    assert len(urls) == len(set(urls)) == m["splits"]["train"]["planned_shards"]
    forged = json.loads((parts / "train-000001.json").read_text())
    (parts / "train-000001.json").write_text(json.dumps({**forged, "n_samples": 0}))  # "empty": left out, if believed
    (tmp_path / "o" / "manifest.json").unlink()
    capsys.readouterr()
    convert_pretrain(str(index), p)
    assert "rebuilding 1: train/1 (its record says 0 samples, the shard holds 40)" in capsys.readouterr().out
    assert _tree_hashes(tmp_path / "o") == before
    for lie, why in ((1, "its record says 1 samples, the shard holds 40"), (None, "unreadable record")):
        (parts / "train-000001.json").write_text(json.dumps({**forged, "n_samples": lie}))
        (tmp_path / "o" / "manifest.json").unlink()
        convert_pretrain(str(index), p)
        assert f"rebuilding 1: train/1 ({why})" in capsys.readouterr().out
        assert _tree_hashes(tmp_path / "o") == before


def test_damaged_records_are_rebuilt_and_a_damaged_plan_is_named(tmp_path):
    index = _random_index(tmp_path, n=120)
    p = ConvertParams(str(tmp_path / "o"), samples_per_shard=40)
    convert_pretrain(str(index), p)
    before = _tree_hashes(tmp_path / "o")
    (tmp_path / "o" / "_parts" / "train-000001.json").write_text('{"split": "tr')
    convert_pretrain(str(index), p)
    assert _tree_hashes(tmp_path / "o") == before
    (tmp_path / "o" / "_parts" / "plan.json").write_text('{"plan')
    with pytest.raises(ValueError, match=r"_parts/plan\.json is not readable JSON.*pass --overwrite"):
        convert_pretrain(str(index), p)
    convert_pretrain(str(index), ConvertParams(str(tmp_path / "o"), samples_per_shard=40, overwrite=True))
    assert _tree_hashes(tmp_path / "o") == before


def test_empty_index_and_mismatched_channels_are_named(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(SystemExit, match=r"e\.csv: empty file; expected a CSV"):
        prep_main(["--index", str(tmp_path / "e.csv"), "--out", str(tmp_path / "o")])
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["ppg"], f["ecg"] = np.zeros((4, 100), np.float32), np.zeros((4, 120), np.float32)
        f["labels"] = np.array([0, 1, 0, 1])
    with pytest.raises(SystemExit, match=r"d\.h5: signal datasets must all be \[N=4, L\].*'/ppg' \(4, 100\), '/ecg' \(4, 120\)"):
        prep_main(["--downstream", str(tmp_path / "d.h5"), "--signal-key", "ppg+ecg", "--out", str(tmp_path / "o")])


def test_keys_are_kept_verbatim(tmp_path):
    _write_h5(tmp_path / "a.h5", {k: np.random.default_rng(0).standard_normal(250) for k in ("  pad  ", "x,y", "0001", "1")})
    _write_index(tmp_path / "i.csv", [("a.h5", k) for k in ("  pad  ", "x,y", "0001", "1")])
    convert_pretrain(str(tmp_path / "i.csv"), ConvertParams(str(tmp_path / "o"), val_fraction=0))
    assert sorted(_stock_read(tmp_path / "o")[1]) == sorted(["  pad  ", "x,y", "0001", "1"])
