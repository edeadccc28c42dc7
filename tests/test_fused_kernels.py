"""The fused Triton kernels against the PyTorch reference, on CPU under TRITON_INTERPRET=1.

`HIMAE_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_fused_kernels.py` runs the same tests
on a GPU with compiled kernels (bench/gpu_check.sh does). One difference is allowed for: the
interpreter rounds fp32 -> bf16 toward zero where the GPU rounds to nearest, so bf16 results
may differ from the reference by one bf16 ulp under the interpreter, by none on CUDA.
"""

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

from kernels import masked_mse_triton as mt  # noqa: E402  (TRITON_INTERPRET: conftest)
from kernels.masked_mse_reference import expand_patch_mask, masked_mse  # noqa: E402
from kernels.masked_mse_triton import fused_masked_mse, fused_patch_mask  # noqa: E402

DEVICE = os.environ.get("HIMAE_TEST_DEVICE", "cpu")
BF16_ULPS = 0 if DEVICE == "cuda" else 1


@pytest.fixture(autouse=True)
def _default_device():
    """Every factory call in these tests makes tensors on DEVICE."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("HIMAE_TEST_DEVICE=cuda but no GPU is visible")
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


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


def _near_converged(B, C, L, noise, seed=0):
    """Targets in (-0.95, 0.95) and logits within `noise` of atanh(target): tiny gradients."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.rand(B, C, L, generator=g) * 1.9 - 0.95
    return x, torch.atanh(x) + noise * torch.randn(B, C, L, generator=g)


@pytest.mark.parametrize("grad_mode", mt.GRAD_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_low_precision_gradient_matches_the_fp32_reference(dtype, scale, grad_mode):
    # Near convergence the unscaled gradient 2*diff*(1-y^2)/count sits in fp16's subnormal range;
    # the loss scale (grad_output) must be applied before the one rounding, as autograd does for
    # the reference. The old kernel rounded the unscaled gradient in forward: at scale 1024 it
    # zeroed most entries (relative L2 error 0.46 on this data).
    x32, z32 = _near_converged(4, 2, 1000, noise=1e-3)  # count = 4*2*160*5 = 6400
    _, pm = fused_patch_mask(x32, 5, 0.8, seed=7)
    z = z32.to(dtype).requires_grad_(True)
    x = x32.to(dtype)
    fused_masked_mse(z, x, pm, 5, 0.8, grad_mode=grad_mode).backward(torch.tensor(scale))
    # fp32 reference on the same (rounded) inputs: the exact gradient, times the loss scale
    z_ref = z.detach().float().requires_grad_(True)
    masked_mse(torch.tanh(z_ref), x.float(), expand_patch_mask(pm.bool(), 5)).backward(torch.tensor(scale))
    g, g_ref = z.grad.float(), z_ref.grad
    eps = torch.finfo(dtype).eps  # 2**-10 fp16, 2**-7 bf16
    # every entry within one rounding of the exact scaled gradient; absolute floors: the subnormal
    # step (where the scaled gradient itself underflows, as the reference's does) and 2**-20 of
    # the gradient unit 2*scale/count (fp32 tanh(z) - x cancels near convergence)
    floor = torch.finfo(dtype).smallest_normal * eps + 2 * scale / 6400 * 2**-20
    assert ((g - g_ref).abs() <= eps * g_ref.abs() + floor).all()
    if scale == 1024.0 and dtype == torch.float16:
        nz = g_ref != 0
        assert ((g == 0) & nz).sum() < 0.01 * nz.sum()
        assert ((g - g_ref).norm() / g_ref.norm()).item() < eps


@pytest.mark.parametrize("grad_mode", mt.GRAD_MODES)
def test_grad_output_is_applied_in_fp32_not_rounded_to_the_logits_dtype(grad_mode):
    x, z32 = _near_converged(4, 1, 250, noise=0.3)
    _, pm = fused_patch_mask(x, 5, 0.8, seed=1)
    gout = torch.tensor(1.0 + 2**-12)  # 1.0 once rounded to fp16, which moves ~1/4 of the results
    z = z32.half().requires_grad_(True)
    fused_masked_mse(z, x, pm, 5, 0.8, grad_mode=grad_mode).backward(gout)
    z_ref = z.detach().float().requires_grad_(True)  # fp32 math on the same inputs
    masked_mse(torch.tanh(z_ref), x, expand_patch_mask(pm.bool(), 5)).backward(gout)
    expected = z_ref.grad.half()  # one rounding, after the scale
    nz = expected != 0
    same = (z.grad == expected)[nz].float().mean().item()
    assert same > 0.95, f"only {same:.3f} of the fp16 gradient entries equal the reference's"


@pytest.mark.parametrize("B,C,L,p,r", [SHAPES[1], SHAPES[2]])
def test_stored_gradient_mode_matches_the_reference(B, C, L, p, r):
    x = torch.rand(B, C, L) * 2 - 1
    _, pm = fused_patch_mask(x, p, r, seed=5)
    z = (torch.randn(B, C, L) * 1.5).requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    fused_masked_mse(z, x, pm, p, r, grad_mode="stored").backward(torch.tensor(2.5))
    masked_mse(torch.tanh(z_ref), x, expand_patch_mask(pm.bool(), p)).backward(torch.tensor(2.5))
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="grad_mode must be one of"):
        fused_masked_mse(z, x, pm, p, r, grad_mode="saved")


