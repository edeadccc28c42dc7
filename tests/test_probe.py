import csv
import json

import h5py
import numpy as np
import pytest
import torch

from data_prep.hdf5_sources import DownstreamSet, read_downstream
from himae_dist.checkpoint import save_weights
from probes.evaluate import apply_seed_probe, main as probe_main
from probes.features import level_features
from probes.random_baseline import random_encoder
from probes.report import unique_names

FAST = ["--folds", "3", "--inner-folds", "2", "--n-boot", "50", "--minirocket-kernels", "0"]


@pytest.fixture(scope="module")
def fast(tiny_shards):
    """FAST with the pretraining shards' BatchNorm policy: every encoder encodes the data once (the
    fold policy, which encodes once per fold, has its own tests in test_probe_fairness.py)."""
    return FAST + ["--manifest", str(tiny_shards / "manifest.json")]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def probe_run(tiny_cohort, tmp_path_factory, fast):
    """Two runs whose checkpoints share file names, plus a lone checkpoint; 2 random baselines."""
    tmp = tmp_path_factory.mktemp("probe")
    for run, seeds in (("runA", (5, 6)), ("runB", (7,))):
        for step, s in zip((10, 20), seeds):
            save_weights(random_encoder(1, s), tmp / run / "weights" / f"step_{step:07d}.pt", step=step)
    save_weights(random_encoder(1, 8), tmp / "runB" / "himae_final.pt", step=10)
    out = tmp / "res"
    probe_main(["--run", str(tmp / "runA"), "--run", str(tmp / "runB"), "--checkpoint", str(tmp / "runB" / "himae_final.pt"),
                "--random-baselines", "2", "--h5", str(tiny_cohort / "downstream.h5"), "--out", str(out), *fast,
                "--minirocket-kernels", "84"])
    return tmp, out


def test_probe_cli_outputs(probe_run, tiny_cohort):
    tmp, out = probe_run
    res = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in res["models"]]
    assert len(set(names)) == len(names) == 7  # 3 run checkpoints + 1 final + 2 random + MiniRocket
    assert res["batchnorm"]["policy"] == "pretrain" and res["folds_run"] == 3
    assert res["models"][-1]["kind"] == "minirocket" and res["models"][-1]["candidates"][0]["dim"] == 84
    for m in res["models"][:4]:  # every checkpoint against both baselines, on the same resamples
        assert set(m["paired"]) == {"random init", "MiniRocket"}
        d = m["paired"]["random init"]
        assert d["n_baselines"] == 2 and d["roc_auc"]["ci95"][0] <= d["roc_auc"]["value"] <= d["roc_auc"]["ci95"][1]
    assert "runA/weights/step_0000010.pt" in names and "runB/weights/step_0000010.pt" in names
    assert res["protocol"] == "nested" and "patient-grouped" in res["protocol_label"]
    m = res["models"][0]
    assert [c["name"] for c in m["candidates"]] == ["L0", "L1", "L2", "L3", "L4", "all"]
    assert [c["dim"] for c in m["candidates"]] == [32, 64, 128, 256, 512, 992]  # mean+std of 16..256
    for metric in ("roc_auc", "ap", "sens_at_spec90", "f1_at_spec90"):
        v = m["headline"]["metrics"][metric]
        assert v["ci95"][0] <= v["value"] <= v["ci95"][1]
    assert m["headline"]["selected_mode"] in {c["name"] for c in m["candidates"]}
    assert len(res["random_baselines"]["seeds"]) == 2 and res["random_baselines"]["headline"]["roc_auc"]["sd"] >= 0
    data = read_downstream(tiny_cohort / "downstream.h5")
    rows = _rows(out / "pvc_predictions.csv")
    assert list(rows[0]) == ["patient_id", "label", "p_pvc", "row"] and len(rows) == len(data.labels)
    assert [int(r["row"]) for r in rows] == list(range(len(data.labels)))
    assert [int(r["label"]) for r in rows] == data.labels.tolist()
    p = np.array([float(r["p_pvc"]) for r in rows])
    assert ((p >= 0) & (p <= 1)).all() and p.std() > 0
    for png in ("roc_pr.png", "level_profile.png", "auc_over_steps.png"):
        assert (out / png).stat().st_size > 10_000
    table = (out / "table.txt").read_text()
    assert "random init (2 seeds)" in table and "runA/weights/step_0000020.pt" in table and "protocol nested" in table
    assert "MiniRocket" in table and "ΔROC-AUC [95 % CI]" in table
    assert "| model |" in (out / "results.md").read_text()


