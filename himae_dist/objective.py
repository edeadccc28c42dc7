"""The pretraining objective: mask patches, reconstruct, masked MSE. Two interchangeable paths.

`reference`: the plain PyTorch functions (any device). `fused`: the Triton kernels (CUDA, or
CPU under TRITON_INTERPRET=1), which also fuse the model's final tanh into the loss, so the
model is asked for logits. `auto` picks fused on CUDA when Triton imports, else reference.
Neither path copies anything to the host in mask + loss + backward
(tests/test_objective_sync.py), so a trainer that logs once per log step does not wait on the
GPU per micro-step.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.masked_mse_reference import mask_input, masked_mse


def mask_seed(base_seed: int, step: int, *stream: int) -> int:
    """Independent, reproducible 31-bit seed per (base seed, step, extra stream ids)."""
    return int(np.random.SeedSequence([base_seed, step, *stream]).generate_state(1)[0] >> 1)


class ReferenceObjective:
    impl = "reference"  # what --loss-impl resolved to (recorded in checkpoints)
    apply_tanh = True  # the model returns tanh(logits); the loss compares that to the input

    def __init__(self, patch_size: int, ratio: float, base_seed: int, rank: int, grad_accum: int = 1):
        self.patch_size, self.ratio, self.base_seed, self.rank = patch_size, ratio, base_seed, rank
        self.grad_accum = grad_accum

    def mask(
        self, x: torch.Tensor, step: int, micro: int, out_dtype: torch.dtype | None = None, place: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked x in out_dtype (default x's), mask [B, 1, L]). `place`: the micro-batch's place in the
        global batch, by default rank * grad_accum + micro (validation gives its own)."""
        # seeded by the micro-batch's place in the global batch (rank r holds micro-batches r * accum ...): the
        # same rows get the same masks on any world size with the same --micro-batch
        place = self.rank * self.grad_accum + micro if place is None else place
        gen = torch.Generator(device=x.device).manual_seed(mask_seed(self.base_seed, step, place))
        x_masked, mask = mask_input(x, self.patch_size, self.ratio, gen)  # mask [B, 1, L]
        return x_masked.to(out_dtype or x.dtype), mask

    def loss(self, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        """Masked MSE over the kept samples (keep [B] bool; all when None); 0 when none is kept."""
        return masked_mse(recon, x, mask if keep is None else mask * keep[:, None, None])

    def row_losses(self, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return row_sse(recon, x, mask)


def row_sse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error over each row's masked samples [B], their count [B]), fp32 on the device, no host sync.
    pred, x [B, C, L]; mask [B, 1, L] (1 = masked). For per-source losses: sum(sse) / sum(n) of a source's rows."""
    m = mask.expand_as(pred).to(torch.float32)
    sq = (pred.detach().to(torch.float32) - x.to(torch.float32)).pow(2)
    return (sq * m).sum((1, 2)), m.sum((1, 2))


class FusedObjective:
    impl = "fused"
    apply_tanh = False  # the loss kernel applies tanh itself

    def __init__(self, patch_size: int, ratio: float, base_seed: int, rank: int, world_size: int, grad_accum: int = 1):
        from kernels import masked_mse_triton

        self.k = masked_mse_triton
        self.patch_size, self.ratio, self.base_seed = patch_size, ratio, base_seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum

    def mask(
        self, x: torch.Tensor, step: int, micro: int, out_dtype: torch.dtype | None = None, place: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked x written by the kernel in out_dtype, patch mask int8 [B, P]); `place` as the reference's."""
        # One seed per step for all ranks; each sample keyed by its row in the global batch, so a
        # row's mask does not depend on the world size (nor on how the batch is split into micro-batches).
        place = self.rank * self.grad_accum + micro if place is None else place  # rank r: rows [r G/W, (r+1) G/W)
        offset = place * x.shape[0]
        seed = mask_seed(self.base_seed, step)
        return self.k.fused_patch_mask(x, self.patch_size, self.ratio, seed, offset, out_dtype=out_dtype)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, pmask: torch.Tensor,
             keep: torch.Tensor | None = None) -> torch.Tensor:
        """Masked MSE over the kept samples (keep [B] bool; all when None); 0 when none is kept."""
        if keep is None:
            return self.k.fused_masked_mse(logits, x, pmask, self.patch_size, self.ratio, apply_tanh=True)
        # the kernel divides by all B rows' masked samples: rescale to the kept rows' (device-side, exact 1.0 if all)
        loss = self.k.fused_masked_mse(logits, x, pmask * keep[:, None], self.patch_size, self.ratio, apply_tanh=True)
        return loss * (len(keep) / keep.sum().clamp_min(1))

    def row_losses(self, logits: torch.Tensor, x: torch.Tensor, pmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As the reference's (tanh applied here); pmask [B, P] int8 -> [B, 1, L]."""
        mask = pmask.repeat_interleave(x.shape[-1] // pmask.shape[1], dim=1)[:, None, :]
        return row_sse(torch.tanh(logits.detach().float()), x, mask)


def make_objective(
    impl: str, device: torch.device, patch_size: int, ratio: float, base_seed: int, rank: int, world_size: int,
    grad_accum: int = 1,
) -> ReferenceObjective | FusedObjective:
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and _triton_available() else "reference"
    if impl == "fused":
        import os

        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"--loss-impl=fused needs a CUDA device (this run is on {device.type}); "
                f"use --loss-impl=reference, or TRITON_INTERPRET=1 to test the kernels on CPU"
            )
        if not _triton_available():
            raise ValueError("--loss-impl=fused needs triton; pip install triton (CUDA torch builds ship it)")
        return FusedObjective(patch_size, ratio, base_seed, rank, world_size, grad_accum)
    return ReferenceObjective(patch_size, ratio, base_seed, rank, grad_accum)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
