"""Checkpoint bookkeeping that needs no process group: which tags count, pruning, metrics truncation."""

import json

import torch

from himae_dist import run_state


def _tag(ckpt, step, complete=True):
    d = ckpt / run_state.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        torch.save({"step": step}, d / run_state.RUN_STATE)


def test_half_written_checkpoint_is_never_chosen_and_pruning_keeps_the_newest_complete(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for s in (5, 10, 15):
        _tag(ckpt, s)
    _tag(ckpt, 20, complete=False)  # killed while saving: DeepSpeed's files, no run state
    assert run_state.complete_tags(ckpt) == ["step0000005", "step0000010", "step0000015"]
    assert run_state.prune(ckpt, keep=2) == ["step0000005"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step0000010", "step0000015", "step0000020"]
    assert run_state.complete_tags(tmp_path / "nothing") == []


def test_metrics_are_truncated_to_the_resumed_step(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (5, 10, 15, 20)))
    run_state.truncate_metrics(m, 10)
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [5, 10]


def test_a_torn_metrics_line_is_dropped_with_a_warning_not_a_blocked_resume(tmp_path, capsys):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 5, "loss": 0.2}\n{"step": 10, "loss": 0.1}\n{"step": 15, "lo')  # killed mid-append
    run_state.truncate_metrics(m, 15)
    assert m.read_text() == '{"step": 5, "loss": 0.2}\n{"step": 10, "loss": 0.1}\n'
    assert f"{m} line 3 is not a metrics record" in capsys.readouterr().out


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(run_state.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    run_state.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]
