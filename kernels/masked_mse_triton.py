"""Fused Triton kernels for patch masking and the masked-MSE loss; the reference is beside it.

`masked_mse_reference.py` spends a chain of small kernels per step (noise, argsort, scatter,
repeat_interleave, multiply; then tanh, square, mask, two sums, a division, and all of it again
backwards). Here masking is two launches and the loss one pass forward and one backward:

* `_patch_mask_kernel`, one program per sample: draws a Philox key per patch with `tl.randint`
  keyed by (seed, batch position, patch), finds the k-th smallest key by bisection (31 rounds of
  a count over the row, no sort) and writes the compact patch mask [B, P]. The patch index sits
  in the key's low bits, so keys in a row are distinct and exactly k = int(ratio * P) patches
  are masked. The mask is a function of (seed, global batch position) only: the same position
  gets the same mask however the global batch is split over ranks (what sits at a position is
  the loader's business, and changes with the world size).
* `_apply_mask_kernel`, a flat 1-D grid over B*C*L: zeroes the masked samples and writes the
  masked input directly in the compute dtype (bf16 for the trainer), so no separate cast pass.
* `_loss_kernel`, a flat 1-D grid over B*C*L, reads the logits (the final tanh is fused here),
  the target and the patch mask. Forward writes fp32 partial sums of (tanh(z) - x)^2 * m;
  backward recomputes d loss / d z in fp32 with `grad_output` (the loss scale) folded in before
  the one rounding to the logits' dtype, so an fp16 gradient is zero only where the scaled
  fp32 gradient is below fp16's range. Nothing is saved but the inputs, and no gradient work happens without autograd.
  (grad_mode="stored" writes the fp32 gradient in forward instead; see FusedMaskedMSE.)
  The denominator sum(m) = B*C*k*p is known on the host and `grad_output` is read on the
  device, so neither pass copies anything to the host.

Index math is 32-bit while every offset fits (int64 beyond 2**31 elements, see `use_int64`);
C, L and the patch size are compile-time constants (fixed for a training run), so the divisions
that map a flat offset to (sample, channel, patch) compile to multiplies, with no division
instruction (tests/test_kernel_compile.py checks the PTX). Flat blocks start at multiples of the
block size, so loads stay 16-byte aligned whatever L is (and vectorise when B*C*L is a multiple
of 16, which Triton detects at launch).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from kernels.masked_mse_reference import check_masking_args, num_masked_patches

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 2048  # elements per program of the flat kernels
INT32_LIMIT = 2**31 - 1  # largest offset int32 index math may reach


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_int64(tensors: list[torch.Tensor], n: int, block: int = BLOCK) -> bool:
    """True when a flat grid of `block`-sized programs over n elements, or an element offset
    (through the strides) of any of `tensors`, can pass INT32_LIMIT."""
    last_program_end = triton.cdiv(n, block) * block
    spans = [sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) for t in tensors if t.numel()]
    return max([last_program_end, *spans]) > INT32_LIMIT


def _check_tensor(name: str, t: object, device: torch.device | None = None, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take {names}")
    if t.device.type != "cuda" and not interpreter_active():
        raise ValueError(
            f"{name} is on {t.device}; the fused Triton kernels need a CUDA tensor "
            f"(or TRITON_INTERPRET=1 for CPU testing). Use loss_impl='reference' on CPU."
        )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other arguments are on {device}; put them on one device")


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def _patch_keys(seed, sample, patch, n_patches, LOG_P: tl.constexpr):
    # Philox draw keyed by (seed, global sample, patch); top 31-LOG_P bits random, low bits = patch.
    r = tl.randint(seed, sample * n_patches + patch)
    rnd = (r >> 1).to(tl.int32)  # uint32 -> non-negative int32
    return ((rnd >> LOG_P) << LOG_P) | patch


# seed changes every step and sample_offset every micro-step / rank: specialising them (on
# divisibility by 16, or == 1) would compile the kernel again early in training.
@triton.jit(do_not_specialize=["seed", "sample_offset"])
def _patch_mask_kernel(
    pmask_ptr, seed, sample_offset, n_patches, k, BLOCK_P: tl.constexpr, LOG_P: tl.constexpr,
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
    tl.store(pmask_ptr + b.to(tl.int64) * n_patches + pidx, (keys < hi).to(tl.int8), mask=pvalid)


@triton.jit
def _flat_offsets(n, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _address(offs, b, c, l, s0, s1, s2, CONTIG: tl.constexpr):
    # element offset of [b, c, l]: the flat offset itself for a contiguous tensor (vectorisable)
    if CONTIG:
        return offs
    else:
        return b * s0 + c * s1 + l * s2


@triton.jit
def _apply_mask_kernel(
    x_ptr, out_ptr, pmask_ptr, n, x_s0, x_s1, x_s2,
    C: tl.constexpr, L: tl.constexpr, PATCH: tl.constexpr, X_CONTIG: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    offs, valid = _flat_offsets(n, INDEX_64, BLOCK)
    b = offs // (C * L)  # constant divisors: multiply-high, no division instruction
    c = (offs // L) % C
    l = offs % L
    m = tl.load(pmask_ptr + b * (L // PATCH) + l // PATCH, mask=valid, other=0)
    x = tl.load(x_ptr + _address(offs, b, c, l, x_s0, x_s1, x_s2, X_CONTIG), mask=valid, other=0.0)
    y = tl.where(m != 0, tl.zeros_like(x), x)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _loss_kernel(
    z_ptr, x_ptr, pmask_ptr, out_ptr, gout_ptr, n, z_s0, z_s1, z_s2, x_s0, x_s1, x_s2, pm_s0, pm_s1,
    inv_count, C: tl.constexpr, L: tl.constexpr, PATCH: tl.constexpr, APPLY_TANH: tl.constexpr,
    MODE: tl.constexpr, Z_CONTIG: tl.constexpr, X_CONTIG: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr, grad32_ptr=None,
):
    # MODE 0: forward, fp32 partial sums to out_ptr. 1: the same, and the unscaled gradient in fp32
    # to grad32_ptr ("stored"). 2: backward, the gradient times *gout_ptr in out_ptr's dtype.
    offs, valid = _flat_offsets(n, INDEX_64, BLOCK)
    b = offs // (C * L)
    c = (offs // L) % C
    l = offs % L
    z = tl.load(z_ptr + _address(offs, b, c, l, z_s0, z_s1, z_s2, Z_CONTIG), mask=valid, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + _address(offs, b, c, l, x_s0, x_s1, x_s2, X_CONTIG), mask=valid, other=0.0).to(tl.float32)
    m = tl.load(pmask_ptr + b * pm_s0 + (l // PATCH) * pm_s1, mask=valid, other=0).to(tl.float32)
    if APPLY_TANH:
        # tanh(z) = 1 - 2 / (exp(2z) + 1): stable at both ends in fp32.
        y = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    else:
        y = z
    diff = (y - x) * m
    if MODE == 2:
        # d (loss * grad_output) / d z in fp32; one rounding, at the store
        g = diff * (2.0 * inv_count * tl.load(gout_ptr).to(tl.float32))
        if APPLY_TANH:
            g = g * (1.0 - y * y)
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(out_ptr + tl.program_id(0), tl.sum(diff * diff, axis=0))
        if MODE == 1:
            g = diff * (2.0 * inv_count)
            if APPLY_TANH:
                g = g * (1.0 - y * y)
            tl.store(grad32_ptr + offs, g, mask=valid)


@triton.jit
def _scale_kernel(g32_ptr, gout_ptr, out_ptr, n, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    # backward of the "stored" mode: fp32 gradient times grad_output, one rounding to z's dtype
    offs, valid = _flat_offsets(n, INDEX_64, BLOCK)
    g = tl.load(g32_ptr + offs, mask=valid, other=0.0) * tl.load(gout_ptr)
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=valid)


def fused_patch_mask(
    x: torch.Tensor, patch_size: int, ratio: float, seed: int, sample_offset: int = 0,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, L] -> (x with masked patches zeroed [B, C, L] in out_dtype (default x's), patch
    mask int8 [B, P]).

    `seed` should come from the base seed and the step; `sample_offset` is the global batch
    position of this batch's first sample, so a position's mask is the same however the global
    batch is split over ranks.
    """
    _check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, C, L], got shape {tuple(x.shape)}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, got {out_dtype}")
    B, C, L = x.shape
    n_patches = check_masking_args(L, patch_size, ratio)
    if n_patches > 4096:
        raise ValueError(f"{n_patches} patches per sample exceed the kernel's 4096; use a larger patch_size")
    if not 0 <= int(seed) < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if sample_offset < 0 or (sample_offset + B) * n_patches >= 2**31:
        raise ValueError(
            f"sample_offset={sample_offset} must be >= 0 and (sample_offset + B) * patches = "
            f"{(sample_offset + B) * n_patches} below 2**31 (the Philox offset is 32-bit)"
        )
    out = torch.empty(B, C, L, dtype=out_dtype, device=x.device)  # [B, C, L], contiguous
    pmask = torch.empty(B, n_patches, dtype=torch.int8, device=x.device)  # [B, P]
    if x.numel() == 0:
        return out, pmask
    block_p = triton.next_power_of_2(n_patches)
    n = x.numel()
    with device_guard(x.device):
        _patch_mask_kernel[(B,)](
            pmask, int(seed), int(sample_offset), n_patches, num_masked_patches(n_patches, ratio),
            BLOCK_P=block_p, LOG_P=max(1, block_p.bit_length() - 1),
        )
        _apply_mask_kernel[(triton.cdiv(n, BLOCK),)](
            x, out, pmask, n, *x.stride(), C=C, L=L, PATCH=patch_size, X_CONTIG=x.is_contiguous(),
            INDEX_64=use_int64([x, out], n), BLOCK=BLOCK,
        )
    return out, pmask