def test_rerun_reads_features_from_the_cache(probe_run, tiny_cohort, capsys, fast):
    tmp, out = probe_run
    probe_main(["--run", str(tmp / "runA"), "--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"),
                "--out", str(out), "--no-plots", *fast])
    assert "features: 3 from cache, 0 encoded" in capsys.readouterr().out


def test_raw_units_read_like_normalised_data(tiny_cohort, tmp_path, fast):
    """The probe min-max scales each segment as pretraining did: raw-unit data gives the same result."""
    with h5py.File(tiny_cohort / "downstream.h5") as f, h5py.File(tmp_path / "raw.h5", "w") as g:
        for k in ("labels", "patient_ids"):
            g[k] = f[k][()]
        g["ppg"] = 500.0 * f["ppg"][()] + 2000.0
        g.attrs["fs"] = 25
    runs = []
    for name in ("downstream.h5", "raw.h5"):
        h5 = tiny_cohort / name if name == "downstream.h5" else tmp_path / name
        probe_main(["--random-baselines", "1", "--h5", str(h5), "--out", str(tmp_path / f"out_{name}"), "--no-plots", *fast])
        runs.append(json.loads((tmp_path / f"out_{name}" / "results.json").read_text())["models"][0]["headline"]["metrics"])
    assert runs[0]["roc_auc"]["value"] == pytest.approx(runs[1]["roc_auc"]["value"], abs=1e-3)


