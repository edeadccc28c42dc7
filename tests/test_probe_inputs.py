import numpy as np
import pytest
import torch

from data_prep.preprocess import Preprocess
from probes.features import FeatureCache, encode_pooled
from probes.model_inputs import input_recipe, model_input
from probes.pooling import Candidate, candidates, pool_stats
from probes.random_baseline import random_baseline, random_encoder

TRAINED_25HZ = Preprocess(normalize="minmax", source_rate=25, length=250).to_dict()


def _pulses(n: int, fs: float, seconds: float = 10.0) -> np.ndarray:
    t = np.arange(int(fs * seconds)) / fs
    rng = np.random.default_rng(0)
    return np.stack([np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * t + rng.uniform(0, 6)) for _ in range(n)])[:, None, :]


def test_raw_units_get_the_pretraining_minmax_scaling():
    x = _pulses(4, 25).astype(np.float32)
    raw = 1000 * x + 300  # same waveforms in raw sensor units
    recipe = input_recipe("ck", TRAINED_25HZ, None, 25.0, 250)
    y_raw, y = model_input(raw, recipe), model_input(x, recipe)
    assert y_raw.min() == -1 and y_raw.max() == 1
    np.testing.assert_allclose(y_raw, y, atol=1e-5)


def test_data_at_another_rate_is_resampled_to_the_checkpoints():
    recipe = input_recipe("ck", TRAINED_25HZ, None, 50.0, 500)
    y = model_input(_pulses(3, 50).astype(np.float32), recipe)
    assert y.shape == (3, 1, 250) and "resampled 50 -> 25 Hz" in recipe.note


def test_lengths_that_cannot_match_are_a_clear_error():
    with pytest.raises(ValueError, match=r"ck: .*give 300-sample model inputs.*pretrained on 250-sample segments at 25 Hz"):
        input_recipe("ck", TRAINED_25HZ, None, 25.0, 300)
    with pytest.raises(ValueError, match=r"ck: resampling 333 samples from 50.0 Hz to 25.0 Hz gives 166.5"):
        input_recipe("ck", TRAINED_25HZ, None, 50.0, 333)


def test_foreign_checkpoints_fall_back_to_the_seed_default_and_say_so():
    r = input_recipe("seed.ckpt", None, None, 25.0, 250)
    assert r.source == "seed default" and r.preprocess.normalize == "minmax" and "seed's default" in r.note


def test_manifest_applies_when_the_checkpoint_records_nothing_and_must_agree_otherwise():
    none = Preprocess(normalize="none", source_rate=25, length=250).to_dict()
    r = input_recipe("ck", None, none, 25.0, 250)
    assert r.source == "manifest" and r.preprocess.normalize == "none"
    with pytest.raises(ValueError, match="disagree"):
        input_recipe("ck", TRAINED_25HZ, none, 25.0, 250)


def test_pool_stats_and_candidates():
    fmap = torch.tensor([[[1.0, 3.0, 5.0], [2.0, 2.0, 2.0]]])  # [1, 2, 3]
    s = pool_stats(fmap)
    assert s["mean"].tolist() == [[3.0, 2.0]] and s["max"].tolist() == [[5.0, 2.0]]
    assert s["std"][0, 0].item() == pytest.approx(np.std([1, 3, 5])) and s["std"][0, 1].item() == 0
    stats = {k: [np.full((2, 3), i + 10 * j) for i in range(2)] for j, k in enumerate(["mean", "std", "max"])}
    assert Candidate("mean+std", 1).features(stats).shape == (2, 6)
    assert Candidate("mean+std+max", None).features(stats).shape == (2, 18)
    assert [c.name(False) for c in candidates(["mean"], 2)] == ["L0", "L1", "all"]
    with pytest.raises(ValueError, match="--pooling 'median'"):
        candidates(["median"], 2)


def test_features_are_cached_by_weights_and_input(tmp_path):
    model = random_encoder(1, 0)
    x = _pulses(6, 25).astype(np.float32)
    cache = FeatureCache(tmp_path)
    a = cache.get_or_encode(model, x)
    b = cache.get_or_encode(model, x)
    assert (cache.hits, cache.misses) == (1, 1)
    for s in a:
        for u, v in zip(a[s], b[s]):
            np.testing.assert_array_equal(u, v)
    assert [m.shape[1] for m in a["mean"]] == [16, 32, 64, 128, 256]
    with torch.no_grad():
        fmap = model.encode(torch.from_numpy(x))[2]
    np.testing.assert_allclose(a["std"][2], fmap.std(-1, unbiased=False).numpy(), rtol=1e-5, atol=1e-6)
    cache.get_or_encode(model, x[:5])  # other data: encoded again
    cache.get_or_encode(random_encoder(1, 1), x)  # other weights: encoded again
    assert cache.misses == 3 and len(list(tmp_path.glob("*.npz"))) == 3


def test_random_baseline_batchnorm_statistics_are_estimated_from_data():
    x = (3 + 2 * _pulses(64, 25)).astype(np.float32)
    fresh = random_encoder(1, 0)
    bn = fresh.encoder_layers[0].main_path[1]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    model = random_baseline(1, 0, x)
    conv = model.encoder_layers[0].main_path[0]
    with torch.no_grad():
        h = conv(torch.from_numpy(x))  # [N, 16, L']: what the first BatchNorm sees
    bn = model.encoder_layers[0].main_path[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), h.mean(dim=(0, 2)).numpy(), rtol=1e-4, atol=1e-5)
    assert not model.training
    out = encode_pooled(model, x)["mean"][0]
    assert np.isfinite(out).all()
