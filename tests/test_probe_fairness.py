"""The probe's comparisons are fair: every fitted step inside its fold, one BatchNorm policy that
never sees test patients, paired CIs, MiniRocket fitted on training folds only, label-efficiency
draws, and degenerate folds or patient counts refused."""

import json

import h5py
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from probes.evaluate import fold_stats, main as probe_main, score_main
from probes.features import FeatureCache
from probes.label_efficiency import draw_training_patients
from probes.metrics import paired_difference, patient_bootstrap, score
from probes.nested_cv import C_GRID, fit_probe, grouped_folds
from probes.random_baseline import random_encoder, shard_segments

QUICK = ["--folds", "3", "--inner-folds", "2", "--n-boot", "50", "--no-plots", "--minirocket-kernels", "0"]


def test_the_scaler_is_fitted_on_each_inner_training_part_only(monkeypatch):
    """Choosing C must not see the inner validation patients' statistics: the scaler is refitted per inner split."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 40)
    y = (rng.random(240) < 0.25).astype(int)
    x = rng.standard_normal((240, 6)) + 0.8 * y[:, None] * np.array([1, 0.5, 0, 0, 0, 0])
    x[groups >= 4] *= 25  # two patients on another scale: one inner validation part
    inner = [(np.flatnonzero(groups < 4), np.flatnonzero(groups >= 4)),
             (np.flatnonzero((groups < 2) | (groups >= 4)), np.flatnonzero((groups >= 2) & (groups < 4)))]
    fitted_means = []
    real_fit = StandardScaler.fit

    def spy(self, X, *args, **kw):
        out = real_fit(self, X, *args, **kw)
        fitted_means.append(self.mean_.copy())
        return out

    monkeypatch.setattr(StandardScaler, "fit", spy)
    _, inner_auc, c = fit_probe(x, y, inner)
    for tr, _ in inner:  # a scaler fitted on exactly the inner training rows, for this split's scores
        assert any(np.allclose(m, x[tr].mean(0)) for m in fitted_means)
    by_hand = [np.mean([roc_auc_score(y[va], make_pipeline(StandardScaler(), LogisticRegression(C=cc, max_iter=300, tol=1e-3))
                                      .fit(x[tr], y[tr]).predict_proba(x[va])[:, 1]) for tr, va in inner]) for cc in C_GRID]
    assert inner_auc == pytest.approx(max(by_hand), abs=1e-12) and c == C_GRID[int(np.argmax(by_hand))]


def _pulses(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(250) / 25
    return np.stack([np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * t) for _ in range(n)])[:, None, :].astype(np.float32)


def test_fold_policy_statistics_never_see_the_test_patients():
    """Under --bn-stats fold every encoder's statistics come from the fold's training inputs: changing the
    test patients' inputs leaves the training rows' features of that fold unchanged."""
    x = _pulses(60)
    labels = np.r_[np.ones(6), np.zeros(54)].astype(int)[np.random.default_rng(0).permutation(60)]
    groups = np.repeat(np.arange(6), 10)
    outer = grouped_folds(labels, groups, 3, 0)
    model = random_encoder(1, 0)
    before = fold_stats(model, x, outer, "fold", FeatureCache(None))
    x2 = x.copy()
    tr, te = outer[0]
    x2[te] = 5 * x2[te] + 3  # other test patients
    after = fold_stats(model, x2, outer, "fold", FeatureCache(None))
    np.testing.assert_allclose(after[0]["mean"][2][tr], before[0]["mean"][2][tr], rtol=1e-5, atol=1e-6)
    assert not np.allclose(after[1]["mean"][2][tr], before[1]["mean"][2][tr])  # fold 1 trains on them: they count
    bn = model.encoder_layers[0].main_path[1]
    assert torch.all(bn.running_mean == 0)  # the probed model itself is untouched


def test_paired_difference_is_a_subtraction_per_resample_and_sees_what_separate_cis_cannot():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(12), 60)
    y = (rng.random(720) < 0.15).astype(int)
    hard = rng.normal(0, 1.2, 12)[groups]  # how hard each patient is, shared by both models
    base = [y * 1.0 + hard + rng.normal(0, 1, 720) for _ in range(2)]  # two random seeds
    better = y * 1.6 + hard + rng.normal(0, 1, 720)
    d = paired_difference(y, better, base, groups, n_boot=300, seed=1)
    b_a = patient_bootstrap(y, better, groups, 300, 1)
    b_b = [patient_bootstrap(y, b, groups, 300, 1) for b in base]
    per_resample = b_a["roc_auc"] - (b_b[0]["roc_auc"] + b_b[1]["roc_auc"]) / 2
    assert d["roc_auc"]["ci95"] == pytest.approx(list(np.nanpercentile(per_resample, [2.5, 97.5])))
    assert d["roc_auc"]["value"] == pytest.approx(roc_auc_score(y, better) - np.mean([roc_auc_score(y, b) for b in base]))
    ci_a, ci_b = score(y, better, groups, 300, 1)["roc_auc"]["ci95"], score(y, base[0], groups, 300, 1)["roc_auc"]["ci95"]
    assert ci_a[0] < ci_b[1]  # the separate CIs overlap ...
    assert d["roc_auc"]["ci95"][0] > 0  # ... the paired one excludes 0


def test_a_ci_over_fewer_than_3_patients_is_refused(tmp_path, capsys):
    rows = ["patient_id,label,p_pvc"] + [f"{i % 2},{int(i % 5 == 0)},{0.1 * (i % 10)}" for i in range(40)]
    (tmp_path / "p.csv").write_text("\n".join(rows) + "\n")
    m = score_main(["--predictions", str(tmp_path / "p.csv")])
    out = capsys.readouterr().out
    assert "no CI: 2 patients; a patient bootstrap needs at least 3" in out and "[" not in out
    assert m["roc_auc"]["ci95"] is None and m["ap"]["ci95"] is None


def _h5(path, labels, pids):
    with h5py.File(path, "w") as f:
        f["ppg"] = (_pulses(len(labels), 1) + np.random.default_rng(0).normal(0, 0.1, (len(labels), 1, 250)))[:, 0]
        f["labels"], f["patient_ids"] = labels, pids
        f.attrs["fs"] = 25


def test_degenerate_folds_are_named_and_refused_or_dropped(tmp_path, capsys):
    pids = np.repeat(np.arange(6), 10)
    labels = ((pids <= 1) & (np.arange(60) % 10 < 3)).astype(int)  # only patients 0 and 1 have PVC
    _h5(tmp_path / "d.h5", labels, pids)
    args = ["--random-baselines", "1", "--h5", str(tmp_path / "d.h5"), "--out", str(tmp_path / "o"), *QUICK]
    with pytest.raises(SystemExit, match=r"d\.h5: outer fold \d of 3 \(test patients [\d, ]+\): no PVC in its test patients"):
        probe_main(args)
    probe_main(args + ["--on-degenerate", "drop"])
    out = capsys.readouterr().out
    assert "dropped outer fold" in out and "patient-grouped 2-fold CV (1 of 3 folds dropped" in out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["folds_run"] == 2 and len(res["folds_dropped"]) == 1
    assert res["models"][0]["headline"]["metrics"]["n"] == 40  # the dropped fold's patients are not scored


def test_the_printed_fold_count_is_the_one_run(tmp_path, capsys):
    pids = np.repeat(np.arange(2), 20)
    _h5(tmp_path / "two.h5", (np.arange(40) % 4 == 0).astype(int), pids)
    probe_main(["--random-baselines", "1", "--h5", str(tmp_path / "two.h5"), "--out", str(tmp_path / "o"),
                *QUICK[2:], "--folds", "5", "--inner-folds", "2"])
    out = capsys.readouterr().out
    assert "patient-grouped 2-fold CV (--folds 5 asked, but 2 patients allow 2)" in out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["folds_run"] == 2 and res["models"][0]["headline"]["metrics"]["roc_auc"]["ci95"] is None


def test_label_draws_are_stratified_and_the_same_for_every_model():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 20)
    pvc_patients = set(range(8))
    labels = np.array([int(g in pvc_patients and rng.random() < 0.3) for g in groups])
    labels[[g * 20 for g in pvc_patients]] = 1
    outer = grouped_folds(labels, groups, 4, 0)
    sub, why = draw_training_patients(outer, labels, groups, 0.5, 0, seed=3)
    again, _ = draw_training_patients(outer, labels, groups, 0.5, 0, seed=3)
    other, _ = draw_training_patients(outer, labels, groups, 0.5, 1, seed=3)
    for (tr, te), (s, ste), (a, _), (o, _) in zip(outer, sub, again, other):
        assert np.array_equal(te, ste) and np.array_equal(s, a) and set(s) <= set(tr)
        full_pos = {g for g in np.unique(groups[tr]) if labels[tr][groups[tr] == g].any()}
        pos = {g for g in np.unique(groups[s]) if labels[s][groups[s] == g].any()}
        assert len(pos) == round(0.5 * len(full_pos)) >= 2
        assert len(np.unique(groups[s])) - len(pos) == round(0.5 * (len(np.unique(groups[tr])) - len(full_pos)))
    assert any(not np.array_equal(s, o) for (s, _), (o, _) in zip(sub, other))
    none, why = draw_training_patients(outer, labels, groups, 0.2, 0, seed=3)
    assert none is None and "a draw needs at least 2" in why


def test_minirocket_is_fitted_on_the_training_fold_only():
    pytest.importorskip("aeon")
    from probes.minirocket import fold_features

    x = _pulses(60)
    outer = [(np.arange(40), np.arange(40, 60))]
    before = fold_features(x, outer, 84, 0)[0]["minirocket"]
    x2 = x.copy()
    x2[40:] = 3 * x2[40:] + 1
    after = fold_features(x2, outer, 84, 0)[0]["minirocket"]
    np.testing.assert_array_equal(after[:40], before[:40])  # the test rows did not shape the transform
    assert before.shape == (60, 84)


def test_pretrain_policy_label_efficiency_and_no_aeon_from_the_cli(tiny_cohort, tiny_shards, tmp_path, capsys,
                                                                    monkeypatch):
    """One CLI run: random encoders' statistics from the shards, the label-efficiency table and figure,
    and without aeon one line saying MiniRocket is skipped."""
    import probes.minirocket as mr

    seg = shard_segments(str(tiny_shards / "manifest.json"), max_segments=100)
    assert seg.shape == (100, 1, 250) and seg.dtype == np.float32 and np.abs(seg).max() <= 1.0001
    monkeypatch.setattr(mr, "unavailable", lambda: "MiniRocket baseline skipped: aeon is not importable (test)")
    probe_main(["--random-baselines", "1", "--h5", str(tiny_cohort / "downstream.h5"), "--out", str(tmp_path),
                "--manifest", str(tiny_shards / "manifest.json"), "--bn-segments", "100", "--label-fractions", "0.5",
                "--label-draws", "1", "--folds", "3", "--inner-folds", "2", "--n-boot", "50", "--minirocket-kernels", "84"])
    out = capsys.readouterr().out
    assert "BatchNorm policy pretrain" in out and "100 segments of the pretraining shards" in out
    assert out.count("MiniRocket baseline skipped: aeon is not importable") == 1
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["batchnorm"]["policy"] == "pretrain" and res["minirocket"]["note"].startswith("MiniRocket baseline skipped")
    assert [m["kind"] for m in res["models"]] == ["random"]
    le = res["models"][0]["label_efficiency"]
    assert set(le) == {"0.5", "1.0"} and len(le["0.5"]["draws"]) == 1
    assert le["0.5"]["n_patients"] < le["1.0"]["n_patients"]
    assert le["1.0"]["draws"][0]["roc_auc"] == res["models"][0]["headline"]["metrics"]["roc_auc"]["value"]
    assert "50% of training patients" in (tmp_path / "table.txt").read_text()
    assert (tmp_path / "label_efficiency.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="--bn-stats pretrain needs --manifest"):
        probe_main(["--bn-stats", "pretrain", "--h5", str(tiny_cohort / "downstream.h5"), "--out", str(tmp_path), *QUICK])
