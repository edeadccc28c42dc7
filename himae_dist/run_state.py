"""What a checkpoint must hold beyond DeepSpeed's files for an exact, safe resume, and how ranks agree on it.

DeepSpeed 0.19.8 writes `latest` and the model states from global rank 0 only and keeps
`client_state` from one rank. So: rank 0 picks the checkpoint and broadcasts it; every rank
proves it can see it (node-local `--out` on several nodes is refused, not silently split);
every rank's loader and RNG state is gathered into `himae_run_state.pt`, written by rank 0 after
all of DeepSpeed's files, atomically, with their sizes and sha256 (`checkpoint_files`). A tag folder without that file is half-written and is
never resumed from. `latest` (DeepSpeed's pointer, read by `load_himae`) is rewritten after it.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.atomic_write import atomic_path
from himae_dist.checkpoint_files import RUN_STATE, file_records
_TAG = re.compile(r"^step(\d{7})$")


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def is_tag(name: str) -> bool:
    """A checkpoint tag folder's name (stepNNNNNNN)."""
    return bool(_TAG.match(name))


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags whose run state was written (so all of DeepSpeed's files were), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / RUN_STATE).is_file()]
    return sorted(tags)


def broadcast(obj: object) -> object:
    """Rank 0's value of obj on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_run_state(ckpt_dir: Path, step: int, loader: dict, schedule: dict, rank: int, extra: dict | None = None) -> None:
    """Collective: gather every rank's loader + RNG state (+ extra) and the size and sha256 of the files its
    DeepSpeed save wrote; rank 0 writes them, then `latest`."""
    tag = tag_for(step)
    mine = {"rank": rank, "loader": loader, "rng": rng_state(), **(extra or {})}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, file_records(ckpt_dir / tag, rank)))
    if rank == 0:
        ranks, files = [r for r, _ in gathered], {k: v for _, f in gathered for k, v in f.items()}
        obj = {"step": step, "schedule": schedule, "ranks": ranks, "files": files}
        with atomic_path(ckpt_dir / tag / RUN_STATE) as tmp:
            torch.save(obj, tmp)
        with atomic_path(ckpt_dir / "latest") as tmp:
            tmp.write_text(tag)


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete tag folders older than the `keep` newest complete ones; returns the deleted tags."""
    tags = complete_tags(ckpt_dir)
    if len(tags) <= keep:
        return []
    oldest_kept = tags[-keep]
    gone = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and p.name < oldest_kept]
    for t in gone:
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
    return sorted(gone)


def _ranks_without(ok: bool) -> list[str]:
    """Collective: "rank R on HOST" for every rank whose `ok` is False."""
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (ok, socket.gethostname()))
    return [f"rank {r} on {host}" for r, (ok_r, host) in enumerate(seen) if not ok_r]


def check_shared_out(out: Path, rank: int, wait_s: float = 30.0) -> None:
    """Collective: refuse an --out that is not one folder for every rank (node-local disks on several nodes).

    Checked at start, not at the first resume days later: rank 0 writes a file with a fresh name
    there and every rank must read it back. A fresh name has no stale negative lookup cached on
    NFS-like filesystems; a rank still not seeing it after `wait_s` is a clear error.
    """
    token = broadcast(uuid.uuid4().hex if rank == 0 else None)
    probe = out / f".himae_shared_check_{token}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(probe) as tmp:
            tmp.write_text(token)
    dist.barrier()
    deadline = time.monotonic() + wait_s
    while not (ok := probe.is_file() and probe.read_text() == token) and time.monotonic() < deadline:
        time.sleep(0.5)
    blind = _ranks_without(ok)
    if rank == 0:
        probe.unlink(missing_ok=True)
    if blind:
        raise ValueError(
            f"--out {out} is not the same folder on every node: {', '.join(blind)} cannot see a file rank 0 wrote "
            f"there within {wait_s:g} s. Checkpoints must be on storage every node sees (a shared filesystem) for "
            f"a resume to work; exported weights can also go to s3:// with --export-url"
        )


def choose_resume(ckpt_dir: Path, rank: int, pick=None) -> tuple[Path | None, dict | None]:
    """Collective: the checkpoint tag folder rank 0 picks (`pick()`, default its newest complete tag in
    `ckpt_dir`; may raise ValueError) and its run state, after every rank showed it sees the files.
    A refusal or an unreadable run state is raised on every rank alike."""
    tag_dir, state, problem = None, None, None
    if rank == 0:
        try:
            if pick is not None:
                tag_dir = pick()
            else:
                tags = complete_tags(ckpt_dir)
                tag_dir = ckpt_dir / tags[-1] if tags else None
            if tag_dir is not None:
                state = torch.load(tag_dir / RUN_STATE, map_location="cpu", weights_only=True)
        except ValueError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 (a damaged run state: named on every rank instead of a hang)
            where = tag_dir / RUN_STATE if tag_dir is not None else ckpt_dir
            problem = f"{where}: cannot read the run state ({type(e).__name__}: {e})"
    tag_dir, problem = broadcast((tag_dir, problem))
    if problem:
        raise ValueError(problem)
    if tag_dir is None:
        return None, None
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    blind = _ranks_without(model_file.is_file())
    if blind:
        raise ValueError(
            f"checkpoint {tag_dir} (rank 0's choice) is not visible to {', '.join(blind)}: --out (and --resume "
            f"PATH) must be a folder every node sees (shared filesystem), or start a fresh --out"
        )
    return tag_dir, broadcast(state)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records after `step` (they belong to the run that was interrupted), atomically.

    A line that does not parse (torn by a crash mid-append) is dropped with a warning naming it,
    instead of blocking every resume.
    """
    if not path.is_file():
        return
    keep = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            print(f"[himae-train] warning: {path} line {i} is not a metrics record ({e}); dropped", flush=True)
            continue
        if rec["step"] <= step:
            keep.append(ln)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))
