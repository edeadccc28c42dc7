"""The trainer's model, objective and DeepSpeed engine fed from a batch already on the GPU: the
segments/s the trainer would reach if loading cost nothing (bench/gpu_check.sh sets it beside the
trainer's own number from local tars).

    torchrun --nproc_per_node=1 bench/gpu_model_from_memory.py --micro-batch 256 --precision bf16 \
        --loss-impl fused --length 250 [--timed-steps 50]

Takes the trainer's flags (`--data` and `--out` are not read); prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--length", type=int, default=250, help="segment length L (himae-synth's default is 250)")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--timed-steps", type=int, default=50)
    own, rest = ap.parse_known_args(argv)

    from himae_dist.config import parse_config
    from himae_dist.model import HiMAE
    from himae_dist.objective import make_objective
    from himae_dist.precision import autocast
    from himae_dist.train import _init_distributed, build_engine

    cfg = parse_config(["--data", "unused", "--out", "unused", *rest])
    deepspeed, device, _ = _init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    if cfg.precision == "bf16" and not bf16:  # as the trainer: no silent fp32 under a bf16 label
        sys.exit("gpu_model_from_memory: error: --precision=bf16 needs a GPU with bf16 support")
    objective = make_objective(cfg.loss_impl, device, cfg.patch_size, cfg.mask_ratio, cfg.seed, rank, world)
    torch.manual_seed(cfg.seed)
    model = HiMAE(cfg.in_chans, cfg.channels)
    engine, _, _, _ = build_engine(deepspeed, cfg, model, device, world)  # as the trainer: fp32 engine, bf16 autocast
    x = torch.rand(cfg.micro_batch, cfg.in_chans, own.length, device=device) * 2 - 1  # [B, C, L], resident

    def step(s: int) -> torch.Tensor:
        for micro in range(cfg.grad_accum):
            x_masked, mask = objective.mask(x, s, micro, torch.bfloat16 if bf16 else None)
            with autocast(device, bf16):
                recon = engine(x_masked, apply_tanh=objective.apply_tanh)
            loss = objective.loss(recon, x, mask)
            engine.backward(loss)
            engine.step()
        return loss

    for s in range(own.warmup_steps):
        step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(own.timed_steps):
        loss = step(own.warmup_steps + s)
    final = float(loss.detach())  # waits for the GPU
    elapsed = time.perf_counter() - t0
    segments = own.timed_steps * cfg.grad_accum * cfg.micro_batch * world
    if rank == 0:
        print(json.dumps({"segments_per_s": round(segments / elapsed, 1), "elapsed_s": round(elapsed, 3),
                          "steps": own.timed_steps, "micro_batch": cfg.micro_batch, "world": world, "bf16": bf16,
                          "objective": type(objective).__name__, "final_loss": final, "device": str(device)}),
              flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
