import csv

import numpy as np
import pytest
import torch

from data_prep.hdf5_sources import DownstreamSet, read_downstream
from probes.evaluate import apply_seed_probe, grouped_oof_probe, main as probe_main, random_encoder
from probes.features import level_features


def test_grouped_split_does_not_reward_recognising_patients():
    """Labels that depend only on the patient: a random split reads high, a grouped split reads ~chance."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 50)
    rate = rng.uniform(0, 0.5, 20)
    labels = (rng.random(1000) < rate[groups]).astype(int)
    feats = np.eye(20)[groups] + 0.01 * rng.standard_normal((1000, 20))  # patient identity only
    random_split = cross_val_predict(LogisticRegression(max_iter=2000), feats, labels,
                                     cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    grouped = grouped_oof_probe(feats, labels, groups, folds=5)
    assert roc_auc_score(labels, random_split) > 0.7
    assert abs(roc_auc_score(labels, grouped) - 0.5) < 0.1


def test_grouped_probe_finds_a_real_signal():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 100)
    labels = (rng.random(1000) < 0.1).astype(int)
    feats = rng.standard_normal((1000, 8))
    feats[:, 0] += 2.0 * labels
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(labels, grouped_oof_probe(feats, labels, groups)) > 0.85


def test_probe_cli_on_a_small_cohort(tiny_cohort, tmp_path, capsys):
    torch.manual_seed(0)
    from himae_dist.checkpoint import save_weights
    save_weights(random_encoder(1, 5), tmp_path / "w.pt", step=0)
    probe_main(["--checkpoint", str(tmp_path / "w.pt"), "--random-init", "0", "--h5", str(tiny_cohort / "downstream.h5"),
                "--out", str(tmp_path / "res"), "--folds", "3"])
    out = capsys.readouterr().out
    assert "w.pt" in out and "random-init(0)" in out
    data = read_downstream(tiny_cohort / "downstream.h5")
    with open(tmp_path / "res" / "pvc_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["patient_id", "label", "p_pvc"] and len(rows) == len(data.labels)
    assert [int(r["label"]) for r in rows] == data.labels.tolist()
    p = np.array([float(r["p_pvc"]) for r in rows])
    assert ((p >= 0) & (p <= 1)).all() and p.std() > 0
    import json
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    dims = [lv["dim"] for lv in res["results"][0]["levels"]]
    assert dims == [16, 32, 64, 128, 256]
    assert all(0 <= lv["auroc"] <= 1 for r in res["results"] for lv in r["levels"])


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
