"""The fused Triton kernels against the PyTorch reference, on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.masked_mse_reference import expand_patch_mask, masked_mse  # noqa: E402
from kernels.masked_mse_triton import fused_masked_mse, fused_patch_mask  # noqa: E402  (TRITON_INTERPRET: conftest)

SHAPES = [  # (B, C, L, patch, ratio): odd batch, L not a multiple of any block, two channels
    (1, 1, 250, 5, 0.8),
    (3, 2, 1000, 5, 0.8),
    (5, 1, 255, 5, 0.5),
    (2, 2, 60, 4, 0.3),
    (4, 1, 250, 25, 0.6),
    (2, 1, 3000, 5, 0.75),
]


@pytest.mark.parametrize("B,C,L,p,r", SHAPES)
def test_mask_has_exactly_k_patches_and_zeroes_them(B, C, L, p, r):
    x = torch.randn(B, C, L) + 3.0
    xm, pm = fused_patch_mask(x, p, r, seed=11)
    assert pm.dtype == torch.int8 and pm.shape == (B, L // p)
    assert (pm.sum(1) == int(r * (L // p))).all()
    m = expand_patch_mask(pm.bool(), p)  # [B, 1, L]
    assert torch.equal(xm, x * (1 - m))


@pytest.mark.parametrize("B,C,L,p,r", SHAPES)
@pytest.mark.parametrize("apply_tanh", [True, False])
def test_loss_and_gradient_match_the_reference(B, C, L, p, r, apply_tanh):
    torch.manual_seed(B * L)
    x = torch.rand(B, C, L) * 2 - 1
    _, pm = fused_patch_mask(x, p, r, seed=5)
    z = (torch.randn(B, C, L) * 1.5).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    grad_out = torch.rand(()) * 3  # DeepSpeed scales the loss, so backward must honour grad_output

    loss = fused_masked_mse(z, x, pm, p, r, apply_tanh=apply_tanh)
    loss.backward(grad_out)
    y_ref = torch.tanh(z_ref) if apply_tanh else z_ref
    loss_ref = masked_mse(y_ref, x, expand_patch_mask(pm.bool(), p))
    loss_ref.backward(grad_out)

    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-8)


def test_half_precision_logits_accumulate_in_fp32():
    x = torch.rand(4, 1, 250) * 2 - 1
    _, pm = fused_patch_mask(x, 5, 0.8, seed=1)
    z = torch.randn(4, 1, 250)
    loss16 = fused_masked_mse(z.half(), x, pm, 5, 0.8)
    loss32 = fused_masked_mse(z.half().float(), x, pm, 5, 0.8)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-5, atol=1e-6)


def test_same_seed_same_mask_and_independent_of_sharding():
    x = torch.randn(8, 1, 250)
    _, full = fused_patch_mask(x, 5, 0.8, seed=42)
    assert torch.equal(full, fused_patch_mask(x, 5, 0.8, seed=42)[1])
    # the same samples split over "two GPUs": rank 1 holds global samples 4..7
    assert torch.equal(full[4:], fused_patch_mask(x[4:], 5, 0.8, seed=42, sample_offset=4)[1])
    assert not torch.equal(full, fused_patch_mask(x, 5, 0.8, seed=43)[1])  # next step: new masks
    assert not torch.equal(full[:4], full[4:])  # rows differ


def test_masks_are_uniform_over_patch_positions():
    from scipy.stats import chisquare

    B, P, r = 400, 20, 0.3  # k = 6; 120 expected per position (the interpreter is slow)
    x = torch.zeros(B, 1, P * 5)
    _, pm = fused_patch_mask(x, 5, r, seed=2024)
    counts = pm.sum(0).double()  # masked count per patch position
    assert counts.sum() == B * int(r * P)
    assert chisquare(counts.numpy()).pvalue > 1e-3
    # independent across steps: two seeds' masks overlap as chance predicts (k^2 / P per row)
    _, pm2 = fused_patch_mask(x, 5, r, seed=2025)
    overlap = (pm.bool() & pm2.bool()).sum(1).double().mean().item()
    assert abs(overlap - 6 * 6 / 20) < 0.2  # about 4 standard errors


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(shape=(2, 1, 251)), ValueError, "L=251 is not divisible by patch_size=5"),
    (dict(ratio=1.0), ValueError, "mask_ratio must be in"),
    (dict(ratio=-0.1), ValueError, "mask_ratio must be in"),
    (dict(dtype=torch.float64), TypeError, "dtype torch.float64"),
    (dict(dtype=torch.int32), TypeError, "dtype torch.int32"),
])
def test_bad_mask_arguments_are_rejected(kwargs, exc, match):
    x = torch.zeros(kwargs.get("shape", (2, 1, 250)), dtype=kwargs.get("dtype", torch.float32))
    with pytest.raises(exc, match=match):
        fused_patch_mask(x, 5, kwargs.get("ratio", 0.8), seed=0)


def test_cpu_tensors_without_the_interpreter_are_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        fused_patch_mask(torch.zeros(2, 1, 250), 5, 0.8, seed=0)


def test_loss_rejects_a_mask_of_the_wrong_shape():
    x = torch.zeros(2, 1, 250)
    with pytest.raises(ValueError, match=r"expected int8 \[2, 50\]"):
        fused_masked_mse(x, x, torch.zeros(2, 49, dtype=torch.int8), 5, 0.8)
