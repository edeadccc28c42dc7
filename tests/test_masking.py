import pytest
import torch

from kernels.masked_mse_reference import mask_input, masked_mse, num_masked_patches, random_patch_mask


@pytest.mark.parametrize("batch,length,patch,ratio", [(7, 250, 5, 0.8), (1, 1000, 5, 0.8), (5, 250, 25, 0.5), (3, 60, 4, 0.3)])
def test_exact_mask_count_on_every_row(batch, length, patch, ratio):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, length) + 5.0  # never zero by chance
    xm, m = mask_input(x, patch, ratio, g)
    k = int(ratio * (length // patch))
    patch_mask = m[:, 0].reshape(batch, -1, patch)
    assert (patch_mask.amin(-1) == patch_mask.amax(-1)).all()  # whole patches
    assert (patch_mask[..., 0].sum(1) == k).all()
    assert (xm[m.expand_as(x) == 1] == 0).all()
    assert torch.equal(xm[m.expand_as(x) == 0], x[m.expand_as(x) == 0])


def test_num_masked_is_python_truncation():
    assert num_masked_patches(50, 0.8) == 40
    assert num_masked_patches(200, 0.8) == 160
    assert num_masked_patches(100, 0.29) == 28  # 0.29 * 100 = 28.999...


def test_masks_differ_between_rows_and_seeds():
    a = random_patch_mask(4, 50, 0.8, torch.Generator().manual_seed(1))
    b = random_patch_mask(4, 50, 0.8, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_loss_against_hand_computation():
    pred = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.0, 0.0, 0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0, 3.0, 1.0]], [[1.0, 1.0, 2.0, 2.0]]])
    mask = torch.tensor([[[0.0, 1.0, 0.0, 1.0]], [[1.0, 1.0, 0.0, 0.0]]])
    # masked squared errors: (2-0)^2=4, (4-1)^2=9, (0-1)^2=1, (0-1)^2=1 -> 15 over 4 masked samples
    assert masked_mse(pred, target, mask).item() == pytest.approx(15 / 4)


def test_loss_broadcasts_mask_over_channels():
    pred, target = torch.ones(1, 2, 4), torch.zeros(1, 2, 4)
    pred[0, 1] = 3.0
    mask = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])
    # channel 0: two masked samples of error 1; channel 1: two of error 9 -> 20 / 4
    assert masked_mse(pred, target, mask).item() == pytest.approx(5.0)


@pytest.mark.parametrize("length,patch,ratio,match", [
    (251, 5, 0.8, "L=251 is not divisible by patch_size=5"),
    (250, 5, 1.0, "mask_ratio must be in"),
    (250, 5, 0.0, "mask_ratio must be in"),
    (10, 5, 0.4, "masks no patch"),
])
def test_bad_masking_arguments(length, patch, ratio, match):
    with pytest.raises(ValueError, match=match):
        mask_input(torch.randn(2, 1, length), patch, ratio)
