import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from probes.nested_cv import grouped_folds, nested_probe


def test_grouped_split_does_not_reward_recognising_patients():
    """Labels that depend only on the patient: a random split reads high, the nested grouped probe ~chance."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 50)
    rate = rng.uniform(0, 0.5, 20)
    labels = (rng.random(1000) < rate[groups]).astype(int)
    feats = np.eye(20)[groups] + 0.01 * rng.standard_normal((1000, 20))  # patient identity only
    random_split = cross_val_predict(LogisticRegression(max_iter=2000), feats, labels,
                                     cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")[:, 1]
    res = nested_probe({"identity": feats}, labels, groups, folds=5, inner_folds=3, n_jobs=1)
    assert roc_auc_score(labels, random_split) > 0.7
    assert abs(roc_auc_score(labels, res.headline_oof) - 0.5) < 0.1


def test_folds_never_share_a_patient():
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 12, 600)
    labels = (rng.random(600) < 0.1).astype(int)
    for tr, te in grouped_folds(labels, groups, 5, 0):
        assert not set(groups[tr]) & set(groups[te])


def test_nested_selection_picks_the_informative_candidate():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 100)
    labels = (rng.random(1000) < 0.1).astype(int)
    signal = rng.standard_normal((1000, 8))
    signal[:, 0] += 2.0 * labels
    feats = {"L0": rng.standard_normal((1000, 8)), "L1": signal, "all": np.hstack([signal, rng.standard_normal((1000, 40))])}
    res = nested_probe(feats, labels, groups, folds=5, inner_folds=3, n_jobs=2)
    assert set(res.selected) <= {"L1", "all"} and res.selected_mode in ("L1", "all")
    assert roc_auc_score(labels, res.headline_oof) > 0.85
    aucs = {c.name: roc_auc_score(labels, c.oof) for c in res.candidates}
    assert aucs["L1"] > 0.85 and abs(aucs["L0"] - 0.5) < 0.15
    assert all(len(c.chosen_c) == 5 for c in res.candidates)


def test_headline_is_not_the_best_of_the_reported_numbers():
    """Pure-noise candidates: the maximum of their out-of-fold scores reads above chance; the nested headline does not."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(12), 60)
    labels = (rng.random(720) < 0.15).astype(int)
    feats = {f"L{i}": rng.standard_normal((720, 4)) for i in range(8)}
    res = nested_probe(feats, labels, groups, folds=4, inner_folds=3, n_jobs=2)
    best_reported = max(roc_auc_score(labels, c.oof) for c in res.candidates)
    headline = roc_auc_score(labels, res.headline_oof)
    assert best_reported > headline and abs(headline - 0.5) < 0.1


def test_fit_probe_uses_only_stable_scikit_learn_api():
    """C is chosen by refitting a plain StandardScaler + LogisticRegression pipeline per inner split, not
    through LogisticRegressionCV, whose attribute layout (C_, scores_) changed in scikit-learn 1.8."""
    from probes.nested_cv import fit_probe

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 5))
    y = (x[:, 0] + 0.5 * rng.standard_normal(120) > 0.8).astype(int)
    inner = list(StratifiedKFold(3, shuffle=True, random_state=0).split(x, y))
    clf, score, c = fit_probe(x, y, inner)
    assert [type(step).__name__ for step in clf] == ["StandardScaler", "LogisticRegression"]
    assert clf[-1].C == c and 0.5 < score <= 1.0
    _, score_none, c_none = fit_probe(x, y, [])
    assert np.isnan(score_none) and c_none == 0.1  # no usable inner split: the middle of the grid
