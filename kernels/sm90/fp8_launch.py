"""Host side of the FP8 block-scaled grouped GEMM: expert tables, argument checks, cached
compilation, launch, and the MoE layer (quantize x, FC1 + SwiGLU, requantize h, FC2 + finalize).

Weights are the checkpoint's (``moe/specs.py``, FP8 experts): ``w3_w1_weight`` e4m3
``[n, 2I, H]`` (rows ``[0, I)`` up, ``[I, 2I)`` gate), ``w3_w1_weight_scale_inv`` fp32
``[n, 2I/128, H/128]``, ``w2_weight`` e4m3 ``[n, H, I]``, ``w2_weight_scale_inv`` fp32
``[n, H/128, I/128]``, in their linear layout (the kernel reads rows by address; no
load-time permutation). H and I must be multiples of 128.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..compile_cache import CompileCache, require_cutlass
from .expert_table import ExpertTable
from .fc2_finalize import chunk_blocks, slot_sum_launcher
from .grouped_launch import (bf16_output, check_finalize_args, check_plan_tensors, current_stream,
                             scratch_config, scratch_dtype, sm_count)

FP8_BLOCK = 128
FP8_BLOCKS_PER_CTA = 2  # 64-row weight blocks per CTA (fp8_gemm.BLOCKS_PER_CTA; Fp8Config.blocks)
FP8_BLOCK_ROWS = 64
E4M3 = torch.float8_e4m3fn


def fp8_ptr(t: torch.Tensor, align: int = 16):
    """A CuTe global-memory pointer to ``t`` (e4m3 tensors as bytes; fp32 / int32 / int64 /
    bf16 as themselves)."""
    require_cutlass()
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    dtype = {E4M3: cutlass.Uint8, torch.uint8: cutlass.Uint8, torch.bfloat16: cutlass.BFloat16,
             torch.float32: cutlass.Float32, torch.int32: cutlass.Int32,
             torch.int64: cutlass.Int64}[t.dtype]
    return make_ptr(dtype, t.data_ptr(), cute.AddressSpace.gmem, assumed_align=align)


def check_fp8_shapes(hidden: int, inter: int) -> None:
    """The FP8 kernels tile hidden and intermediate sizes in 128-wide scale blocks."""
    for name, value in (("hidden size", hidden), ("expert intermediate size", inter)):
        if value <= 0 or value % FP8_BLOCK:
            raise ValueError(
                f"FP8 MoE kernels: {name} {value} is not a positive multiple of {FP8_BLOCK} "
                f"(the 128 x 128 scale block); use backend='torch' for it")


def build_fp8_expert_table(
    weights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    expert_offsets: Sequence[int],
) -> ExpertTable:
    """Tables for FP8 tensors ``weights[t]`` float8_e4m3fn ``[n_t, rows, K]`` and
    ``scales[t]`` fp32 ``[n_t, rows/128, K/128]`` (``weight_scale_inv``); tensor t holds
    global experts ``[expert_offsets[t], expert_offsets[t] + n_t)``. ``table`` is int64
    ``[2, S]`` (weight and scale base addresses). Rows and K must be multiples of 128, every
    weight tensor must start on a 16-byte boundary (16 B cp.async) and every scale tensor on a
    4-byte one: ValueError otherwise, before any launch."""
    s = len(weights)
    if s == 0 or len(scales) != s or len(expert_offsets) != s:
        raise ValueError(
            f"build_fp8_expert_table: need S >= 1 weights, scales and offsets, got "
            f"{len(weights)}, {len(scales)}, {len(expert_offsets)}")
    if weights[0].dim() != 3:
        raise ValueError(f"build_fp8_expert_table: weights must be [n, rows, K], got "
                         f"{tuple(weights[0].shape)}")
    rows, k = weights[0].shape[1:]
    if rows % FP8_BLOCK or k % FP8_BLOCK or rows == 0 or k == 0:
        raise ValueError(f"build_fp8_expert_table: rows {rows} and K {k} must be positive "
                         f"multiples of {FP8_BLOCK}")
    device = weights[0].device
    tensor_of, local_of = [], []
    for t, (w, sf) in enumerate(zip(weights, scales)):
        n = w.shape[0]
        expected = (n, rows // FP8_BLOCK, k // FP8_BLOCK)
        if (w.dtype != E4M3 or tuple(w.shape) != (n, rows, k) or sf.dtype != torch.float32
                or tuple(sf.shape) != expected):
            raise ValueError(
                f"build_fp8_expert_table: tensor {t}: weight {w.dtype} {tuple(w.shape)}, scale "
                f"{sf.dtype} {tuple(sf.shape)}; expected float8_e4m3fn [n, {rows}, {k}], "
                f"float32 [n, {rows // FP8_BLOCK}, {k // FP8_BLOCK}]")
        for name, x in (("weight", w), ("scale", sf)):
            if not x.is_contiguous():
                raise ValueError(f"build_fp8_expert_table: {name} tensor {t} must be contiguous")
            if x.device != device:
                raise ValueError(f"build_fp8_expert_table: {name} tensor {t} on {x.device}, "
                                 f"not {device}")
        if w.data_ptr() % 16:
            raise ValueError(f"build_fp8_expert_table: weight tensor {t} starts at "
                             f"{w.data_ptr():#x}, not on a 16-byte boundary (16 B cp.async)")
        if expert_offsets[t] != len(tensor_of):
            raise ValueError(f"build_fp8_expert_table: tensor {t} starts at expert "
                             f"{expert_offsets[t]}, expected {len(tensor_of)}")
        tensor_of += [t] * n
        local_of += list(range(n))
    table = torch.tensor([[w.data_ptr() for w in weights], [sf.data_ptr() for sf in scales]],
                         dtype=torch.int64).to(device)
    return ExpertTable(
        table=table,
        tensor_of_expert=torch.tensor(tensor_of, dtype=torch.int32).to(device),
        local_of_expert=torch.tensor(local_of, dtype=torch.int32).to(device),
        rows=rows,
        k=k,
        weight_ptrs=tuple(w.data_ptr() for w in weights),
        experts_per_tensor=tuple(w.shape[0] for w in weights),
    )


def fp8_gemm_launcher(
    cache: CompileCache,
    *,
    epilogue: str,
    a: torch.Tensor,
    a_scale: torch.Tensor,
    row_index: torch.Tensor,
    tile_expert: torch.Tensor,
    table: ExpertTable,
    topk_w: torch.Tensor,
    out: torch.Tensor,
    bn: int,
    y_cols: int = 0,
    config=None,
):
    """``launch(blk_begin, blk_end)``: one ``fp8_gemm`` over every token tile and the 64-row
    weight blocks ``[blk_begin, blk_end)`` into ``out``; persistent grid = min(work tiles,
    resident CTAs). ``config``: an ``Fp8Config`` (default ``fp8_config(bn)``)."""
    from .fp8_gemm import fp8_config

    cfg = scratch_config("fp8 gemm", config or fp8_config(bn), epilogue, out)
    num_tiles = tile_expert.numel()
    if num_tiles == 0:
        return lambda blk_begin, blk_end: None
    num_tensors = table.num_tensors if cfg.tma else 1
    key = ("fp8_gemm", epilogue, table.rows, table.k, bn, y_cols, cfg, num_tensors)
    require_cutlass()
    import cutlass

    ptrs = [fp8_ptr(a), fp8_ptr(a_scale, 4), fp8_ptr(row_index, 4), fp8_ptr(tile_expert, 4),
            fp8_ptr(table.tensor_of_expert, 4), fp8_ptr(table.local_of_expert, 4),
            fp8_ptr(table.table, 8), fp8_ptr(topk_w, 4), fp8_ptr(out)]
    fixed = [cutlass.Int32(v) for v in (
        num_tiles, table.tensor_of_expert.numel(), table.num_tensors)]
    tma_args = tma_weight_args(table) if cfg.tma else ((), ())
    if cfg.tma and a.shape[0] != num_tiles * bn:
        raise ValueError(f"fp8 gemm (tma): token rows must be the plan's {num_tiles * bn} "
                         f"rows in plan order, got {a.shape[0]}")
    resident = sm_count(a.device) * cfg.ctas_per_sm
    stream = current_stream()
    compiled = None

    def launch(blk_begin: int, blk_end: int) -> None:
        nonlocal compiled
        tiles = num_tiles * -(-(blk_end - blk_begin) // cfg.blocks)
        if tiles == 0:
            return
        if cfg.pair_scales and blk_begin % FP8_BLOCKS_PER_CTA:
            raise ValueError(f"fp8 gemm (tokens_m): blocks start at an even block (one scale "
                             f"block per CTA pair), got {blk_begin}")
        grid = min(tiles, resident)
        if cfg.cluster_size > 1:  # clusters over units of their tiles, as many as fit at once
            groups = -(-(blk_end - blk_begin) // cfg.blocks)
            units = -(-num_tiles // cfg.cluster_m) * -(-groups // cfg.cluster_n)
            grid = cfg.cluster_size * min(units, max_active_clusters(a.device,
                                                                     cfg.cluster_size))
        args = [*ptrs, *fixed, *(cutlass.Int32(v) for v in (blk_begin, blk_end, grid)),
                *tma_args, stream]
        if compiled is None:
            def build():
                import cutlass.cute as cute

                from .fp8_gemm import Fp8BlockGemm

                kernel = Fp8BlockGemm(epilogue=epilogue, n_weight=table.rows, k=table.k,
                                      bn=bn, y_cols=y_cols, config=cfg,
                                      num_tensors=num_tensors)
                return cute.compile(kernel, *args)

            compiled = cache.get(key, build)
        compiled(*args)

    return launch


_ACTIVE_CLUSTERS: dict[tuple[int, int], int] = {}


def max_active_clusters(device: torch.device, size: int) -> int:
    """Clusters of ``size`` CTAs, one CTA per SM, that the device runs at once (a GPC whose SM
    count is not a multiple of ``size`` leaves SMs out, so it can be fewer than SMs / size):
    the persistent grid of the cluster kernels, so no cluster waits for a second wave."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, size) not in _ACTIVE_CLUSTERS:
        import cutlass.utils

        with torch.cuda.device(index):
            # the runtime's context current (HardwareInfo needs one); under graph capture the
            # captured launches before this one have made it current, and a sync is illegal
            if not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()
            info = cutlass.utils.HardwareInfo(device_id=index)
            count = int(info.get_max_active_clusters(size))
        if count < 1:
            raise RuntimeError(f"fp8 gemm: cuda:{index} runs no {size}-CTA cluster")
        _ACTIVE_CLUSTERS[index, size] = count
    return _ACTIVE_CLUSTERS[index, size]


