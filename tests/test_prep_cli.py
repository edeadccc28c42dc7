"""himae-prep's command line (issue 17): --help documents every flag, --dry-run plans and times a
sample without writing, and `himae-prep verify OUT` names what differs from the manifest."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from data_prep.convert import ConvertParams, build_parser, convert_pretrain, main as prep_main
from tests.h5_inputs import random_index


def test_help_gives_every_flag_a_description_its_choices_and_its_default():
    ap = build_parser()
    for action in ap._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        if flag in ("--index", "--downstream", "--wfdb"):  # one of the three is required
            continue
        text = " ".join((action.help or "").split())
        assert len(text) > 20, f"{flag} has no description"
        for choice in action.choices or ():
            assert f"{choice} =" in text or f"{choice} (" in text or f"{choice}," in text, f"{flag}: {choice} unexplained"
        if action.required:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            assert "(default: off" in text, f"{flag}: default not given"
        elif action.default is not None:
            shown = f"{action.default:g}" if isinstance(action.default, float) else str(action.default)
            assert f"(default: {shown})" in text, f"{flag}: default {shown} not given in {text!r}"
        else:
            assert "(default: " in text, f"{flag}: what happens by default is not said"
    out = " ".join(ap.format_help().split())
    assert "himae-prep verify OUT" in out and "--dry-run" in out


def test_storage_options_that_are_not_a_json_object_are_named(capsys):
    for bad, says in (("{bad", "not valid JSON"), ("[1]", "expected a JSON object")):
        with pytest.raises(SystemExit):
            prep_main(["--index", "i.csv", "--out", "o", "--storage-options", bad])
        assert f"argument --storage-options: {says}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A finished conversion of 240 rows (5 + 3 shards of 32) and its index."""
    folder = tmp_path_factory.mktemp("cli")
    index = random_index(folder, n=240, length=64, n_files=3)
    m = convert_pretrain(str(index), ConvertParams(str(folder / "out"), samples_per_shard=32, val_fraction=0.2))
    return index, folder / "out", m


def test_dry_run_prints_rows_shards_bytes_and_time_and_writes_nothing(converted, tmp_path, capsys):
    index, done, m = converted
    out = tmp_path / "new"
    prep_main(["--index", str(index), "--out", str(out), "--samples-per-shard", "32", "--val-fraction", "0.2",
               "--dry-run"])
    text = capsys.readouterr().out
    assert not out.exists()  # nothing written, not even the folder
    train, val = m["splits"]["train"], m["splits"]["val"]
    real_bytes = sum(s["bytes"] for sp in (train, val) for s in sp["shards"])
    assert f"input:    {index}: 240 rows in 3 file(s)" in text
    assert (f"shards:   train {train['n_samples']} rows in {len(train['shards'])} shard(s), val {val['n_samples']} rows "
            f"in {len(val['shards'])} shard(s) (--samples-per-shard 32; split by patient)") in text
    shown = float(re.search(r"bytes:    ~([\d.]+) kB of shards", text).group(1)) * 1000
    assert abs(shown - real_bytes) <= 0.01 * real_bytes + 100  # the shards are built in memory: exact
    assert re.search(r"time:     ~[\d.]+ s with 1 worker\(s\) x 1 task\(s\) \(planning [\d.]+ s, then .* from 80 timed row\(s\) of \S+\.h5: "
                     r"fetch\+open [\d.]+ s, read [\d.]+ s, spill [\d.]+ s, write [\d.]+ s", text), text
    assert "--out:    empty: every shard would be built" in text
    before = {p: p.stat().st_mtime_ns for p in done.rglob("*")}
    prep_main(["--index", str(index), "--out", str(done), "--samples-per-shard", "40", "--val-fraction", "0.2", "--dry-run"])
    again = capsys.readouterr().out
    assert f"--out:    a real run would stop: {done} holds shards from another conversion (samples_per_shard 32 -> 40)" \
        in again, again
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*")} == before


def _verify(out, capsys) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as e:
        prep_main(["verify", str(out)])
    cap = capsys.readouterr()
    return e.value.code, cap.err.splitlines(), cap.out


