"""The trainer's one config object, its command line, and the DeepSpeed config it implies.

Defaults are the seed's recipe: patch 5, mask ratio 0.8, AdamW lr 1e-3, weight decay 1e-3,
10 % linear warmup then linear decay. Values come from the dataclass defaults, then an
optional `--config FILE.json`, then command-line flags; the resolved result is printed at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass

from himae_dist.model import DEFAULT_CHANNELS


@dataclass
class TrainConfig:
    data: str = ""  # manifest.json (path or URL) or the folder holding it
    out: str = "runs/himae"
    storage_options: dict | None = None  # fsspec options for s3:// data
    in_chans: int = 1
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    patch_size: int = 5
    mask_ratio: float = 0.8
    micro_batch: int = 64  # per rank
    grad_accum: int = 1
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_frac: float = 0.1
    grad_clip: float = 0.0  # 0 = off, as the seed
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32), fp32, bf16
    zero_stage: int = 0
    loss_impl: str = "auto"  # auto (fused Triton on CUDA when available), reference, fused
    seed: int = 0
    num_workers: int = 4  # DataLoader workers per rank (pinned memory on CUDA)
    shuffle_shards: int = 4  # shards loaded and shuffled together per reader
    strict_data: bool = False  # a missing/corrupt shard is fatal instead of skipped with a warning
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    wandb: bool = False
    wandb_project: str = "himae-dist"
    ds_config: str | None = None  # JSON file merged over the generated DeepSpeed config

    def validate(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: expected {want}")

        if not self.data:
            bad("data", "a manifest.json path/URL or the folder holding it")
        for name in ("micro_batch", "grad_accum", "steps", "patch_size", "in_chans", "log_every", "shuffle_shards"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not 0.0 < self.mask_ratio < 1.0:
            bad("mask_ratio", "a value in (0, 1)")
        if not 0.0 <= self.warmup_frac < 1.0:
            bad("warmup_frac", "a value in [0, 1)")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "one of auto, fp32, bf16")
        if self.zero_stage not in (0, 1, 2):
            bad("zero_stage", "0, 1 or 2 (a 1.2 M-parameter model gains nothing from stage 3)")
        if self.loss_impl not in ("auto", "reference", "fused"):
            bad("loss_impl", "one of auto, reference, fused")
        if self.num_workers < 0 or self.save_every < 0:
            bad("num_workers" if self.num_workers < 0 else "save_every", "an integer >= 0")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps))


def _arg_type(tp: object):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if origin is tuple:
        return lambda s: tuple(int(c) for c in s.split(","))
    if tp is dict or (args and args[0] is dict):
        return json.loads
    if args:
        return args[0]
    return tp


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    ap = argparse.ArgumentParser(prog="python -m himae_dist.train", description="Pretrain HiMAE with DeepSpeed.")
    ap.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    # The deepspeed launcher passes --local_rank; torchrun sets LOCAL_RANK. Accept both.
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_arg_type(hints[f.name]), default=None)
    ns = ap.parse_args(argv)
    values: dict = {}
    if ns.config:
        with open(ns.config) as fh:
            values = json.load(fh)
        unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"{ns.config}: unknown config key(s) {sorted(unknown)}")
    values.update({k: v for k, v in vars(ns).items() if v is not None and k not in ("config", "local_rank")})
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def deepspeed_config(cfg: TrainConfig, world_size: int, bf16: bool, torch_adam: bool = False) -> dict:
    """The DeepSpeed config implied by cfg (optimizer, schedule, batch, precision, ZeRO).

    torch_adam=True selects torch.optim.AdamW instead of DeepSpeed's fused op, which on CPU
    would be JIT-compiled with a C++ toolchain on every fresh machine.
    """
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        },
        # Linear warmup to lr over warmup_frac of the steps, then linear decay to 0 (the seed's schedule).
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": cfg.steps, "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
                "warmup_num_steps": max(1, cfg.warmup_steps), "warmup_type": "linear",
            },
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # the trainer logs itself
        "wall_clock_breakdown": False,
    }
    if torch_adam:
        ds["optimizer"]["params"]["torch_adam"] = True
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.ds_config:
        with open(cfg.ds_config) as fh:
            _merge(ds, json.load(fh))
    return ds


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def resolved(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=list)

