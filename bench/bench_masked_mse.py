"""Forward + backward of patch masking and masked MSE: fused Triton vs the eager PyTorch reference
vs torch.compile of the reference, with the memory-traffic floor beside each row.

    python bench/bench_masked_mse.py                      # full grid (B 256/1024/4096, L 250/1000, fp32/bf16/fp16)
    python bench/bench_masked_mse.py --batches 256 --lengths 250 --dtypes fp32   # a quick look
    python bench/bench_masked_mse.py --dry-run            # check imports, print the grid, time nothing

Floor = bytes that must move / measured copy bandwidth, where the bytes are: read x and write the
masked x (mask), read the logits and the target and write the gradient (loss), plus the compact
patch mask written once and read once. "of floor" = floor time / fused time. The fused kernels
move more than the floor: the loss reads z and x once forward and once backward (`recompute`,
5s + 2s per element in all) or writes an fp32 gradient forward and scales it backward (`stored`);
both columns are timed. On a machine without CUDA the fused columns are n/a (the interpreter is
for correctness, not speed).
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
import torch._dynamo

from kernels.masked_mse_reference import mask_input, masked_mse

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per ms of a large device-to-device copy (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / time_ms(lambda: dst.copy_(src), device)


def reference_step(x: torch.Tensor, z: torch.Tensor, patch: int, ratio: float) -> torch.Tensor:
    x_masked, m = mask_input(x, patch, ratio)
    loss = masked_mse(torch.tanh(z), x, m)
    loss.backward()
    return x_masked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--lengths", default="250,1000")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--patch", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--dry-run", action="store_true", help="import everything, print the grid, time nothing")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch._dynamo.config.recompile_limit = 64  # one static graph per benchmarked shape
    fused_ok = device.type == "cuda"
    if fused_ok or a.dry_run:
        from kernels.masked_mse_triton import GRAD_MODES, fused_masked_mse, fused_patch_mask  # noqa: F401
    grid = [(d, int(L), int(B)) for d in a.dtypes.split(",") for L in a.lengths.split(",") for B in a.batches.split(",")]
    unknown = sorted({d for d, _, _ in grid} - set(DTYPES))
    if unknown:
        ap.error(f"--dtypes: unknown {unknown}; choose from {sorted(DTYPES)}")
    if a.dry_run:
        print(f"dry run: device {device.type}; would time {len(grid)} rows (dtype, L, B): {grid}; "
              f"columns eager, {'compile, ' if not a.no_compile else ''}fused recompute, fused stored"
              f"{'' if fused_ok else ' (fused n/a without CUDA)'}")
        return

    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if fused_ok else platform.processor() or platform.machine()
    print(f"run: {datetime.date.today()} | {name} | torch {torch.__version__} | copy bandwidth {bw / 1e6:.1f} GB/s\n")
    cols = ["B", "L", "dtype", "eager ms", "compile ms", "fused ms", "fused stored ms", "vs eager", "vs compile",
            "floor ms", "of floor"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for dname, L, B in grid:
        dtype = DTYPES[dname]
        # a fresh static-shape compile per row: one graph per shape, as a trainer would get
        compiled = None if a.no_compile else torch.compile(reference_step, dynamic=False)
        x = (torch.rand(B, 1, L, device=device) * 2 - 1).to(dtype)
        z = torch.randn(B, 1, L, device=device, dtype=dtype, requires_grad=True)

        def eager():
            z.grad = None
            reference_step(x, z, a.patch, a.ratio)

        def comp():
            z.grad = None
            compiled(x, z, a.patch, a.ratio)

        def fused(grad_mode="recompute"):
            z.grad = None
            xm, pm = fused_patch_mask(x, a.patch, a.ratio, seed=1)
            fused_masked_mse(z, x, pm, a.patch, a.ratio, grad_mode=grad_mode).backward()

        t_e = time_ms(eager, device)
        t_c = time_ms(comp, device) if compiled else float("nan")
        n, s, P = B * L, x.element_size(), L // a.patch
        floor = (5 * n * s + 2 * B * P) / bw
        if fused_ok:
            t_f = time_ms(fused, device)
            t_s = time_ms(lambda: fused("stored"), device)
            row = [f"{t_f:.3f}", f"{t_s:.3f}", f"{t_e / t_f:.1f}x", f"{t_c / t_f:.1f}x", f"{floor:.3f}",
                   f"{100 * floor / t_f:.0f} %"]
        else:
            row = ["n/a", "n/a", "n/a", "n/a", f"{floor:.3f}", "n/a"]
        print(f"| {B} | {L} | {dname} | {t_e:.3f} | {t_c:.3f} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
