"""FC2 of a MoE layer on Hopper with a deterministic finalize.

Kernel: ``y[m] = router_weight[m] * (alpha_e * h[m] @ w2_e^T)`` in fp32 for every permuted row
(router weight 0 on padding rows). Finalize: ``out[t] = bf16(sum_j y[inverse[t, j]])`` summed
in fp32 in slot order j = 0..k-1 (no atomics), so results are bitwise reproducible run to run
and independent of how the experts are split over B tensors.
"""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache
from .expert_table import ExpertTable
from .grouped_launch import check_plan_tensors, current_stream, gmem_ptr, launch_grouped_gemm


def permuted_row_weights(topk_weights: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """fp32 ``[M_pad]``: the router weight of each permuted row's (token, slot), 0 on padding."""
    flat = topk_weights.reshape(-1).float()
    valid = slot_index >= 0
    return torch.where(valid, flat[slot_index.clamp(min=0).long()], torch.zeros((), device=flat.device))


def fc2_weighted(
    cache: CompileCache,
    h: torch.Tensor,
    tile_expert: torch.Tensor,
    row_weight: torch.Tensor,
    w2: ExpertTable,
    tile_m: int,
    n_sub: int = 128,
    out: torch.Tensor | None = None,
    warp_specialized: bool = False,
    stages: int = 4,
    fuse_n: bool = False,
) -> torch.Tensor:
    """h bf16 ``[M_pad, I]``; row_weight fp32 ``[M_pad]``; ``w2`` rows = H, k = I.
    Returns fp32 ``[M_pad, H]`` router-weighted rows."""
    if h.dtype != torch.bfloat16 or h.dim() != 2 or not h.is_contiguous():
        raise ValueError(f"fc2: h must be contiguous bf16 [M_pad, I], got {h.dtype} {tuple(h.shape)}")
    if h.shape[1] != w2.k:
        raise ValueError(f"fc2: h width {h.shape[1]} != weight K {w2.k}")
    m_pad = h.shape[0]
    check_plan_tensors(tile_m, m_pad, tile_expert)
    if row_weight.dtype != torch.float32 or row_weight.shape != (m_pad,):
        raise ValueError(f"fc2: row_weight must be fp32 [{m_pad}], got {row_weight.dtype} "
                         f"{tuple(row_weight.shape)}")
    if out is None:
        out = torch.empty(m_pad, w2.rows, dtype=torch.float32, device=h.device)
    elif out.dtype != torch.float32 or tuple(out.shape) != (m_pad, w2.rows) or not out.is_contiguous():
        raise ValueError(f"fc2: out must be contiguous torch.float32 {(m_pad, w2.rows)}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return launch_grouped_gemm(
        cache, epilogue="weighted", a=h, row_index=tile_expert, tile_expert=tile_expert,
        table=w2, row_weight=row_weight, out=out, tile_m=tile_m, n_sub=n_sub, gather=False, warp_specialized=warp_specialized,
        stages=stages, fuse_n=fuse_n)


def finalize(cache: CompileCache, y: torch.Tensor, inverse: torch.Tensor,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 ``[T, H]``: each token's k router-weighted fp32 rows of ``y [M_pad, H]`` summed in
    slot order (``inverse [T, k]`` int32, the plan's permuted row of each slot)."""
    tokens, k = inverse.shape
    hidden = y.shape[1]
    if y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"finalize: y must be contiguous fp32, got {y.dtype}")
    if inverse.dtype != torch.int32 or not inverse.is_contiguous():
        raise ValueError(f"finalize: inverse must be contiguous int32, got {inverse.dtype}")
    if out is None:
        out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=y.device)
    if tokens == 0:
        return out
    import cutlass

    args = [gmem_ptr(y, 16), gmem_ptr(inverse), gmem_ptr(out, 8), cutlass.Int32(tokens)]

    def build():
        import cutlass.cute as cute

        from .slot_sum import SlotSum

        return cute.compile(SlotSum(hidden, k), *args, current_stream())

    compiled = cache.get(("slot_sum", hidden, k), build)
    compiled(*args, current_stream())
    return out
