"""Checkpointing as one component: which checkpoint to resume, the resume rules, saves, exported
weights, pruning (as torchtitan's CheckpointManager: the training loop only calls `resume`,
`save` and `finish`).

Which checkpoint a start loads (`plan_resume`, `--resume`): auto, the newest complete one in
--out whose files check out (`checkpoint_files`: damaged newer ones are named and skipped);
never, none (an --out that holds checkpoints is refused, so a run is never mixed with an older
one's files); PATH, that tag folder. A torchrun restart (attempt > 0) of the same job
always goes on from its own newest checkpoint. `--init-from WEIGHTS` gives a fresh start (step 0,
its own schedule) the weights of any checkpoint `load_himae` reads (`init_weights`).

Files under --out: `checkpoints/stepNNNNNNN/` (DeepSpeed's files + `himae_run_state.pt`, every
rank's loader, RNG and log state; `run_state` says why), `weights/step_NNNNNNN.pt` and
`himae_final.pt` (plain fp32 weights, pooled BatchNorm statistics), `config.json` and
`ds_config.json` (as used), optionally mirrored to --export-url.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from data_prep.atomic_write import atomic_path
from data_prep.storage import StorageError, redact_secrets
from himae_dist import run_state, weights_export
from himae_dist.bn_sync import digest as bn_digest
from himae_dist.bn_sync import restore_batchnorm_stats, sync_batchnorm_stats
from himae_dist.checkpoint import load_himae, save_weights
from himae_dist.checkpoint_files import RUN_STATE, CheckpointFileError, load_weights_only, tag_problem
from himae_dist.config import TrainConfig, lr_lambda, resolved
from himae_dist.guards import check_weights_finite
from himae_dist.model import HiMAE
from himae_dist.streaming import LoaderState

_FIXED = ("in_chans", "channels", "zero_stage")  # the checkpoint's files cannot be loaded otherwise
_HOW_SPLIT = ("world_size", "grad_accum")  # may change while the global batch stays


def resume_refusal(saved: dict, now: dict, allow_change: bool) -> tuple[dict, str | None]:
    """(changed values {key: (saved, now)}, why the resume is refused or None).

    Keys a checkpoint does not record (an older run state) are not compared. The model shape and
    ZeRO stage never change on resume, nor the world size under ZeRO (its optimizer partitions
    are per rank); everything else may with --allow-schedule-change.
    """
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and _plain(saved[k]) != _plain(v)}
    if "global_batch" in saved:  # the data order and the schedule follow the global batch, not how it is split
        for k in _HOW_SPLIT:
            if k in changed and not (k == "world_size" and now["zero_stage"] > 0):
                del changed[k]
    fixed = {k: changed[k] for k in _FIXED if k in changed}
    if now["zero_stage"] > 0 and "world_size" in changed:
        fixed["world_size"] = changed["world_size"]
    if fixed:
        hint = ""
        if "zero_stage" in fixed:
            hint = f" (or resume it with --zero-stage {fixed['zero_stage'][0]}; in the launch scripts, ZERO_STAGE=" \
                   f"{fixed['zero_stage'][0]})"
        return changed, (f"cannot resume with {fixed} (saved, now): the model shape and ZeRO stage are fixed for a run, "
                         f"and so is the world size under ZeRO (optimizer partitions per rank); start a fresh --out"
                         f"{hint}")
    if changed and not allow_change:
        return changed, (f"trained with a different schedule (saved, now): {changed}; resume with the same flags, "
                         f"or pass --allow-schedule-change")
    return changed, None


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def plan_resume(ckpt_dir: Path, mode: str, restart: bool = False, set_aside: bool = False) -> Path | None:
    """Not collective (rank 0, or a dry run): the checkpoint tag folder this start loads under
    --resume `mode`, or None for step 0; a ValueError says why the start is refused and what to do.
    `restart`: a later attempt of the same torchrun job, which goes on from its own checkpoints.
    Every tag considered is checked first (`checkpoint_files.tag_problem`): auto skips a damaged one,
    saying which and why, for the newest good one; a damaged PATH is refused naming the file.
    `set_aside` (a real start, not a dry run): a skipped tag is renamed `stepNNNNNNN.damaged`, so
    pruning never counts it as one of the checkpoints to keep, and `latest` names the chosen one."""
    tags = run_state.complete_tags(ckpt_dir)
    out = ckpt_dir.parent
    if mode == "auto" or (mode == "never" and (not tags or restart)):
        return _newest_good(ckpt_dir, tags, set_aside=set_aside)
    if mode == "never":
        raise ValueError(f"--resume never: --out {out} already holds checkpoints (newest {tags[-1]}); pick a "
                         f"fresh --out for a new run, remove {ckpt_dir} to start over there, or --resume auto to "
                         f"continue it")
    chosen = Path(mode)
    if not (chosen / RUN_STATE).is_file():
        found = run_state.complete_tags(chosen)
        hint = (f" such as {chosen / found[-1]}" if found else
                f" (its {RUN_STATE} is written last: a folder without it was never completely saved)")
        raise ValueError(f"--resume {mode}: not a complete checkpoint tag folder; expected auto, never or a tag "
                         f"folder{hint}")
    state, problem = _checked(chosen)
    if problem:
        raise ValueError(f"--resume {mode}: {problem}")
    chosen_tag = chosen.name if run_state.is_tag(chosen.name) else run_state.tag_for(state["step"])
    newer = [t for t in tags if (ckpt_dir / t).resolve() != chosen.resolve() and t >= chosen_tag]
    if newer and restart:  # this job's own saves since it resumed `chosen`
        return _newest_good(ckpt_dir, newer, fallback=chosen, set_aside=set_aside)
    if newer:
        raise ValueError(f"--resume {mode}: --out {out} holds later checkpoints {newer}, which a restart would "
                         f"resume instead; move them out of {ckpt_dir}, or resume into a fresh --out")
    return chosen


def _checked(tag_dir: Path) -> tuple[dict | None, str | None]:
    """(its run state, why it must not be resumed from or None). A file that cannot be read at all (an
    I/O error, a stale NFS handle, no permission) is no verdict on the tag: the start is refused, so a
    passing filesystem fault never makes a run fall back to an older checkpoint."""
    try:
        state = load_weights_only(tag_dir / RUN_STATE, map_location="cpu", deepspeed=False)
        if not _is_run_state(state):
            return None, (f"{tag_dir / RUN_STATE}: not a run state (expected a dict with an integer 'step' >= 0, a "
                          f"'schedule' dict and 'ranks', one dict with a 'loader' dict per rank)")
        return state, tag_problem(tag_dir, state)
    except CheckpointFileError as e:
        return None, str(e)
    except OSError as e:
        raise ValueError(f"{tag_dir}: cannot be read ({type(e).__name__}: {e}); not resuming from an older "
                         f"checkpoint over it: check the filesystem, then run again") from e


def _is_run_state(state: object) -> bool:
    """What the resume reads of a run state is there, of the right types (the file is input too)."""
    return (isinstance(state, dict) and isinstance(state.get("step"), int) and not isinstance(state["step"], bool)
            and state["step"] >= 0 and isinstance(state.get("schedule"), dict)
            and isinstance(state.get("ranks"), list) and len(state["ranks"]) > 0
            and all(isinstance(r, dict) and isinstance(r.get("loader"), dict) for r in state["ranks"]))


def _newest_good(ckpt_dir: Path, tags: list[str], fallback: Path | None = None, set_aside: bool = False) -> Path | None:
    """The newest of `tags` that checks out (each damaged newer one named in a warning, and renamed with
    `set_aside`), else `fallback`; None when there are no tags. Only damaged ones: refused (a fresh start
    would bury them)."""
    skipped, chosen = {}, fallback
    for t in reversed(tags):
        _, problem = _checked(ckpt_dir / t)
        if problem is None:
            chosen = ckpt_dir / t
            break
        skipped[t] = problem
    for t, problem in skipped.items():
        moved = ""
        if set_aside and chosen is not None:  # all damaged: left where they are, and refused below
            aside, n = ckpt_dir / f"{t}.damaged", 1
            while aside.exists():
                aside, n = ckpt_dir / f"{t}.damaged{n}", n + 1
            (ckpt_dir / t).rename(aside)
            moved = f"; moved to {aside.name}"
        print(f"[himae-train] warning: not resuming from {ckpt_dir / t}: {problem}{moved}", flush=True)
    if skipped and chosen is None:
        raise ValueError(f"no checkpoint in {ckpt_dir} can be resumed from ({', '.join(skipped)}: damaged, see the "
                         f"warnings above); move them out of {ckpt_dir} to start over, or --resume a good copy")
    if skipped and set_aside:  # DeepSpeed's pointer, read by load_himae: the newest tag left in --out
        left = run_state.complete_tags(ckpt_dir)
        if left:
            with atomic_path(ckpt_dir / "latest") as tmp:
                tmp.write_text(left[-1])
        else:
            (ckpt_dir / "latest").unlink(missing_ok=True)
    return chosen


def read_init_weights(cfg: TrainConfig) -> tuple[dict, str]:
    """Not collective: (state_dict, what it is) of --init-from, checked against this run's architecture."""
    try:
        model, info = load_himae(cfg.init_from, storage_options=cfg.storage_options)
    except (ValueError, FileNotFoundError, StorageError) as e:
        raise ValueError(f"--init-from {cfg.init_from}: {e}") from e
    arch = info["config"]
    if (arch.in_chans, tuple(arch.channels)) != (cfg.in_chans, tuple(cfg.channels)):
        raise ValueError(f"--init-from {cfg.init_from}: weights of HiMAE(in_chans={arch.in_chans}, channels="
                         f"{list(arch.channels)}), but this run builds in_chans={cfg.in_chans}, channels="
                         f"{list(cfg.channels)}; pass --in-chans {arch.in_chans} --channels "
                         f"{','.join(map(str, arch.channels))}")
    step = f", step {info['step']} of its run" if info.get("step") is not None else ""
    return model.state_dict(), f"{info['source']}{step}"


