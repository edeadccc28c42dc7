"""The multi-node trainer: `torchrun ... -m himae_dist.train` or `deepspeed --module himae_dist.train`.

One code path for CPU (gloo, `DS_ACCELERATOR=cpu`) and GPUs (NCCL): the accelerator picks the
backend. Each step masks the batch, reconstructs it and takes the masked-MSE loss; DeepSpeed
owns the optimizer (AdamW), the warmup/decay schedule, gradient accumulation and checkpoints.
Outputs under --out: `checkpoints/` (DeepSpeed, resumable), `weights/step_XXXXXXX.pt` and
`himae_final.pt` (plain fp32 weights with the seed's names), `metrics.jsonl`, `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from himae_dist.checkpoint import save_weights
from himae_dist.config import TrainConfig, deepspeed_config, parse_config, resolved
from himae_dist.model import HiMAE
from himae_dist.objective import make_objective
from himae_dist.streaming import check_shards, load_manifest, make_loader
from kernels.masked_mse_reference import check_masking_args


def _init_distributed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cuda":
        acc.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return deepspeed, device


def train(cfg: TrainConfig) -> dict:
    deepspeed, device = _init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(cfg.out)
    manifest = load_manifest(cfg.data, cfg.storage_options)
    if manifest.channels != cfg.in_chans:
        raise ValueError(f"--in-chans={cfg.in_chans} but {manifest.url} holds {manifest.channels}-channel segments")
    check_masking_args(manifest.length, cfg.patch_size, cfg.mask_ratio)
    extra = {"preprocess": manifest.preprocess, "data": manifest.url}  # so evaluation scales its data the same way
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16:
        raise ValueError("--precision=bf16 needs a GPU with bf16 support; use fp32 or auto")
    objective = make_objective(cfg.loss_impl, device, cfg.patch_size, cfg.mask_ratio, cfg.seed, rank, world)
    if rank == 0:
        print(f"[himae-train] world={world} device={device.type} bf16={bf16} "
              f"objective={type(objective).__name__} resolved config:\n{resolved(cfg)}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(resolved(cfg) + "\n")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = HiMAE(cfg.in_chans, cfg.channels)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg, world, bf16, torch_adam=device.type != "cuda")
    )
    ckpt_dir = out / "checkpoints"
    start = 0
    if (ckpt_dir / "latest").is_file():
        engine.load_checkpoint(str(ckpt_dir))
        start = engine.global_steps
        if rank == 0:
            print(f"[himae-train] resumed from {ckpt_dir} at step {start}", flush=True)

    # The stream position is the number of micro-batches consumed, so a resumed run continues it.
    if rank == 0:
        broken = check_shards(manifest, "train", cfg.storage_options)
        if broken and cfg.strict_data:
            raise ValueError(f"{manifest.url}: {len(broken)} shard(s) missing or damaged: {broken[:5]}; re-run himae-prep")
        if broken:
            print(f"[himae-train] warning: {len(broken)} shard(s) missing or damaged, they will be skipped: "
                  f"{broken[:5]}; re-run himae-prep to rebuild them", flush=True)
    loader, _ = make_loader(
        manifest, cfg.micro_batch, seed=cfg.seed, rank=rank, world_size=world, num_workers=cfg.num_workers,
        shuffle_shards=cfg.shuffle_shards, storage_options=cfg.storage_options, strict=cfg.strict_data,
        state={"batches": start * cfg.grad_accum, "seed": cfg.seed, "world_size": world, "num_workers": cfg.num_workers,
               "batch_size": cfg.micro_batch, "shuffle_shards": cfg.shuffle_shards,
               "n_shards": len(manifest.shards("train")), "split": "train"},
        pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    loss_sum, loss_n = torch.zeros((), device=device), 0  # on the device: no host sync per micro-step
    wandb_run = _wandb(cfg) if rank == 0 else None
    metrics_path = out / "metrics.jsonl"
    history, t0 = [], time.time()
    if rank == 0 and start >= cfg.steps:
        print(f"[himae-train] already at step {start} >= --steps={cfg.steps}; nothing to train", flush=True)
    for step in range(start, cfg.steps):
        for micro in range(cfg.grad_accum):
            x = next(batches)["signal"].to(device, non_blocking=True).float()  # [B, C, L], stored fp16/fp32
            x_masked, mask = objective.mask(x, step, micro, torch.bfloat16 if bf16 else None)
            recon = engine(x_masked, apply_tanh=objective.apply_tanh)  # [B, C, L]
            loss = objective.loss(recon, x, mask)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
            loss_n += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            dist.all_reduce(loss_sum)  # collective: every rank reaches it at the same step
            mean = float(loss_sum) / (loss_n * world)  # the one host sync per log step
            loss_sum.zero_()
            loss_n = 0
            rec = {"step": done, "loss": mean, "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - t0, 2)}
            history.append(rec)
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                print(f"[himae-train] step {done}/{cfg.steps} loss {mean:.5f} lr {rec['lr']:.2e}", flush=True)
                if wandb_run:
                    wandb_run.log(rec, step=done)
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
            _save(engine, ckpt_dir, out, done, rank, extra)
    if start < cfg.steps or not (out / "himae_final.pt").exists():
        _save(engine, ckpt_dir, out, max(start, cfg.steps), rank, extra, final=True)
    if wandb_run:
        wandb_run.finish()
    return {"history": history, "start_step": start}


def _save(engine, ckpt_dir: Path, out: Path, step: int, rank: int, extra: dict, final: bool = False) -> None:
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:07d}")  # collective; writes `latest` last
    if rank == 0:
        save_weights(engine.module, out / "weights" / f"step_{step:07d}.pt", step, extra)
        if final:
            save_weights(engine.module, out / "himae_final.pt", step, extra)
            print(f"[himae-train] wrote {out / 'himae_final.pt'} (step {step})", flush=True)


def _wandb(cfg: TrainConfig):
    if not cfg.wandb:
        return None
    import wandb

    return wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.out)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv)
        train(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad options or data: one clear line, no traceback
        sys.exit(f"himae-train: error: {e}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
