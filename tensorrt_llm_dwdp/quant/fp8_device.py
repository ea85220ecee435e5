"""Activation quantization for the FP8 paths: the fused Hopper kernel where it runs, else the
torch reference, with the same numbers either way (on the same device).

:func:`quantize_act_per_token_fast` is what the FP8 linears and MoE kernels call. It takes the
kernel (``kernels/sm90/fp8_quant.py``) for a bf16 ``[T, K]`` CUDA input with K a multiple of
128 on an sm90 device when the CUTLASS DSL imports; anything else goes through
``quant.fp8.quantize_act_per_token`` (which also checks for inf / NaN, syncing the host; the
kernel does not check: non-finite values propagate into the scales).
"""
from __future__ import annotations

import functools
import logging

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.fp8_quant import (
    SCALE_LAYOUTS,
    check_input,
    quantize_act_per_token_cuda,
)
from .fp8 import quantize_act_per_token

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _cutlass_imports() -> bool:
    try:
        import cutlass  # noqa: F401
    except ImportError:
        logger.info("nvidia-cutlass-dsl not importable: FP8 activation quantization runs the "
                    "torch reference")
        return False
    return True


@functools.lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.lru_cache(maxsize=1)
def _shared_cache() -> CompileCache:
    """The compiled kernels of callers that bring no cache (two entries at most: one per scale
    layout; a compiled kernel holds no state)."""
    return CompileCache()


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether the fused kernel takes ``x`` (its ``check_input``: bf16 ``[T, K]`` on CUDA, K a
    positive multiple of 128, rows contiguous and 16-byte aligned) on an sm90 device with the
    CUTLASS DSL importable."""
    try:
        check_input(x)
    except (TypeError, ValueError):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _is_sm90(index) and _cutlass_imports()


def quantize_act_per_token_fast(
    x: torch.Tensor,
    *,
    scale_layout: str = "row",
    cache: CompileCache | None = None,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, K]`` -> ``(q float8_e4m3fn [T, K], scale float32 [T, ceil(K/128)])`` with
    ``quant.fp8.quantize_act_per_token``'s recipe, the scale row-major (``"row"``) or
    group-major (``"col"``: ``scale.t().contiguous().t()``, torch._scaled_mm's blockwise
    scale_a). ``cache``: where the compiled kernel lives (default: one shared by all callers).
    ``out`` / ``scale_out``: preallocated outputs (contiguous q; the scale in the layout asked
    for), filled and returned; the kernel path then allocates nothing."""
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    if kernel_applies(x):
        return quantize_act_per_token_cuda(cache if cache is not None else _shared_cache(), x,
                                           scale_layout=scale_layout, out=out,
                                           scale_out=scale_out)
    q, scale = quantize_act_per_token(x)
    if scale_layout == "col":
        scale = scale.t().contiguous().t()
    return _fill(out, q, "out"), _fill(scale_out, scale, "scale_out")


def _fill(dst: torch.Tensor | None, src: torch.Tensor, what: str) -> torch.Tensor:
    if dst is None:
        return src
    if dst.dtype != src.dtype or dst.shape != src.shape or dst.stride() != src.stride():
        raise ValueError(
            f"quantize_act_per_token_fast: {what} must be {src.dtype} {tuple(src.shape)} with "
            f"strides {src.stride()}, got {dst.dtype} {tuple(dst.shape)} {dst.stride()}"
        )
    return dst.copy_(src)
