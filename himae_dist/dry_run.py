"""`himae-train --dry-run`: what a start would do, from the files alone, so a wrong flag costs seconds.

No process group, no DeepSpeed engine and nothing written (not even --out is created): the
world size comes from the launcher's environment (WORLD_SIZE), and under a launcher only rank 0
prints while every rank exits 0 at once, so no rank waits for another.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep.storage import out_problem, redact_secrets
from himae_dist.checkpointer import plan_resume, read_init_weights
from himae_dist.config import TrainConfig, deepspeed_config, for_world, resolved
from himae_dist.streaming import check_shards, load_sources, make_loader
from kernels.masked_mse_reference import check_masking_args


def describe(cfg: TrainConfig, world: int) -> str:
    """The dry run's report; a ValueError (or FileNotFoundError) for what the real start would refuse."""
    problem = out_problem(Path(cfg.out))
    if problem:
        raise ValueError(problem)
    cfg = for_world(cfg, world)  # --global-batch: refused here too where it does not split
    deepspeed_config(cfg, world)  # a --ds-config that contradicts a flag is refused here too
    sources = cfg.data_sources()
    manifests = load_sources([url for url, _ in sources], cfg.storage_options, cfg.in_chans)
    manifest = manifests[0]
    check_masking_args(manifest.length, cfg.patch_size, cfg.mask_ratio)
    global_batch = cfg.micro_batch * cfg.grad_accum * world
    _, fresh = make_loader(manifests, cfg.micro_batch, cfg.seed, 0, world, global_batch=global_batch,  # refuses
                           weights=[w for _, w in sources], shuffle_shards=cfg.shuffle_shards,  # what the start would
                           readers=cfg.stream_readers)  # (nothing is read)
    counts = [int(src[1]) for src in fresh.sources]  # each source's samples per global batch (source_counts)
    train = manifest.shards("train")
    n_train = sum(s.n_samples for s in train)
    samples = global_batch * cfg.steps
    split = (f"--global-batch {global_batch} = " if cfg.global_batch else f"global batch {global_batch} = ") + (
        f"--micro-batch {cfg.micro_batch} x --grad-accum {cfg.grad_accum} x {world} rank(s)")
    lines = ["[himae-train] dry run: nothing is written and no engine is started", "resolved config:", resolved(cfg),
             f"world size {world} (WORLD_SIZE), {split}",
             f"data order: fixed by --seed {cfg.seed}, --shuffle-shards {cfg.shuffle_shards}, the global batch, "
             f"the sources and --stream-readers "
             f"{cfg.stream_readers or f'(the first start: {world} x max(1, --num-workers) = {world * max(1, cfg.num_workers)})'}"]
    if len(manifests) > 1:
        for m, (_, w), n, width in zip(manifests, sources, counts, fresh.widths):
            size = m.n_samples("train")
            lines.append(f"source {redact_secrets(m.url)}: weight {w:g}, {n} of {global_batch} samples per global "
                         f"batch, shuffled {width} shard(s) at a time, {len(m.shards('train'))} train shard(s), "
                         f"{size} segments: "
                         + (f"{n * cfg.steps / size:.2f} epochs at --steps {cfg.steps}" if size else "empty"))
    lines += [f"data: {redact_secrets(manifest.url)}: {len(train)} train shard(s), {n_train} segments of "
              f"{manifest.length} samples x {manifest.channels} channel(s)",
              f"--steps {cfg.steps} x {global_batch} = {samples} segments: "
              + (f"{counts[0] * cfg.steps / n_train:.2f} epochs of the train split" if n_train
                 else "the train split is empty")]
    names = [s.name for s in train]
    lines.append("train shards: " + ", ".join(names[:8]) + (f", ... ({len(names) - 8} more)" if len(names) > 8 else ""))
    for m in manifests:
        broken = check_shards(m, "train", cfg.storage_options)
        if broken:
            where = f" of {redact_secrets(m.url)}" if len(manifests) > 1 else ""
            lines.append(f"missing or damaged train shards{where} ({len(broken)}): {broken[:5]}")
    if cfg.val_every:
        val = sum(len(m.splits.get("val") or []) for m in manifests)
        lines.append(f"validation every {cfg.val_every} steps on {val} val shard(s)")
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