def _count_loss_launches(monkeypatch) -> list[bool]:
    launches: list[bool] = []
    real = mt._launch_loss

    def spy(*args, backward, grad32=None, **kwargs):
        launches.append("grad32" if grad32 is not None else backward)
        return real(*args, backward=backward, grad32=grad32, **kwargs)

    monkeypatch.setattr(mt, "_launch_loss", spy)
    return launches


@pytest.mark.parametrize("grad_mode", mt.GRAD_MODES)
@pytest.mark.parametrize("requires_grad,no_grad", [(False, False), (True, True)])
def test_no_gradient_work_without_autograd(monkeypatch, requires_grad, no_grad, grad_mode):
    launches = _count_loss_launches(monkeypatch)
    x = torch.rand(2, 1, 250) * 2 - 1
    _, pm = fused_patch_mask(x, 5, 0.8, seed=1)
    z = torch.randn(2, 1, 250, requires_grad=requires_grad)
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        loss = fused_masked_mse(z, x, pm, 5, 0.8, grad_mode=grad_mode)
    assert not loss.requires_grad
    assert launches == [False]  # the forward pass only: no gradient computed or kept


def test_gradient_is_computed_only_in_backward(monkeypatch):
    launches = _count_loss_launches(monkeypatch)
    x = torch.rand(2, 1, 250) * 2 - 1
    _, pm = fused_patch_mask(x, 5, 0.8, seed=1)
    loss = fused_masked_mse(torch.randn(2, 1, 250, requires_grad=True), x, pm, 5, 0.8)
    assert launches == [False]
    loss.backward()
    assert launches == [False, True]
    launches.clear()
    fused_masked_mse(torch.randn(2, 1, 250, requires_grad=True), x, pm, 5, 0.8, grad_mode="stored").backward()
    assert launches == ["grad32"]  # stored: the forward pass writes it, backward only scales


def test_strided_arguments_are_read_through_their_strides():
    # the model crops its last deconv ([:, :, :L]); a transposed mask view has the right shape
    B, C, L, p = 3, 2, 250, 5
    x = torch.rand(B, C, L) * 2 - 1
    _, pm = fused_patch_mask(x, p, 0.8, seed=4)
    z_full = torch.randn(B, C, L + 6)
    z_view = z_full[:, :, :L]
    x_t = x.transpose(0, 2).contiguous().transpose(0, 2)  # same values, non-contiguous
    pm_t = pm.t().contiguous().t()
    assert not (z_view.is_contiguous() or x_t.is_contiguous() or pm_t.is_contiguous())
    z1 = z_view.clone().requires_grad_(True)
    z2 = z_full.clone().requires_grad_(True)
    loss1 = fused_masked_mse(z1, x, pm, p, 0.8)
    loss2 = fused_masked_mse(z2[:, :, :L], x_t, pm_t, p, 0.8)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss2, loss1, rtol=0, atol=0)
    torch.testing.assert_close(z2.grad[:, :, :L], z1.grad, rtol=0, atol=0)
    assert (z2.grad[:, :, L:] == 0).all()
    xm1, pm1 = fused_patch_mask(x, p, 0.8, seed=9)
    xm2, pm2 = fused_patch_mask(x_t, p, 0.8, seed=9)
    assert torch.equal(pm1, pm2) and torch.equal(xm1, xm2)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mask_writes_the_masked_input_in_the_compute_dtype(out_dtype):
    x = torch.rand(3, 2, 250) * 2 - 1
    xm, pm = fused_patch_mask(x, 5, 0.8, seed=3, out_dtype=out_dtype)
    assert xm.dtype == out_dtype and xm.is_contiguous()
    expected = x * (1 - expand_patch_mask(pm.bool(), 5))
    if out_dtype == torch.bfloat16 and BF16_ULPS:  # the interpreter truncates fp32 -> bf16
        torch.testing.assert_close(xm.float(), expected, rtol=BF16_ULPS * 2**-7, atol=0)
        assert (xm.float().abs() <= expected.abs()).all()
    else:
        assert torch.equal(xm, expected.to(out_dtype))


