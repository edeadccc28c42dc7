"""The device-side non-finite guard: bad samples never reach the model, the loss or a gradient."""

import pytest
import torch

from himae_dist.guards import NonFiniteGuard
from himae_dist.model import HiMAE
from himae_dist.objective import make_objective


def _batch(bad_rows: list[int], B: int = 6, L: int = 250) -> tuple[torch.Tensor, dict]:
    x = torch.rand(B, 1, L) * 2 - 1
    for i, r in enumerate(bad_rows):
        x[r, 0, 7 + i] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    return x.half(), {"key": [f"k{i:03d}" for i in range(B)], "shard": torch.tensor([i % 2 for i in range(B)])}


def test_bad_samples_take_a_good_samples_place_and_are_counted():
    x, batch = _batch([1, 4])
    guard = NonFiniteGuard("skip", 0, torch.device("cpu"), ["train/a.tar", "train/b.tar"])
    clean, keep = guard.clean(x, batch)
    assert keep.tolist() == [True, False, True, True, False, True]
    assert clean.dtype == torch.float16 and torch.isfinite(clean).all()
    assert torch.equal(clean[1], x[0]) and torch.equal(clean[4], x[0])  # BatchNorm sees real data only
    assert torch.equal(clean[keep], x[keep])
    assert float(guard.count) == 2 and guard.pending() == 6
    all_bad, _ = _batch(list(range(6)))
    clean, keep = guard.clean(all_bad, batch)
    first = torch.nan_to_num(all_bad[0], nan=0.0, posinf=0.0, neginf=0.0)
    assert not keep.any() and all(torch.equal(row, first) for row in clean) and float(guard.count) == 8


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_loss_and_gradients_come_from_the_kept_samples_only(impl):
    if impl == "fused":
        pytest.importorskip("triton")
    obj = make_objective(impl, torch.device("cpu"), 5, 0.8, 0, 0, 1)
    x, batch = _batch([2, 3])
    clean, keep = NonFiniteGuard("skip", 0, torch.device("cpu"), ["a", "b"]).clean(x, batch)
    xm, mask = obj.mask(clean, step=1, micro=0, out_dtype=torch.float32)
    model = HiMAE(1, (4, 8))
    recon = model(xm, apply_tanh=obj.apply_tanh)
    loss = obj.loss(recon, clean, mask, keep)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # the value and gradients of the loss over the kept rows alone (same forward, so same BatchNorm batch)
    rows = keep.nonzero().flatten()
    want = obj.loss(recon[rows], clean[rows], mask[rows].contiguous())
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    for g, w in zip(grads, torch.autograd.grad(want, params, retain_graph=True)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    everything = torch.autograd.grad(obj.loss(recon, clean, mask), params, retain_graph=True)
    assert any(not torch.allclose(g, e, rtol=1e-3, atol=1e-6) for g, e in zip(grads, everything))  # rows mattered
    # nothing kept: loss 0, gradients 0, not NaN
    loss0 = obj.loss(recon, clean, mask, torch.zeros_like(keep))
    assert float(loss0) == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in torch.autograd.grad(loss0, params, retain_graph=True))
    # everything kept: exactly the loss and gradients without a keep mask
    all_kept = obj.loss(recon, clean, mask, torch.ones_like(keep))
    assert torch.equal(all_kept, obj.loss(recon, clean, mask))
    assert all(torch.equal(g, e) for g, e in zip(torch.autograd.grad(all_kept, params, retain_graph=True), everything))
