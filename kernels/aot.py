"""Compile every fused kernel ahead of time for a GPU target, without a GPU (PTX + cubin via ptxas).

    TRITON_INTERPRET=0 python -m kernels.aot [--arch 80,90]     # prints one JSON line per kernel

Must run with TRITON_INTERPRET unset or 0: under the interpreter `triton.jit` returns functions
that cannot be compiled. tests/test_kernel_compile.py runs this in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
# (logits dtype, target dtype): each supported dtype alone, and the trainer's bf16 logits vs fp32 input
LOSS_COMBOS = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")]
SHAPE = dict(C=1, L=1000, PATCH=5)  # the trainer's usual segment; 250 is compiled too
DIV64 = re.compile(r"\b(?:div|rem)(?:\.full)?(?:\.approx)?\.[su]64\b")
LDV4 = re.compile(r"\bld\.global(?:\.[\w:]+)*\.v4\.")
DIV32 = re.compile(r"\b(?:div|rem)\.[su]32\b")


def ptxas_path() -> str | None:
    """The ptxas Triton would use, or None when it is missing (no CUDA toolkit in the wheel)."""
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001  (older triton layouts, or a build without the NVIDIA backend)
        path = shutil.which("ptxas")
    return path if path and Path(path).is_file() else None


def _attrs(sig: dict[str, str], ptrs: set[str]) -> dict:
    # What the launcher infers for tensors from the caching allocator (16-byte aligned) and for
    # n = B*C*L when it is a multiple of 16 (any even B at L=1000): that lets loads vectorise.
    return {(i,): [["tt.divisibility", 16]] for i, (n, ty) in enumerate(sig.items())
            if ty != "constexpr" and (n in ptrs or n == "n")}


def builds(index_64: bool = False) -> list[tuple[str, object, dict, dict, set[str]]]:
    """(label, kernel, signature, constexprs, pointer names) for every kernel and dtype the module launches."""
    from kernels import masked_mse_triton as k

    out = []
    out.append(("patch_mask", k._patch_mask_kernel,
                {"pmask_ptr": "*i8", "seed": "i32", "sample_offset": "i32", "n_patches": "i32", "k": "i32",
                 "BLOCK_P": "constexpr", "LOG_P": "constexpr"},
                {"BLOCK_P": 256, "LOG_P": 8}, {"pmask_ptr"}))
    for L in (250, SHAPE["L"]):
        shape = dict(SHAPE, L=L)
        for src, dst in [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")]:
            sig = {"x_ptr": f"*{src}", "out_ptr": f"*{dst}", "pmask_ptr": "*i8", "n": "i32",
                   "x_s0": "i32", "x_s1": "i32", "x_s2": "i32"}
            const = dict(shape, X_CONTIG=True, INDEX_64=index_64, BLOCK=k.BLOCK)
            sig.update({c: "constexpr" for c in const})
            out.append((f"apply_mask {src}->{dst} L={L}", k._apply_mask_kernel, sig, const,
                        {"x_ptr", "out_ptr", "pmask_ptr"}))
        for zd, xd in LOSS_COMBOS:
            for mode, name in ((0, "fwd"), (1, "fwd+grad32"), (2, "bwd")):
                sig = {"z_ptr": f"*{zd}", "x_ptr": f"*{xd}", "pmask_ptr": "*i8",
                       "out_ptr": f"*{zd}" if mode == 2 else "*fp32", "gout_ptr": "*fp32", "n": "i32"}
                sig.update({s: "i32" for s in ("z_s0", "z_s1", "z_s2", "x_s0", "x_s1", "x_s2", "pm_s0", "pm_s1")})
                sig["inv_count"] = "fp32"
                const = dict(shape, APPLY_TANH=True, MODE=mode, Z_CONTIG=True, X_CONTIG=True,
                             INDEX_64=index_64, BLOCK=k.BLOCK)
                sig.update({c: "constexpr" for c in const})
                sig["grad32_ptr"] = "*fp32" if mode == 1 else "constexpr"
                if mode != 1:
                    const["grad32_ptr"] = None
                out.append((f"loss {name} z={zd} x={xd} L={L}", k._loss_kernel, sig, const,
                            {"z_ptr", "x_ptr", "pmask_ptr", "out_ptr", "gout_ptr", "grad32_ptr"}))
    for d in DTYPES:
        sig = {"g32_ptr": "*fp32", "gout_ptr": "*fp32", "out_ptr": f"*{d}", "n": "i32",
               "INDEX_64": "constexpr", "BLOCK": "constexpr"}
        out.append((f"scale fp32->{d}", k._scale_kernel, sig, {"INDEX_64": index_64, "BLOCK": k.BLOCK},
                    {"g32_ptr", "gout_ptr", "out_ptr"}))
    return out


def compile_all(arch: int, index_64: bool = False) -> list[dict]:
    """Compile every build for sm_<arch>; one record per kernel with PTX division counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    records = []
    for label, fn, sig, const, ptrs in builds(index_64):
        src = ASTSource(fn, sig, constexprs=const, attrs=_attrs(sig, ptrs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        ptx = compiled.asm["ptx"]
        records.append({
            "arch": arch, "kernel": label, "index_64": index_64, "div_rem_64": len(DIV64.findall(ptx)),
            "div_rem_32": len(DIV32.findall(ptx)), "cubin_bytes": len(compiled.asm.get("cubin", b"")),
            "ld_global_v4": len(LDV4.findall(ptx)),
        })
    return records


def unspecialised_params() -> dict[str, list[str]]:
    """Per kernel, the integer arguments Triton does not specialise (so new values reuse the binary)."""
    from kernels import masked_mse_triton as k

    kernels = {"patch_mask": k._patch_mask_kernel, "apply_mask": k._apply_mask_kernel, "loss": k._loss_kernel,
               "scale": k._scale_kernel}
    return {name: [p.name for p in fn.params if p.do_not_specialize] for name, fn in kernels.items()}


def main(argv: list[str] | None = None) -> int:
    import os

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("kernels.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--index-64", action="store_true", help="compile the int64 index path instead")
    a = ap.parse_args(argv)
    if ptxas_path() is None:
        print(json.dumps({"skip": "ptxas not found (triton's bundled CUDA tools are missing)"}))
        return 0
    print(json.dumps({"do_not_specialize": unspecialised_params()}), flush=True)
    for arch in (int(v) for v in a.arch.split(",")):
        for rec in compile_all(arch, a.index_64):
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
