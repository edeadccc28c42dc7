import json

import pytest

from himae_dist.config import deepspeed_config, parse_config


def test_flags_override_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "steps": 50, "lr": 5e-4}))
    cfg = parse_config(["--config", str(tmp_path / "c.json"), "--steps", "200", "--channels", "8,16,32", "--local_rank=1"])
    assert (cfg.steps, cfg.lr, cfg.channels, cfg.data) == (200, 5e-4, (8, 16, 32), "d")


def test_seed_recipe_becomes_the_deepspeed_config():
    cfg = parse_config(["--data", "d", "--steps", "1000", "--micro-batch", "32", "--grad-accum", "2"])
    ds = deepspeed_config(cfg, world_size=4, bf16=False)
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}}
    sched = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupDecayLR"
    assert (sched["warmup_num_steps"], sched["total_num_steps"], sched["warmup_type"]) == (100, 1000, "linear")


def test_user_deepspeed_json_is_merged(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    ds = deepspeed_config(parse_config(["--data", "d", "--ds-config", str(tmp_path / "ds.json")]), 1, False)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["optimizer"]["type"] == "AdamW"


@pytest.mark.parametrize("argv,match", [
    (["--data", "d", "--mask-ratio", "1.5"], r"--mask-ratio=1\.5: expected a value in \(0, 1\)"),
    (["--data", "d", "--steps", "0"], r"--steps=0: expected an integer >= 1"),
    (["--data", "d", "--zero-stage", "3"], r"--zero-stage=3"),
    (["--steps", "5"], r"--data='': expected a manifest"),
])
def test_bad_options_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        parse_config(["--config", str(tmp_path / "c.json")])