def tma_weight_args(table: ExpertTable) -> tuple[tuple, tuple]:
    """The ``tma`` kernels' weight arguments: an e4m3 pointer and an expert count per tensor
    (the table's host copies)."""
    from .fp8_gemm import MAX_TMA_TENSORS

    if not table.weight_ptrs:
        raise ValueError("fp8 gemm (tma): the expert table has no host copy of its tensors' "
                         "addresses (build it with build_fp8_expert_table)")
    if len(table.weight_ptrs) > MAX_TMA_TENSORS:
        raise ValueError(f"fp8 gemm (tma): {len(table.weight_ptrs)} weight tensors, at most "
                         f"{MAX_TMA_TENSORS}")
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr

    ptrs = tuple(make_ptr(cutlass.Float8E4M3FN, p, cute.AddressSpace.gmem, assumed_align=16)
                 for p in table.weight_ptrs)
    return ptrs, tuple(cutlass.Int32(n) for n in table.experts_per_tensor)


def plan_order_rows(q: torch.Tensor, scale: torch.Tensor, index: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``tma`` kernels' token operand: e4m3 rows in plan order (``q[index]``, index -1
    reading row 0, or ``q`` itself with ``index`` None) and their scales transposed
    ``[K/128, rows]`` (one contiguous run per token tile and K block)."""
    if index is not None:
        rows = index.clamp(min=0)
        q = q.view(torch.uint8).index_select(0, rows).view(E4M3)
        scale = scale.index_select(0, rows)
    return q, scale.t().contiguous()


def _check_rows(name: str, q: torch.Tensor, scale: torch.Tensor, k: int) -> None:
    """``q`` contiguous e4m3 ``[rows, k]`` on a 16-byte boundary, ``scale`` fp32
    ``[rows, k/128]`` contiguous."""
    if q.dtype != E4M3 or q.dim() != 2 or q.shape[1] != k or not q.is_contiguous():
        raise ValueError(f"{name}: values must be contiguous float8_e4m3fn [rows, {k}], got "
                         f"{q.dtype} {tuple(q.shape)}")
    if q.data_ptr() % 16:
        raise ValueError(f"{name}: values must start on a 16-byte boundary (16 B cp.async)")
    want = (q.shape[0], k // FP8_BLOCK)
    if scale.dtype != torch.float32 or tuple(scale.shape) != want or not scale.is_contiguous():
        raise ValueError(f"{name}: scales must be contiguous float32 {want}, got "
                         f"{scale.dtype} {tuple(scale.shape)}")


def fc1_fp8_gather_swiglu(
    cache: CompileCache,
    xq: torch.Tensor,
    xs: torch.Tensor,
    gather_index: torch.Tensor,
    tile_expert: torch.Tensor,
    w13: ExpertTable,
    bn: int,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """FC1: ``h[m] = bf16(silu(x[g[m]] @ w1_e^T) * (x[g[m]] @ w3_e^T))`` with the block-scaled
    FP8 product (``quant.fp8.blockwise_matmul_ref``'s numerics). xq e4m3 ``[T, H]`` and xs fp32
    ``[T, H/128]`` (``quantize_act_per_token``); gather_index int32 ``[M_pad]`` (-1 on padding:
    reads token 0, its h is never used); tile_expert int32 ``[M_pad / bn]`` (-1: tile skipped,
    its h rows are not written); ``w13`` rows = 2I, k = H. Returns bf16 ``[M_pad, I]``."""
    _check_rows("fc1 fp8", xq, xs, w13.k)
    m_pad = gather_index.numel()
    check_plan_tensors(bn, m_pad, tile_expert)
    inter = w13.rows // 2
    out = bf16_output(out, (m_pad, inter), xq.device, "fc1 fp8")
    config = _config(config, bn, w13, hidden=w13.k)
    if config.tma:
        xq, xs = plan_order_rows(xq, xs, gather_index)
    launch = fp8_gemm_launcher(
        cache, epilogue="swiglu", a=xq, a_scale=xs, row_index=gather_index,
        tile_expert=tile_expert, table=w13, topk_w=xs.new_empty(1), out=out, bn=bn,
        config=config)
    launch(0, w13.rows // FP8_BLOCK_ROWS)
    return out


def fc2_fp8_finalize(
    cache: CompileCache,
    hq: torch.Tensor,
    hs: torch.Tensor,
    slot_index: torch.Tensor,
    tile_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: ExpertTable,
    bn: int,
    out: torch.Tensor | None = None,
    config=None,
) -> torch.Tensor:
    """FC2 + deterministic finalize: per hidden-column chunk, rows ``y[t k + j] =
    router_weight[t, j] * (h[m] @ w2_e^T)`` (block-scaled FP8 product; bf16 with
    ``config.y_bf16``, else fp32) summed in slot order in fp32 into bf16 ``[T, H]``
    (``fc2_finalize``'s scheme and scratch bound). hq e4m3 ``[M_pad, I]``, hs fp32
    ``[M_pad, I/128]``; slot_index int32 ``[M_pad]`` (-1 on padding); topk_ids int32
    ``[T, k]`` (-1 = empty slot); topk_weights fp32 ``[T, k]``; ``w2`` rows = H, k = I."""
    _check_rows("fc2 fp8", hq, hs, w2.k)
    check_plan_tensors(bn, hq.shape[0], tile_expert)
    tokens, top_k, topk_ids = check_finalize_args("fc2 fp8", hq.shape[0], slot_index, topk_ids,
                                                  topk_weights)
    hidden = w2.rows
    out = bf16_output(out, (tokens, hidden), hq.device, "fc2 fp8")
    if tokens == 0:
        return out
    blocks = hidden // FP8_BLOCK_ROWS
    config = _config(config, bn, w2, hidden=w2.rows)
    cb = fc2_chunk_blocks(hidden, top_k, config)
    y = torch.empty(tokens * top_k, cb * FP8_BLOCK_ROWS, dtype=scratch_dtype(config),
                    device=hq.device)
    if config.tma:
        hq, hs = plan_order_rows(hq, hs, None)
    gemm = fp8_gemm_launcher(cache, epilogue="scatter", a=hq, a_scale=hs, row_index=slot_index,
                             tile_expert=tile_expert, table=w2,
                             topk_w=topk_weights.contiguous().reshape(-1), out=y, bn=bn,
                             y_cols=cb * FP8_BLOCK_ROWS, config=config)
    finalize = slot_sum_launcher(cache, y, topk_ids, out)
    for b0 in range(0, blocks, cb):
        b1 = min(blocks, b0 + cb)
        gemm(b0, b1)
        finalize(b0 * FP8_BLOCK_ROWS, (b1 - b0) * FP8_BLOCK_ROWS)
    return out


def fc2_chunk_blocks(hidden: int, top_k: int, config) -> int:
    """64-column blocks per FC2 chunk (``chunk_blocks``'s scratch bound, whole CTA tiles):
    with two blocks a tile and tokens_m whole block pairs, a pair sharing its scale block."""
    cb = chunk_blocks(hidden, top_k, config.blocks, scratch_dtype(config).itemsize)
    if config.pair_scales and cb % FP8_BLOCKS_PER_CTA:
        cb += 1
    return cb


def _config(config, bn: int, table: ExpertTable, hidden: int):
    """``config``, or the default for ``bn`` and the layer's ``hidden`` size; the default
    moves the weights by cp.async where the table has more tensors than one copy-engine
    kernel takes (``MAX_TMA_TENSORS``)."""
    from dataclasses import replace

    from .fp8_gemm import MAX_TMA_TENSORS, fp8_config

    if config is not None:
        return config
    cfg = fp8_config(bn, hidden)
    if cfg.tma and table.num_tensors > MAX_TMA_TENSORS:
        cfg = replace(cfg, tma=False, cluster2=False, mcast_tokens=False)
    return cfg


def quantize_rows(t: torch.Tensor, cache: CompileCache | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one activation quantization of the FP8 MoE path (x before FC1, h before FC2): e4m3
    ``[rows, K]`` and fp32 ``[rows, K/128]`` per token per 128 channels, bit for bit
    ``quant.fp8.quantize_act_per_token``: the fused sm90 kernel
    (``quant.fp8_device.quantize_act_per_token_fast``, no host sync, so the layer can be
    captured in a CUDA graph), the torch recipe where the kernel does not apply."""
    from tensorrt_llm_dwdp.quant.fp8_device import quantize_act_per_token_fast

    return quantize_act_per_token_fast(t, cache=cache)


def fp8_moe_forward(
    cache: CompileCache,
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: ExpertTable,
    w2: ExpertTable,
    plan,
    bn: int,
    return_h: bool = False,
    config=None,
):
    """The routed experts of one FP8 MoE layer: x bf16 ``[T, H]`` quantized per token per 128
    (``quantize_rows``), FC1 + SwiGLU (``fc1_fp8_gather_swiglu``) into bf16 h, h requantized
    the same way (one pass), FC2 + slot-order finalize (``fc2_fp8_finalize``). ``plan``:
    ``moe.permute.build_permutation(topk_ids, E, tile_m=bn)``. Returns bf16 ``[T, H]`` (and
    the permuted bf16 h with ``return_h``). ``config``: both GEMMs' ``Fp8Config`` (default
    ``fp8_config(bn)``)."""
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != w13.k:
        raise ValueError(f"fp8 MoE: x must be bf16 [T, {w13.k}], got {x.dtype} {tuple(x.shape)}")
    if w13.rows != 2 * w2.k or w2.rows != w13.k:
        raise ValueError(f"fp8 MoE: w3_w1 [{w13.rows}, {w13.k}] and w2 [{w2.rows}, {w2.k}] "
                         f"do not make one layer (need 2I x H and H x I)")
    check_fp8_shapes(w13.k, w2.k)
    xq, xs = quantize_rows(x, cache)
    h = fc1_fp8_gather_swiglu(cache, xq, xs, plan.gather_index, plan.tile_expert, w13, bn,
                              config=config)
    hq, hs = quantize_rows(h, cache)
    out = fc2_fp8_finalize(cache, hq, hs, plan.slot_index, plan.tile_expert, topk_ids,
                           topk_weights, w2, bn, config=config)
    return (out, h) if return_h else out
