"""FC1 of a MoE layer on Hopper: gathered bf16 rows x NVFP4 ``w3_w1`` -> SwiGLU -> bf16 ``h``.

``h[m] = bf16(silu(alpha_e * x[g[m]] @ w1_e^T) * (alpha_e * x[g[m]] @ w3_e^T))`` for every
permuted row m of expert e (``g`` = the plan's gather index; padding rows read token 0 and
their ``h`` is never used), fp32 accumulation, SwiGLU in fp32, one rounding to bf16.
"""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache
from .expert_table import ExpertTable
from .grouped_launch import BLOCK_ROWS, bf16_output, check_plan_tensors, rs_gemm_launcher


def fc1_gather_swiglu(
    cache: CompileCache,
    x: torch.Tensor,
    gather_index: torch.Tensor,
    tile_expert: torch.Tensor,
    w13: ExpertTable,
    bn: int,
    out: torch.Tensor | None = None,
    config=None,
    *,
    tile_count: torch.Tensor,
    compute: str = "bf16",
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x bf16 ``[T, H]``; gather_index int32 ``[M_pad]``; tile_expert int32 ``[M_pad / bn]``
    (the plan built with ``tile_m=bn``: ``M_pad / bn`` is its tile bound); ``tile_count`` int32
    ``[1]`` on the device: the real tiles, a prefix (read by the kernel, never by the host);
    ``w13`` rows = 2I, k = H (a table of preshuffled experts, ``preshuffle``). Returns bf16
    ``[M_pad, I]`` in permuted order; rows of tiles past ``tile_count`` are not written.
    ``config``: the kernel's ``RsConfig`` (default for ``bn``). ``compute="e4m3"``: W4A8
    (``quant/w4a8.py``): x quantized per token per 128 channels first (``w4a8_activations``),
    fp8 WGMMA; a new ``h`` is then zero-filled, so rows past ``tile_count`` stay finite for
    FC2's quantization. ``quantized``: ``w4a8_activations(x)`` computed by the caller."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"fc1: x must be contiguous bf16 [T, H], got {x.dtype} {tuple(x.shape)}")
    if x.data_ptr() % 16:
        raise ValueError("fc1: x must start on a 16-byte boundary (cp.async copies 16 B)")
    if x.shape[1] != w13.k:
        raise ValueError(f"fc1: x hidden {x.shape[1]} != weight K {w13.k}")
    m_pad = gather_index.numel()
    check_plan_tensors(bn, m_pad, tile_expert, tile_count)
    inter = w13.rows // 2
    a, a_scale = x, None
    if compute == "e4m3":
        from .w4a8_act import w4a8_activations

        a, a_scale = quantized if quantized is not None else w4a8_activations(x)
        if out is None:
            out = torch.zeros(m_pad, inter, dtype=torch.bfloat16, device=x.device)
    out = bf16_output(out, (m_pad, inter), x.device, "fc1")
    launch = rs_gemm_launcher(
        cache, epilogue="swiglu", a=a, row_index=gather_index, tile_expert=tile_expert,
        tile_count=tile_count,
        table=w13, topk_w=x.new_empty(1, dtype=torch.float32), out=out, bn=bn, config=config,
        compute=compute, a_scale=a_scale)
    launch(0, w13.rows // BLOCK_ROWS)
    return out
