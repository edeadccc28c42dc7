"""The trainer's one config object, its command line, and the DeepSpeed config it implies.

Defaults are the seed's recipe: patch 5, mask ratio 0.8, AdamW lr 1e-3, weight decay 1e-3,
10 % linear warmup then linear decay. Values come from the dataclass defaults, then an
optional `--config FILE.json`, then command-line flags; the resolved result is printed at start.
The optimizer and schedule are built by the trainer (`train.build_engine`, `lr_lambda`), not by
DeepSpeed: PyTorch's fused AdamW on GPUs (no JIT build), and a schedule whose every update has
lr > 0. A user `--ds-config` may tune DeepSpeed but not contradict a flag (`deepspeed_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
    precision: str = "auto"  # auto (bf16 on GPUs that support it, else fp32), fp32, bf16 (autocast; CPU too)
    zero_stage: int = 0
    loss_impl: str = "auto"  # auto (fused Triton on CUDA when available), reference, fused
    seed: int = 0
    num_workers: int = 4  # DataLoader workers per rank (pinned memory on CUDA)
    shuffle_shards: int = 4  # shards loaded and shuffled together per reader
    strict_data: bool = False  # a missing/corrupt shard is fatal instead of skipped with a warning
    max_bad_data: float = 0.01  # stop when more than this fraction of shard reads failed (all ranks, so far)
    verify_data: bool = False  # check every shard read against the manifest's sha256 (costs a hash per read)
    log_every: int = 10
    save_every: int = 0  # also save every N steps (0 = off)
    save_every_min: float = 30.0  # also save at the first log step after N minutes since the last save (0 = off)
    val_every: int = 0  # masked MSE on the val split every N steps (0 = off), logged at the next log step
    val_batches: int = 4  # val micro-batches per rank (the same ones every time)
    wandb: str = "off"  # off, offline, online
    plot_every: int = 0  # reconstruction PNG of val samples every N steps (needs --val-every; 0 = off)
    wandb_project: str = "himae-dist"
    export_url: str | None = None  # also place weights/step_*.pt and himae_final.pt here (s3://... or a path)
    ds_config: str | None = None  # JSON file merged over the generated DeepSpeed config
    keep_checkpoints: int = 3  # complete checkpoints kept in --out/checkpoints (older ones deleted)
    allow_schedule_change: bool = False  # resume even if --steps/lr/warmup/batch differ from the checkpoint's
    on_nonfinite: str = "abort"  # samples with NaN/inf (dropped on the device): abort naming shard and keys, or skip them (counted)
    collective_timeout_s: int = 300  # a collective waiting longer (stalled/dead rank) is an error
    deterministic: bool = False  # deterministic cuDNN/cuBLAS kernels: bitwise resume on GPUs too (CPU always)
    compile: bool = False  # torch.compile the model (forward and backward; the fused loss stays a Triton kernel)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: graph capture without code generation)
    tf32: bool = True  # TF32 for fp32 convolutions and matmuls on Ampere+ GPUs (bf16 runs do not use it)

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
        if self.on_nonfinite not in ("abort", "skip"):
            bad("on_nonfinite", "abort or skip")
        if self.compile_backend not in ("inductor", "aot_eager", "eager", "cudagraphs"):
            bad("compile_backend", "one of inductor, aot_eager, eager, cudagraphs")
        if self.keep_checkpoints < 1 or self.collective_timeout_s < 1:
            bad("keep_checkpoints" if self.keep_checkpoints < 1 else "collective_timeout_s", "an integer >= 1")
        if self.wandb not in ("off", "offline", "online"):
            bad("wandb", "off, offline or online")
        if self.plot_every < 0:
            bad("plot_every", "an integer >= 0")
        if self.plot_every and (not self.val_every or self.plot_every % self.val_every):
            bad("plot_every", "0, or a multiple of --val-every (the plots show validation samples)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", "a finite learning rate > 0")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                bad(name, "a finite value >= 0")
        if self.val_every < 0 or self.val_batches < 1:
            bad("val_every" if self.val_every < 0 else "val_batches", ">= 0" if self.val_every < 0 else ">= 1")
        if not 0.0 <= self.max_bad_data <= 1.0:
            bad("max_bad_data", "a fraction in [0, 1] of shard reads that may fail")
        if not (math.isfinite(self.save_every_min) and self.save_every_min >= 0):
            bad("save_every_min", "a finite number of minutes >= 0 (0 = off)")
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


# DeepSpeed keys that a flag sets: a --ds-config may repeat them with the same value only.
_OWNED = {
    ("train_micro_batch_size_per_gpu",): "--micro-batch",
    ("gradient_accumulation_steps",): "--grad-accum",
    ("train_batch_size",): "--micro-batch x --grad-accum x world size",
    ("zero_optimization", "stage"): "--zero-stage",
    ("gradient_clipping",): "--grad-clip",
    ("optimizer",): "--lr/--weight-decay (the trainer builds AdamW)",
    ("scheduler",): "--lr/--warmup-frac/--steps (the trainer builds the schedule)",
    ("bf16",): "--precision (bf16 is autocast over fp32 masters)",
    ("fp16",): "--precision",
}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config implied by cfg (batch, ZeRO, clipping; fp32 engine), merged with --ds-config.

    DeepSpeed runs in fp32: bf16 is the trainer's autocast, so gradients accumulate and are
    all-reduced in fp32 and the module weights are the fp32 masters. A --ds-config that sets a
    key a flag owns to a different value is refused, so the recorded config is the one used.
    """
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,  # the trainer logs itself
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronises the device in forward() and step() (on a GPU, a
        # cudaDeviceSynchronize twice per micro-step); the trainer measures throughput itself
        "timers": {"throughput": {"enabled": False}},
        # always written: DeepSpeed's default is 1.0, which would clip (and add an all-reduce per step)
        # where --grad-clip 0 means off, as in the seed's recipe
        "gradient_clipping": cfg.grad_clip,
    }
    if cfg.ds_config:
        try:
            with open(cfg.ds_config) as fh:
                user = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--ds-config={cfg.ds_config}: expected a readable JSON object ({e})") from e
        if not isinstance(user, dict):
            raise ValueError(f"--ds-config={cfg.ds_config}: expected a JSON object, got {type(user).__name__}")
        for path, flag in _OWNED.items():
            mine, theirs = _get(ds, path), _get(user, path)
            if path in (("bf16",), ("fp16",)) and theirs == {"enabled": False}:
                continue  # agrees with the fp32 engine: DeepSpeed's bf16/fp16 modes stay off
            if theirs is not None and theirs != mine:
                raise ValueError(
                    f"--ds-config={cfg.ds_config}: {'.'.join(path)}={theirs!r} contradicts {flag} "
                    f"(= {mine!r}); set it with the flag instead"
                )
        _merge(ds, user)
    return ds


