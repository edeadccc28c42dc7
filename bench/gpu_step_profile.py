"""What one training step costs the host on a GPU: device syncs and kernel launches per step.

Runs the real trainer in-process on one rank. After `--warmup` steps (compiles, cuDNN autotuning,
allocator growth) it counts, over the next steps up to the last (which logs and saves):
synchronizing CUDA calls (`torch.cuda.set_sync_debug_mode("warn")`: each one warns) and device
kernels and copies (`torch.profiler`). Only the last step is a log step, so every count is the
steady-state step's own. Prints one JSON line:

    {"compile": false, "steps": 20, "syncs_per_step": 0.0, "device_kernels_per_step": 512.0, ...}

    torchrun --nproc_per_node=1 bench/gpu_step_profile.py --data SHARDS [--compile] [--micro-batch 256]

On CPU it runs (a dry check): syncs are n/a and it counts aten ops per step instead of kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=256)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--precision", default="auto")
    a = ap.parse_args(argv)
    if a.steps < a.warmup + 2:
        ap.error(f"--steps={a.steps}: expected >= --warmup + 2")
    from himae_dist import fault_injection
    from himae_dist.config import parse_config
    from himae_dist.train import train

    cuda = torch.cuda.is_available()
    counted = {"syncs": 0, "kernels": 0, "steps": 0}
    real_steps = fault_injection.steps

    def measured_steps(steps, rank, attempt, stop, beat):
        prof = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in real_steps(steps, rank, attempt, stop, beat):
                if step == a.warmup:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("warn")
                    caught.clear()
                    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                    prof = torch.profiler.profile(activities=acts)
                    prof.__enter__()
                if step == a.steps - 1 and prof is not None:  # the last step logs and saves: not counted
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
                        torch.cuda.synchronize()
                    prof.__exit__(None, None, None)
                    counted["steps"] = step - a.warmup
                    counted["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
                    evts = prof.events()
                    if cuda:
                        counted["kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in evts)
                    else:
                        counted["kernels"] = sum(e.name.startswith("aten::") for e in evts)
                    prof = None
                yield step

    fault_injection.steps = measured_steps
    with tempfile.TemporaryDirectory() as td:
        cfg = parse_config(["--data", a.data, "--out", td, "--steps", str(a.steps), "--log-every", str(a.steps),
                            "--micro-batch", str(a.micro_batch), "--save-every-min", "0", "--num-workers", "2",
                            "--precision", a.precision, "--compile", str(a.compile).lower()])
        hist = train(cfg)["history"]
    n = max(counted["steps"], 1)
    print(json.dumps({"compile": a.compile, "device": "cuda" if cuda else "cpu", "steps": counted["steps"],
                      "syncs_per_step": round(counted["syncs"] / n, 2) if cuda else None,
                      ("device_kernels_per_step" if cuda else "aten_ops_per_step"): round(counted["kernels"] / n, 1),
                      "segments_per_s": hist[-1]["segments_per_s"]}))


if __name__ == "__main__":
    main()