def _check_loss_args(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, patch_size: int, ratio: float
) -> int:
    """Validate the loss arguments; returns sum(m) = B * C * k * patch_size."""
    _check_tensor("reconstruction", z)
    _check_tensor("target", target, z.device)
    _check_tensor("patch mask", pmask, z.device, dtypes=(torch.int8,))
    if z.dim() != 3 or z.shape != target.shape:
        raise ValueError(f"reconstruction {tuple(z.shape)} and target {tuple(target.shape)} must both be [B, C, L]")
    B, C, L = z.shape
    n_patches = check_masking_args(L, patch_size, ratio)
    if pmask.shape != (B, n_patches):
        raise ValueError(
            f"patch mask is {pmask.dtype} {tuple(pmask.shape)}; expected int8 [{B}, {n_patches}] from fused_patch_mask"
        )
    # Every row masks exactly k patches, so sum(m) is known here: no device-to-host copy.
    return B * C * patch_size * num_masked_patches(n_patches, ratio)


def _launch_loss(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, out: torch.Tensor, gout: torch.Tensor,
    patch_size: int, count: int, apply_tanh: bool, backward: bool, grad32: torch.Tensor | None = None,
) -> None:
    B, C, L = z.shape
    n = z.numel()
    mode = 2 if backward else (1 if grad32 is not None else 0)
    with device_guard(z.device):
        _loss_kernel[(triton.cdiv(n, BLOCK),)](
            z, target, pmask, out, gout, n, *z.stride(), *target.stride(), *pmask.stride(), 1.0 / count,
            C=C, L=L, PATCH=patch_size, APPLY_TANH=apply_tanh, MODE=mode,
            Z_CONTIG=z.is_contiguous(), X_CONTIG=target.is_contiguous(),
            INDEX_64=use_int64([z, target, pmask, out], n), BLOCK=BLOCK, grad32_ptr=grad32,
        )