def _get(d: dict, path: tuple[str, ...]):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def lr_lambda(cfg: TrainConfig):
    """Multiplier of --lr for update i (0-based): linear warmup from lr/W, then linear decay to lr/(S-W) > 0.

    No update gets lr 0 (DeepSpeed's WarmupDecayLR gave the first two updates lr 0).
    """
    steps, warm = cfg.steps, min(cfg.warmup_steps, cfg.steps - 1)

    def f(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return max(steps - i, 1) / (steps - warm)

    return f


def schedule_params(cfg: TrainConfig, world_size: int, precision: str | None = None,
                    loss_impl: str | None = None) -> dict:
    """What a checkpoint records of the run; a resume with other values is no longer exact (`checkpointer.resume_refusal`).

    `precision` (bf16/fp32) and `loss_impl` (fused/reference) are what "auto" resolved to on this
    hardware, so the same flags on other hardware count as a change, and an explicit value equal
    to the resolved one does not.
    """
    return {"steps": cfg.steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_steps": cfg.warmup_steps,
            "micro_batch": cfg.micro_batch, "grad_accum": cfg.grad_accum, "world_size": world_size,
            "seed": cfg.seed, "mask_ratio": cfg.mask_ratio, "patch_size": cfg.patch_size,
            "grad_clip": cfg.grad_clip, "precision": precision or cfg.precision, "loss_impl": loss_impl or cfg.loss_impl,
            "in_chans": cfg.in_chans, "channels": list(cfg.channels), "zero_stage": cfg.zero_stage,
            "compile": cfg.compile, "compile_backend": cfg.compile_backend if cfg.compile else None, "tf32": cfg.tf32}


def _merge(base: dict, over: dict) -> None:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def resolved(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=list)

