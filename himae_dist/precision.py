"""bf16 as autocast over fp32 weights: the one place that decides the compute dtype.

DeepSpeed's own bf16 mode casts the parameters but not the buffers (BatchNorm running
statistics stay fp32), which breaks BatchNorm, and it accumulates and all-reduces gradients in
bf16. Autocast leaves every parameter, buffer and gradient in fp32 and runs the convolutions
in bf16; BatchNorm keeps fp32 weights and running statistics and normalises the bf16
activations with fp32 accumulation (PyTorch's mixed-dtype batch_norm).
"""

from __future__ import annotations

import contextlib

import torch


def use_bf16(precision: str, device: torch.device) -> bool:
    """auto: bf16 on GPUs that support it; bf16: also on CPU (CPU autocast supports it); fp32: never."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision=bf16: this GPU has no bf16 support; use fp32 or auto")
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool):
    """The forward pass's context: bf16 autocast, or nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
