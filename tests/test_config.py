import json
import re
from pathlib import Path

import pytest

from himae_dist.config import ConfigError, deepspeed_config, lr_lambda, parse_config


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
    assert ds["gradient_clipping"] == 0.0  # the seed does not clip; DeepSpeed's own default (1.0) would


def test_the_engine_does_not_clip_unless_asked(tmp_path):
    """DeepSpeed's default gradient_clipping is 1.0: the engine as built must say 0 (off) unless --grad-clip."""
    from deepspeed.runtime.config import get_gradient_clipping

    for argv, want in (([], 0.0), (["--grad-clip", "0.5"], 0.5)):
        ds = deepspeed_config(parse_config(["--data", "d", *argv]), world_size=1)
        assert get_gradient_clipping(ds) == want  # what the engine reads


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
    for want in (stage, "0", "1", "2"):  # ZERO_STAGE=any: the JSON leaves the stage to the flag
        cfg = parse_config(["--data", "d", "--zero-stage", want, "--ds-config", str(root / "launch" / "ds_config.json")])
        assert deepspeed_config(cfg, 8)["zero_optimization"]["stage"] == int(want)
    assert stage == "0"


@pytest.mark.parametrize("argv,match", [
    (["--data", "d", "--mask-ratio", "1.5"], r"--mask-ratio=1\.5: expected a value in \(0, 1\)"),
    (["--data", "d", "--steps", "0"], r"--steps=0: expected an integer >= 1"),
    (["--data", "d", "--zero-stage", "3"], r"--zero-stage=3"),
    (["--steps", "5"], r"--data='': expected a manifest"),
    (["--data", "d", "--plot-every", "10"], r"--plot-every=10: expected 0, or a multiple of --val-every"),
    (["--data", "d", "--plot-every", "6", "--val-every", "4"], r"--plot-every=6: expected 0, or a multiple"),
    (["--data", "d", "--lr", "0"], r"--lr=0\.0: expected a finite learning rate > 0"),
    (["--data", "d", "--lr", "inf"], r"--lr=inf: expected a finite learning rate > 0"),
    (["--data", "d", "--weight-decay", "-1"], r"--weight-decay=-1\.0: expected a finite value >= 0"),
    (["--data", "d", "--weight-decay", "nan"], r"--weight-decay=nan: expected a finite value >= 0"),
    (["--data", "d", "--grad-clip", "inf"], r"--grad-clip=inf: expected a finite value >= 0"),
])
def test_bad_options_are_named(argv, match):
    with pytest.raises(ValueError, match=match):
        parse_config(argv)


