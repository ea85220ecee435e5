"""Fixtures of the device kernel tests: the CuTeDSL backend and cached random NVFP4 experts in
the preshuffled layout (the only one the kernels read; the torch reference unshuffles them)."""
from __future__ import annotations

import glob
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # the top-level ``bench`` folder (its variant tables) as a package
    sys.path.insert(0, ROOT)

from tensorrt_llm_dwdp.kernels.testing import model_experts


def sm90_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(scope="module")
def backend():
    if not sm90_available():
        pytest.skip("needs an sm90 GPU")
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend

    return CuteDslMoeBackend()


@pytest.fixture(scope="module")
def experts():
    """``experts(model)``: that model's random experts, preshuffled and tagged so (one model kept
    on the device at a time)."""
    cache = {}

    def get(model: str):
        if model not in cache:
            cache.clear()
            torch.cuda.empty_cache()
            cache[model] = model_experts(model, seed=7)
        return cache[model]

    return get


def _tool(name: str) -> str | None:
    """``name`` on PATH, else inside the ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm``
    wheels (which install their binaries under the ``nvidia`` namespace package)."""
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
    """(cuobjdump, nvdisasm) for the CPU compile checks of the sm_90a kernels."""
    pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")
    if torch.cuda.is_available():
        pytest.skip("CPU-only compile check (a GPU machine runs the kernels instead)")
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if not cuobjdump or not nvdisasm:
        pytest.skip("needs cuobjdump and nvdisasm (pip install nvidia-cuda-cuobjdump "
                    "nvidia-cuda-nvdisasm)")
    return cuobjdump, nvdisasm
