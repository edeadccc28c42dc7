"""Fused Triton kernels for patch masking and the masked-MSE loss; the reference is beside it.

`masked_mse_reference.py` spends a chain of small kernels per step (noise, argsort, scatter,
repeat_interleave, multiply; then tanh, square, mask, two sums, a division, and all of it again
backwards). Here it is two passes:

* mask kernel, one program per sample: draws a Philox key per patch with `tl.randint` keyed by
  (seed, global sample index, patch), finds the k-th smallest key by bisection (31 rounds of a
  count over the row, no sort), writes the compact patch mask [B, P] and the masked input. The
  patch index sits in the key's low bits, so keys in a row are distinct and exactly
  k = int(ratio * P) patches are masked. A sample's mask depends only on (seed, its global
  index), not on how the global batch is split over GPUs.
* loss kernel, a 1-D grid over B*C*L: reads the reconstruction logits (the final tanh is fused
  here, saving the model's tanh pass), the target and the patch mask; writes fp32 partial sums
  of (tanh(z) - x)^2 * m and, in the same pass, d loss / d z. The denominator sum(m) = B*C*k*p
  is known on the host, so nothing waits on the device. Backward scales the saved gradient by
  `grad_output` (DeepSpeed divides the loss by the gradient-accumulation steps).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.masked_mse_reference import check_masking_args, num_masked_patches

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOSS_BLOCK = 2048


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take float32, bfloat16 or float16")
    if t.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{name} is on {t.device}; the fused Triton kernels need a CUDA tensor "
            f"(or TRITON_INTERPRET=1 for CPU testing). Use loss_impl='reference' on CPU."
        )


@triton.jit
def _patch_keys(seed, sample, patch, n_patches, LOG_P: tl.constexpr):
    # Philox draw keyed by (seed, global sample, patch); top 31-LOG_P bits random, low bits = patch.
    r = tl.randint(seed, sample * n_patches + patch)
    rnd = (r >> 1).to(tl.int32)  # uint32 -> non-negative int32
    return ((rnd >> LOG_P) << LOG_P) | patch


@triton.jit
def _mask_kernel(
    x_ptr, out_ptr, pmask_ptr, seed, sample_offset, C, L, n_patches, k, patch,
    BLOCK_P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0)
    sample = b + sample_offset
    pidx = tl.arange(0, BLOCK_P)
    pvalid = pidx < n_patches
    keys = _patch_keys(seed, sample, pidx, n_patches, LOG_P).to(tl.int64)
    # Bisection for the threshold T with exactly k keys below it (keys in a row are distinct).
    lo = tl.zeros((), dtype=tl.int64)
    hi = tl.full((), 2147483648, dtype=tl.int64)
    for _ in range(31):
        mid = (lo + hi) // 2
        cnt = tl.sum((pvalid & (keys < mid)).to(tl.int32), axis=0)
        below = cnt >= k
        hi = tl.where(below, mid, hi)
        lo = tl.where(below, lo, mid)
    tl.store(pmask_ptr + b * n_patches + pidx, (keys < hi).to(tl.int8), mask=pvalid)
    row = b.to(tl.int64) * C * L
    for start in range(0, L, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        valid = offs < L
        j = offs // patch
        masked = _patch_keys(seed, sample, j, n_patches, LOG_P).to(tl.int64) < hi
        for c in range(0, C):
            ptr = row + c * L + offs
            x = tl.load(x_ptr + ptr, mask=valid, other=0.0)
            tl.store(out_ptr + ptr, tl.where(masked, tl.zeros_like(x), x), mask=valid)


@triton.jit
def _loss_kernel(
    z_ptr, x_ptr, pmask_ptr, grad_ptr, partial_ptr, n, CL, L, n_patches, patch, inv_count,
    APPLY_TANH: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n
    z = tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    b = offs // CL
    j = (offs % L) // patch
    m = tl.load(pmask_ptr + b * n_patches + j, mask=valid, other=0).to(tl.float32)
    if APPLY_TANH:
        # tanh(z) = 1 - 2 / (exp(2z) + 1): stable at both ends in fp32.
        y = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    else:
        y = z
    diff = (y - x) * m
    tl.store(partial_ptr + pid, tl.sum(diff * diff, axis=0))
    g = 2.0 * diff * inv_count
    if APPLY_TANH:
        g = g * (1.0 - y * y)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=valid)


def fused_patch_mask(
    x: torch.Tensor, patch_size: int, ratio: float, seed: int, sample_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, L] -> (x with masked patches zeroed [B, C, L], patch mask int8 [B, P]).

    `seed` should come from the base seed and the step; `sample_offset` is the global index of
    this batch's first sample, so each sample's mask is the same however the batch is sharded.
    """
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [B, C, L], got {tuple(x.shape)}")
    _check_tensor("x", x)
    B, C, L = x.shape
    n_patches = check_masking_args(L, patch_size, ratio)
    if n_patches > 4096:
        raise ValueError(f"{n_patches} patches per sample exceed the kernel's 4096; use a larger patch_size")
    if not 0 <= int(seed) < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if (sample_offset + B) * n_patches >= 2**31:
        raise ValueError(f"sample_offset + B = {sample_offset + B} samples x {n_patches} patches overflow the Philox offset")
    x = x.contiguous()
    out = torch.empty_like(x)
    pmask = torch.empty(B, n_patches, dtype=torch.int8, device=x.device)
    block_p = triton.next_power_of_2(n_patches)
    _mask_kernel[(B,)](
        x, out, pmask, int(seed), int(sample_offset), C, L, n_patches, num_masked_patches(n_patches, ratio),
        patch_size, BLOCK_P=block_p, LOG_P=max(1, block_p.bit_length() - 1),
        BLOCK_L=min(1024, triton.next_power_of_2(L)),
    )
    return out, pmask


