import pytest
import torch

from himae_dist.model import HiMAE, encoder_parameter_count


def test_parameter_counts_match_the_seed():
    m = HiMAE()
    assert sum(p.numel() for p in m.parameters()) == 1_245_953
    assert encoder_parameter_count(m) == 700_672


def test_parameter_names_are_the_seeds():
    names = set(HiMAE().state_dict())
    expected = {
        "encoder_layers.0.main_path.0.weight", "encoder_layers.0.main_path.1.running_mean",
        "encoder_layers.0.main_path.3.weight", "encoder_layers.0.main_path.4.bias",
        "encoder_layers.4.shortcut.0.weight", "encoder_layers.4.shortcut.1.weight",
        "decoder_layers.0.upconv.weight", "decoder_layers.0.upconv.bias",
        "decoder_layers.3.conv_block.0.weight", "decoder_layers.3.conv_block.4.num_batches_tracked",
        "final_deconv.weight", "final_deconv.bias",
    }
    assert expected <= names
    assert len([n for n in names if n.startswith("encoder_layers.")]) == 5 * 18  # per block: 3 convs + 3 BatchNorms (weight, bias, 3 buffers)
    assert not any(n.startswith("encoder_layers.5") or n.startswith("decoder_layers.4") for n in names)


@pytest.mark.parametrize("in_chans,length", [(1, 250), (1, 1000), (2, 250), (2, 1000), (1, 255), (1, 40)])
def test_output_length_equals_input_length(in_chans, length):
    m = HiMAE(in_chans).eval()
    x = torch.randn(3, in_chans, length)
    y = m(x)
    assert y.shape == x.shape
    assert y.abs().max() < 1.0  # tanh output


def test_encode_returns_every_level():
    feats = HiMAE().eval().encode(torch.randn(2, 1, 250))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 125), (2, 32, 63), (2, 64, 32), (2, 128, 16), (2, 256, 8)]


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input \[B, 2, L\]"):
        HiMAE(2).encode(torch.randn(1, 1, 250))
