"""CuTeDSL MoE backend for Hopper (sm_90a): grouped GEMMs over NVFP4 (W4A16) or FP8 experts.

The kernel follows the experts' format (``weights.quant``): "nvfp4" runs the W4A16 register-
operand kernels below; "fp8" (block-128 e4m3 weights with fp32 ``weight_scale_inv``, the
DeepSeek-V3 / Qwen3 FP8 checkpoints' format) runs ``kernels/sm90/fp8_gemm.py``: tokens
quantized per token per 128 channels, e4m3 WGMMA with fp32 promotion per 128 of K, FC1 + SwiGLU
into bf16 h, h requantized, FC2 + the same slot-order finalize (``quant/fp8.py`` numerics).
FP8 experts stay in the checkpoint's linear layout (H and I multiples of 128).

``run_experts`` = permutation plan (token tiles of ``bn`` rows per expert) -> FC1 (gather +
RS grouped GEMM + SwiGLU, one kernel) -> FC2 (RS grouped GEMM writing router-weighted fp32 rows
of one hidden-column chunk at a time, each chunk summed in slot order into the bf16 output).
The B operand of both GEMMs is the weights' tensor LIST (S = 1 without DWDP, S = own slice +
one prefetch buffer per peer with it), resolved per expert inside the kernel, so the result does
not depend on how the experts are split: S = 1 and S > 1 are bitwise equal.

The kernels read NVFP4 weights in the ``preshuffled`` layout only (``moe/layouts.py``: each
expert's bytes permuted once at load so that one bulk copy moves a block's K tile and the
dequant is a few shifts; 1.25-1.6x the kernels that read checkpoint rows, kernels/NOTES.md).
``load_model`` picks that layout for this backend; a set tagged otherwise is refused.

Numerics follow the torch reference backend (dequantized exact-bf16 weights, fp32
accumulation, alpha and SwiGLU in fp32, bf16 h, fp32 FC2 and router weight, slot-order sum).
Shapes: hidden and expert intermediate sizes must be multiples of 64 (checked before launch).

``nvfp4_compute`` picks the tensor-core format of the NVFP4 experts: ``"bf16"`` (W4A16, the
default: exact weights, bf16 tokens) or ``"fp8"`` (W4A8: weights rounded once to e4m3, tokens
and h quantized per token per 128 channels, fp8 WGMMA; ``quant/w4a8.py`` states the numerics
and the error, about 3% relative against W4A16; sizes must be multiples of 128). The default
stays bf16 until a device measurement says W4A8 is faster.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.kernels.sm90.expert_table import ExpertTable, build_expert_table
from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import (
    build_fp8_expert_table,
    check_fp8_shapes,
    fp8_moe_forward,
)
from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import TOKEN_TILES
from tensorrt_llm_dwdp.moe.backends.torch_ref import check_run_experts_args
from tensorrt_llm_dwdp.moe.layouts import LINEAR, PRESHUFFLED
from tensorrt_llm_dwdp.moe.permute import (RoutingErrors, build_permutation, sync_checks_requested,
                                           warm_up_plans)
from tensorrt_llm_dwdp.moe.specs import FP8
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

logger = logging.getLogger(__name__)

SIZE_MULTIPLE = 64
FP8_SCALES = {"w3_w1_weight": "w3_w1_weight_scale_inv", "w2_weight": "w2_weight_scale_inv"}
NVFP4_COMPUTES = {"bf16": "bf16", "fp8": "e4m3"}  # moe_config value -> the kernel's format


def choose_token_tile(num_rows: int, num_experts: int) -> int:
    """Tokens per tile (WGMMA N): the smallest of 16, 32, 64, 128 that holds the mean rows per
    expert (one tile per expert when memory-bound), 128 beyond (compute-bound: the widest N
    whose two accumulators fit the consumer registers)."""
    mean = num_rows / max(1, num_experts)
    for bn in TOKEN_TILES:
        if mean <= bn:
            return bn
    return TOKEN_TILES[-1]


def tokens_for_tile(bn: int, num_experts: int, top_k: int) -> int:
    """A token count whose step picks token tile ``bn`` over ``num_experts`` experts with
    ``top_k`` slots per token (``choose_token_tile``): the most tokens with at most ``bn``
    rows per expert on average."""
    if bn not in TOKEN_TILES:
        raise ValueError(f"token tile {bn} is not one of {TOKEN_TILES}")
    tokens = max(1, bn * num_experts // top_k)
    if choose_token_tile(tokens * top_k, num_experts) != bn:
        raise ValueError(f"no token count picks tile {bn} over {num_experts} experts, top-{top_k}")
    return tokens


def check_expert_shapes(hidden: int, inter: int) -> None:
    """The sm90 kernels tile hidden and intermediate sizes in 64-wide blocks."""
    for name, value in (("hidden size", hidden), ("expert intermediate size", inter)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(
                f"cutedsl backend: {name} {value} is not a positive multiple of "
                f"{SIZE_MULTIPLE} (the sm90 kernels' block); use backend='torch' for it")


class CuteDslMoeBackend:
    """``run_experts`` on Hopper with the sm90 CuTeDSL kernels (NVFP4 or FP8 experts).

    Holds the compiled-kernel cache and a small LRU of device expert tables keyed by the
    weights' addresses (DWDP buffers keep their addresses, so steady state builds none). One
    object serves every MoE layer of a model (``load_model`` shares it), so each kernel
    configuration compiles once per process; ``warm_up`` compiles them all before serving.

    ``run_experts`` never waits on the host (plan on the device, grids from its tile bound), so
    a layer can be captured in a CUDA graph once its kernels and expert tables exist (after one
    eager call with the same weights). Out-of-range expert ids are flagged on the device and
    raised by ``check_routing()`` (the engine calls it at each step's end); ``sync_check=True``
    raises them per layer instead (a debug mode: one host sync per layer).
    """

    accepts_multi_tensor = True  # a composite view is the S = 1 case
    weight_layouts = (PRESHUFFLED,)

    def __init__(self, max_tables: int = 512, sync_check: bool = False,
                 nvfp4_compute: str = "bf16") -> None:
        if nvfp4_compute not in NVFP4_COMPUTES:
            raise ValueError(f"cutedsl backend: nvfp4_compute must be one of "
                             f"{sorted(NVFP4_COMPUTES)}, got {nvfp4_compute!r}")
        self.nvfp4_compute = nvfp4_compute
        self.compute = NVFP4_COMPUTES[nvfp4_compute]
        self.cache = CompileCache()
        self.routing_errors = RoutingErrors(sync_check)
        self._tables: OrderedDict[tuple, ExpertTable] = OrderedDict()
        self._max_tables = max_tables

    def _table(self, weights: ExpertWeights, w: str, sf: str, alpha: str | None) -> ExpertTable:
        """The expert table of weight ``w`` with scales ``sf`` and alphas ``alpha`` (None: an
        FP8 table, weights and block scales only), cached by the tensors' addresses."""
        ws, sfs = weights.tensors[w], weights.tensors[sf]
        alphas = weights.tensors[alpha] if alpha else ()
        key = (w, weights.quant, weights.expert_offsets,
               tuple((t.data_ptr(), tuple(t.shape)) for t in (*ws, *sfs, *alphas)))
        table = self._tables.get(key)
        if table is None:
            if alpha is None:
                table = build_fp8_expert_table(ws, sfs, weights.expert_offsets)
            else:
                table = build_expert_table(ws, sfs, alphas, weights.expert_offsets)
            self._tables[key] = table
            if len(self._tables) > self._max_tables:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def graph_safe(self, quant: str) -> bool:
        """NVFP4 and FP8 layers are capturable in a CUDA graph: no host read, replays bitwise
        equal to eager with host syncs raising (``tests/gpu/test_cuda_graphs_gpu.py``, H100,
        2026-12-07: 16, 300 and 3000 tokens each)."""
        return quant in ("nvfp4", "fp8")

    def check_routing(self) -> None:
        """Raise ValueError naming an out-of-range expert id seen since the last call (reads
        one device flag: call it where the host syncs anyway)."""
        self.routing_errors.check()

    def compile_stats(self) -> tuple[int, float]:
        """(kernels compiled so far, seconds spent compiling them)."""
        return self.cache.compiles, self.cache.compile_seconds

    def warm_up(self, weights: ExpertWeights, top_k: int) -> int:
        """Compile now every kernel a step over ``weights`` with ``top_k`` slots per token can
        pick (one configuration per token tile, chosen by rows per expert; 1.3-2.2 s each on
        an H200 host), by running each tile once on zero-valued tokens. Otherwise the first
        served step whose rows per expert pick a tile not seen yet compiles it mid-step.
        Returns how many kernels were compiled."""
        before = self.cache.compiles
        e = weights.num_experts
        device = weights.tensors["w3_w1_weight"][0].device
        slots = torch.arange(top_k, device=device)
        for bn in TOKEN_TILES:
            tokens = tokens_for_tile(bn, e, top_k)
            rows = torch.arange(tokens, device=device)[:, None] * top_k + slots
            # distinct experts per token; slots past the experts held here are empty (-1)
            ids = torch.where(slots < e, rows % e, -1).to(torch.int32)
            x = torch.zeros(tokens, weights.hidden_size, dtype=torch.bfloat16, device=device)
            w = torch.full((tokens, top_k), 1.0 / top_k, dtype=torch.float32, device=device)
            self.run_experts(x, ids, w, weights)
        warm_up_plans(e, top_k, device)  # the plan kernel's size classes (Triton, if there)
        return self.cache.compiles - before

    def run_experts(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        weights: ExpertWeights,
    ) -> torch.Tensor:
        check_run_experts_args(x, topk_ids, topk_weights, weights)
        self._check(x, weights)
        tokens, k = topk_ids.shape
        if tokens == 0:
            return torch.empty(0, x.shape[1], dtype=torch.bfloat16, device=x.device)
        bn = choose_token_tile(tokens * k, weights.num_experts)
        plan = build_permutation(topk_ids, weights.num_experts, tile_m=bn)
        self.routing_errors.add(plan)
        x = x.contiguous()
        if x.data_ptr() % 16:  # a row-offset view; the gather copies 16-byte chunks
            x = x.clone()
        if weights.quant == FP8:
            w13 = self._table(weights, "w3_w1_weight", FP8_SCALES["w3_w1_weight"], None)
            w2 = self._table(weights, "w2_weight", FP8_SCALES["w2_weight"], None)
            return fp8_moe_forward(self.cache, x, topk_ids, topk_weights.contiguous(), w13, w2,
                                   plan, bn)
        w13 = self._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
        w2 = self._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
        h = fc1_gather_swiglu(self.cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                              tile_count=plan.tile_count, compute=self.compute)
        return fc2_finalize(self.cache, h, plan.slot_index, plan.tile_expert, topk_ids,
                            topk_weights, w2, bn, tile_count=plan.tile_count,
                            compute=self.compute)

    def _check(self, x: torch.Tensor, weights: ExpertWeights) -> None:
        """ValueError naming what these kernels cannot run, before any launch: NVFP4 experts
        preshuffled (W4A16, or W4A8 with sizes multiples of 128), FP8 experts linear (sizes
        multiples of 128), no biases, CUDA tensors."""
        if weights.quant == FP8:
            if weights.weight_layout != LINEAR:
                raise ValueError(f"cutedsl backend: FP8 experts are read in the linear layout, "
                                 f"got {weights.weight_layout!r}")
        elif weights.quant != "nvfp4":
            raise ValueError(
                f"cutedsl backend: needs NVFP4 or FP8 expert weights, got {weights.quant!r} "
                "(use backend='torch' for bf16 weights)")
        elif weights.weight_layout != PRESHUFFLED:
            raise ValueError(
                f"cutedsl backend: reads preshuffled expert weights, got {weights.weight_layout!r} "
                "(load_model shuffles them for this backend; moe.layouts.shuffle_experts_ does "
                "it for tensors built by hand)")
        if weights.has_bias:
            raise ValueError("cutedsl backend: expert biases are not supported (use 'torch')")
        if not x.is_cuda:
            raise ValueError(f"cutedsl backend: tensors must be on a CUDA device, got {x.device}")
        if weights.quant == FP8:
            check_fp8_shapes(weights.hidden_size, weights.intermediate_size)
            return
        check_expert_shapes(weights.hidden_size, weights.intermediate_size)
        if self.compute == "e4m3" and (weights.hidden_size % 128
                                       or weights.intermediate_size % 128):
            raise ValueError(
                f"cutedsl backend, nvfp4_compute='fp8': hidden size {weights.hidden_size} and "
                f"expert intermediate size {weights.intermediate_size} must be multiples of 128 "
                f"(one activation scale per 128 channels); use nvfp4_compute='bf16'")


def create_backend(nvfp4_compute: str = "bf16") -> CuteDslMoeBackend:
    return CuteDslMoeBackend(nvfp4_compute=nvfp4_compute, sync_check=sync_checks_requested())
