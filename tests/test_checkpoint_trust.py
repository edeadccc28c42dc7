"""Checkpoint files as untrusted input: a planted pickle never runs, a damaged newest tag is skipped for
the newest good one, and DeepSpeed's own loader reads weights-only (ZeRO 1 included)."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from himae_dist.checkpoint import load_himae
from himae_dist.checkpointer import plan_resume
from himae_dist.run_state import RUN_STATE
from tests.ports import free_port
from tests.test_train_distributed import _run_trainer
from tests.test_train_resume import TWO_NODE_ARGS, _final, _ok

MODEL_STATES = "mp_rank_00_model_states.pt"


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker, forge_records=True):
    """Replace `path` with a pickle that runs code; `forge_records`: also rewrite the run state's size and
    sha256 of it (as someone who can write --out could), so only the weights-only reading stands in the way."""
    torch.save({"module": _Evil(marker), "state_dict": _Evil(marker)}, path)
    run_state_file = path.parent / RUN_STATE
    if forge_records and path.name != RUN_STATE:
        state = torch.load(run_state_file, weights_only=True)
        state["files"][path.name] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        torch.save(state, run_state_file)


@pytest.mark.xdist_group("one_node_run")
@pytest.mark.parametrize("victim,says", [
    (RUN_STATE, r"cannot be read as a weights-only checkpoint file \(UnpicklingError: .*GLOBAL posix\.system\)"),
    (MODEL_STATES, r"\d+ bytes, but \d+ were saved"),  # its record gives it away
])
def test_a_planted_pickle_in_a_tag_is_refused_by_name_and_never_runs(one_node_run, tmp_path, victim, says):
    """A planted file whose record was forged too gets past these checks, and DeepSpeed's own loading refuses
    it (test_deepspeeds_own_loader_reads_weights_only_zero1_included)."""
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(one_node_run / "checkpoints", ckpt)
    tag, marker = ckpt / "step0000012", tmp_path / "MARKER"
    assert set(torch.load(tag / RUN_STATE, weights_only=True)["files"]) == {MODEL_STATES}  # recorded at save
    _plant(tag / victim, marker, forge_records=False)
    with pytest.raises(ValueError, match=rf"--resume .*step0000012: .*step0000012/{victim}: {says}"):
        plan_resume(tmp_path / "elsewhere" / "checkpoints", str(tag))
    assert plan_resume(ckpt, "auto") == ckpt / "step0000008"  # the newest good one
    assert not marker.exists()


@pytest.mark.xdist_group("one_node_run")
def test_a_malformed_run_state_or_a_fifo_is_one_line_not_a_traceback_or_a_hang(one_node_run, tmp_path):
    def forged(change):
        tag = tmp_path / f"t{len(list(tmp_path.iterdir()))}" / "step0000008"
        shutil.copytree(one_node_run / "checkpoints" / "step0000008", tag)
        state = torch.load(tag / RUN_STATE, weights_only=True)
        change(state, tag)
        torch.save(state, tag / RUN_STATE)
        return tag

    for change, says in [
        (lambda st, tag: st["files"].update({MODEL_STATES: [1, 2]}), rf"{RUN_STATE} is a list, expected a dict"),
        (lambda st, tag: st["files"].update({3: {}}), r"'files' record names 3, not a file of the tag folder"),
        (lambda st, tag: st.pop("ranks"), r"not a run state \(expected a dict with an integer 'step'"),
        # a run state from before records were kept, and a FIFO where DeepSpeed reads: it would block a rank
        (lambda st, tag: (st.pop("files"), (tag / MODEL_STATES).unlink(), os.mkfifo(tag / MODEL_STATES)),
         rf"{MODEL_STATES}: not a regular file \(a symlink, folder, FIFO or device\)"),
    ]:
        tag = forged(change)
        with pytest.raises(ValueError, match=rf"^--resume {tag}: {tag}/.*{says}"):
            plan_resume(tmp_path / "elsewhere" / "checkpoints", str(tag))


@pytest.mark.xdist_group("one_node_run")
def test_a_flipped_bit_is_named_and_the_probe_or_init_from_refuse_that_tag_too(one_node_run, tmp_path):
    tag = tmp_path / "step0000008"
    shutil.copytree(one_node_run / "checkpoints" / "step0000008", tag)
    data = bytearray((tag / MODEL_STATES).read_bytes())
    data[len(data) // 2] ^= 1  # same size; it may even still load
    (tag / MODEL_STATES).write_bytes(bytes(data))
    says = rf"{tag / MODEL_STATES}: sha256 differs from the one recorded at save \(damaged or replaced\)"
    with pytest.raises(ValueError, match=rf"^--resume {tag}: {says}$"):
        plan_resume(tmp_path / "elsewhere" / "checkpoints", str(tag))
    with pytest.raises(ValueError, match=rf"^{says}$"):
        load_himae(tag)


@pytest.mark.xdist_group("one_node_run")
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_if_it_never_was(one_node_run, tiny_shards,
                                                                                 tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(one_node_run, out)
    newest = out / "checkpoints" / "step0000012" / MODEL_STATES
    size = newest.stat().st_size
    with open(newest, "r+b") as fh:  # a copy cut short: the file is still there, only shorter
        fh.truncate(size // 2)
    (out / "himae_final.pt").unlink()
    with pytest.raises(ValueError, match=rf"--resume .*step0000012: .*{MODEL_STATES}: {size // 2} bytes, but {size} "
                                         rf"were saved \(truncated or replaced\)"):
        plan_resume(tmp_path / "other" / "checkpoints", str(newest.parent))
    log = _ok(_run_trainer(tiny_shards, out, TWO_NODE_ARGS))
    assert (f"warning: not resuming from {newest.parent}: {newest}: {size // 2} bytes, but {size} were saved "
            f"(truncated or replaced); moved to step0000012.damaged") in log
    assert f"resumed from {out / 'checkpoints' / 'step0000008'} at step 8" in log
    a, b = _final(out), _final(one_node_run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # steps 9-12 trained again, bitwise as the first time
    assert newest.stat().st_size == size and plan_resume(out / "checkpoints", "auto") == newest.parent  # saved anew
    aside = out / "checkpoints" / "step0000012.damaged" / MODEL_STATES  # kept for a look, never pruned as a "newest"
    assert aside.stat().st_size == size // 2

    tags = sorted(p.name for p in (out / "checkpoints").glob("step???????"))
    for tag in tags:  # every checkpoint damaged: refused, not a silent fresh start
        (out / "checkpoints" / tag / MODEL_STATES).write_bytes(b"")
    with pytest.raises(ValueError, match=rf"no checkpoint in .*checkpoints can be resumed from \({', '.join(tags[::-1])}: "
                                         r"damaged, see the warnings above\)"):
        plan_resume(out / "checkpoints", "auto")


ENGINE_LOAD = r"""
import os, sys, torch, torch.distributed as dist
import deepspeed
from himae_dist.checkpoint_files import CheckpointFileError
from himae_dist.config import parse_config
from himae_dist.model import HiMAE
from himae_dist.train import _skip_shm_comm_build, build_engine
from tests.test_checkpoint_trust import _plant
folder, marker = sys.argv[1], sys.argv[2]
_skip_shm_comm_build()  # as the trainer: no JIT build of DeepSpeed's CPU comm op
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
cfg = parse_config(["--data", "d", "--channels", "8,16", "--zero-stage", "1"])
engine, optimizer, scheduler, _ = build_engine(deepspeed, cfg, HiMAE(1, (8, 16)), torch.device("cpu"), 1)
engine.backward(engine(torch.randn(2, 1, 40)).pow(2).mean())  # an optimizer state to save
engine.step()
engine.save_checkpoint(folder, tag="t")
before = [p.detach().clone() for p in engine.module.parameters()]
for p in engine.module.parameters():
    p.data.zero_()