def test_seed_protocol_is_labelled_everywhere(tiny_cohort, tmp_path):
    probe_main(["--protocol", "seed", "--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"),
                "--out", str(tmp_path), "--no-plots", "--n-boot", "20"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["protocol"] == "seed" and "random 80/20 segment split" in res["protocol_label"]
    assert "seed protocol" in (tmp_path / "table.txt").read_text()
    assert "seed protocol" in (tmp_path / "results.md").read_text()
    rows = _rows(tmp_path / "pvc_predictions.csv")
    assert abs(len(rows) - 0.2 * res["n_segments"]) <= 1  # the 20 % test split only


def test_skipped_and_flat_rows_keep_their_row_ids(tiny_cohort, tmp_path, fast):
    with h5py.File(tiny_cohort / "downstream.h5") as f, h5py.File(tmp_path / "d.h5", "w") as g:
        ppg = f["ppg"][()]
        ppg[3, 10] = np.nan  # bad: skipped by --on-bad skip
        ppg[5] = 0.25  # flat line: no min-max scale, dropped and counted
        g["ppg"], g["labels"], g["patient_ids"] = ppg, f["labels"][()], f["patient_ids"][()]
    probe_main(["--random-baselines", "1", "--h5", str(tmp_path / "d.h5"), "--fs", "25", "--on-bad", "skip",
                "--out", str(tmp_path / "o"), "--no-plots", *fast])
    rows = [int(r["row"]) for r in _rows(tmp_path / "o" / "pvc_predictions.csv")]
    assert rows[:5] == [0, 1, 2, 4, 6] and len(rows) == len(ppg) - 2
    assert json.loads((tmp_path / "o" / "results.json").read_text())["n_constant_dropped"] == 1


def _h5(path, labels, pids, n=40):
    with h5py.File(path, "w") as f:
        f["ppg"] = np.random.default_rng(0).standard_normal((n, 250)).astype(np.float32)
        f["labels"], f["patient_ids"] = labels, pids


@pytest.mark.parametrize("labels,pids,message", [
    (np.eye(2)[np.arange(40) % 2], np.arange(40) % 4, r"'/labels' has shape \(40, 2\); expected a 1-D array"),
    (np.arange(40) % 3, np.arange(40) % 4, r"'/labels' must hold only 0 and 1"),
    (np.arange(40) % 2, np.arange(40) % 4 + 0.5, r"'/patient_ids' must be integers"),
    (np.zeros(40, int), np.arange(40) % 4, r"'/labels' holds a single class"),
    (np.arange(40) % 2, np.zeros(40, int), r"'/patient_ids' holds a single patient"),
])
def test_bad_downstream_input_is_a_clear_error(tmp_path, capsys, labels, pids, message):
    _h5(tmp_path / "bad.h5", labels, pids)
    with pytest.raises(SystemExit) as e:
        probe_main(["--random-baselines", "1", "--h5", str(tmp_path / "bad.h5"), "--out", str(tmp_path / "o"), *FAST])
    assert "bad.h5" in str(e.value)
    import re
    assert re.search(message, str(e.value)), str(e.value)


def test_score_reproduces_the_seeds_reference_numbers(seed_reference, capsys):
    probe_main(["score", "--predictions", str(seed_reference / "pvc_predictions.csv"), "--n-boot", "200"])
    out = capsys.readouterr().out
    import re
    auc = re.search(r"ROC-AUC\s+(\S+)\s+\[(\S+), (\S+)\]", out)
    ap = re.search(r"AP\s+(\S+)\s+\[(\S+), (\S+)\]", out)
    assert auc.group(1) == "0.766" and ap.group(1) == "0.116"
    assert float(auc.group(2)) < 0.766 < float(auc.group(3)) and float(ap.group(2)) < 0.116 < float(ap.group(3))
    assert "515 PVC" in out and "17 patients" in out


def test_score_names_a_missing_column(tmp_path):
    (tmp_path / "p.csv").write_text("patient_id,y,p_pvc\n1,0,0.2\n")
    with pytest.raises(SystemExit, match=r"p\.csv: columns .* lack \['label'\]"):
        probe_main(["score", "--predictions", str(tmp_path / "p.csv")])


def test_unique_names():
    assert unique_names(["a/r1/himae_final.pt", "b/r2/himae_final.pt", "c/x.pt"]) == [
        "r1/himae_final.pt", "r2/himae_final.pt", "c/x.pt"]
    assert unique_names(["w.pt", "w.pt"]) == ["w.pt", "w.pt#2"]
    assert unique_names(["s3://b/r1/w.pt", "/x/r1/w.pt", "s3://c/r1/w.pt"]) == [  # a URL's scheme + bucket is one part
        "s3://b/r1/w.pt", "x/r1/w.pt", "s3://c/r1/w.pt"]


def test_seed_format_probe_applies_to_the_bottleneck(seed_reference):
    data = DownstreamSet(np.random.default_rng(0).uniform(-1, 1, (64, 1, 250)).astype(np.float32),
                         np.r_[np.ones(8), np.zeros(56)].astype(np.int64), np.arange(64) % 4, np.arange(64))
    bottleneck = level_features(random_encoder(1, 0), data.signals)[-1]
    p, auroc, ap = apply_seed_probe(bottleneck, data.labels, str(seed_reference / "pvc_linear_probe.pt"))
    sd = torch.load(seed_reference / "pvc_linear_probe.pt", map_location="cpu", weights_only=True)
    assert tuple(sd["fc.weight"].shape) == (1, 256)
    assert p.shape == (64,) and 0 <= auroc <= 1 and 0 <= ap <= 1


def test_seed_probe_of_the_wrong_width_is_a_clear_error(tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 128), "fc.bias": torch.zeros(1)}, tmp_path / "p.pt")
    data = DownstreamSet(np.zeros((4, 1, 250), np.float32), np.array([0, 1, 0, 1]), np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match=r"p\.pt: fc\.weight \(1, 128\).*expected \[1, 256\]"):
        apply_seed_probe(level_features(random_encoder(1, 0), data.signals)[-1], data.labels, str(tmp_path / "p.pt"))


def test_seed_format_probe_from_the_cli(tiny_cohort, tmp_path, fast):
    torch.save({"fc.weight": torch.ones(1, 256) * 0.01, "fc.bias": torch.zeros(1)}, tmp_path / "p.pt")
    probe_main(["--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"), "--seed-probe", str(tmp_path / "p.pt"),
                "--out", str(tmp_path / "o"), "--no-plots", *fast])
    rows = _rows(tmp_path / "o" / "seed_probe" / "random-init(0).csv")
    assert len(rows) == 559 and list(rows[0]) == ["patient_id", "label", "p_pvc", "row"]
