"""WFDB records in (himae-prep --wfdb, himae-prep label) on real PhysioNet data and on records written with wfdb.

Real data: MIT-BIH Arrhythmia Database and BIDMC PPG and Respiration Dataset (PhysioNet, ODC-BY 1.0;
Moody & Mark 2001, Pimentel et al. 2017, Goldberger et al. 2000), read from ../shared/real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.signal import resample_poly

from data_prep.convert import ConvertParams, convert, convert_wfdb, main as prep_main
from data_prep.shard_format import read_shard_blocks
from tests.wfdb_inputs import real, record_subset, write_multisegment, write_record

wfdb = pytest.importorskip("wfdb")


def _prep(argv: list[str], capsys) -> tuple[int, str, str]:
    """himae-prep in this process: (exit code, stdout, stderr)."""
    try:
        prep_main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    return lines[0]


def _shard_windows(out: Path) -> dict[str, np.ndarray]:
    """key -> stored window [C, L] of every shard in a finished output."""
    m = json.loads((out / "manifest.json").read_text())
    got = {}
    for split in m["splits"].values():
        for s in split["shards"]:
            for b in read_shard_blocks((out / s["url"]).read_bytes(), s["url"]):
                for k, x in zip(b.key, b.signal):
                    got[str(k)] = np.asarray(x, np.float64)
    return got


@pytest.fixture(scope="module")
def mitdb_export(tmp_path_factory):
    """The labelled export of all of mitdb at 10-s windows, 100 Hz, MLII else V5, 201/202 one subject."""
    mitdb = real("mitdb")
    tmp = tmp_path_factory.mktemp("mitdb")
    smap = tmp / "subjects.csv"
    smap.write_text("record,patient_id\n202,201\n")
    out = tmp / "mitdb.h5"
    with pytest.raises(SystemExit) as e:
        prep_main(["label", str(mitdb), "--channel", "MLII,V5", "--window-s", "10", "--target-rate", "100",
                   "--label-symbols", "V", "--subject-map", str(smap), "--out", str(out)])
    assert e.value.code == 0
    return mitdb, out


def test_label_export_of_mitdb_equals_an_independent_count_from_rdann(mitdb_export):
    """8,640 windows and 2,382 with a V beat, record by record as wfdb.rdann's beats say (counted here
    by integer division of each V beat's sample, not by the export's code)."""
    mitdb, out = mitdb_export
    names = (mitdb / "RECORDS").read_text().split()
    want_windows, want_pos = {}, {}
    for n in names:
        sig_len = wfdb.rdheader(str(mitdb / n)).sig_len
        ann = wfdb.rdann(str(mitdb / n), "atr")
        v = np.asarray(ann.sample)[np.asarray(ann.symbol) == "V"]
        want_windows[n] = sig_len // 3600
        want_pos[n] = len({int(s) // 3600 for s in v if int(s) // 3600 < want_windows[n]})
    with h5py.File(out) as f:
        records = f["records"].asstr()[()]
        labels, pids, starts = f["labels"][()], f["patient_ids"][()], f["starts"][()]
        assert f["ecg"].shape == (8640, 1000) and f.attrs["fs"] == 100.0
        assert json.loads(f.attrs["summary"])["per_record"]["102"]["channel"] == "V5"  # 102 and 104 have no MLII
    assert len(labels) == sum(want_windows.values()) == 8640
    assert labels.sum() == sum(want_pos.values()) == 2382
    assert list(dict.fromkeys(records)) == names  # RECORDS order, then time order
    for n in names:
        sel = records == n
        assert sel.sum() == want_windows[n] and labels[sel].sum() == want_pos[n], n
        assert np.array_equal(starts[sel], np.arange(want_windows[n]) * 3600)
    assert len(np.unique(pids)) == 47 and set(pids[records == "202"]) == {201} and set(pids[records == "100"]) == {100}


def test_label_export_resamples_360_to_100_hz_like_resample_poly(mitdb_export):
    """Each window is cut at 360 Hz, then resampled by 5/18 (polyphase), in physical units (mV)."""
    mitdb, out = mitdb_export
    with h5py.File(out) as f:
        records, starts = f["records"].asstr()[()], f["starts"][()]
        idx = np.flatnonzero(records == "208")[[0, 7, 179]]
        got = f["ecg"][sorted(idx)]
    rec = wfdb.rdrecord(str(mitdb / "208"), channel_names=["MLII"])
    for g, i in zip(got, sorted(idx)):
        s = starts[i]
        want = resample_poly(rec.p_signal[s:s + 3600, 0], 5, 18)
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-5)  # float32 storage of float64 mV


def test_wfdb_shards_resample_125_to_100_hz_and_are_byte_identical_for_any_workers(tmp_path):
    """bidmc II at 125 Hz, 10-s windows every 5 s -> 100 Hz: every stored window equals resample_poly(4, 5) of
    the record's window read by wfdb, and 1 worker in one wave gives the same bytes as 2 workers in waves."""
    bidmc = record_subset(real("bidmc"), tmp_path / "bidmc", ["bidmc01", "bidmc02", "bidmc03"])
    common = dict(samples_per_shard=64, channel="II", window_s=10.0, stride_s=5.0, target_rate=100.0,
                  normalize="none", dtype="float32", val_fraction=0.34)
    one = convert_wfdb(str(bidmc), ConvertParams(str(tmp_path / "one"), **common))
    two = convert_wfdb(str(bidmc), ConvertParams(str(tmp_path / "two"), workers=2, max_rows=100, **common))
    for task in (0, 1, 0, 1):  # two tasks, each run twice (the second run builds its shards), then --finalize
        convert(None, None, ConvertParams(str(tmp_path / "tasks"), num_tasks=2, task_index=task, **common),
                wfdb=str(bidmc))
    tasks = convert(None, None, ConvertParams(str(tmp_path / "tasks"), num_tasks=2, **common), finalize_only=True,
                    wfdb=str(bidmc))
    assert [s["sha256"] for sp in one["splits"].values() for s in sp["shards"]] == \
        [s["sha256"] for sp in tasks["splits"].values() for s in sp["shards"]]
    assert one["n_samples"] == 3 * ((60001 - 1250) // 625 + 1) == 3 * 95
    assert [s["sha256"] for sp in one["splits"].values() for s in sp["shards"]] == \
        [s["sha256"] for sp in two["splits"].values() for s in sp["shards"]]
    assert one["preprocess"]["source_rate"] == 125.0 and one["length"] == 1000
    assert one["wfdb"]["records"] == 3 and one["split"]["by"] == "patient"
    got = _shard_windows(tmp_path / "one")
    assert len(got) == 285
    sig = {n: wfdb.rdrecord(str(bidmc / n), channel_names=["II"]).p_signal[:, 0] for n in ("bidmc01", "bidmc02", "bidmc03")}
    for key in list(got)[::20]:
        name, start = key.rsplit(":", 1)
        want = resample_poly(sig[name][int(start):int(start) + 1250], 4, 5)
        np.testing.assert_allclose(got[key][0], want, rtol=1e-6, atol=1e-6)


def test_a_multisegment_record_with_a_gap_and_a_segment_without_the_channel(tmp_path):
    """MIMIC-III layout written with wfdb: windows inside segments that hold II are the segments' samples;
    the four touching the `~` gap or the PLETH-only segment are NaN there and counted as non-finite."""
    folder = tmp_path / "mimic"
    want = write_multisegment(folder)
    out = tmp_path / "shards"
    code = prep_main_ok(["--wfdb", str(folder), "--channel", "II", "--window-s", "4", "--normalize", "none", "--dtype",
                         "float32", "--on-bad", "skip", "--val-fraction", "0", "--out", str(out)])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == (6550 - 500) // 500 + 1 == 13
    assert m["skipped"] == {"non_finite": 4} and m["n_samples"] == 9
    got = _shard_windows(out)
    assert sorted(got, key=lambda k: int(k.split(":")[1])) == [f"ms01:{s}" for s in (0, 500, 1000, 1500, 2000, 4500,
                                                                                      5000, 5500, 6000)]
    for key, x in got.items():
        s = int(key.split(":")[1])
        seg0 = 0 if s < 2500 else 4050
        np.testing.assert_allclose(x[0], want["II"][seg0][s - seg0:s - seg0 + 500], atol=1e-6)
    # the same record by its other channel: segments 1 and 2 hold PLETH; segment 3 is NaN
    out2 = tmp_path / "pleth"
    assert prep_main_ok(["--wfdb", str(folder), "--channel", "ECG,PLETH", "--window-s", "4", "--on-bad", "skip",
                         "--val-fraction", "0", "--out", str(out2)]) == 0
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["wfdb"]["channels"] == [["PLETH", 1]] and m2["n_samples"] == 5 + 2  # [0, 2500) and [2800, 4050)
    # without RECORDS the folder's headers are listed, and the segments and the layout are not records (a blank
    # line before a record line is valid WFDB)
    (folder / "RECORDS").unlink()
    hea = folder / "ms01.hea"
    hea.write_text("  \n# a comment\n" + hea.read_text())
    out3 = tmp_path / "listed"
    assert prep_main_ok(["--wfdb", str(folder), "--channel", "II", "--window-s", "4", "--normalize", "none", "--dtype",
                         "float32", "--on-bad", "skip", "--val-fraction", "0", "--out", str(out3)]) == 0
    m3 = json.loads((out3 / "manifest.json").read_text())
    assert m3["wfdb"]["records"] == 1 and m3["n_samples"] == 9
    assert _shard_windows(out3).keys() == got.keys()


def prep_main_ok(argv: list[str]) -> int:
    try:
        prep_main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


# ------------------------------------------------------------------------------------------------
# bad input: one line naming the record or file, or a counted skip


@pytest.fixture
def bidmc_pair(tmp_path):
    return record_subset(real("bidmc"), tmp_path / "recs", ["bidmc01", "bidmc02"])


def test_a_short_dat_is_one_line_or_a_counted_skip(bidmc_pair, tmp_path, capsys):
    dat = bidmc_pair / "bidmc02.dat"
    dat.write_bytes(dat.read_bytes()[:50_000])
    args = ["--wfdb", str(bidmc_pair), "--channel", "II", "--target-rate", "100"]
    code, _, err = _prep(args + ["--out", str(tmp_path / "a")], capsys)
    line = _error_line(err)
    assert code == 1 and "bidmc02.dat: 50000 bytes, shorter than the 600010 its header implies" in line
    code, out, _ = _prep(args + ["--on-bad", "skip", "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and "skipped record bidmc02" in out
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["skipped"] == {"record_unreadable": 1} and m["n_samples"] == 48
    assert "bidmc02" in m["wfdb"]["skipped_records"]


def test_a_header_naming_a_missing_dat_and_an_unknown_format(bidmc_pair, tmp_path, capsys):
    (bidmc_pair / "bidmc02.dat").unlink()
    code, _, err = _prep(["--wfdb", str(bidmc_pair), "--channel", "II", "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and _error_line(err).endswith("bidmc02.hea names " + str(bidmc_pair) + "/bidmc02.dat, which does not exist")
    shutil.copy(real("bidmc") / "bidmc02.dat", bidmc_pair)
    hea = bidmc_pair / "bidmc01.hea"
    hea.write_text(hea.read_text().replace("bidmc01.dat 16 ", "bidmc01.dat 999 "))
    code, _, err = _prep(["--wfdb", str(bidmc_pair), "--channel", "II", "--out", str(tmp_path / "b")], capsys)
    assert code == 1 and "bidmc01.hea: signal format '999' is not a WFDB format" in _error_line(err)


def test_a_record_without_the_channel_is_named_and_counted(tmp_path, capsys):
    folder = tmp_path / "recs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_record(folder, "r1", {"II": np.round(rng.standard_normal(3000) * 200) / 200}, 100)
    write_record(folder, "r2", {"PLETH": np.round(rng.standard_normal(3000) * 200) / 200}, 100)
    code, out, _ = _prep(["--wfdb", str(folder), "--channel", "MLII,II", "--val-fraction", "0", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 0 and "skipped record r2: record r2 has none of the channels MLII,II (it has PLETH)" in out
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["skipped"] == {"record_no_channel": 1} and m["n_samples"] == 3
    code, _, err = _prep(["--wfdb", str(folder), "--channel", "V5", "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and "none of its 2 record(s) is usable" in _error_line(err)


def test_a_rate_that_gives_no_whole_window_is_one_line(bidmc_pair, tmp_path, capsys):
    code, _, err = _prep(["--wfdb", str(bidmc_pair), "--channel", "II", "--window-s", "0.3", "--out",
                          str(tmp_path / "a")], capsys)
    assert code == 1 and "record bidmc01: a 0.3-s window at 125 Hz is 37.5 samples, not a whole number" in _error_line(err)
    code, _, err = _prep(["--wfdb", str(bidmc_pair), "--channel", "II", "--window-s", "0.088", "--target-rate", "100",
                          "--out", str(tmp_path / "b")], capsys)
    line = _error_line(err)
    assert code == 1 and "record bidmc01" in line and "gives 8.8 samples, not a whole number" in line
    code, _, err = _prep(["label", str(bidmc_pair), "--channel", "II", "--window-s", "0.088", "--target-rate", "100",
                          "--out", str(tmp_path / "c.h5")], capsys)
    assert code == 1 and "record bidmc01" in _error_line(err) and not (tmp_path / "c.h5").exists()


def test_label_refuses_missing_annotations_and_symbols_that_match_nothing(tmp_path, capsys):
    mitdb = record_subset(real("mitdb"), tmp_path / "m", ["100", "119"], (".hea", ".dat", ".atr"))
    out = tmp_path / "l.h5"
    code, _, err = _prep(["label", str(mitdb), "--label-symbols", "Q", "--out", str(out)], capsys)
    line = _error_line(err)
    assert code == 1 and "--label-symbols Q match no annotation in 2 record(s)" in line and "N (" in line
    assert not out.exists() and not list(tmp_path.glob("l.h5*"))  # nothing half-written
    code, out_, err = _prep(["label", str(mitdb), "--out", str(out)], capsys)
    assert code == 0 and "100 (MLII, 360 Hz): 180 windows, 1 positive" in out_ and "119 (MLII, 360 Hz): 180 windows" in out_
    (mitdb / "119.atr").unlink()
    code, _, err = _prep(["label", str(mitdb), "--out", str(tmp_path / "m.h5")], capsys)
    assert code == 1 and f"record 119: annotation file {mitdb}/119.atr does not exist" in _error_line(err)
    code, out_, _ = _prep(["label", str(mitdb), "--on-bad", "skip", "--out", str(tmp_path / "m.h5")], capsys)
    assert code == 0 and "skipped record 119" in out_ and "180 windows, 1 positive (0.6 %) from 1 record(s)" in out_


def test_wfdb_dry_run_plans_and_times_without_writing(bidmc_pair, tmp_path, capsys):
    code, out, _ = _prep(["--wfdb", str(bidmc_pair), "--channel", "II", "--stride-s", "2", "--target-rate", "100",
                          "--dry-run", "--out", str(tmp_path / "o")], capsys)
    assert code == 0 and "472 rows in 2 file(s)" in out
    assert "[1, 1250] (10-s windows at 125 Hz) -> [1, 1000]" in out and not (tmp_path / "o").exists()


def test_flags_that_go_with_wfdb(tmp_path, capsys):
    code, _, err = _prep(["--wfdb", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--wfdb needs --channel" in err
    code, _, err = _prep(["--wfdb", str(tmp_path / "nope"), "--channel", "II", "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "does not exist" in _error_line(err)
    smap = tmp_path / "s.csv"
    smap.write_text("record,patient\n1,2\n")
    code, _, err = _prep(["label", str(tmp_path), "--subject-map", str(smap), "--out", str(tmp_path / "x.h5")], capsys)
    assert code == 1 and "expected columns record,patient_id" in _error_line(err)


def test_flat_lines_are_counted_as_bad_windows_and_a_records_file_names_the_records(tmp_path, capsys):
    """A flat stretch (sensor off) makes its window bad: dropped and counted as `constant` in the shards'
    manifest, and as a bad window in the labelled export, which is written from a RECORDS file's records."""
    folder = tmp_path / "recs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x = np.round(rng.standard_normal(3000) * 200) / 200
    x[1000:2000] = 0.5  # window 1 of 3 is a flat line
    write_record(folder, "r7", {"II": x}, 100)
    write_record(folder, "r8", {"II": np.round(rng.standard_normal(2000) * 200) / 200}, 100)
    wfdb.wrann("r7", "atr", np.array([50, 1500, 2500]), np.array(["V", "V", "N"]), write_dir=str(folder))
    wfdb.wrann("r8", "atr", np.array([10]), np.array(["N"]), write_dir=str(folder))
    (folder / "RECORDS").write_text("r8\nr7\n")  # not sorted: RECORDS' order is the export's
    code, _, _ = _prep(["--wfdb", str(folder / "RECORDS"), "--channel", "II", "--val-fraction", "0", "--out",
                        str(tmp_path / "s")], capsys)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert code == 0 and m["n_rows"] == 5 and m["skipped"] == {"constant": 1} and m["n_samples"] == 4
    out = tmp_path / "l.h5"
    code, text, _ = _prep(["label", str(folder / "RECORDS"), "--channel", "II", "--out", str(out)], capsys)
    assert code == 0 and "r7 (II, 100 Hz): 2 windows, 1 positive, 1 bad (NaN or flat)" in text
    with h5py.File(out) as f:
        assert list(f["records"].asstr()[()]) == ["r8", "r8", "r7", "r7"]
        assert list(f["starts"][()]) == [0, 1000, 0, 2000] and list(f["labels"][()]) == [0, 0, 1, 0]
        assert list(f["patient_ids"][()]) == [8, 8, 7, 7] and f.attrs["fs"] == 100.0
        np.testing.assert_allclose(f["ecg"][2], x[:1000], atol=1e-6)  # no resampling asked: the mV as stored


def test_headers_without_counts_records_files_that_climb_out_and_records_of_another_rate(tmp_path, capsys):
    folder = tmp_path / "recs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, fs, n in (("r1", 100, 3000), ("r2", 100, 3000), ("r3", 250, 7500), ("r4", 100, 500)):
        write_record(folder, name, {"II": np.round(rng.standard_normal(n) * 200) / 200}, fs)
    args = ["--wfdb", str(folder), "--channel", "II", "--val-fraction", "0"]
    code, _, err = _prep(args + ["--out", str(tmp_path / "a")], capsys)
    assert code == 1 and "record r3: 250 Hz, but the other records" in _error_line(err)
    code, out, _ = _prep(args + ["--on-bad", "skip", "--out", str(tmp_path / "b")], capsys)
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert code == 0 and m["skipped"] == {"record_other_rate": 1, "record_too_short": 1} and m["n_samples"] == 6
    assert "skipped record r4: record r4: 500 samples, shorter than one 10-s window (1000)" in out
    hea = folder / "r2.hea"
    hea.write_text(hea.read_text().replace("r2 1 100 3000", "r2 1 100"))  # the sample count is optional in WFDB
    code, _, err = _prep(args + ["--out", str(tmp_path / "c")], capsys)
    assert code == 1 and "r2.hea: sample count None (0 or none: unknown to WFDB)" in _error_line(err)
    (folder / "RECORDS").write_text("r1\n../recs/r2\n")
    code, _, err = _prep(args + ["--out", str(tmp_path / "d")], capsys)
    assert code == 1 and "RECORDS: line '../recs/r2' is not a record name" in _error_line(err)
    code, _, err = _prep(["--wfdb", str(folder), "--channel", "II", "--stride-s", "0", "--out", str(tmp_path / "e")],
                         capsys)
    assert code == 1 and "--stride-s=0.0: expected a positive number of seconds" in _error_line(err)
    code, _, err = _prep(["label", str(folder), "--channel", "II", "--out", "s3://bucket/x.h5"], capsys)
    assert code == 1 and "--out s3://bucket/x.h5: expected a local file" in _error_line(err)


def test_patient_ids_from_names_mimic_folders_and_the_subject_map():
    from data_prep.wfdb_sources import WfdbError, check_patients, patient_of

    assert patient_of("100", None) == 100 and patient_of("bidmc07", None) == 7
    assert patient_of("p00/p000020/3000003", None) == 20  # MIMIC-III: the subject's folder, not the stay
    assert patient_of("files/p1000/p10000032/s40689238/40689238", None) == 10000032  # MIMIC-IV-ECG
    assert patient_of("202", {"202": 201}) == 201
    with pytest.raises(WfdbError, match="gives no patient id; give a --subject-map"):
        patient_of("a1b23", None)
    check_patients([("p00/p000020/3000003", 20), ("p00/p000020/3000005", 20), ("bidmc7", 7), ("bidmc07", 7)])
    with pytest.raises(WfdbError, match="records a7 and b7 both give patient id 7"):
        check_patients([("a7", 7), ("b7", 7)])


def test_a_fixed_layout_record_reads_each_segment_by_the_channels_name(tmp_path):
    """A segment without II is NaN, not its PLETH; a `~` gap is NaN too: the 8 windows touching them are
    counted as non-finite, the 20 inside segments 1 and 3 are their II samples."""
    from tests.wfdb_inputs import write_fixed_layout

    folder = tmp_path / "fixed"
    want = write_fixed_layout(folder)
    out = tmp_path / "s"
    assert prep_main_ok(["--wfdb", str(folder), "--channel", "II", "--window-s", "1", "--normalize", "none", "--dtype",
                         "float32", "--on-bad", "skip", "--val-fraction", "0", "--subject-map", str(_smap(tmp_path)),
                         "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["n_rows"] == 28 and m["skipped"] == {"non_finite": 8} and m["n_samples"] == 20
    for key, x in _shard_windows(out).items():
        s = int(key.split(":")[1])
        seg0 = 0 if s < 1000 else 1800
        np.testing.assert_allclose(x[0], want["II"][seg0][s - seg0:s - seg0 + 100], atol=1e-6)


def _smap(tmp_path: Path) -> Path:
    p = tmp_path / "subjects.csv"
    p.write_text("record,patient_id\nfx01,1\n")
    return p


def test_malformed_rates_tiny_windows_cut_annotations_and_an_existing_out(tmp_path, capsys):
    mitdb = record_subset(real("mitdb"), tmp_path / "m", ["100", "119"], (".hea", ".dat", ".atr"))
    hea = mitdb / "100.hea"
    good = hea.read_text()
    hea.write_text(good.replace("100 2 360 650000", "100 2 -360 650000"))  # wfdb alone would read 250 Hz
    code, _, err = _prep(["--wfdb", str(mitdb), "--channel", "MLII", "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and "100.hea: record line '100 2 -360 650000': rate '-360'" in _error_line(err)
    hea.write_text(good)
    code, _, err = _prep(["--wfdb", str(mitdb), "--channel", "MLII", "--window-s", "1e-9", "--out",
                          str(tmp_path / "b")], capsys)
    assert code == 1 and "a 1e-09-s window at 360 Hz is 0 samples; expected at least one" in _error_line(err)
    atr = mitdb / "119.atr"
    atr.write_bytes(atr.read_bytes()[:120])  # annotations stop early: later windows would read as negative
    out = tmp_path / "l.h5"
    code, _, err = _prep(["label", str(mitdb), "--out", str(out)], capsys)
    assert code == 1 and "119.atr: 120 bytes without the end-of-file marker" in _error_line(err)
    shutil.copy(real("mitdb") / "119.atr", atr)
    out.write_bytes(b"precious")
    code, _, err = _prep(["label", str(mitdb), "--out", str(out)], capsys)
    assert code == 1 and "exists; pass --overwrite" in _error_line(err) and out.read_bytes() == b"precious"
    (tmp_path / "l.h5.tmp-999999999").write_bytes(b"a killed run's")  # no such process: removed
    (tmp_path / "l.h5.tmp-notes").write_bytes(b"the user's")  # not a run's: kept
    code, _, _ = _prep(["label", str(mitdb), "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and h5py.is_hdf5(out)
    assert sorted(p.name for p in tmp_path.glob("l.h5*")) == ["l.h5", "l.h5.tmp-notes"]
    code, _, err = _prep(["label", str(mitdb), "--out", str(tmp_path)], capsys)
    assert code == 1 and "is a folder; expected the path of the HDF5 file" in _error_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_label_interrupted_says_so_in_one_line_and_leaves_nothing(tmp_path, sig):
    """SIGTERM/SIGINT while `himae-prep label` writes: exit 128+signal, one line, no temp file, no temp folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    mitdb = real("mitdb")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "l.h5"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.convert", "label", str(mitdb), "--channel", "MLII,V5",
                             "--target-rate", "100", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("l.h5.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the export ended before it could be interrupted"
        proc.send_signal(getattr(signal, sig))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + getattr(signal, sig)
    assert _error_line(stderr) == f"himae-prep label: interrupted by {sig}; no partial file is left"
    assert list(tmp_path.iterdir()) == [tmp] and list(tmp.iterdir()) == []