engine.load_checkpoint(folder, tag="t")
assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
print("LOADED", engine.global_steps, sorted(os.listdir(os.path.join(folder, "t"))))
for name in sorted(os.listdir(os.path.join(folder, "t"))):
    path = os.path.join(folder, "t", name)
    with open(path, "rb") as fh:
        saved = fh.read()
    _plant(__import__("pathlib").Path(path), marker, forge_records=False)
    try:
        engine.load_checkpoint(folder, tag="t")
    except CheckpointFileError as e:
        print("REFUSED", e)
    with open(path, "wb") as fh:
        fh.write(saved)
dist.destroy_process_group()
"""


def test_deepspeeds_own_loader_reads_weights_only_zero1_included(tmp_path):
    """The engine the trainer builds loads a real ZeRO-1 checkpoint (DeepSpeed's types allowed), and refuses
    a planted pickle in each of its files before any code in it runs: even past the run-state checks."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    folder, marker = tmp_path / "ckpt", tmp_path / "MARKER"
    proc = subprocess.run([sys.executable, "-c", ENGINE_LOAD, str(folder), str(marker)], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [MODEL_STATES, "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert f"LOADED 1 {files}" in proc.stdout, proc.stdout
    for victim in files:
        assert f"REFUSED {folder / 't' / victim}: cannot be read as a weights-only checkpoint file" in proc.stdout
    assert not marker.exists()
    assert not (tmp_path / "torch_extensions").exists()  # nothing was compiled (a fresh CI machine would take minutes)
