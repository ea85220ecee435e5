"""Host side of the W4A16 grouped GEMM: argument checks, cached compilation, launch."""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache, require_cutlass
from .expert_table import ExpertTable


def cute_tensor(t: torch.Tensor):
    """A CuTe view of ``t`` with every extent and stride dynamic (one compile serves all
    token counts); 2-D tensors are assumed 16-byte aligned, 1-D ones 4-byte."""
    require_cutlass()
    from cutlass.cute.runtime import from_dlpack

    return from_dlpack(t, assumed_align=16 if t.dim() > 1 else 4).mark_layout_dynamic(
        leading_dim=t.dim() - 1)


def current_stream():
    import cuda.bindings.driver as cuda

    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


def launch_grouped_gemm(
    cache: CompileCache,
    *,
    epilogue: str,
    a: torch.Tensor,
    row_index: torch.Tensor,
    tile_expert: torch.Tensor,
    table: ExpertTable,
    row_weight: torch.Tensor,
    out: torch.Tensor,
    tile_m: int,
    n_sub: int,
    gather: bool,
    warp_specialized: bool = False,
) -> torch.Tensor:
    """Run one grouped GEMM (see ``w4a16_grouped_gemm``; ``warp_specialized`` picks the
    producer/consumer variant of ``w4a16_grouped_gemm_ws``) into ``out`` and return it."""
    if tile_expert.numel() == 0:
        return out
    key = ("w4a16_grouped_gemm", warp_specialized, epilogue, table.rows, table.k, tile_m, n_sub,
           gather, a.dtype, out.dtype)
    args = [a, row_index, tile_expert, table.tensor_of_expert, table.local_of_expert,
            table.table, row_weight, out]

    def build():
        require_cutlass()
        import cutlass.cute as cute

        from .w4a16_grouped_gemm import W4A16GroupedGemm
        from .w4a16_grouped_gemm_ws import W4A16GroupedGemmWS

        cls = W4A16GroupedGemmWS if warp_specialized else W4A16GroupedGemm
        kernel = cls(epilogue=epilogue, n_weight=table.rows, k=table.k,
                                  tile_m=tile_m, n_sub=n_sub, gather=gather)
        return cute.compile(kernel, *[cute_tensor(t) for t in args], current_stream())

    compiled = cache.get(key, build)
    compiled(*[cute_tensor(t) for t in args], current_stream())
    return out


def check_plan_tensors(tile_m: int, m_pad: int, tile_expert: torch.Tensor) -> None:
    """The permuted row count must be a whole number of int32-indexed tiles."""
    if m_pad != tile_expert.numel() * tile_m:
        raise ValueError(
            f"grouped GEMM: {m_pad} permuted rows != {tile_expert.numel()} tiles x tile_m={tile_m}")
    if tile_expert.dtype != torch.int32:
        raise ValueError(f"grouped GEMM: tile_expert must be int32, got {tile_expert.dtype}")
