import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score, roc_curve

from probes.metrics import patient_bootstrap, point_metrics, score


def _sklearn_spec90(y, p):
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    i = np.flatnonzero(fpr <= 0.1)[-1]
    return tpr[i], f1_score(y, p >= thr[i])


@pytest.mark.parametrize("decimals", [2, 6])  # with and without many tied scores
def test_point_metrics_equal_scikit_learn(decimals):
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.07).astype(int)
    p = np.round(rng.random(3000) * 0.8 + 0.25 * y, decimals)
    m = point_metrics(y, p)
    sens, f1 = _sklearn_spec90(y, p)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert m["sens_at_spec90"] == pytest.approx(sens, abs=1e-12)
    assert m["f1_at_spec90"] == pytest.approx(f1, abs=1e-12)


def test_bootstrap_resamples_patients_not_segments():
    """The same predictions read far less certain when they come from 4 patients than from 2,000."""
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.2).astype(int)
    p = rng.random(2000) + 0.5 * y
    many = score(y, p, np.arange(2000), n_boot=300)["roc_auc"]["ci95"]
    few_groups = np.repeat(np.arange(4), 500)
    p_few = p + 0.6 * (few_groups == 0)  # one patient's scores run high
    few = score(y, p_few, few_groups, n_boot=300)["roc_auc"]["ci95"]
    assert few[1] - few[0] > 2 * (many[1] - many[0])


def test_bootstrap_matches_resampling_by_hand():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(6), 50)
    y = (rng.random(300) < 0.3).astype(int)
    p = rng.random(300) + 0.3 * y
    boot = patient_bootstrap(y, p, groups, n_boot=5, seed=7, chunk=5)
    draw = np.random.default_rng(7)
    for b in range(5):
        pick = draw.integers(0, 6, 6)
        idx = np.concatenate([np.flatnonzero(groups == g) for g in pick])
        if len(np.unique(y[idx])) == 2:
            assert boot["roc_auc"][b] == pytest.approx(roc_auc_score(y[idx], p[idx]))
            assert boot["ap"][b] == pytest.approx(average_precision_score(y[idx], p[idx]))


def test_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="single class"):
        score(np.zeros(10, int), np.random.default_rng(0).random(10), np.arange(10))