def test_unknown_config_key_is_named(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"data": "d", "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        parse_config(["--config", str(tmp_path / "c.json")])


def test_resume_refusals_name_what_changed():
    from himae_dist.checkpointer import resume_refusal
    from himae_dist.config import schedule_params

    def sched(*argv, world=2):
        return schedule_params(parse_config(["--data", "d", *argv]), world)

    saved = sched("--zero-stage", "1")
    assert resume_refusal(saved, sched("--zero-stage", "1"), False) == ({}, None)
    changed, why = resume_refusal(saved, sched("--zero-stage", "1", "--steps", "2000", "--lr", "5e-4"), False)
    assert changed == {"steps": (1000, 2000), "warmup_steps": (100, 200), "lr": (1e-3, 5e-4)}
    assert "--allow-schedule-change" in why
    assert resume_refusal(saved, sched("--zero-stage", "1", "--precision", "bf16"), True)[1] is None
    # what "auto" resolved to is recorded: auto on a bf16 GPU == bf16; the same flags on a CPU are a change
    gpu = schedule_params(parse_config(["--data", "d"]), 2, precision="bf16", loss_impl="fused")
    same = schedule_params(parse_config(["--data", "d", "--precision", "bf16", "--loss-impl", "fused"]), 2,
                           precision="bf16", loss_impl="fused")
    assert resume_refusal(gpu, same, False) == ({}, None)
    cpu = schedule_params(parse_config(["--data", "d"]), 2, precision="fp32", loss_impl="reference")
    assert resume_refusal(gpu, cpu, False)[0] == {"precision": ("bf16", "fp32"), "loss_impl": ("fused", "reference")}
    for argv, world, key in ((("--zero-stage", "1"), 4, "world_size"), (("--zero-stage", "0"), 2, "zero_stage"),
                             (("--zero-stage", "1", "--channels", "8,16"), 2, "channels")):
        changed, why = resume_refusal(saved, sched(*argv, world=world), True)  # refused even when allowed
        assert f"'{key}'" in why and "start a fresh --out" in why, (key, why)
        # a run from before ZeRO 0 became the default names the way to resume it
        assert ("--zero-stage 1" in why and "ZERO_STAGE=1" in why) == (key == "zero_stage"), why
    stage0 = sched()  # ZeRO 0 keeps no per-rank optimizer partitions: another world size is allowed
    assert resume_refusal(stage0, sched(world=3), True)[1] is None
    old = {k: v for k, v in stage0.items() if k not in ("precision", "channels")}  # an older run state
    assert resume_refusal(old, sched("--precision", "bf16"), False) == ({}, None)


def test_help_documents_every_flag_with_choices_and_defaults():
    import dataclasses

    from himae_dist.config import TrainConfig, build_parser

    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in text and f.metadata["help"], flag
    assert "--precision {auto,fp32,bf16}" in text and "(default: auto)" in text
    assert "--strict-data [{true,false}]" in text and "--dry-run" in text
    assert "(default: 16,32,64,128,256)" in text and "TOML table [optim]" in text
    assert text.startswith("usage: himae-train")


def test_strict_booleans_name_the_flag():
    assert parse_config(["--data", "d", "--strict-data", "YES", "--compile", "off", "--verify-data"]).strict_data
    cfg = parse_config(["--data", "d", "--compile", "off", "--verify-data"])
    assert (cfg.compile, cfg.verify_data) == (False, True)  # a bare boolean flag means true
    with pytest.raises(ValueError, match=r"^argument --strict-data: expected true or false .*got 'ture'"):
        parse_config(["--data", "d", "--strict-data", "ture"])
    with pytest.raises(ValueError, match=r"argument --channels: expected comma-separated integers"):
        parse_config(["--data", "d", "--channels", "16,x"])
    with pytest.raises(ValueError, match=r"--precision=.bf32.: expected one of auto, fp32, bf16"):
        parse_config(["--data", "d", "--precision", "bf32"])


@pytest.mark.parametrize("values,match", [
    ({"allow_schedule_change": "false"}, r"key 'allow_schedule_change' = \"false\": expected true or false"),
    ({"steps": "5"}, r"key 'steps' = \"5\": expected an integer"),
    ({"steps": 5.5}, r"key 'steps' = 5.5: expected an integer"),
    ({"channels": 16}, r"key 'channels' = 16: expected a list of integers"),
    ({"lr": True}, r"key 'lr' = true: expected a number"),
    ({"storage_options": "anon"}, r"key 'storage_options' = \"anon\": expected a table/object"),
])
def test_wrongly_typed_config_values_name_the_file_and_key(tmp_path, values, match):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": "d", **values}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
        parse_config(["--config", str(path)])


def test_a_truncated_config_file_is_named(tmp_path):
    (tmp_path / "c.json").write_text('{"data": "d", ')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c.json")) + r": not valid JSON \(Expecting"):
        parse_config(["--config", str(tmp_path / "c.json")])
    (tmp_path / "c.toml").write_text("[optim]\nsteps = ")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "c.toml")) + r": not valid TOML"):
        parse_config(["--config", str(tmp_path / "c.toml")])
    with pytest.raises(ValueError, match=r"--config .*missing.toml: cannot read it"):
        parse_config(["--config", str(tmp_path / "missing.toml")])


def test_toml_config_with_sections(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndata = "s3://b/shards"\nstrict_data = true\n\n[model]\nchannels = [8, 16]\n\n'
                    '[optim]\nsteps = 50\nlr = 5e-4\n\n[checkpoint]\nresume = "never"\n\n[log]\nlog_every = 5\n')
    cfg = parse_config(["--config", str(path), "--lr", "1e-4"])
    assert (cfg.data, cfg.strict_data, cfg.channels, cfg.steps, cfg.lr, cfg.resume, cfg.log_every) == \
        ("s3://b/shards", True, (8, 16), 50, 1e-4, "never", 5)
    assert isinstance(cfg.lr, float) and parse_config(["--config", str(path)]).lr == 5e-4
    for text, match in (('[optim]\nlog_every = 5\n', r"key 'log_every' belongs in \[log\], not \[optim\]"),
                        ('steps = 5\n', r"'steps' is not a table .* \('steps' belongs in \[optim\]\)"),
                        ('[optim]\nstep = 5\n', r"unknown config key\(s\) \[optim\] 'step'"),
                        ('[training]\nsteps = 5\n', r"'training' is not a table of this config"),
                        ('[data]\ndata = "d"\nstrict_data = "false"\n',
                         r"key 'strict_data' = \"false\": expected true")):
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
            parse_config(["--config", str(path)])


def test_a_runs_config_json_is_read_back(tmp_path):
    from himae_dist.config import resolved

    cfg = parse_config(["--data", "d", "--channels", "8,16", "--storage-options", '{"anon": true}', "--steps", "7"])
    (tmp_path / "config.json").write_text(resolved(cfg))
    assert parse_config(["--config", str(tmp_path / "config.json")]) == cfg


