"""Every fused kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed: Triton's bundled
ptxas), for each supported dtype, and the PTX is what the kernels' docstring promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _aot(*args: str) -> list[dict]:
    # a fresh interpreter: under TRITON_INTERPRET=1 (conftest) kernels cannot be compiled
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if records and "skip" in records[0]:
        pytest.skip(records[0]["skip"])
    return records


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return _aot("--arch", "80,90")


def test_every_kernel_compiles_for_sm80_and_sm90_in_every_dtype(compiled):
    kernels = [r for r in compiled if "kernel" in r]
    for arch in (80, 90):
        built = {r["kernel"] for r in kernels if r["arch"] == arch and r["cubin_bytes"] > 0}
        assert "patch_mask" in built
        for d in ("fp32", "bf16", "fp16"):
            for L in (250, 1000):
                assert f"apply_mask {d}->{d} L={L}" in built
                for mode in ("fwd", "fwd+grad32", "bwd"):
                    assert f"loss {mode} z={d} x={d} L={L}" in built
            assert f"scale fp32->{d}" in built
        assert "loss bwd z=bf16 x=fp32 L=1000" in built and "apply_mask fp32->bf16 L=1000" in built


def test_no_integer_division_in_the_loss_and_mask_kernels(compiled):
    # the old loss kernel's sm_90 PTX held 32 div/rem.s64 (software division on the GPU)
    kernels = [r for r in compiled if "kernel" in r]
    assert len(kernels) == 2 * (1 + 2 * (4 + 4 * 3) + 3)
    for r in kernels:
        assert r["div_rem_64"] == 0, r
        assert r["div_rem_32"] == 0, r


def test_flat_kernels_load_16_bytes_at_a_time(compiled):
    # flat blocks start at multiples of BLOCK, so loads vectorise whatever L is (250 included)
    for r in compiled:
        if r.get("kernel", "").startswith(("loss", "apply_mask", "scale")):
            assert r["ld_global_v4"] > 0, r


def test_per_step_scalars_are_not_specialised(compiled):
    (info,) = [r["do_not_specialize"] for r in compiled if "do_not_specialize" in r]
    assert {"seed", "sample_offset"} <= set(info["patch_mask"])


def test_the_int64_index_path_compiles_without_division():
    records = [r for r in _aot("--arch", "90", "--index-64") if "kernel" in r]
    assert records and all(r["index_64"] and r["cubin_bytes"] > 0 and r["div_rem_64"] == 0 for r in records)
