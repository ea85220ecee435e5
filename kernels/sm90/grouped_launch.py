"""Host side of the RS W4A16 grouped GEMM: argument checks, cached compilation, launch."""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache, require_cutlass
from .expert_table import ExpertTable

TOKEN_TILES = (16, 32, 64, 128)  # the kernel's token tiles (WGMMA N), smallest first
BLOCK_ROWS = 64  # weight rows per block (WGMMA M): FC1 / FC2 column ranges count blocks
_ALIGN = {torch.bfloat16: 16, torch.float32: 4, torch.int32: 4, torch.int64: 8,
          torch.float8_e4m3fn: 16}


def gmem_ptr(t: torch.Tensor, align: int | None = None):
    """A CuTe global-memory pointer to ``t`` (cheap: no DLPack round trip per launch)."""
    require_cutlass()
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    dtype = {torch.bfloat16: cutlass.BFloat16, torch.float32: cutlass.Float32,
             torch.int32: cutlass.Int32, torch.int64: cutlass.Int64,
             torch.float8_e4m3fn: cutlass.Float8E4M3FN}[t.dtype]
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem,
                    assumed_align=align or _ALIGN[t.dtype])


def current_stream():
    import cuda.bindings.driver as cuda

    return cuda.CUstream(torch.cuda.current_stream().cuda_stream)


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the persistent grid's size)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def scratch_dtype(cfg) -> torch.dtype:
    """FC2's router-weighted scratch rows: bf16 with ``cfg.y_bf16``, else fp32."""
    return torch.bfloat16 if cfg.y_bf16 else torch.float32


def scratch_config(name: str, cfg, epilogue: str, out: torch.Tensor):
    """``cfg`` as the kernel is compiled: FC1 drops ``y_bf16`` (FC2's scratch format; one FC1
    kernel serves both), FC2 checks that ``out`` is the scratch dtype it writes."""
    if epilogue == "swiglu" and cfg.y_bf16:
        from dataclasses import replace

        return replace(cfg, y_bf16=False)
    if epilogue == "scatter" and out.dtype != scratch_dtype(cfg):
        raise ValueError(f"{name}: FC2 scratch y is {out.dtype}, {cfg} writes "
                         f"{'bf16' if cfg.y_bf16 else 'fp32'}")
    return cfg