def test_saved_configs_hold_no_secret_and_are_not_reused_with_the_placeholder(tmp_path):
    from data_prep.storage import redact_argv, redact_secrets
    from himae_dist.config import resolved

    opts = {"key": "K1", "secret": "S1", "client_kwargs": {"endpoint_url": "http://u:P@ss1@h:9000", "region_name": "r"}}
    cfg = parse_config(["--data", "s3://b/d", "--storage-options", json.dumps(opts), "--export-url", "ftp://u:P2@h/x"])
    text = resolved(cfg)
    assert not any(s in text for s in ("K1", "S1", "P@ss1", "P2", "ss1@")) and '"region_name": "r"' in text
    assert "http://u:<redacted>@h:9000" in text and "ftp://u:<redacted>@h/x" in text
    # a password (or user name) typed with '/' or '@' unescaped; where ambiguous (an '@' in the path), more goes
    for url, shown in (("https://u:pa/ss@h/x", "https://u:<redacted>@h/x"),
                       ("https://u:2024/secret@h/x", "https://u:<redacted>@h/x"),
                       ("https://u:p@ss/w0rd@h/x", "https://u:<redacted>@h/x"),
                       ("https://me@corp.com:tok3n@git.host/x", "https://me@corp.com:<redacted>@git.host/x"),
                       ("s3://b/k?r=1http://u:p@h/y", "s3://b/k?r=1http://u:<redacted>@h/y"),
                       ('{"sep":"://","url":"http://u:pw@h"}', '{"sep":"://","url":"http://u:<redacted>@h"}'),
                       ("x ://https://u:tok3n@h/x", "x ://https://u:<redacted>@h/x"),
                       ("s3://bucket/a:b@c", "s3://bucket/a:b@c"), ("s3://bucket/data@v2/x", "s3://bucket/data@v2/x"),
                       ("http://u:p@h/a@b", "http://u:<redacted>@b"), ("http://h:8080/path@x", "http://h:<redacted>@x")):
        assert redact_secrets(f"see {url} now") == f"see {shown} now"

    argv = ["--storage-opt", json.dumps(opts), "--export-url=https://u:P3@h/x", f"--storage-options={json.dumps(opts)}"]
    assert not any(s in " ".join(redact_argv(argv)) for s in ("K1", "S1", "P@ss1", "P3"))  # W&B's command line
    (tmp_path / "config.json").write_text(text)  # a run's saved config, given back as --config
    with pytest.raises(ConfigError, match=r"the config holds '<redacted>' where a credential or URL password was"):
        parse_config(["--config", str(tmp_path / "config.json")])


def test_sources_from_toml_and_data_flags_that_replace_them(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\n[[data.sources]]\nurl = "/a"\nweight = 0.7\n[[data.sources]]\nurl = "/b"\nweight = 0.3\n'
                    '[checkpoint]\nout = "/tmp/x"\n')
    assert parse_config(["--config", str(toml)]).data_sources() == [("/a", 0.7), ("/b", 0.3)]
    # a flag overrides the file: --data on the command line replaces its sources
    assert parse_config(["--config", str(toml), "--data", "/c"]).data_sources() == [("/c", 1.0)]
    assert parse_config(["--config", str(toml), "--data", "/c", "--data", "/d", "--weights", "3,1"]
                        ).data_sources() == [("/c", 3.0), ("/d", 1.0)]
    with pytest.raises(ConfigError, match=r"--weights=1.0: 1 weight\(s\) for 2 --data source\(s\)"):
        parse_config(["--data", "/c", "--data", "/d", "--weights", "1", "--out", "/tmp/x"])
    for bad in ("0,1", "nan,1", "-1,1"):
        with pytest.raises(ConfigError, match=r"--weights=.*expected numbers > 0"):
            parse_config(["--data", "/c", "--data", "/d", f"--weights={bad}", "--out", "/tmp/x"])
    with pytest.raises(ConfigError, match=r"sources\[1\]\.weight = 0: expected a number > 0"):
        parse_config(["--sources", '[{"url": "/a"}, {"url": "/b", "weight": 0}]', "--out", "/tmp/x"])
    bad_toml = tmp_path / "bad.toml"  # a bad [[data.sources]] table: the error names the file
    bad_toml.write_text('[data]\n[[data.sources]]\nurl = "/a"\n[[data.sources]]\nurl = "/b"\nweight = -2\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad_toml))}: \[data\] sources\[1\]\.weight = -2: "):
        parse_config(["--config", str(bad_toml), "--out", "/tmp/x"])
    bad_toml.write_text('[data]\nsources = []\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad_toml))}: \[data\] sources = \[\]: expected at least one"):
        parse_config(["--config", str(bad_toml), "--out", "/tmp/x"])