def test_int64_index_path_matches_the_int32_path(monkeypatch):
    B, C, L, p = 3, 2, 250, 5
    x = torch.rand(B, C, L) * 2 - 1
    z = torch.randn(B, C, L)
    chosen: list[bool] = []
    real = mt.use_int64
    monkeypatch.setattr(mt, "use_int64", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])

    def run():
        xm, pm = fused_patch_mask(x, p, 0.8, seed=21)
        zz = z.clone().requires_grad_(True)
        loss = fused_masked_mse(zz, x, pm, p, 0.8)
        loss.backward()
        return xm, pm, loss, zz.grad

    small = run()
    assert chosen and not any(chosen)
    chosen.clear()
    monkeypatch.setattr(mt, "INT32_LIMIT", 0)  # force the path taken from 2**31 elements up
    big = run()
    assert chosen and all(chosen)
    for a, b in zip(small, big):
        assert torch.equal(a, b)


def test_int64_is_chosen_exactly_when_an_offset_passes_int32():
    meta = dict(device="meta")
    lim, blk = mt.INT32_LIMIT, mt.BLOCK
    n_ok = (lim + 1) - blk  # the last program ends at 2**31 - BLOCK + BLOCK - 1... within int32
    assert not mt.use_int64([], n_ok)
    assert mt.use_int64([], n_ok + 1)  # one more element starts a program whose offsets reach 2**31
    t = torch.empty(4096, 1, 1000, **meta)  # 4M elements
    assert not mt.use_int64([t], t.numel())
    # a small view of a huge buffer: offsets through the strides pass 2**31
    strided = torch.empty_strided((2, 1, 1000), (2**31, 1000, 1), **meta)
    assert mt.use_int64([strided], strided.numel())
    assert mt.use_int64([torch.empty(2**20, 2, 1024, **meta)], 2**31)  # B*C*L = 2**31


def test_launches_are_guarded_on_the_tensors_device():
    guard = mt.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(mt.device_guard(torch.device("cpu")), contextlib.nullcontext)


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

    B, P, r = 160, 20, 0.3  # k = 6; 48 expected per position (the interpreter is slow; fixed seeds)
    x = torch.zeros(B, 1, P * 5)
    _, pm = fused_patch_mask(x, 5, r, seed=2024)
    counts = pm.sum(0).double()  # masked count per patch position
    assert counts.sum() == B * int(r * P)
    assert chisquare(counts.cpu().numpy()).pvalue > 1e-3
    # independent across steps: two seeds' masks overlap as chance predicts (k^2 / P per row)
    _, pm2 = fused_patch_mask(x, 5, r, seed=2025)
    overlap = (pm.bool() & pm2.bool()).sum(1).double().mean().item()
    assert abs(overlap - 6 * 6 / 20) < 0.25  # about 3 standard errors


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
        fused_patch_mask(torch.zeros(2, 1, 250, device="cpu"), 5, 0.8, seed=0)


@pytest.mark.parametrize("which,bad,exc,match", [
    ("pmask", torch.zeros(2, 50, dtype=torch.bool), TypeError, "patch mask has dtype torch.bool"),
    ("pmask", torch.zeros(2, 50, dtype=torch.int8, device="meta"), ValueError, "patch mask is on meta"),
    ("target", torch.zeros(2, 1, 250, device="meta"), ValueError, "target is on meta"),
    ("target", torch.zeros(2, 1, 250, dtype=torch.float64), TypeError, "target has dtype torch.float64"),
    ("target", torch.zeros(2, 2, 250), ValueError, r"target \(2, 2, 250\) must both be"),
    ("z", torch.zeros(2, 250), ValueError, r"reconstruction \(2, 250\)"),
    ("z", [0.0], TypeError, "reconstruction must be a torch.Tensor"),
])
def test_loss_rejects_bad_arguments_by_name(which, bad, exc, match):
    args = dict(z=torch.zeros(2, 1, 250), target=torch.zeros(2, 1, 250), pmask=torch.zeros(2, 50, dtype=torch.int8))
    args[which] = bad
    with pytest.raises(exc, match=match):
        fused_masked_mse(args["z"], args["target"], args["pmask"], 5, 0.8)


def test_mask_rejects_bad_offsets_and_dtypes():
    x = torch.zeros(2, 1, 250)
    with pytest.raises(ValueError, match="sample_offset=-1 must be >= 0"):
        fused_patch_mask(x, 5, 0.8, seed=0, sample_offset=-1)
    with pytest.raises(ValueError, match="seed must be in"):
        fused_patch_mask(x, 5, 0.8, seed=2**31)
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        fused_patch_mask(x, 5, 0.8, seed=0, out_dtype=torch.float64)


def test_loss_rejects_a_mask_of_the_wrong_shape():
    x = torch.zeros(2, 1, 250)
    with pytest.raises(ValueError, match=r"expected int8 \[2, 50\]"):
        fused_masked_mse(x, x, torch.zeros(2, 49, dtype=torch.int8), 5, 0.8)
