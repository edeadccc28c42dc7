"""Plain PyTorch reference for patch masking and the masked-MSE loss (the seed's semantics).

Every sample gets exactly `int(ratio * n_patches)` masked patches, chosen uniformly at random;
masked samples are zeroed in the input; the loss is the squared error over masked samples
only, sum((x_hat - x)^2 * m) / max(sum(m), 1), with m broadcast over channels. A fused kernel must
match these functions; they stay here as the ground truth its tests compare against.
"""

from __future__ import annotations

import torch


def check_masking_args(length: int, patch_size: int, ratio: float) -> int:
    """Validate (L, p, r) and return the number of patches; errors name the offending option."""
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if length % patch_size != 0:
        raise ValueError(
            f"segment length L={length} is not divisible by patch_size={patch_size}; "
            f"choose a patch size that divides L (e.g. 5 for L=250 or L=1000)"
        )
    if not (0.0 < float(ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in (0, 1), got {ratio!r}")
    n_patches = length // patch_size
    if num_masked_patches(n_patches, ratio) == 0:
        raise ValueError(
            f"mask_ratio={ratio} masks no patch of {n_patches} (int(ratio * n_patches) == 0); "
            f"raise mask_ratio or use a smaller patch_size"
        )
    return n_patches


def num_masked_patches(n_patches: int, ratio: float) -> int:
    """k = int(ratio * n_patches), as the seed computes it (Python truncation)."""
    return int(ratio * n_patches)


def random_patch_mask(
    batch: int, n_patches: int, ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool mask [B, n_patches] with exactly k True per row, uniform over positions."""
    k = num_masked_patches(n_patches, ratio)
    noise = torch.rand(batch, n_patches, generator=generator, device=device)  # [B, P]
    ranks = noise.argsort(dim=1)  # [B, P]: the first k indices of each row are masked
    mask = torch.zeros(batch, n_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, ranks[:, :k], True)
    return mask


def expand_patch_mask(patch_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, P] patch mask -> [B, 1, P * patch_size] float sample mask (1 = masked)."""
    return patch_mask.to(torch.float32).repeat_interleave(patch_size, dim=1).unsqueeze(1)


def mask_input(
    x: torch.Tensor, patch_size: int, ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask whole patches of x [B, C, L]; returns (x with masked samples zeroed, mask [B, 1, L])."""
    if x.dim() != 3:
        raise ValueError(f"expected x of shape [B, C, L], got {tuple(x.shape)}")
    n_patches = check_masking_args(x.shape[-1], patch_size, ratio)
    patch_mask = random_patch_mask(x.shape[0], n_patches, ratio, generator, x.device)
    sample_mask = expand_patch_mask(patch_mask, patch_size).to(x.dtype)  # [B, 1, L]
    return x * (1.0 - sample_mask), sample_mask


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum((pred - target)^2 * m) / sum(m); m [B, 1, L] or [B, C, L], broadcast over channels."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    m = mask.expand_as(pred).to(torch.float32)
    sq = (pred.to(torch.float32) - target.to(torch.float32)).pow(2)
    # No host sync here. check_masking_args guarantees k >= 1 per sample; an all-zero mask (every
    # sample dropped by the trainer's non-finite guard) gives 0, not NaN.
    return (sq * m).sum() / m.sum().clamp_min(1.0)