GRAD_MODES = ("recompute", "stored")


def _loss_forward(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, patch_size: int, ratio: float,
    apply_tanh: bool, grad_mode: str, need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(fp32 loss, the unscaled fp32 gradient when need_grad and grad_mode == 'stored' else None, sum(m))."""
    count = _check_loss_args(z, target, pmask, patch_size, ratio)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    partial = torch.empty(triton.cdiv(z.numel(), BLOCK), dtype=torch.float32, device=z.device)
    grad32 = None
    if need_grad and grad_mode == "stored":
        grad32 = torch.empty(z.shape, dtype=torch.float32, device=z.device)  # [B, C, L]
    if z.numel():
        _launch_loss(z, target, pmask, partial, partial, patch_size, count, apply_tanh, backward=False, grad32=grad32)
    return partial.sum() / count, grad32, count


class FusedMaskedMSE(torch.autograd.Function):
    """Masked MSE over patch-masked samples, with the final tanh fused; grads w.r.t. logits only.

    Two gradient modes, both exact in fp16/bf16 (the loss scale `grad_output` is applied in fp32
    before the one rounding to z's dtype), both one pass over the data each way:
    `recompute` (default): backward reads z, x and the mask again and writes the gradient;
    nothing is saved but references to the inputs. Bytes per element, z of size sz and x of sx:
    (sz + sx) forward + (sz + sx + sz) backward.
    `stored`: forward also writes the unscaled gradient in fp32, backward scales it:
    (sz + sx + 4) + (4 + sz), and an fp32 [B, C, L] buffer held until backward. Recompute moves
    no more bytes whenever sx <= 4 (every supported dtype: 10 vs 12 for bf16, 14 vs 16 for the
    trainer's bf16 logits against fp32 input, 20 vs 20 for fp32); bench/bench_masked_mse.py
    times both. Without autograd (no input requires grad, or no_grad) no gradient work is done."""

    @staticmethod
    def forward(ctx, z, target, pmask, patch_size, ratio, apply_tanh, grad_mode):  # type: ignore[override]
        loss, grad32, count = _loss_forward(z, target, pmask, patch_size, ratio, apply_tanh, grad_mode, need_grad=True)
        ctx.save_for_backward(*((grad32,) if grad32 is not None else (z, target, pmask)))
        ctx.args = (patch_size, count, apply_tanh, grad_mode, z.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        patch_size, count, apply_tanh, grad_mode, dtype = ctx.args
        saved = ctx.saved_tensors
        grad = torch.empty(saved[0].shape, dtype=dtype, device=saved[0].device)  # [B, C, L], contiguous
        gout = grad_output.to(device=grad.device, dtype=torch.float32)  # fp32: no rounding of the loss scale
        if grad.numel() == 0:
            pass
        elif grad_mode == "stored":
            (grad32,) = saved
            n = grad.numel()
            with device_guard(grad.device):
                _scale_kernel[(triton.cdiv(n, BLOCK),)](grad32, gout, grad, n, INDEX_64=use_int64([grad32], n), BLOCK=BLOCK)
        else:
            z, target, pmask = saved
            _launch_loss(z, target, pmask, grad, gout, patch_size, count, apply_tanh, backward=True)
        return grad, None, None, None, None, None, None


def fused_masked_mse(
    z: torch.Tensor, target: torch.Tensor, pmask: torch.Tensor, patch_size: int, ratio: float,
    apply_tanh: bool = True, grad_mode: str = "recompute",
) -> torch.Tensor:
    """sum((tanh(z) - x)^2 * m) / sum(m), m the patch mask (from fused_patch_mask with the same
    ratio) expanded over samples and channels; z are logits when apply_tanh, else the reconstruction.
    Any strides are read correctly; the loss is fp32; the gradient has z's dtype. grad_mode:
    see FusedMaskedMSE."""
    if torch.is_grad_enabled() and isinstance(z, torch.Tensor) and z.requires_grad:
        return FusedMaskedMSE.apply(z, target, pmask, patch_size, ratio, apply_tanh, grad_mode)
    return _loss_forward(z, target, pmask, patch_size, ratio, apply_tanh, grad_mode, need_grad=False)[0]
