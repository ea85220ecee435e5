"""FC2 of a MoE layer on Hopper with a deterministic finalize and bounded scratch.

Per column chunk ``[c0, c0 + Hc)`` of the hidden size: the RS grouped GEMM writes
``y[t k + j, c] = router_weight[t, j] * (alpha_e * h[m] @ w2_e^T)[c0 + c]`` in fp32 for every
real permuted row m = (token t, slot j); then ``slot_sum`` writes ``out[t, c0 + c] =
bf16(sum_j y[t k + j, c])`` summed in fp32 in slot order j = 0..k-1 (no atomics), so results
are bitwise reproducible run to run and independent of how the experts are split over B
tensors. The scratch ``y`` is ``T k Hc`` values with ``Hc <= H / k`` in fp32 (``2 H / k`` in
bf16: ``RsConfig.y_bf16`` / ``Fp8Config.y_bf16``, each row rounded once): at most 2x the bf16
output (``Hc`` is a multiple of 64 columns; for ``H < 64 k`` it is one 64-column block).
The chunks partition the weight rows, so every NVFP4 byte is still read once.
"""
from __future__ import annotations

import torch

from ..compile_cache import CompileCache
from .expert_table import ExpertTable
from .grouped_launch import (
    BLOCK_ROWS,
    bf16_output,
    check_finalize_args,
    check_plan_tensors,
    current_stream,
    gmem_ptr,
    rs_gemm_launcher,
    scratch_dtype,
)


def chunk_blocks(hidden: int, top_k: int, blocks_per_cta: int = 4, y_bytes: int = 4) -> int:
    """64-column blocks per FC2 chunk: the most with the scratch ``T k Hc`` (``y_bytes`` each:
    fp32 4, bf16 2) <= 2 ``T H`` bf16 (Hc <= H / k fp32, 2 H / k bf16) and no more than the
    layer has (one chunk at k = 1 in bf16), rounded down to whole CTA tiles when that leaves
    at least one; never below one."""
    budget = min(4 * hidden // (BLOCK_ROWS * top_k * y_bytes), max(1, hidden // BLOCK_ROWS))
    if budget >= blocks_per_cta:
        return budget // blocks_per_cta * blocks_per_cta
    return max(1, budget)


def fc2_finalize(
    cache: CompileCache,
    h: torch.Tensor,
    slot_index: torch.Tensor,
    tile_expert: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2: ExpertTable,
    bn: int,
    out: torch.Tensor | None = None,
    config=None,
    *,
    tile_count: torch.Tensor,
    compute: str = "bf16",
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """h bf16 ``[M_pad, I]``; slot_index int32 ``[M_pad]`` (the plan's flat slot per row, -1 on
    padding); ``tile_count`` int32 ``[1]`` on the device: the plan's real tiles (a prefix of
    ``tile_expert``, read by the GEMM kernel; the slot sums need no count); topk_ids int32
    ``[T, k]`` (-1 = empty slot, summed as nothing); topk_weights fp32 ``[T, k]``; ``w2`` rows = H, k = I (a table of preshuffled experts); ``config``: the
    GEMM's ``RsConfig`` (default for ``bn``). ``compute="e4m3"``: W4A8, h
    quantized per row per 128 channels first (``w4a8_activations``; every row of h must be
    finite: FC1 zero-fills a new h); ``quantized``: ``w4a8_activations(h)`` computed by the
    caller. Returns bf16 ``[T, H]``."""
    if h.dtype != torch.bfloat16 or h.dim() != 2 or not h.is_contiguous():
        raise ValueError(f"fc2: h must be contiguous bf16 [M_pad, I], got {h.dtype} {tuple(h.shape)}")
    if h.shape[1] != w2.k:
        raise ValueError(f"fc2: h width {h.shape[1]} != weight K {w2.k}")
    check_plan_tensors(bn, h.shape[0], tile_expert, tile_count)
    tokens, top_k, topk_ids = check_finalize_args("fc2", h.shape[0], slot_index, topk_ids,
                                                  topk_weights)
    hidden = w2.rows
    out = bf16_output(out, (tokens, hidden), h.device, "fc2")
    if tokens == 0:
        return out
    blocks = hidden // BLOCK_ROWS
    from .w4a16_rs_gemm import rs_config

    config = config or rs_config(bn, w2.k, compute)
    y_dtype = scratch_dtype(config)
    cb = chunk_blocks(hidden, top_k, config.blocks_per_cta, y_dtype.itemsize)
    y = torch.empty(tokens * top_k, cb * BLOCK_ROWS, dtype=y_dtype, device=h.device)
    a, a_scale = h, None
    if compute == "e4m3":
        from .w4a8_act import w4a8_activations

        a, a_scale = quantized if quantized is not None else w4a8_activations(h)
    gemm = rs_gemm_launcher(cache, epilogue="scatter", a=a, row_index=slot_index,
                            tile_expert=tile_expert, tile_count=tile_count, table=w2,
                            topk_w=topk_weights.contiguous().reshape(-1), out=y, bn=bn,
                            y_cols=cb * BLOCK_ROWS, config=config, compute=compute,
                            a_scale=a_scale)
    finalize = slot_sum_launcher(cache, y, topk_ids, out)
    for b0 in range(0, blocks, cb):
        b1 = min(blocks, b0 + cb)
        gemm(b0, b1)
        finalize(b0 * BLOCK_ROWS, (b1 - b0) * BLOCK_ROWS)
    return out


def slot_sum_launcher(cache: CompileCache, y: torch.Tensor, topk_ids: torch.Tensor,
                      out: torch.Tensor):
    """``launch(col0, cols)``: ``out[t, col0 + c] = bf16(sum_j y[t k + j, c])`` (y fp32 or
    bf16) for ``c < cols``, slot order j, empty slots (``topk_ids`` -1) skipped. Pointers and stream
    are made here once and the compiled kernel is looked up at the first launch (as
    ``rs_gemm_launcher``)."""
    import cutlass

    tokens, hidden = out.shape
    top_k = topk_ids.shape[1]
    y_cols = y.shape[1]
    y_bf16 = y.dtype == torch.bfloat16
    fixed = [gmem_ptr(y, 16), gmem_ptr(topk_ids), gmem_ptr(out, 8), cutlass.Int32(tokens)]
    stream = current_stream()
    compiled = None

    def launch(col0: int, cols: int) -> None:
        nonlocal compiled
        args = [*fixed, cutlass.Int32(col0), cutlass.Int32(cols), stream]
        if compiled is None:
            def build():
                import cutlass.cute as cute

                from .slot_sum import SlotSum

                return cute.compile(SlotSum(y_cols, top_k, hidden, y_bf16), *args)

            compiled = cache.get(("slot_sum", y_cols, top_k, hidden, y_bf16), build)
        compiled(*args)

    return launch
