"""CuTeDSL MoE backend for Hopper (sm_90a): W4A16 grouped GEMMs over NVFP4 expert weights.

``run_experts`` = permutation plan -> FC1 (gather + grouped GEMM + SwiGLU, one kernel) ->
FC2 (grouped GEMM writing router-weighted fp32 rows) -> fixed-order slot sum (bf16 out). The
B operand of both GEMMs is the weights' tensor LIST (S = 1 without DWDP, S = own slice + one
prefetch buffer per peer with it), resolved per expert inside the kernel, so the result does
not depend on how the experts are split: S = 1 and S > 1 are bitwise equal.

Numerics follow the torch reference backend (dequantized exact-bf16 weights, fp32
accumulation, alpha and SwiGLU in fp32, bf16 h, fp32 FC2 and router weight, slot-order sum).
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.expert_table import ExpertTable, build_expert_table
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import (
    fc2_weighted,
    finalize,
    permuted_row_weights,
)
from tensorrt_llm_dwdp.moe.backends.torch_ref import check_run_experts_args
from tensorrt_llm_dwdp.moe.permute import build_permutation
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

logger = logging.getLogger(__name__)

SMALL_TILE_ROWS_PER_EXPERT = 96  # at or below this mean load, 64-row tiles waste less
LARGE_TILE_ROWS_PER_EXPERT = 256  # from this mean load on, 256-row tiles pad little
MAX_TILE_M = (128, 256)


def choose_tile_m(num_rows: int, num_experts: int, max_tile_m: int = 128) -> int:
    """128-row M tiles normally; 64 when experts get few rows (memory-bound regime); 256 when
    ``max_tile_m`` allows it and experts get >= 256 rows on average (compute-bound regime)."""
    if num_rows <= SMALL_TILE_ROWS_PER_EXPERT * num_experts:
        return 64
    if max_tile_m >= 256 and num_rows >= LARGE_TILE_ROWS_PER_EXPERT * num_experts:
        return 256
    return 128


def n_sub_for(tile_m: int) -> int:
    """B sub-tile rows: 64 for 256-row tiles (register budget of 512 threads), else 128."""
    return 64 if tile_m == 256 else 128


class CuteDslMoeBackend:
    """``run_experts`` on Hopper with the sm90 CuTeDSL kernels (NVFP4 weights only).
    ``warp_specialized`` selects the producer/consumer schedule of the GEMMs (same results).
    ``max_tile_m=256`` (opt-in) lets compute-bound layers use 256 x (2 x 64) CTA tiles, which
    dequantize each weight tile once per 256 rows instead of 128 (same results, bitwise;
    measured 0.77-0.99x of the default on H100, kernels/NOTES.md: kept for experiments).

    Holds the compiled-kernel cache and a small LRU of device expert tables keyed by the
    weights' addresses (DWDP buffers keep their addresses, so steady state builds none).
    """

    accepts_multi_tensor = True  # a composite view is the S = 1 case

    def __init__(self, warp_specialized: bool = False, max_tables: int = 512,
                 max_tile_m: int = 128) -> None:
        if max_tile_m not in MAX_TILE_M:
            raise ValueError(f"cutedsl backend: max_tile_m must be one of {MAX_TILE_M}, "
                             f"got {max_tile_m}")
        if warp_specialized and max_tile_m == 256:
            raise ValueError("cutedsl backend: the warp-specialized schedule has no 256-row "
                             "tiles (use max_tile_m=128)")
        self.warp_specialized = warp_specialized
        self.max_tile_m = max_tile_m
        self.cache = CompileCache()
        self._tables: OrderedDict[tuple, ExpertTable] = OrderedDict()
        self._max_tables = max_tables

    def _table(self, weights: ExpertWeights, w: str, sf: str, alpha: str) -> ExpertTable:
        ws, sfs, alphas = (weights.tensors[n] for n in (w, sf, alpha))
        key = (w, weights.expert_offsets,
               tuple((t.data_ptr(), tuple(t.shape)) for t in (*ws, *sfs, *alphas)))
        table = self._tables.get(key)
        if table is None:
            table = build_expert_table(ws, sfs, alphas, weights.expert_offsets)
            self._tables[key] = table
            if len(self._tables) > self._max_tables:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def run_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: ExpertWeights,
    ) -> torch.Tensor:
        check_run_experts_args(x, topk_ids, topk_weights, weights)
        if weights.quant != "nvfp4":
            raise ValueError(
                f"cutedsl backend: needs NVFP4 expert weights, got {weights.quant!r} "
                "(use backend='torch' for bf16 weights)")
        if weights.has_bias:
            raise ValueError("cutedsl backend: expert biases are not supported (use 'torch')")
        if not x.is_cuda:
            raise ValueError(f"cutedsl backend: tensors must be on a CUDA device, got {x.device}")
        tokens, k = topk_ids.shape
        if tokens == 0:
            return torch.empty(0, x.shape[1], dtype=torch.bfloat16, device=x.device)
        tile_m = choose_tile_m(tokens * k, weights.num_experts, self.max_tile_m)
        n_sub = n_sub_for(tile_m)
        plan = build_permutation(topk_ids, weights.num_experts, tile_m=tile_m)
        w13 = self._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
        w2 = self._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
        x = x.contiguous()
        if x.data_ptr() % 16:  # a row-offset view; the gather copies 16-byte chunks
            x = x.clone()
        ws = self.warp_specialized
        h = fc1_gather_swiglu(self.cache, x, plan.gather_index, plan.tile_expert, w13, tile_m,
                              n_sub=n_sub, warp_specialized=ws)
        row_weight = permuted_row_weights(topk_weights, plan.slot_index)
        y = fc2_weighted(self.cache, h, plan.tile_expert, row_weight, w2, tile_m,
                         n_sub=n_sub, warp_specialized=ws)
        return finalize(self.cache, y, plan.inverse)


def create_backend() -> CuteDslMoeBackend:
    return CuteDslMoeBackend()
