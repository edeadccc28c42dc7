"""`himae-train --dry-run`: what a start would do, from the files alone, so a wrong flag costs seconds.

No process group, no DeepSpeed engine and nothing written (not even --out is created): the
world size comes from the launcher's environment (WORLD_SIZE), and under a launcher only rank 0
prints while every rank exits 0 at once, so no rank waits for another.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.storage import out_problem
from himae_dist.checkpointer import plan_resume, read_init_weights
from himae_dist.config import TrainConfig, deepspeed_config, resolved
from himae_dist.streaming import check_shards, load_manifest
from kernels.masked_mse_reference import check_masking_args


def describe(cfg: TrainConfig, world: int) -> str:
    """The dry run's report; a ValueError (or FileNotFoundError) for what the real start would refuse."""
    problem = out_problem(Path(cfg.out))
    if problem:
        raise ValueError(problem)
    deepspeed_config(cfg, world)  # a --ds-config that contradicts a flag is refused here too
    manifest = load_manifest(cfg.data, cfg.storage_options)
    if manifest.channels != cfg.in_chans:
        raise ValueError(f"--in-chans={cfg.in_chans} but {manifest.url} holds {manifest.channels}-channel segments")
    check_masking_args(manifest.length, cfg.patch_size, cfg.mask_ratio)
    train = manifest.shards("train")
    n_train = sum(s.n_samples for s in train)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    samples = global_batch * cfg.steps
    lines = ["[himae-train] dry run: nothing is written and no engine is started", "resolved config:", resolved(cfg),
             f"world size {world} (WORLD_SIZE), global batch {global_batch} = --micro-batch {cfg.micro_batch} x "
             f"--grad-accum {cfg.grad_accum} x {world} rank(s)",
             f"data: {manifest.url}: {len(train)} train shard(s), {n_train} segments of {manifest.length} samples x "
             f"{manifest.channels} channel(s)",
             f"--steps {cfg.steps} x {global_batch} = {samples} segments: "
             + (f"{samples / n_train:.2f} epochs of the train split" if n_train else "the train split is empty")]
    names = [s.name for s in train]
    lines.append("train shards: " + ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else ""))
    broken = check_shards(manifest, "train", cfg.storage_options)
    if broken:
        lines.append(f"missing or damaged train shards ({len(broken)}): {broken[:5]}")
    if cfg.val_every:
        val = manifest.splits.get("val") or []
        lines.append(f"validation every {cfg.val_every} steps on {len(val)} val shard(s)")
    tag_dir = plan_resume(Path(cfg.out) / "checkpoints", cfg.resume)
    if tag_dir is not None:
        lines.append(f"resume: from {tag_dir} (--resume {cfg.resume})")
    else:
        lines.append(f"resume: none, a new run at step 0 in {cfg.out} (--resume {cfg.resume})")
    if cfg.init_from:
        _, what = read_init_weights(cfg)
        lines.append(f"init: {'not used (a checkpoint is resumed): ' if tag_dir else 'weights from '}{what}")
    return "\n".join(lines)


def dry_run(cfg: TrainConfig) -> None:
    """Rank 0 (or a lone process) prints `describe`; other ranks only exit."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(describe(cfg, int(os.environ.get("WORLD_SIZE", "1"))), flush=True)