def test_verify_passes_an_intact_folder_and_names_each_damaged_shard(converted, tmp_path, capsys):
    _, done, m = converted
    code, err, out = _verify(done, capsys)
    assert code == 0 and err == [] and out.strip().endswith("8 shard(s), 240 samples: all match manifest.json")
    out = tmp_path / "out"
    shutil.copytree(done, out)
    train = [s["url"] for s in m["splits"]["train"]["shards"]]
    (out / train[0]).unlink()
    data = (out / train[1]).read_bytes()
    (out / train[1]).write_bytes(data[:-512])
    (out / train[2]).write_bytes(data[:20] + bytes([data[20] ^ 1]) + data[21:])  # a bit of the first member's name
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][3]["n_samples"] += 1
    manifest["splits"]["train"]["n_samples"] += 1
    manifest["n_samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, err, summary = _verify(out, capsys)
    assert code == 1 and all(line.startswith("himae-prep verify: ") for line in err), err
    said = sorted(tuple(line.split(": ", 2)[1:]) for line in err)
    n0 = m["splits"]["train"]["shards"][0]["n_samples"]
    assert said[0] == (str(out / train[0]), f"missing (the manifest lists it with {n0} samples)")
    assert said[1] == (str(out / train[1]), f"{len(data) - 512} bytes, the manifest says {len(data)}")
    assert said[2] == (str(out / train[2]), "bad tar header checksum at byte 0 (not a readable format-v2 shard)")
    assert said[3][0] == str(out / train[2]) and re.fullmatch(r"sha256 \w{16}\.\.\., the manifest says \w{16}\.\.\. "
                                                               r"\(the bytes changed\)", said[3][1])
    assert said[4] == (str(out / train[3]), "32 samples, the manifest says 33") and len(said) == 5
    assert summary.strip().endswith("4 shard(s) wrong")
    (out / "manifest.json").write_text("{")
    code, err, _ = _verify(out, capsys)
    assert code == 1 and err == [f"himae-prep verify: {out}/manifest.json: not valid JSON (Expecting property name "
                                 f"enclosed in double quotes: line 1 column 2 (char 1))"]
    code, err, _ = _verify(tmp_path / "nothing", capsys)
    assert code == 1 and len(err) == 1 and "manifest.json: does not exist" in err[0]


def _overflowing_npy_header(data: bytes) -> bytes:
    """The shard with its first signal array's .npy header claiming shape (2**32, 2**32, 1): 2**64 elements,
    which int64 arithmetic wraps to 0 (past a size check made with it); same header length, so the tar holds."""
    at = data.index(b"\x93NUMPY")
    hlen = int.from_bytes(data[at + 8:at + 10], "little")
    head = data[at + 10:at + 10 + hlen].decode("latin1")
    forged = re.sub(r"'shape': \([^)]*\)", "'shape': (4294967296, 4294967296, 1)", head).rstrip(" \n")
    forged = forged + " " * (hlen - 1 - len(forged)) + "\n"
    return data[:at + 10] + forged.encode("latin1") + data[at + 10 + hlen:]


def test_verify_checks_the_plan_and_names_a_malformed_manifest_or_array_in_one_line(converted, tmp_path, capsys):
    _, done, m = converted
    train = [s["url"] for s in m["splits"]["train"]["shards"]]
    assert m["splits"]["train"]["planned_shards"] == len(train) and m["splits"]["train"]["empty_shards"] == []
    out = tmp_path / "out"
    shutil.copytree(done, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    shards[1] = dict(shards[2])  # shard 1's entry replaced by shard 2's: 2 listed twice, 1 not at all
    manifest["splits"]["train"]["n_samples"] = sum(s["n_samples"] for s in shards)
    manifest["n_samples"] = manifest["splits"]["train"]["n_samples"] + manifest["splits"]["val"]["n_samples"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / train[3]).write_bytes(_overflowing_npy_header((out / train[3]).read_bytes()))
    (out / train[4]).write_bytes(b"")  # ...and the shards after it are still checked
    code, err, _ = _verify(out, capsys)
    where = f"himae-prep verify: {out}/manifest.json"
    assert code == 1 and f"{where}: {train[2]} is listed 2 times (each shard holds other segments: once)" in err
    assert f"{where}: {train[1]} is planned but not listed" in err
    assert any(line.startswith(f"himae-prep verify: {out / train[3]} member ") and "truncated array data" in line
               for line in err), err
    assert any(line.startswith(f"himae-prep verify: {out / train[4]}: 0 bytes") for line in err), err
    j = json.loads((done / "manifest.json").read_text())
    j["splits"]["train"]["shards"].pop(1)  # shard 1 called empty and left out: its segments would be lost
    j["splits"]["train"]["empty_shards"] = [1]
    j["splits"]["train"]["n_samples"] = sum(s["n_samples"] for s in j["splits"]["train"]["shards"])
    j["n_samples"] = j["splits"]["train"]["n_samples"] + j["splits"]["val"]["n_samples"]
    (out / "manifest.json").write_text(json.dumps(j))
    (out / train[3]).write_bytes((done / train[3]).read_bytes())
    (out / train[4]).write_bytes((done / train[4]).read_bytes())
    code, err, _ = _verify(out, capsys)
    assert err == [f"{where}: {train[1]} holds 32 samples, but the manifest calls it empty and does not list it"]
    j["splits"]["train"]["empty_shards"], j["splits"]["train"]["planned_shards"] = [], 10**20  # no set of 10**20 names
    (out / "manifest.json").write_text(json.dumps(j))
    code, err, summary = _verify(out, capsys)
    assert err == [f"{where}: splits.train: planned_shards 100000000000000000000 and empty_shards [] do not fit its "
                   f"{len(train) - 1} listed shard(s): expected the planned count and the indices below it of the shards "
                   f"with no segment"] and summary.strip().endswith(": 1 problem(s) with the manifest itself")
    data = (done / train[3]).read_bytes()  # a zero-size dtype: any shape takes 0 bytes, past a size check
    at = data.index(b"\x93NUMPY")
    head = data[at + 10:at + 10 + int.from_bytes(data[at + 8:at + 10], "little")].decode("latin1")
    forged = re.sub(r"'descr': '[^']*'", "'descr': '|V0'", re.sub(r"'shape': \([^)]*\)", "'shape': (10**30, 1, 250)"
                                                                   .replace("10**30", str(10**30)), head)).rstrip(" \n")
    (out / train[3]).write_bytes(data[:at + 10] + (forged + " " * (len(head) - 1 - len(forged)) + "\n").encode("latin1")
                                 + data[at + 10 + len(head):])
    shutil.copy(done / "manifest.json", out / "manifest.json")
    code, err, _ = _verify(out, capsys)
    assert any(line.startswith(f"himae-prep verify: {out / train[3]} member ") and "zero-size" in line for line in err)
    for damage, says in [
        (lambda j: j.update(dtype=["float16"]), "dtype = ['float16']: expected a string"),
        (lambda j: j["splits"]["val"].pop("shards"), "splits.val has no 'shards' list"),
        (lambda j: j.update(splits=[j["splits"]["train"]]), "'splits' is a list, expected an object"),
        (lambda j: j["splits"]["train"]["shards"][0].pop("url"), "splits.train.shards[0].url = None: expected a string"),
        (lambda j: j["splits"]["train"]["shards"][0].update(n_samples="fifty"),
         "splits.train.shards[0].n_samples = 'fifty': expected a whole number >= 0"),
    ]:
        j = json.loads((done / "manifest.json").read_text())
        damage(j)
        (out / "manifest.json").write_text(json.dumps(j))
        code, err, _ = _verify(out, capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith(f"{where}: {says}"), err


def test_local_input_and_output_mistakes_are_one_line_naming_the_flag(converted, tmp_path, monkeypatch):
    import errno

    import h5py
    import numpy as np

    index, _, _ = converted
    with pytest.raises(SystemExit, match=rf"^himae-prep: error: --index {tmp_path} is a folder; expected the index "
                                         r"CSV file"):
        prep_main(["--index", str(tmp_path), "--out", str(tmp_path / "o")])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=rf"^himae-prep: error: --out {tmp_path / 'file'} is a file; expected a "
                                         r"folder \(created if missing\)$"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "file")])
    with h5py.File(tmp_path / "d.h5", "w") as f:  # 10 segments, 9 labels: the labels are the odd one out
        f["ppg"], f["labels"] = np.random.rand(10, 64), np.zeros(9, np.int8)
    with pytest.raises(SystemExit, match=r"'/labels' has 9 rows but '/ppg' has 10; expected one label per segment"):
        prep_main(["--downstream", str(tmp_path / "d.h5"), "--out", str(tmp_path / "ds")])
    from data_prep.hdf5_sources import read_downstream  # himae-probe's reader says the same

    with pytest.raises(ValueError, match=r"'/labels' has 9 rows but '/ppg' has 10; expected one label per segment"):
        read_downstream(tmp_path / "d.h5")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("data_prep.external_shuffle.spill_wave", full)
    with pytest.raises(SystemExit, match=rf"^himae-prep: error: no space left on the device \(No space left on device\); "
                                         rf"the spill folder {tmp_path / 'o2'}/\.spill \(--spill-dir\): [\d.]+ GiB free, "
                                         rf"--out {tmp_path / 'o2'}: [\d.]+ GiB free\. Free space or pick another"):
        prep_main(["--index", str(index), "--out", str(tmp_path / "o2")])


def test_a_url_password_never_reaches_an_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.storage.RETRIES", 0)
    with pytest.raises(SystemExit) as e:
        prep_main(["--index", "http://user:SECRET-9@127.0.0.1:9/index.csv", "--out", str(tmp_path / "o")])
    assert "SECRET-9" not in str(e.value) and "http://user:<redacted>@127.0.0.1:9/index.csv" in str(e.value)