def init_weights(model: HiMAE, cfg: TrainConfig, rank: int) -> str | None:
    """Collective, before the engine is built (so ZeRO's fp32 partitions start from them too): rank 0
    reads --init-from and every rank loads the same weights; returns what they are, or None."""
    if not cfg.init_from:
        return None
    got, problem = None, None
    if rank == 0:
        try:
            got = read_init_weights(cfg)
        except ValueError as e:
            problem = str(e)
    got, problem = run_state.broadcast((got, problem))
    if problem:
        raise ValueError(problem)
    model.load_state_dict(got[0], strict=True)
    return got[1]


@dataclasses.dataclass
class Resumed:
    """Where this rank goes on from: the step, and its saved stream, log window and guard counts."""

    start: int = 0
    loader: dict | None = None  # the stream's LoaderState (every rank's failed reads), or None for a new stream
    stream_seed: int = 0
    window: dict | None = None
    nonfinite: float = 0.0  # this rank's dropped non-finite samples so far
    nonfinite_all: float = 0.0  # every rank's, summed


class Checkpointer:
    """Resume and save a run; every method is collective unless it says otherwise."""

    def __init__(self, engine, optimizer, scheduler, cfg: TrainConfig, out: Path, rank: int, world: int,
                 schedule: dict, extra: dict, ds_config: dict, attempt: int = 0, init_note: str | None = None):
        self.attempt = attempt  # > 0: a torchrun restart of this job (`plan_resume`)
        self.init_note = init_note  # the --init-from weights the model was built with, if any
        self.ds_config = ds_config  # as used
        self.engine, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.cfg, self.out, self.rank, self.world = cfg, out, rank, world
        self.schedule, self.extra = schedule, extra  # what a checkpoint records; what exported weights carry
        self.dir = out / "checkpoints"
        self.exporter = (weights_export.Exporter(out, cfg.export_url, cfg.storage_options)
                         if cfg.export_url and rank == 0 else None)

    def check_export(self) -> str | None:
        """Rank 0, at start: why --export-url cannot be written, or None (bounded well below a collective's timeout)."""
        if self.exporter is None:
            return None
        try:
            self.exporter.check(timeout_s=self.cfg.collective_timeout_s / 3)
        except Exception as e:  # noqa: BLE001 (named, on every rank)
            return f"--export-url={self.cfg.export_url}: cannot write there: {type(e).__name__}: {e}"
        return None

    def resume(self) -> Resumed:
        """Load the checkpoint --resume picks (if any) and this rank's run state; then write
        config.json and ds_config.json (only now that the resume checks passed)."""
        res = self._resume()
        if self.rank == 0:
            with atomic_path(self.out / "config.json") as tmp:
                tmp.write_text(resolved(self.cfg) + "\n")
            with atomic_path(self.out / "ds_config.json") as tmp:
                tmp.write_text(json.dumps(self.ds_config, indent=2, sort_keys=True) + "\n")
        return res

    def _resume(self) -> Resumed:
        cfg, rank, world = self.cfg, self.rank, self.world
        tag_dir, saved = run_state.choose_resume(
            self.dir, rank, lambda: plan_resume(self.dir, cfg.resume, restart=self.attempt > 0, set_aside=True))
        if tag_dir is None:
            if rank == 0:  # a fresh start (or a restart before the first checkpoint): no stale records
                run_state.truncate_metrics(self.out / "metrics.jsonl", 0)
                if self.init_note:
                    print(f"[himae-train] initialised from {self.init_note}; a new schedule starts at step 0",
                          flush=True)
            return Resumed(stream_seed=cfg.seed)
        if rank == 0 and self.init_note:
            print(f"[himae-train] --init-from not used: resuming {tag_dir}", flush=True)
        changed, refusal = resume_refusal(saved["schedule"], self.schedule, cfg.allow_schedule_change)
        if refusal:
            raise ValueError(f"{tag_dir}: {refusal}")
        self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        start = self.engine.global_steps
        if start != saved["step"]:
            raise ValueError(f"{tag_dir}: DeepSpeed step {start} != run state step {saved['step']}")
        if changed:  # the optimizer state restored the old lr and weight decay: the new schedule from here on
            f = lr_lambda(cfg)
            self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
            self.scheduler.lr_lambdas = [f] * len(self.optimizer.param_groups)
            for g in self.optimizer.param_groups:
                g.update(lr=cfg.lr * f(start), initial_lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:  # the run state is input too: a field of the wrong shape is one line naming the file
            counts = [float(r.get("nonfinite", 0.0)) for r in saved["ranks"]]
            res = Resumed(start=start, stream_seed=cfg.seed + start, nonfinite_all=sum(counts))
            # The stream's position is global (any world size goes on from it); failed reads: every rank's.
            res.loader = dict(saved["ranks"][0]["loader"])
            if "readers" in res.loader:
                res.loader["failed"] = LoaderState.merge_failed([r["loader"] for r in saved["ranks"]])
                res.stream_seed = LoaderState.from_dict(res.loader).seed
            if len(saved["ranks"]) == world:  # same world size: this rank's RNG, log window and counts go on
                mine = saved["ranks"][rank]
                res.window, res.nonfinite = mine.get("window"), counts[rank]
                run_state.set_rng_state(mine["rng"])
                restore_batchnorm_stats(self.engine.module, mine.get("bn_before_sync", {}))  # its own, as if never saved
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{tag_dir / RUN_STATE}: a malformed run state ({type(e).__name__}: {e}); resume from "
                             f"another checkpoint (--resume PATH) or move this one out") from e
        if len(saved["ranks"]) != world:
            res.window, res.nonfinite = {"last_logged": start}, sum(counts) if rank == 0 else 0.0  # rank 0 carries them
            if rank == 0:
                print(f"[himae-train] world size {len(saved['ranks'])} -> {world}", flush=True)
        if rank == 0:
            run_state.truncate_metrics(self.out / "metrics.jsonl", start)
            print(f"[himae-train] resumed from {tag_dir} at step {start}", flush=True)
        return res

    def save(self, step: int, state: dict, final: bool = False, checkpoint: bool = True) -> None:
        """BatchNorm sync, DeepSpeed's files, every rank's run state (`state`: loader, window, counts),
        `latest`, exported weights, pruning; then the upload to --export-url is kicked off."""
        engine = self.engine
        bn_before = sync_batchnorm_stats(engine.module)  # every rank saves/exports the pooled statistics
        if checkpoint:
            check_weights_finite(engine.module, step)  # the same verdict on every rank: never save NaN weights
            engine.save_checkpoint(str(self.dir), tag=run_state.tag_for(step), save_latest=False)
            state = {**state, "bn_before_sync": bn_before, "bn_digest": bn_digest(engine.module)}  # drift, per rank
            run_state.write_run_state(self.dir, step, state["loader"], self.schedule, self.rank,
                                      {k: v for k, v in state.items() if k != "loader"})
        if self.rank == 0:
            save_weights(engine.module, self.out / "weights" / f"step_{step:07d}.pt", step, self.extra)
            if final:
                save_weights(engine.module, self.out / weights_export.FINAL_NAME, step, self.extra)
                print(f"[himae-train] wrote {self.out / weights_export.FINAL_NAME} (step {step})", flush=True)
            run_state.prune(self.dir, self.cfg.keep_checkpoints)
        restore_batchnorm_stats(engine.module, bn_before)  # training goes on with this rank's own estimates
        dist.barrier()  # nobody runs ahead of (or exits before) rank 0's writes
        if self.exporter:
            self.exporter.kick()  # uploads in the background: no rank waits on the store in a collective

    def finish(self, start: int, state: Callable[[], dict]) -> None:
        """After the last step: the final save unless this attempt trained nothing and the final
        weights are already this step's (decided by rank 0)."""
        need = run_state.broadcast(self._needs_final(start) if self.rank == 0 else None)
        if need:  # nothing trained in this attempt: the checkpoint it resumed from is the final one, kept as it is
            self.save(max(start, self.cfg.steps), state(), final=True, checkpoint=start < self.cfg.steps)

    def close(self, failing_ok: bool = False) -> None:
        """Not collective (after the last one; other ranks may exit meanwhile): the export's last upload.
        `failing_ok`: a failure is a warning (a preempted run; a re-run syncs)."""
        if not self.exporter:
            return
        try:
            self.exporter.finish()
        except StorageError as e:
            if not failing_ok:
                raise
            print(redact_secrets(f"[himae-train] warning: {e}"), file=sys.stderr, flush=True)

    def _needs_final(self, start: int) -> bool:
        """Rank 0: steps left, or the final weights missing or from another step (a resume to more steps
        killed before its last write). The export needs no check here: `Exporter.finish` uploads the final."""
        final = self.out / weights_export.FINAL_NAME
        if start < self.cfg.steps or not final.exists():
            return True
        try:
            return torch.load(final, map_location="cpu", weights_only=True).get("step") != start
        except Exception:  # noqa: BLE001 (unreadable: write it again)
            return True
