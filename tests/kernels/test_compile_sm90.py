"""The sm90 kernels compile for sm_90a on a CPU-only machine and their SASS holds HGMMA.

Each configuration compiles in a subprocess (the DSL reads CUTE_DSL_* at import) into a temp
dump dir; cuobjdump (nvidia-cuda-cuobjdump, with nvdisasm from nvidia-cuda-nvdisasm) then
disassembles the cubin. Checks: warpgroup MMAs (HGMMA ... BF16) are there, no local-memory
spills (LDL/STL), 16-byte cp.async (LDGSTS.E.BYPASS.128) for the gathered A rows and NVFP4
rows, and the packed-bf16 multiply of the dequant (HMUL2.BF16).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels
HERE = Path(__file__).resolve().parent


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        hits = glob.glob(os.path.join(root, "**", "bin", name), recursive=True)
        if hits:
            return hits[0]
    return None


@pytest.fixture(scope="module")
def tools():
    pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU-only compile check (a GPU machine runs the kernels instead)")
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        pytest.skip("needs cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    return cuobjdump, nvdisasm


def _compile_sass(tools, tmp_path, *argv) -> str:
    cuobjdump, nvdisasm = tools
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP_CUBIN="1",
               CUTE_DSL_DUMP_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "_compile_sm90_main.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cubins = list(tmp_path.glob("*.sm_90a.cubin"))
    assert len(cubins) == 1, f"expected one sm_90a cubin in {os.listdir(tmp_path)}"
    env_path = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ["PATH"])
    return subprocess.run([cuobjdump, "-sass", str(cubins[0])], env=env_path,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("epilogue,tile_m,n_sub,variant", [
    ("swiglu", 128, 128, "plain"), ("weighted", 64, 128, "plain"), ("swiglu", 128, 128, "ws"),
    ("weighted", 256, 64, "plain"), ("swiglu", 128, 128, "fused"),
])
def test_compiles_to_hgmma(tools, tmp_path, epilogue, tile_m, n_sub, variant):
    sass = _compile_sass(tools, tmp_path, epilogue, str(tile_m), str(n_sub), variant)
    if tile_m == 256:  # 512 threads: the kernel must fit 128 registers per thread
        regs = _registers(tools, tmp_path)
        assert regs <= 128, f"{regs} registers per thread x 512 threads > 64K"
    hgmma = re.findall(r"HGMMA\.64x(\d+)x16\.F32\.BF16", sass)
    # 4 k16 steps per 64-wide K tile, 2 B sub-tiles, each a 64 x n_sub WGMMA (fused: one
    # 64 x 2 n_sub WGMMA over both).
    want = (4, str(2 * n_sub)) if variant == "fused" else (8, str(n_sub))
    assert len(hgmma) == want[0] and set(hgmma) == {want[1]}, hgmma
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    assert "LDGSTS.E.BYPASS.128" in sass
    assert "HMUL2.BF16" in sass
    if variant == "ws":  # producer gives registers back, consumers take them
        assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass


def _registers(tools, tmp_path) -> int:
    cubin = next(tmp_path.glob("*.sm_90a.cubin"))
    usage = subprocess.run([tools[0], "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def test_slot_sum_compiles_with_wide_loads(tools, tmp_path):
    sass = _compile_sass(tools, tmp_path, "slot_sum", "0", "0")
    assert sass.count("LDG.E.128.CONSTANT") == 8  # one 16 B load per slot (top-k = 8)
    assert "STG.E.64" in sass
