import json
import re
from pathlib import Path

import pytest

from himae_dist.config import deepspeed_config, lr_lambda, parse_config


def test_flags_override_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "steps": 50, "lr": 5e-4}))
    cfg = parse_config(["--config", str(tmp_path / "c.json"), "--steps", "200", "--channels", "8,16,32", "--local_rank=1"])
    assert (cfg.steps, cfg.lr, cfg.channels, cfg.data) == (200, 5e-4, (8, 16, 32), "d")


def test_seed_recipe_becomes_the_deepspeed_config():
    cfg = parse_config(["--data", "d", "--steps", "1000", "--micro-batch", "32", "--grad-accum", "2"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 32 * 2 * 4
    assert "bf16" not in ds and "fp16" not in ds  # fp32 engine: bf16 is the trainer's autocast
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer builds AdamW and the schedule


def test_schedule_warms_up_decays_and_never_gives_lr_zero():
    cfg = parse_config(["--data", "d", "--steps", "40", "--warmup-frac", "0.1"])
    lam = lr_lambda(cfg)
    mult = [lam(i) for i in range(cfg.steps)]  # multiplier of --lr for updates 1..40
    assert mult[:4] == [0.25, 0.5, 0.75, 1.0]  # 4 warmup updates, the first already at lr/4
    assert all(a >= b for a, b in zip(mult[4:], mult[5:]))  # then linear decay
    assert min(mult) == mult[-1] == 1 / 36 > 0
    cfg0 = parse_config(["--data", "d", "--steps", "1", "--warmup-frac", "0"])
    assert lr_lambda(cfg0)(0) == 1.0


def test_user_deepspeed_json_is_merged(tmp_path):
    user = {"zero_optimization": {"stage": 1, "overlap_comm": True}, "bf16": {"enabled": False},
            "train_micro_batch_size_per_gpu": 64}  # values that agree with the flags are accepted
    (tmp_path / "ds.json").write_text(json.dumps(user))
    ds = deepspeed_config(parse_config(["--data", "d", "--zero-stage", "1", "--ds-config", str(tmp_path / "ds.json")]), 1)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": False} and ds["train_micro_batch_size_per_gpu"] == 64


@pytest.mark.parametrize("user,match", [
    ({"zero_optimization": {"stage": 2}}, r"zero_optimization\.stage=2 contradicts --zero-stage \(= 0\)"),
    ({"bf16": {"enabled": True}}, r"bf16=.* contradicts --precision"),
    ({"train_micro_batch_size_per_gpu": 7}, r"contradicts --micro-batch"),
    ({"optimizer": {"type": "Adam"}}, r"optimizer=.* contradicts"),
])
def test_deepspeed_json_contradicting_a_flag_is_refused(tmp_path, user, match):
    (tmp_path / "ds.json").write_text(json.dumps(user))
    with pytest.raises(ValueError, match=match):
        deepspeed_config(parse_config(["--data", "d", "--ds-config", str(tmp_path / "ds.json")]), 2)


def test_shipped_multinode_ds_config_matches_the_stage_its_script_passes():
    root = Path(__file__).resolve().parents[1]
    script = (root / "launch" / "train_multinode.sh").read_text()
    stage = re.search(r"--zero-stage \"\$\{ZERO_STAGE:-(\d)\}\"", script).group(1)
    cfg = parse_config(["--data", "d", "--zero-stage", stage, "--ds-config", str(root / "launch" / "ds_config.json")])
    assert deepspeed_config(cfg, 8)["zero_optimization"]["stage"] == int(stage)


@pytest.mark.parametrize("argv,match", [
    (["--data", "d", "--mask-ratio", "1.5"], r"--mask-ratio=1\.5: expected a value in \(0, 1\)"),
    (["--data", "d", "--steps", "0"], r"--steps=0: expected an integer >= 1"),
    (["--data", "d", "--zero-stage", "3"], r"--zero-stage=3"),
    (["--steps", "5"], r"--data='': expected a manifest"),
    (["--data", "d", "--plot-every", "10"], r"--plot-every=10: expected 0 unless --val-every is set"),
])
def test_bad_options_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        parse_config(["--config", str(tmp_path / "c.json")])
