"""A checkpoint tag folder's files as untrusted input: read weights-only, checked against their records.

Anyone who can write --out (or hand over a tag folder for --resume PATH) controls these files.
DeepSpeed 0.19.8 reads its own files through `TorchCheckpointEngine.load`, which unpickles
(`torch.load(weights_only=False)`): a planted file runs code before anything is checked.
`WeightsOnlyCheckpointEngine` replaces that engine on every trainer's DeepSpeed engine; it reads
with `weights_only=True` and allows exactly the non-tensor types DeepSpeed's own files hold
(`DEEPSPEED_TYPES`, ZeRO stages 1-2). Anything else is refused with one line naming the file.

Damage is caught before DeepSpeed reads anything: each save records every file's size and sha256
in the run state (`file_records`, each rank its own files), and `tag_problem` compares them, so
`--resume auto` can skip a damaged tag for the newest good one. The records are
a check against damage (a truncated copy, a full disk, bit rot), not against an attacker who
rewrites the run state too; weights-only reading is what stops code from running.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import torch

RUN_STATE = "himae_run_state.pt"  # every rank's loader and RNG state (run_state), written after the files


def deepspeed_types() -> list[type]:
    """The classes (besides tensors and plain containers) that DeepSpeed 0.19.8's ZeRO 1-2 optimizer
    files pickle; found with `torch.serialization.get_unsafe_globals_in_checkpoint` on real saves."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read weights-only; the message names it."""


def load_weights_only(path: str | os.PathLike, map_location=None, deepspeed: bool = True) -> object:
    """torch.load(path) with weights_only=True and (`deepspeed`) DeepSpeed's own types allowed, nothing else."""
    try:
        with torch.serialization.safe_globals(deepspeed_types() if deepspeed else []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # the file could not be read (I/O, permission): no verdict on what it holds
    except Exception as e:  # noqa: BLE001 (a refused type, a truncated or corrupt file: named, one line)
        raise CheckpointFileError(f"{path}: cannot be read as a weights-only checkpoint file ({_reason(e)}); it holds "
                                  f"something other than tensors and DeepSpeed's own types, or is damaged") from None


def _reason(e: Exception) -> str:
    """The part of torch.load's error that says what was wrong (not its advice to load unsafely)."""
    text = " ".join(str(e).split())
    refused = re.search(r"(Unsupported global: GLOBAL \S+|Trying to load unsupported GLOBAL \S+|Unsupported operand \S+)",
                        text)
    if refused:
        return f"{type(e).__name__}: {refused.group(1)}"
    if isinstance(e, EOFError) or not text:
        return f"{type(e).__name__}: the file ends early (empty or truncated)"
    return f"{type(e).__name__}: {text[:200]}"


def use_weights_only_loading(engine) -> None:
    """Make a DeepSpeed engine read every checkpoint file through `load_weights_only`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # another engine: our override would not hold
        raise RuntimeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)  # as DeepSpeed builds its own


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_records(tag_dir: Path, rank: int) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}} of the files this rank's DeepSpeed save wrote into the tag folder
    (rank 0: the model states; every rank: its own ZeRO partition). Each rank hashes its own, as its
    save returns: no rank reads another node's fresh files (a shared filesystem's listing may lag)."""
    mine = [p for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != RUN_STATE
            and ((rank == 0 and p.name.startswith("mp_rank_")) or f"zero_pp_rank_{rank}_" in p.name)]
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in mine}


def record_problem(f: Path, rec: object) -> str | None:
    """Why file `f` is not the one its record (at save) describes, or None."""
    if not isinstance(rec, dict):
        return f"{f}: its record in {RUN_STATE} is a {type(rec).__name__}, expected a dict"
    if not f.is_file():
        return f"{f}: missing (the run state recorded it at save)"
    size = f.stat().st_size
    if size != rec.get("bytes"):
        return f"{f}: {size} bytes, but {rec.get('bytes')} were saved (truncated or replaced)"
    if _sha256(f) != rec.get("sha256"):
        return f"{f}: sha256 differs from the one recorded at save (damaged or replaced)"
    return None


def tag_problem(tag_dir: Path, state: dict) -> str | None:
    """Why this tag folder must not be resumed from (one line naming the file), or None.

    Every file the save recorded must be there with its size and sha256. A run state written
    before records were kept has none: then each .pt file is read weights-only instead. (Reading
    is what stops code from running, for every file DeepSpeed loads: `use_weights_only_loading`.)"""
    for f in sorted(tag_dir.iterdir()):  # DeepSpeed reads whatever is at its names: a FIFO would block a rank
        if not stat.S_ISREG(f.lstat().st_mode):
            return f"{f}: not a regular file (a symlink, folder, FIFO or device); a checkpoint holds plain files only"
    records = state.get("files")
    if records is None:
        for f in sorted(tag_dir.glob("*.pt")):
            if f.name != RUN_STATE:
                try:
                    load_weights_only(f, map_location="cpu")
                except CheckpointFileError as e:
                    return str(e)
        return None
    if not isinstance(records, dict) or not records:
        return f"{tag_dir / RUN_STATE}: its 'files' record is {records!r}, expected the files the save wrote"
    for name, rec in sorted(records.items(), key=lambda kv: str(kv[0])):
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            return f"{tag_dir / RUN_STATE}: its 'files' record names {name!r}, not a file of the tag folder"
        if problem := record_problem(tag_dir / name, rec):
            return problem
    return None