def rs_gemm_launcher(
    cache: CompileCache,
    *,
    epilogue: str,
    a: torch.Tensor,
    row_index: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_count: torch.Tensor,
    table: ExpertTable,
    topk_w: torch.Tensor,
    out: torch.Tensor,
    bn: int,
    y_cols: int = 0,
    config=None,
    compute: str = "bf16",
    a_scale: torch.Tensor | None = None,
):
    """``launch(blk_begin, blk_end)``: one ``w4a16_rs_gemm`` over every token tile and the
    64-row weight blocks ``[blk_begin, blk_end)`` into ``out``; the grid is min(work tiles,
    resident CTAs) for persistent configurations, else one CTA per work tile, counted over
    ``tile_expert.numel()`` token tiles (the plan's host-side bound); the kernel reads the real
    count from ``tile_count`` (int32 ``[1]``, device), so nothing here reads the device and
    the launch can be captured in a CUDA graph. ``config``: an
    ``RsConfig`` (default ``rs_config(bn, K, compute)``). ``compute="e4m3"`` (W4A8): ``a`` is
    e4m3 in ``permute_act_k16`` order and ``a_scale`` its fp32 ``[rows, K / 128]`` scales.
    Pointers and stream are made here once and the compiled kernel is looked up at the first
    launch, so FC2's column chunks reuse them."""
    from .w4a16_rs_gemm import rs_config

    cfg = scratch_config("w4a16 gemm", config or rs_config(bn, table.k, compute), epilogue, out)
    if compute == "e4m3" and (a.dtype != torch.float8_e4m3fn or a_scale is None
                              or a_scale.dtype != torch.float32
                              or tuple(a_scale.shape) != (a.shape[0], table.k // 128)):
        raise ValueError(f"W4A8 GEMM: needs e4m3 rows and fp32 scales [{a.shape[0]}, "
                         f"{table.k // 128}], got {a.dtype} and "
                         f"{None if a_scale is None else (a_scale.dtype, tuple(a_scale.shape))}")
    num_tiles = tile_expert.numel()
    if num_tiles == 0:
        return lambda blk_begin, blk_end: None
    key = ("w4a16_rs_gemm", epilogue, table.rows, table.k, bn, y_cols, cfg, compute)
    require_cutlass()
    import cutlass

    # bf16 ignores ``a_scale``: any fp32 pointer stands in
    ptrs = [gmem_ptr(a, 16), gmem_ptr(topk_w if a_scale is None else a_scale),
            gmem_ptr(row_index), gmem_ptr(tile_expert),
            gmem_ptr(tile_count), gmem_ptr(table.tensor_of_expert), gmem_ptr(table.local_of_expert),
            gmem_ptr(table.table), gmem_ptr(topk_w), gmem_ptr(out, 16)]
    fixed = [cutlass.Int32(v) for v in (
        num_tiles, table.tensor_of_expert.numel(), table.num_tensors)]
    resident = sm_count(a.device) * cfg.ctas_per_sm if cfg.persistent else None
    stream = current_stream()
    compiled = None

    def launch(blk_begin: int, blk_end: int) -> None:
        nonlocal compiled
        tiles = num_tiles * -(-(blk_end - blk_begin) // cfg.blocks_per_cta)
        if tiles == 0:
            return
        args = [*ptrs, *fixed, *(cutlass.Int32(v) for v in (
            blk_begin, blk_end, tiles if resident is None else min(tiles, resident))), stream]
        if compiled is None:
            def build():
                import cutlass.cute as cute

                from .w4a16_rs_gemm import W4A16RsGemm

                kernel = W4A16RsGemm(epilogue=epilogue, n_weight=table.rows, k=table.k,
                                     bn=bn, y_cols=y_cols, config=cfg, compute=compute)
                return cute.compile(kernel, *args)

            compiled = cache.get(key, build)
        compiled(*args)

    return launch


def bf16_output(out: torch.Tensor | None, shape: tuple, device, who: str) -> torch.Tensor:
    """``out`` if it is a contiguous bf16 tensor of ``shape``, a new one if None."""
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    if out.dtype != torch.bfloat16 or tuple(out.shape) != shape or not out.is_contiguous():
        raise ValueError(f"{who}: out must be contiguous torch.bfloat16 {shape}, got "
                         f"{out.dtype} {tuple(out.shape)}")
    return out


def check_plan_tensors(bn: int, m_pad: int, tile_expert: torch.Tensor,
                       tile_count: torch.Tensor | None = None) -> None:
    """The permuted row count must be a whole number of int32-indexed token tiles, with the
    real tile count (for kernels that read it; the FP8 kernels skip tiles of expert -1
    instead) an int32 ``[1]`` on the same device (checked without reading it)."""
    if m_pad != tile_expert.numel() * bn:
        raise ValueError(
            f"grouped GEMM: {m_pad} permuted rows != {tile_expert.numel()} tiles x bn={bn}")
    if tile_expert.dtype != torch.int32:
        raise ValueError(f"grouped GEMM: tile_expert must be int32, got {tile_expert.dtype}")
    if tile_count is not None and (tile_count.dtype != torch.int32 or tuple(tile_count.shape) != (1,)
            or tile_count.device != tile_expert.device):
        raise ValueError(f"grouped GEMM: tile_count must be int32 [1] on {tile_expert.device} "
                         f"(the plan's real tile count), got {tile_count.dtype} "
                         f"{tuple(tile_count.shape)} on {tile_count.device}")


def check_finalize_args(what: str, rows: int, slot_index: torch.Tensor, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """The FC2 + slot-sum routing operands (every FC2 kernel's): slot_index int32 ``[rows]``,
    topk_weights fp32 ``[T, k]``, topk_ids int32 of the same shape. Returns ``(T, k,
    topk_ids contiguous)``; ValueError naming the operand otherwise."""
    if slot_index.dtype != torch.int32 or slot_index.shape != (rows,):
        raise ValueError(f"{what}: slot_index must be int32 [{rows}], got "
                         f"{slot_index.dtype} {tuple(slot_index.shape)}")
    if topk_weights.dtype != torch.float32 or topk_weights.dim() != 2:
        raise ValueError(f"{what}: topk_weights must be fp32 [T, k], got {topk_weights.dtype} "
                         f"{tuple(topk_weights.shape)}")
    tokens, top_k = topk_weights.shape
    if topk_ids.dtype != torch.int32 or topk_ids.shape != topk_weights.shape:
        raise ValueError(f"{what}: topk_ids must be int32 {tuple(topk_weights.shape)}, got "
                         f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    return tokens, top_k, topk_ids.contiguous()
