"""Masked MSE on the manifest's held-out patient split: the same batches and masks at every validation.

Each rank caches `--val-batches` batches of its share of each source's val stream once (device memory), so
every rank runs the same number of forward passes and the values are comparable over the run.
The model is evaluated in eval mode after BatchNorm statistics are pooled across ranks, i.e. as
the exported weights would be. The result stays on the device; the trainer reads it with the
training loss, in its one host sync per log step.
"""

from __future__ import annotations

import sys

import torch

from data_prep.storage import redact_secrets
from himae_dist.bn_sync import sync_batchnorm_stats
from himae_dist.guards import NonFiniteError, bad_rows, describe
from himae_dist.precision import autocast
from himae_dist.streaming import make_loader

_VAL_STEP = 10**9  # mask seeds of validation: disjoint from every training step's


class Validator:
    """`--val-batches` cached micro-batches per rank of each source's val split (sources without one are left out)."""

    def __init__(self, manifests, cfg, rank: int, world: int, device: torch.device, objective, bf16: bool):
        self.device, self.objective, self.bf16, self.rank = device, objective, bf16, rank
        self.batches: list[torch.Tensor] = []
        self.source_of: list[int] = []  # each cached batch's source
        manifests = manifests if isinstance(manifests, list) else [manifests]
        self.per_source_n = [0] * len(manifests)
        for i, manifest in enumerate(manifests):
            if not manifest.splits.get("val"):
                if rank == 0:
                    print(f"[himae-train] warning: {redact_secrets(manifest.url)} has no val split; "
                          f"{'validation is off' if len(manifests) == 1 else 'it is not validated'}", flush=True)
                continue
            self._cache(manifest, i, cfg, rank, world)

    def _cache(self, manifest, source: int, cfg, rank: int, world: int) -> None:
        it, _ = make_loader(manifest, cfg.micro_batch, seed=cfg.seed, rank=rank, world_size=world,
                            num_workers=0, shuffle_shards=cfg.shuffle_shards, split="val",
                            storage_options=cfg.storage_options, strict=cfg.strict_data)
        names = [sh.name for sh in manifest.shards("val")]
        for _ in range(cfg.val_batches):
            b, tries = next(it), 0
            while len(rows := bad_rows(b["signal"])):  # as training batches: --on-nonfinite abort|skip
                what = f"rank {rank}, validation: {describe(b, rows, names)}"
                if cfg.on_nonfinite == "abort":
                    raise NonFiniteError(f"{what}; fix the data or pass --on-nonfinite skip")
                tries += 1
                if tries > 100:
                    raise NonFiniteError(f"{what}: 100 val batches in a row had NaN/inf; the val split is broken")
                print(f"[himae-train] warning: skipped a val batch ({what})", file=sys.stderr, flush=True)
                b = next(it)
            self.batches.append(b["signal"].to(self.device))  # [B, C, L] stored dtype, kept on the device
            self.source_of.append(source)
            self.per_source_n[source] += 1

    @property
    def enabled(self) -> bool:
        return bool(self.batches)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, plot=None, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective (BatchNorm pooling): the sum of this rank's batch losses (a device scalar), and per source [S]."""
        sync_batchnorm_stats(model, keep_before=False)  # no host copy
        model.eval()
        total = torch.zeros((), device=self.device)
        per_source = torch.zeros(len(self.per_source_n), device=self.device)
        for i, sig in enumerate(self.batches):
            x = sig  # [B, C, L], stored dtype, on the device
            # each rank's val batches have their own places (masks the same at every validation, none shared)
            x_masked, mask = self.objective.mask(x, _VAL_STEP, i, torch.bfloat16 if self.bf16 else torch.float32,
                                                 place=self.rank * len(self.batches) + i)
            with autocast(self.device, self.bf16):  # eager forward: under --compile, eval mode would add a graph
                recon = model.forward(x_masked, apply_tanh=self.objective.apply_tanh)
            loss = self.objective.loss(recon, x, mask)
            total += loss
            per_source[self.source_of[i]] += loss
            if plot is not None and i == 0:  # a host copy: only at plot steps, rank 0
                from himae_dist.train_log import plot_reconstructions

                if mask.dim() == 2:  # fused objective: patch mask [B, P] -> [B, 1, L]
                    mask = mask.repeat_interleave(x.shape[-1] // mask.shape[1], dim=1)[:, None, :]
                if not self.objective.apply_tanh:
                    recon = torch.tanh(recon)
                plot_reconstructions(x, mask, recon, plot, step)
        model.train()
        return total, per_source