def _loss_forward(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, patch_size: int, ratio: float, apply_tanh: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if z.shape != target.shape or z.dim() != 3:
        raise ValueError(f"reconstruction {tuple(z.shape)} and target {tuple(target.shape)} must both be [B, C, L]")
    _check_tensor("reconstruction", z)
    _check_tensor("target", target)
    B, C, L = z.shape
    n_patches = check_masking_args(L, patch_size, ratio)
    if pmask.shape != (B, n_patches) or pmask.dtype != torch.int8:
        raise ValueError(
            f"patch mask is {pmask.dtype} {tuple(pmask.shape)}; expected int8 [{B}, {n_patches}] from fused_patch_mask"
        )
    # Every row masks exactly k patches, so sum(m) is known here: no device-to-host sync.
    count = B * C * patch_size * num_masked_patches(n_patches, ratio)
    z, target = z.contiguous(), target.contiguous()
    n = z.numel()
    grid = (triton.cdiv(n, LOSS_BLOCK),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=z.device)
    grad = torch.empty_like(z)
    _loss_kernel[grid](
        z, target, pmask, grad, partial, n, C * L, L, n_patches, patch_size, 1.0 / count,
        APPLY_TANH=apply_tanh, BLOCK=LOSS_BLOCK,
    )
    return partial.sum() / count, grad


class FusedMaskedMSE(torch.autograd.Function):
    """Masked MSE over patch-masked samples, with the final tanh fused; grads w.r.t. logits only."""

    @staticmethod
    def forward(ctx, z, target, pmask, patch_size, ratio, apply_tanh):  # type: ignore[override]
        loss, grad = _loss_forward(z, target, pmask, patch_size, ratio, apply_tanh)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None


def fused_masked_mse(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, patch_size: int, ratio: float,
    apply_tanh: bool = True,
) -> torch.Tensor:
    """sum((tanh(z) - x)^2 * m) / sum(m), m the patch mask (from fused_patch_mask with the same
    ratio) expanded over samples and channels; z are logits when apply_tanh, else the reconstruction."""
    return FusedMaskedMSE.apply(z, target, pmask, patch_size, ratio, apply_tanh)
