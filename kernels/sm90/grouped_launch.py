"""Host side of the W4A16 grouped GEMM: argument checks, cached compilation, launch."""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache, require_cutlass
from .expert_table import ExpertTable


_ALIGN = {torch.bfloat16: 16, torch.float32: 4, torch.int32: 4, torch.int64: 8}


def gmem_ptr(t: torch.Tensor, align: int | None = None):
    """A CuTe global-memory pointer to ``t`` (cheap: no DLPack round trip per launch)."""
    require_cutlass()
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    dtype = {torch.bfloat16: cutlass.BFloat16, torch.float32: cutlass.Float32,
             torch.int32: cutlass.Int32, torch.int64: cutlass.Int64}[t.dtype]
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem,
                    assumed_align=align or _ALIGN[t.dtype])


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
    stages: int = 4,
    fuse_n: bool = False,
) -> torch.Tensor:
    """Run one grouped GEMM (see ``w4a16_grouped_gemm``; ``warp_specialized`` picks the
    producer/consumer variant of ``w4a16_grouped_gemm_ws``; ``stages`` sets the plain
    variant's load ring, loads running ``stages - 2`` K tiles ahead; ``fuse_n``: one WGMMA over both B sub-tiles, plain variant only) into ``out``."""
    if tile_expert.numel() == 0:
        return out
    key = ("w4a16_grouped_gemm", warp_specialized, stages, fuse_n, epilogue, table.rows, table.k,
           tile_m, n_sub, gather, a.dtype, out.dtype)
    require_cutlass()
    import cutlass

    ptrs = [gmem_ptr(a, 16), gmem_ptr(row_index), gmem_ptr(tile_expert),
            gmem_ptr(table.tensor_of_expert), gmem_ptr(table.local_of_expert),
            gmem_ptr(table.table), gmem_ptr(row_weight), gmem_ptr(out, 16)]
    sizes = [cutlass.Int32(a.shape[0]), cutlass.Int32(tile_expert.numel()),
             cutlass.Int32(table.tensor_of_expert.numel()), cutlass.Int32(table.num_tensors)]

    def build():
        import cutlass.cute as cute

        from .w4a16_grouped_gemm import W4A16GroupedGemm
        from .w4a16_grouped_gemm_ws import W4A16GroupedGemmWS

        cls = W4A16GroupedGemmWS if warp_specialized else W4A16GroupedGemm
        kernel = cls(epilogue=epilogue, n_weight=table.rows, k=table.k,
                     tile_m=tile_m, n_sub=n_sub, gather=gather, stages=stages,
                     **({"fuse_n": True} if fuse_n else {}))
        return cute.compile(kernel, *ptrs, *sizes, current_stream())

    compiled = cache.get(key, build)
    compiled(*ptrs, *sizes, current_stream())
    return out


def check_plan_tensors(tile_m: int, m_pad: int, tile_expert: torch.Tensor) -> None:
    """The permuted row count must be a whole number of int32-indexed tiles."""
    if m_pad != tile_expert.numel() * tile_m:
        raise ValueError(
            f"grouped GEMM: {m_pad} permuted rows != {tile_expert.numel()} tiles x tile_m={tile_m}")
    if tile_expert.dtype != torch.int32:
        raise ValueError(f"grouped GEMM: tile_expert must be int32, got {tile_expert.dtype}")
