"""HiMAE: a hierarchical 1-D convolutional masked autoencoder, read top to bottom.

The module and parameter names match the authors' implementation exactly
(`encoder_layers.{i}.main_path`, `.shortcut`, `decoder_layers.{i}.upconv`, `.conv_block`,
`final_deconv`), so their Lightning checkpoints load with `strict=True` once the `model.`
prefix is stripped, and weights exported from here load into their module.

Shapes at the defaults (in_chans=1, L=250, channels 16-32-64-128-256):
    x [B, 1, 250] -> enc0 [B, 16, 125] -> enc1 [B, 32, 63] -> enc2 [B, 64, 32]
    -> enc3 [B, 128, 16] -> enc4 [B, 256, 8] (bottleneck)
    -> dec0 [B, 128, 16] -> dec1 [B, 64, 32] -> dec2 [B, 32, 63] -> dec3 [B, 16, 125]
    -> final_deconv [B, 1, 250] -> tanh
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

DEFAULT_CHANNELS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class HiMAEConfig:
    """Architecture of one HiMAE; stored beside exported weights so they reload without guessing."""

    in_chans: int = 1
    channels: tuple[int, ...] = DEFAULT_CHANNELS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HiMAEConfig":
        return cls(in_chans=int(d["in_chans"]), channels=tuple(int(c) for c in d["channels"]))


class ResConvBlock(nn.Module):
    """Stride-2 residual block: two k=5 convs with BatchNorm/GELU, 1x1 strided shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.main_path = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size=5, stride=stride, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.GELU(),
            nn.Conv1d(out_channels, out_channels, kernel_size=5, stride=1, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm1d(out_channels),
            )
        self.final_activation = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, Cin, L] -> [B, Cout, ceil(L / stride)]
        main = self.main_path(x)
        short = self.shortcut(x)[:, :, : main.shape[-1]]
        return self.final_activation(main + short)


class DecoderSkipBlock(nn.Module):
    """Upsample x2 with a transposed conv, crop to the skip's length, concat the skip, two convs."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.upconv = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size=5, stride=2, padding=2, output_padding=1
        )
        self.conv_block = nn.Sequential(
            nn.Conv1d(out_channels + skip_channels, out_channels, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.GELU(),
            nn.Conv1d(out_channels, out_channels, kernel_size=5, padding=2, bias=False),
            nn.BatchNorm1d(out_channels),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # x [B, Cin, l] -> up [B, Cout, 2l] -> crop [B, Cout, Ls]; cat skip [B, Cout + Cs, Ls]
        up = self.upconv(x)[:, :, : skip.shape[-1]]
        return self.conv_block(torch.cat([up, skip], dim=1))


class HiMAE(nn.Module):
    """Encoder of stride-2 residual blocks, U-Net decoder with skips, tanh output.

    Works for any input length (output length always equals input length) and any
    number of input channels (1 for PPG or ECG, 2 for both).
    """

    def __init__(self, in_chans: int = 1, channels: tuple[int, ...] = DEFAULT_CHANNELS):
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {tuple(channels)}")
        self.config = HiMAEConfig(in_chans=in_chans, channels=tuple(channels))

        self.encoder_layers = nn.ModuleList()
        prev = in_chans
        for chan in channels:
            self.encoder_layers.append(ResConvBlock(prev, chan, stride=2))
            prev = chan

        rev = list(channels)[::-1]
        self.decoder_layers = nn.ModuleList(
            DecoderSkipBlock(rev[i], rev[i + 1], rev[i + 1]) for i in range(len(rev) - 1)
        )
        self.final_deconv = nn.ConvTranspose1d(
            channels[0], in_chans, kernel_size=5, stride=2, padding=2, output_padding=1
        )
        self.final_activation = nn.Tanh()

    @classmethod
    def from_config(cls, config: HiMAEConfig) -> "HiMAE":
        return cls(in_chans=config.in_chans, channels=config.channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature map of every encoder level, finest first: the multi-resolution embeddings."""
        if x.dim() != 3 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"HiMAE expects input [B, {self.config.in_chans}, L], got {tuple(x.shape)}"
            )
        feats = []
        for block in self.encoder_layers:
            x = block(x)  # [B, C_i, ceil(L_{i-1} / 2)]
            feats.append(x)
        return feats

    def decode_logits(self, feats: list[torch.Tensor], length: int) -> torch.Tensor:
        """Reconstruction before the final tanh (a fused loss can apply tanh itself)."""
        x = feats[-1]
        for block, skip in zip(self.decoder_layers, reversed(feats[:-1])):
            x = block(x, skip)
        # [B, C0, ceil(L/2)] -> [B, in_chans, 2 * ceil(L/2)] -> crop to [B, in_chans, L]
        return self.final_deconv(x)[:, :, :length]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_logits(self.encode(x), x.shape[-1])

    def forward(self, x: torch.Tensor, apply_tanh: bool = True) -> torch.Tensor:
        # x [B, C, L] -> reconstruction in [-1, 1], [B, C, L] (logits if apply_tanh=False,
        # for a loss kernel that fuses the tanh)
        logits = self.forward_logits(x)
        return self.final_activation(logits) if apply_tanh else logits


def encoder_parameter_count(model: HiMAE) -> int:
    return sum(p.numel() for p in model.encoder_layers.parameters())
