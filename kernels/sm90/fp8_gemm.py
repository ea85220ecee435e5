"""Grouped FP8 block-scaled MoE GEMM for Hopper: e4m3 x e4m3 WGMMA (QGMMA), DeepGEMM numerics.

Operands swapped as in ``w4a16_rs_gemm``: ``C^T [weight rows, tokens] = W_e [weight rows, K] .
X^T`` for one expert's token tile, so the weights are WGMMA's M (64-row blocks) and the tokens
its N (``bn`` = 16..128 per tile). Both operands are e4m3 in shared memory, K-major, in the
128 B-swizzled layout WGMMA reads (one swizzle atom row = 128 e4m3 = one K tile = one scale
block of K).

Numerics (``tensorrt_llm_dwdp.quant.fp8``, DeepGEMM's Hopper recipe): token rows quantized per
token per 128 channels (``quantize_act_per_token``: e4m3 values, fp32 scale per row and K
block); weights e4m3 with one fp32 ``weight_scale_inv`` per 128 x 128 block. Per K tile of 128
every consumer warpgroup runs 4 k32 QGMMAs into a fresh fp32 partial accumulator, waits for
them, and promotes: ``total = fma(partial, x_scale[token, kb] * w_scale[row block, kb], total)``
(fp32, the scale product first as in DeepGEMM; ``quant.fp8``'s reference rounds each step
apart, so the two agree to fp32 rounding, not bit for bit;
once per 128 of K: Hopper's fp8 WGMMA accumulates with reduced precision inside an
instruction sequence, so the partial never spans more than one scale block).
FC1 (``epilogue="swiglu"``): 64-row block b holds up rows ``[32b, 32b+32)`` and their gate rows
``I + [32b, 32b+32)``, interleaved (accumulator rows g / g+8 of each 16-row group are up / gate
of one column); the interleave is applied by the producer's row addresses, so the weights are
read in the checkpoint's layout. h = silu(gate) * up in fp32 -> bf16 ``h [M_pad, I]`` (the
caller requantizes h per token per 128 with one pass before FC2: 128 h columns span four
blocks, i.e. two CTAs, so an in-kernel amax would need a cross-CTA reduction).
FC2 (``"scatter"``): block b is rows ``[64b, 64b+64)`` of ``w2``; the epilogue writes
router-weighted fp32 (``y_bf16``: bf16) rows ``y[slot, 64 (b - blk_begin) + row]`` of a
hidden-column chunk, the caller sums the slots in fixed order (``slot_sum``).

Warp roles (384 threads; persistent CTAs over (token tile, block pair) work tiles in a static
round robin, all roles walking the same tiles; a tile whose ``tile_expert`` is -1 is skipped
by every role, so a plan whose tile count is a host-side upper bound works as is):
  producer warpgroup 0 (``producer_regs``): per K tile, wait for the stage's ``empty``, then
      every thread cp.asyncs 16 B chunks: 8 of the CTA's two 64 x 128 weight tiles (rows of the
      expert in the checkpoint layout, swizzled into place), ``bn / 16`` of the gathered token
      rows, and threads < ``bn`` 4 B of the token's activation scale; one cp.async group per
      stage; then waits for its own group of the stage ``lag = stages - 2`` back
      (``cp.async.wait_group lag``), fences the async proxy (WGMMA reads what cp.async wrote)
      and arrives on that stage's ``full``: ``lag + 1`` stages of loads stay in flight.
  consumer warpgroups 1, 2 (``consumer_regs``): warpgroup q owns 64-row block ``blk0 + q``.
      Per K tile: load the block's weight scale(s) of the next K tile from global (carried to
      it: ``scale_lookahead``), wait ``full``, read its ``bn / 4`` token scales from shared
      memory, 4 QGMMAs 64 x bn x 32 (A and B from shared memory), commit, wait for them,
      release the slot (``_release``), promote into the fp32 total. The two warpgroups
      interleave: one promotes while the other's QGMMAs run. After the last K tile: epilogue
      from registers to global memory.
Pipelines (``stages`` slots of [sA 16 KiB | sB bn x 128 B | sX bn x 4 B]):
  full[s]   producer -> consumers: 128 arrivals, one per producer thread once its copies of
            stage s landed (``cp.async.wait_group``) and were fenced to the async proxy.
  empty[s]  consumers -> producer: 256 arrivals, one per consumer thread once its QGMMAs that
            read stage s completed and its token scales of s are in registers - by default
            one arrival of count 32 per warp (``release_per_warp``) - and 256 more per
            cluster partner whose producer multicasts into this slot (cluster2's weights,
            mcast_tokens' token halves), as its consumers release it too.
Steady state (K-tile counter i over the CTA's real tiles, slot s = i % stages):
  producer: wait empty[s] | cp.async A(i), B(i), X(i) | commit | wait own copies(i-lag) |
            fence | arrive full[(i-lag) % stages]   (lag = stages - 2)
  consumer: load w_scale(i + 1) | wait full[s] | x_scale(i) | 4 x QGMMA | commit | wait |
            arrive empty[s] | promote with w_scale(i)
so ``stages - 1`` K tiles of loads are in flight (the producer blocks on ``empty`` only when
the consumers are a full ring behind), across work-tile boundaries.

64-bit offsets wherever a global address is formed from a row index; offsets inside one expert
are int32 (checked < 2^31 at construction).
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import Float8E4M3FN, Float32, Int32, Int64
from cutlass.cute.nvgpu import cpasync, warpgroup

from .ptx import (
    cp_async_4,
    cp_async_16,
    cp_async_bulk,
    ld_global_f32,
    ld_shared_f32,
    ld_shared_v2_f32,
    st_global_bf16,
    st_global_bf16x2,
    st_global_f32,
    st_global_v2_f32,
)

EPILOGUES = ("swiglu", "scatter")
FP8_BLOCK = 128  # the scale block along K and along the weight rows (quant.fp8.FP8_BLOCK)
K_TILE = FP8_BLOCK  # K elements per pipeline stage: one scale block, one 128 B swizzle row
BLOCK_ROWS = 64  # weight rows per consumer warpgroup (WGMMA M)
CONSUMER_WGS = 2
BLOCKS_PER_CTA = CONSUMER_WGS  # 64-row weight blocks of a CTA tile (``Fp8Config.blocks``)
WIDE_BLOCKS = 3  # blocks of the wide tile (tokens_m: 128 tokens x 192 weight rows)
PRODUCER_THREADS = 128
THREADS = PRODUCER_THREADS + 128 * CONSUMER_WGS
TOKEN_TILES = (16, 32, 64, 128)
SMEM_PER_SM = 220 * 1024
MAX_STAGES = 8
MAX_TMA_TENSORS = 8  # weight tensors (DWDP sources) one ``tma`` kernel takes
ROW_CHUNKS = K_TILE // 16  # 16 B chunks of one row's K tile
MCAST_TOKENS_MIN_HIDDEN = 7168  # bn 128 multicasts the token tile from here on (fp8_config)
A_TILE = BLOCK_ROWS * K_TILE  # bytes of one block's K tile


@dataclass(frozen=True)
class Fp8Config:
    """The static shape of one compiled kernel beyond the GEMM sizes, a field each:

    - bn: token tile (WGMMA N); ctas_per_sm: CTAs resident per SM (2 halves shared memory and
      registers); producer_regs: setmaxnreg of the producer warpgroup (the consumers take the
      rest). CTAs are always persistent (grid = resident CTAs, ``fp8_launch``).
    - bulk_weights: the weights in the preshuffled layout (``fp8_preshuffle``), one
      ``cp.async.bulk`` per CTA block and stage (else 16 B cp.asyncs of the checkpoint's rows).
    - tma: one producer warp (one elected lane issuing) moves every operand with the copy
      engine: weights in the checkpoint's layout by tensor-map copies, the token rows
      pre-permuted ``[M_pad, K]`` by one tensor-map copy, their scales transposed
      ``[K/128, M_pad]`` by one ``cp.async.bulk`` (``fp8_launch`` prepares both).
    - tokens_m (bn 128): DeepGEMM's MMA roles - each consumer warpgroup multiplies 64 of the
      tile's tokens (WGMMA M) by the CTA's weight rows (N), so a thread's accumulators share 2
      token scales and 1 (FC2) or 2 (FC1: up, gate) weight scales a block, and the promotion
      is one FMA per accumulator.
    - cluster2 (tma, tokens_m): CTA pairs over two token tiles; when both are one expert's,
      each loads part of the weight boxes and multicasts it to both (``_unit``; measured
      0.61-0.81x the default).
    - mcast_tokens (tma, tokens_m): CTA pairs over two block groups of one token tile, each
      loading one 64-token half of the token box and multicasting it to both (always shared);
      with cluster2, 4-CTA clusters.
    - fc1_one_box (tma, FC1): a 64-row block as one 4-D tensor-map box (8 rows, up / gate at
      stride I rows, 4 groups of 8, K), the interleave by the map's strides, instead of eight
      8-row boxes (FC2's block is one box already).
    - y_bf16 (FC2, default): the router-weighted scratch rows are bf16 (rounded once, as
      TensorRT-LLM's finalize reads its GEMM's output; False: fp32): half the bytes and
      chunks, measured 1.00-1.16x the fp32 scratch, output within 2.7e-3 relative (H100,
      2026-12-07, ``bench/results/fp8_kernels_h100_2/``); FC1 ignores it.
    - release_per_warp (default): a consumer warp frees a slot by one arrival of count 32 per
      barrier after a warp barrier (``_release``; False: every thread arrives, the kernels
      measured up to 2026-12-08).
    - scale_lookahead (default): the consumers load the next K tile's weight scales while this
      one runs (``_next_scales``; False: this tile's, just before the stage's wait, exposing
      their L2 latency at the promotion - Nsight's top stall was long scoreboard).
    - blocks: 64-row weight blocks of a CTA tile, 2 (128 rows, one scale block), or 3 with
      tokens_m and tma (128 x 192, QGMMA 64x192x32: a sixth fewer L2 -> SM bytes per FLOP;
      each block's scales loaded apiece; with cluster2 rank 0 multicasts blocks 0 and 2, rank 1
      block 1, and FC1 needs fc1_one_box).

    release_per_warp, scale_lookahead and blocks 3 are compile-checked only; the bench variants
    ``thread_release``, ``no_lookahead`` and ``blocks3*`` time them against the default."""

    bn: int
    ctas_per_sm: int
    producer_regs: int
    bulk_weights: bool = False
    tma: bool = False
    tokens_m: bool = False
    cluster2: bool = False
    y_bf16: bool = True
    mcast_tokens: bool = False
    fc1_one_box: bool = False
    release_per_warp: bool = True
    scale_lookahead: bool = True
    blocks: int = BLOCKS_PER_CTA

    @property
    def pair_scales(self) -> bool:
        """tokens_m's two blocks are one 128-row scale block: one (FC2) or two (FC1) weight
        scales a K tile for the whole tile, so a tile starts at an even block (and FC2's
        chunks are whole pairs); the wide tile's blocks load theirs apiece."""
        return self.tokens_m and self.blocks == BLOCKS_PER_CTA

    @property
    def cluster_m(self) -> int:
        """Token tiles of one work unit (CTAs sharing the weight boxes)."""
        return 2 if self.cluster2 else 1

    @property
    def cluster_n(self) -> int:
        """Block pairs of one work unit (CTAs sharing the token box)."""
        return 2 if self.mcast_tokens else 1

    @property
    def cluster_size(self) -> int:
        """CTAs of one cluster, rank ``rm + cluster_m rn`` for (token tile rm, block pair rn)."""
        return self.cluster_m * self.cluster_n

    @property
    def register_pool(self) -> int:
        """Registers per thread at launch: the most, in steps of 8, that ``ctas_per_sm`` CTAs
        fit (setmaxnreg moves them between warpgroups)."""
        return 65536 // (self.ctas_per_sm * THREADS) // 8 * 8

    @property
    def consumer_regs(self) -> int:
        return (self.register_pool * THREADS - self.producer_regs * PRODUCER_THREADS) \
            // (THREADS - PRODUCER_THREADS) // 8 * 8


def fp8_config(bn: int, hidden: int = 0, **overrides) -> Fp8Config:
    """The configuration for token tile ``bn`` of a layer of hidden size ``hidden`` (0:
    unknown); ``overrides`` replace fields (benchmarks).

    bn <= 32 (memory-bound): two CTAs per SM (twice the warps and loads in flight; 80
    registers at launch, producer 48 / consumers 96: partial + total accumulators are 2 x bn/2
    registers; at 40 the cp.async producer spilled at DeepSeek-V3's FC1). bn >= 64: one CTA
    (the 64 x bn partial and total take bn registers together per thread; producer 56 /
    consumers 224; the wide tile, ``blocks=3``: 40 / 232). bn 128: ``tma`` + ``tokens_m``, measured
    1.10-1.16x the cp.async orientation at 256 and 1024 tokens per expert, both models and
    routings, same bits (H100, 2026-12-07, ``bench/results/fp8_kernels_h100/``); at bn 16
    ``tma`` alone measured 0.97-0.99x, so the smaller tiles keep the cp.async producer. From
    ``MCAST_TOKENS_MIN_HIDDEN`` on, bn 128 also multicasts the token tile over CTA pairs
    (``mcast_tokens``): 1.00-1.16x (geometric mean 1.05) at DeepSeek-V3's 7168 over 12
    points, 0.89-1.10x (1.00) at Qwen3-235B-A22B's 4096, 256-1024 tokens per expert, both
    routings (H100, 2026-12-08, ``bench/results/fp8_kernels_h100_3/``)."""
    if bn not in TOKEN_TILES:
        raise ValueError(f"token tile bn must be one of {TOKEN_TILES}, got {bn}")
    if bn <= 32:
        fields = dict(ctas_per_sm=2, producer_regs=48)
    elif bn == 2 * BLOCK_ROWS:
        fields = dict(ctas_per_sm=1, producer_regs=56, tma=True, tokens_m=True,
                      mcast_tokens=hidden >= MCAST_TOKENS_MIN_HIDDEN)
    else:
        fields = dict(ctas_per_sm=1, producer_regs=56)
    fields.update(bn=bn)
    fields.update(overrides)
    if fields.get("blocks") == WIDE_BLOCKS and "producer_regs" not in overrides:
        fields["producer_regs"] = 40  # 232 a consumer: 2 x 96 accumulators and the rest
    return Fp8Config(**fields)


class Fp8BlockGemm:
    """One compiled configuration (see the module docstring).

    n_weight: rows of each expert's weight (2I for FC1, H for FC2), a multiple of 128;
    k: the reduction size (H for FC1, I for FC2), a multiple of 128; bn: token tile (N);
    y_cols: row length of FC2's output chunk (a multiple of 64), unused for FC1;
    config: the tile configuration (default ``fp8_config(bn)``).
    """

    def __init__(self, *, epilogue: str, n_weight: int, k: int, bn: int, y_cols: int = 0,
                 config: Fp8Config | None = None, num_tensors: int = 1):
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
        if bn not in TOKEN_TILES:
            raise ValueError(f"token tile bn must be one of {TOKEN_TILES}, got {bn}")
        if k % FP8_BLOCK or k <= 0:
            raise ValueError(f"K={k} must be a positive multiple of {FP8_BLOCK}")
        if n_weight % FP8_BLOCK or n_weight <= 0:
            raise ValueError(f"{n_weight} weight rows: must be a positive multiple of {FP8_BLOCK}")
        if epilogue == "swiglu" and (n_weight // 2) % FP8_BLOCK:
            raise ValueError(f"FC1: I={n_weight // 2} must be a multiple of {FP8_BLOCK}")
        if n_weight * k >= 2**31:
            raise ValueError(f"one expert's weight ({n_weight} x {k}) has 2^31 bytes or more")
        if epilogue == "scatter" and (y_cols % BLOCK_ROWS or y_cols <= 0):
            raise ValueError(f"y_cols={y_cols} must be a positive multiple of {BLOCK_ROWS}")
        cfg = config or fp8_config(bn)
        if cfg.bn != bn:
            raise ValueError(f"{cfg} does not fit bn={bn}")
        if cfg.tokens_m and bn != 2 * BLOCK_ROWS:
            raise ValueError(f"tokens_m needs the 128-token tile (two warpgroups of 64), got "
                             f"bn={bn}")
        if cfg.cluster_size > 1 and not (cfg.tma and cfg.tokens_m and cfg.ctas_per_sm == 1):
            raise ValueError("cluster2 / mcast_tokens need tma, tokens_m and one CTA per SM")
        if cfg.tma and cfg.bulk_weights:
            raise ValueError("tma and bulk_weights are two ways to move the weights: pick one")
        if not 1 <= num_tensors <= MAX_TMA_TENSORS:
            raise ValueError(f"num_tensors={num_tensors}: 1..{MAX_TMA_TENSORS} weight tensors")
        if cfg.blocks not in (BLOCKS_PER_CTA, WIDE_BLOCKS):
            raise ValueError(f"blocks={cfg.blocks}: a CTA tile has {BLOCKS_PER_CTA} or "
                             f"{WIDE_BLOCKS} weight blocks of {BLOCK_ROWS} rows")
        if cfg.blocks == WIDE_BLOCKS and not (cfg.tokens_m and cfg.tma):
            raise ValueError(f"the {WIDE_BLOCKS * BLOCK_ROWS}-row tile needs tokens_m and tma "
                             "(tokens as WGMMA M, N = its rows)")
        if cfg.blocks == WIDE_BLOCKS and cfg.cluster2 and epilogue == "swiglu" \
                and not cfg.fc1_one_box:
            raise ValueError("FC1's wide tile with cluster2 needs fc1_one_box (its 24 boxes of "
                             "8 rows overflow the producer's 40 registers)")
        self.blocks = cfg.blocks
        self.num_tensors = num_tensors
        # tensor-map copies of the weights: FC1's block interleaves 8-row groups of up and
        # gate rows (``weight_row``), so it moves as 8 boxes of 8 rows; FC2's as one box
        if cfg.fc1_one_box and not cfg.tma:
            raise ValueError("fc1_one_box needs tma (it is a tensor-map layout)")
        self.one_box = epilogue == "swiglu" and cfg.fc1_one_box
        self.box_rows = 8 if epilogue == "swiglu" and not self.one_box else BLOCK_ROWS
        self.boxes = BLOCK_ROWS // self.box_rows
        self.cfg = cfg
        self.epilogue = epilogue
        self.n_weight = n_weight
        self.k = k
        self.bn = bn
        self.y_cols = y_cols
        self.half = n_weight // 2  # FC1: I, the gate rows' offset
        self.k_tiles = k // K_TILE
        self.k_steps = K_TILE // 32  # QGMMAs (k32) per K tile
        self.stage_a = self.blocks * A_TILE
        self.stage_b = bn * K_TILE
        self.stage_x = bn * 4
        stage_bytes = self.stage_a + self.stage_b + self.stage_x
        smem_budget = SMEM_PER_SM // cfg.ctas_per_sm - 2048 * (cfg.ctas_per_sm - 1)
        self.stages = min(MAX_STAGES, smem_budget // stage_bytes)
        if self.stages < 3:
            raise ValueError(f"only {self.stages} pipeline stages fit ({stage_bytes} B each)")
        # stages each producer thread keeps in flight beyond the one it is issuing: it
        # publishes stage i - lag once ``cp.async.wait_group lag`` says its copies landed
        self.lag = self.stages - 2
        self.a_chunks = self.stage_a // 16 // PRODUCER_THREADS  # 16 B A chunks per thread (8)
        # a producer thread's rows in a block are r0 + 16 j: expert rows ``row_step`` j apart
        # (FC1's interleave maps 16 block rows to 8 up rows; ``weight_row``)
        self.row_step = 8 if epilogue == "swiglu" else 16
        self.b_chunks = self.stage_b // 16 // PRODUCER_THREADS  # bn / 16

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, a_scale_ptr: cute.Pointer,
                 row_index_ptr: cute.Pointer, tile_expert_ptr: cute.Pointer,
                 tensor_of_ptr: cute.Pointer, local_of_ptr: cute.Pointer,
                 table_ptr: cute.Pointer, topk_w_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 num_token_tiles: Int32, num_experts: Int32, num_b: Int32, blk_begin: Int32,
                 blk_end: Int32, grid: Int32, w_ptrs: tuple, w_counts: tuple, stream):
        """``a``: e4m3 rows (FC1: tokens ``[T, K]`` gathered by ``row_index``; FC2: ``h``
        ``[M_pad, K]``) with fp32 ``a_scale [rows, K/128]``; ``row_index`` int32 ``[M_pad]``
        (FC1: gather index, FC2: slot index; -1 on padding); ``tile_expert [num_token_tiles]``
        (-1: skip the tile); multi-B maps and ``table`` int64 ``[2, S]`` (weight and scale base
        of each tensor, ``fp8_launch.build_fp8_expert_table``); ``topk_w`` fp32 flat router
        weights (FC2); ``out``: FC1 bf16 ``h [M_pad, I]``, FC2 fp32 ``y [T*k, y_cols]``
        (``y_bf16``: bf16). ``grid`` <= number of work tiles. ``tma``: ``a`` is the token
        rows in plan order ``[M_pad, K]`` (both GEMMs), ``a_scale`` their scales transposed
        ``[K/128, M_pad]``, and ``w_ptrs`` / ``w_counts`` the ``num_tensors`` weight tensors
        (e4m3 pointers) and their expert counts, the table's order (other configurations
        ignore them)."""
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            Float8E4M3FN, Float8E4M3FN, warpgroup.OperandMajorMode.K,
            warpgroup.OperandMajorMode.K, Float32, (1, 1, 1), tiler_mn=(BLOCK_ROWS, self.bn))
        a_layout = sm90_utils.make_smem_layout_a(
            utils.LayoutEnum.ROW_MAJOR, (BLOCK_ROWS, self.bn, K_TILE), Float8E4M3FN,
            self.stages * self.blocks)
        b_layout = sm90_utils.make_smem_layout_b(
            utils.LayoutEnum.ROW_MAJOR, (BLOCK_ROWS, self.bn, K_TILE), Float8E4M3FN,
            self.stages)
        if cutlass.const_expr(self.cfg.tokens_m):
            # the same bytes in the other roles: 64-token halves of each stage's token tile as
            # WGMMA A (one per consumer warpgroup), the CTA's 128 weight rows as B
            tiled_mma = sm90_utils.make_trivial_tiled_mma(
                Float8E4M3FN, Float8E4M3FN, warpgroup.OperandMajorMode.K,
                warpgroup.OperandMajorMode.K, Float32, (1, 1, 1),
                tiler_mn=(BLOCK_ROWS, self.blocks * BLOCK_ROWS))
            mma_layouts = (
                sm90_utils.make_smem_layout_a(
                    utils.LayoutEnum.ROW_MAJOR, (BLOCK_ROWS, self.bn, K_TILE), Float8E4M3FN,
                    self.stages * CONSUMER_WGS),
                sm90_utils.make_smem_layout_b(
                    utils.LayoutEnum.ROW_MAJOR,
                    (BLOCK_ROWS, self.blocks * BLOCK_ROWS, K_TILE), Float8E4M3FN,
                    self.stages))
        else:
            mma_layouts = (a_layout, b_layout)
        m_rows = num_token_tiles * self.bn
        tensors = (
            cute.make_tensor(a_ptr, cute.make_layout(1)),
            cute.make_tensor(a_scale_ptr, cute.make_layout(1)),
            cute.make_tensor(row_index_ptr, cute.make_layout(m_rows)),
            cute.make_tensor(tile_expert_ptr, cute.make_layout(num_token_tiles)),
            cute.make_tensor(tensor_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(local_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(table_ptr, cute.make_layout((2, num_b), stride=(num_b, 1))),
            cute.make_tensor(topk_w_ptr, cute.make_layout(1)),
            cute.make_tensor(out_ptr, cute.make_layout(1)),
        )
        self.shared_storage = self._shared_storage(a_layout, b_layout)
        tma = self._tma_atoms(a_ptr, m_rows, w_ptrs, w_counts, a_layout, b_layout)
        # minctasm lets ptxas size the entry register count (the pool), which setmaxnreg needs.
        self.kernel(*tensors, tiled_mma, a_layout, b_layout, mma_layouts, num_token_tiles,
                    blk_begin, blk_end, tma).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1],
                                         stream=stream, min_blocks_per_mp=self.cfg.ctas_per_sm,
                                         cluster=[self.cfg.cluster_size, 1, 1])

    def _tma_atoms(self, a_ptr, m_rows, w_ptrs, w_counts, a_layout, b_layout):
        """``tma``: the tensor-map copy atoms and coordinate tensors of the token rows
        (``[m_rows, K]``, one ``bn x 128`` box per stage) and of each weight tensor
        (``[n_t * rows, K]``, ``box_rows x 128`` boxes); an empty tuple otherwise."""
        if cutlass.const_expr(not self.cfg.tma):
            return ()
        op = cpasync.CopyBulkTensorTileG2SOp()
        mcast = cpasync.CopyBulkTensorTileG2SMulticastOp()
        gx = cute.make_tensor(cute.recast_ptr(a_ptr, dtype=Float8E4M3FN),
                              cute.make_layout((m_rows, self.k), stride=(self.k, 1)))
        if cutlass.const_expr(self.cfg.mcast_tokens):
            # 64-token halves (one per consumer warpgroup), each to both CTAs of a token tile
            half = cute.make_composed_layout(
                b_layout.inner, 0, cute.make_layout((BLOCK_ROWS, K_TILE), stride=(K_TILE, 1)))
            x_atom, x_tma = cpasync.make_tiled_tma_atom(mcast, gx, half, (BLOCK_ROWS, K_TILE),
                                                        num_multicast=1)
        else:
            x_atom, x_tma = cpasync.make_tiled_tma_atom(
                op, gx, cute.slice_(b_layout, (None, None, 0)), (self.bn, K_TILE))
        box = cute.make_composed_layout(a_layout.inner, 0, self._box_layout())
        w_op = mcast if self.cfg.cluster2 else op
        w = []
        for t in range(self.num_tensors):
            gw = cute.make_tensor(w_ptrs[t], cute.make_layout(
                (w_counts[t] * self.n_weight, self.k), stride=(self.k, 1)))
            if cutlass.const_expr(self.one_box):
                # (r, u, g, k): expert row 8 g + r + u I, g over the tensor's 8-row groups (an
                # up group's gate rows stay inside the tensor); flat modes - CuTeDSL 4.3.5
                # refuses the nested ((8, 2, g), k) view ("failed to compute the TMA G-basis")
                gw = cute.make_tensor(w_ptrs[t], cute.make_layout(
                    (8, 2, w_counts[t] * self.n_weight // 8, self.k),
                    stride=(self.k, self.half * self.k, 8 * self.k, 1)))
            if cutlass.const_expr(self.cfg.cluster2):  # whole boxes, to both CTAs by the mask
                w.append(cpasync.make_tiled_tma_atom(w_op, gw, box, self._box_tile(),
                                                     num_multicast=1))
            else:
                w.append(cpasync.make_tiled_tma_atom(w_op, gw, box, self._box_tile()))
        return (x_atom, x_tma, tuple(w))

    def _box_tile(self):
        """One weight box: ``box_rows x 128``, or fc1_one_box's (8, 2, 4, 128)."""
        return (8, 2, 4, K_TILE) if self.one_box else (self.box_rows, K_TILE)

    def _box_layout(self):
        """A weight box in shared memory (before the swizzle): K-major 128 B rows; the one-box
        block's row ``r + 8 u + 16 g`` is accumulator row g / g + 8's interleave."""
        if self.one_box:
            return cute.make_layout((8, 2, 4, K_TILE),
                                    stride=(K_TILE, 8 * K_TILE, 16 * K_TILE, 1))
        return cute.make_layout((self.box_rows, K_TILE), stride=(K_TILE, 1))

    def _shared_storage(self, a_layout, b_layout):
        stages = self.stages

        @cute.struct
        class SharedStorage:
            full: cute.struct.MemRange[cutlass.Int64, stages]
            empty: cute.struct.MemRange[cutlass.Int64, stages]
            sA: cute.struct.Align[
                cute.struct.MemRange[Float8E4M3FN, cute.cosize(a_layout)], 1024]
            sB: cute.struct.Align[
                cute.struct.MemRange[Float8E4M3FN, cute.cosize(b_layout)], 1024]
            sX: cute.struct.Align[cute.struct.MemRange[Float32, stages * self.bn], 16]

        return SharedStorage

    @cute.kernel
    def kernel(self, a: cute.Tensor, a_scale: cute.Tensor, row_index: cute.Tensor,
               tile_expert: cute.Tensor, tensor_of: cute.Tensor, local_of: cute.Tensor,
               b_table: cute.Tensor, topk_w: cute.Tensor, out: cute.Tensor,
               tiled_mma: cute.TiledMma, a_layout: cute.ComposedLayout,
               b_layout: cute.ComposedLayout, mma_layouts: tuple, num_token_tiles: Int32,
               blk_begin: Int32, blk_end: Int32, tma: tuple):
        tidx, _, _ = cute.arch.thread_idx()
        bid, _, _ = cute.arch.block_idx()
        grid, _, _ = cute.arch.grid_dim()
        wg = cute.arch.make_warp_uniform(tidx // 128)
        smem = utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full = storage.full.data_ptr()
        empty = storage.empty.data_ptr()
        if tidx == 0:
            for s in cutlass.range_constexpr(self.stages):
                cute.arch.mbarrier_init(full + s, 1 if self.cfg.tma else PRODUCER_THREADS)
                # clusters: the consumers of every CTA whose copies multicast into this one
                # (the weights' partner, the tokens' partner) release its slots too
                cute.arch.mbarrier_init(empty + s, 128 * CONSUMER_WGS * (
                    self.cfg.cluster_m + self.cfg.cluster_n - 1))
        cute.arch.mbarrier_init_fence()
        if cutlass.const_expr(self.cfg.cluster_size > 1):
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()
        else:
            cute.arch.sync_threads()
        n_groups = (blk_end - blk_begin + self.blocks - 1) // self.blocks
        my_tiles = (num_token_tiles * n_groups - bid + grid - 1) // grid
        if cutlass.const_expr(self.cfg.cluster_size > 1):  # work units of the cluster
            cm, cn = self.cfg.cluster_m, self.cfg.cluster_n
            units = (num_token_tiles + cm - 1) // cm * ((n_groups + cn - 1) // cn)
            cs = self.cfg.cluster_size
            my_tiles = (units - bid // cs + grid // cs - 1) // (grid // cs)
        addrs = (storage.sA.data_ptr().toint(), storage.sB.data_ptr().toint(),
                 storage.sX.data_ptr().toint())
        # the MMA's A and B: weights and tokens, or (tokens_m) tokens and weights
        mma_a, mma_b = mma_layouts
        src_a, src_b = (storage.sB, storage.sA) if self.cfg.tokens_m else (storage.sA, storage.sB)
        sA = src_a.get_tensor(mma_a.outer, swizzle=mma_a.inner)
        sB = src_b.get_tensor(mma_b.outer, swizzle=mma_b.inner)
        if wg == 0:
            cute.arch.warpgroup_reg_dealloc(self.cfg.producer_regs)
            if cutlass.const_expr(self.cfg.tma):
                # warp 0 whole: the copy atoms issue through elect.sync over the full warp,
                # which waits for every lane that has not exited (with clusters the other
                # lanes would be held at the exit barrier: a deadlock)
                if tidx // 32 == 0:
                    self._produce_tma(bid, grid, my_tiles, n_groups, blk_begin, blk_end,
                                      a_scale, tile_expert, tensor_of, local_of, full, empty,
                                      addrs, num_token_tiles, a_layout, b_layout, storage, tma)
            else:
                self._produce(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a,
                              a_scale, row_index, tile_expert, tensor_of, local_of, b_table,
                              full, empty, addrs)
        else:
            cute.arch.warpgroup_reg_alloc(self.cfg.consumer_regs)
            if cutlass.const_expr(self.cfg.tokens_m):
                self._consumer_tm(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end,
                                  row_index, tile_expert, tensor_of, local_of, b_table, topk_w,
                                  out, tiled_mma, sA, sB, full, empty, addrs, num_token_tiles)
            else:
                self._consumer(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end,
                               row_index, tile_expert, tensor_of, local_of, b_table, topk_w,
                               out, tiled_mma, sA, sB, full, empty, addrs)
        if cutlass.const_expr(self.cfg.cluster_size > 1):
            # no CTA leaves while a partner may still write its shared memory or arrive on its
            # barriers
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ---------------------------------------------------------------- shared arithmetic
    @cute.jit
    def _unit(self, bid, grid, j, n_groups, blk_begin, num_token_tiles, tile_expert):
        """Work item ``j`` of this CTA: (token tile, first block, the expert whose weights it
        loads, run, write, share). Without clusters: tile ``bid + j grid``; run = write = its
        expert >= 0, share False. Clusters (``cluster_m`` x ``cluster_n`` CTAs, rank ``rm +
        cluster_m rn``): unit ``bid // size + j grid / size`` is token tiles ``cm p + (0, 1)``
        and block pairs ``cn q + (0, 1)``, CTA (rm, rn) takes tile ``cm p + rm`` and pair ``cn q
        + rn``. Every CTA of the cluster runs unless all its tiles are empty (-1 or past the
        plan), so their stage counters stay in step: a CTA whose tile is empty runs its
        partner's tile, one whose pair is past the blocks its partner's pair, as a dummy (write
        False); share when both token tiles are one expert's (the weights are multicast; the
        token halves always are, both pairs being one expert's rows)."""
        run = Int32(0)
        write = Int32(0)
        share = Int32(0)
        if cutlass.const_expr(self.cfg.cluster_size == 1):
            tile = bid + j * grid
            tt = tile // n_groups
            blk0 = blk_begin + (tile % n_groups) * self.blocks
            expert = tile_expert[tt]
            if expert >= 0:
                run = Int32(1)
                write = Int32(1)
        else:
            cm, cn, cs = self.cfg.cluster_m, self.cfg.cluster_n, self.cfg.cluster_size
            _, rm, rn = self.cluster_place(bid)
            unit = bid // cs + j * (grid // cs)
            n_pairs = (n_groups + cn - 1) // cn
            pair = cn * (unit % n_pairs) + rn
            pair_ok = Int32(1)
            if pair >= n_groups:
                pair = pair - rn
                pair_ok = Int32(0)
            blk0 = blk_begin + pair * self.blocks
            mine = cm * (unit // n_pairs) + rm
            e_mine = Int32(-1)
            if mine < num_token_tiles:
                e_mine = tile_expert[mine]
            tt = mine
            expert = e_mine
            if cutlass.const_expr(cm == 2):
                other = mine + 1 - 2 * rm
                e_other = Int32(-1)
                if other < num_token_tiles:
                    e_other = tile_expert[other]
                if e_mine < 0:
                    tt = other
                    expert = e_other
                elif e_mine == e_other:
                    share = Int32(1)
            if e_mine >= 0:
                write = pair_ok
            if expert >= 0:
                run = Int32(1)
        return tt, blk0, expert, run, write, share

    def cluster_place(self, bid):
        """(rank in the cluster, token tile rm, block pair rn) of CTA ``bid``: consecutive CTAs
        form a cluster, rank ``rm + cluster_m rn``."""
        rank = bid % self.cfg.cluster_size
        return rank, rank % self.cfg.cluster_m, rank // self.cfg.cluster_m

    def _expert_bases(self, expert, tensor_of, local_of, b_table):
        """(weight base, scale base) of ``expert`` (>= 0), 64-bit addresses."""
        t = tensor_of[expert]
        local = Int64(local_of[expert])
        w_base = b_table[0, t] + local * (self.n_weight * self.k)
        sf_base = b_table[1, t] + local * (self.n_weight // FP8_BLOCK * self.k_tiles * 4)
        return w_base, sf_base

    def weight_row(self, gblk, r):
        """Expert row of row ``r`` (0..63) of 64-row block ``gblk``: FC1 interleaves up rows
        ``32 gblk + 8 (r // 16) + r % 8`` (r % 16 < 8) with their gate rows ``I + ...``."""
        if self.epilogue == "swiglu":
            return (r // 8) % 2 * self.half + gblk * 32 + (r // 16) * 8 + r % 8
        return gblk * BLOCK_ROWS + r

    def scale_rows(self, gblk):
        """(scale row of accumulator rows g, of rows g + 8) of block ``gblk``: FC1 up / gate
        row blocks, FC2 the block's one row block."""
        if self.epilogue == "swiglu":
            return gblk // 4, self.half // FP8_BLOCK + gblk // 4
        return gblk // 2, gblk // 2

    @staticmethod
    def swizzled(row, chunk):
        """Byte offset of 16 B chunk ``chunk`` of K-major row ``row`` in a 128 B-swizzled tile
        (``Swizzle<3, 4, 3>``: the chunk index XOR the row index mod 8)."""
        return row * 128 + ((chunk ^ (row % 8)) * 16)

    # ---------------------------------------------------------------- producer
    @cute.jit
    def _produce(self, tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a, a_scale,
                 row_index, tile_expert, tensor_of, local_of, b_table, full, empty, addrs):
        """Producer thread: per stage, wait for the slot, cp.async its 16 B chunks of the
        weights and token rows and (threads < bn) one token scale (one group), then wait until
        at most ``lag`` of its groups are pending and publish the stage ``lag`` back
        (``_publish``). The stage counter runs across work tiles, so the pipeline never drains
        at a tile boundary; the last ``lag`` stages are published after the loop."""
        sa_addr, sb_addr, sx_addr = addrs
        a_base = a.iterator.toint()
        xs_base = a_scale.iterator.toint()
        chunk = tidx % ROW_CHUNKS  # every chunk of this thread has this K offset
        row0 = tidx // ROW_CHUNKS  # + 16 i: its rows (of the CTA's weights and of the tokens)
        rows_per_pass = PRODUCER_THREADS // ROW_CHUNKS
        done = Int32(0)  # K tiles this CTA has loaded so far (its stage counter)
        for j in cutlass.range(my_tiles, unroll=1):
            tile = bid + j * grid
            tt = tile // n_groups
            blk0 = blk_begin + (tile % n_groups) * self.blocks
            expert = tile_expert[tt]
            if expert >= 0:
                w_base, _ = self._expert_bases(expert, tensor_of, local_of, b_table)
                # int32 offset inside the expert of this thread's first chunk of each CTA block
                # (K tile 0); its other chunks of the block sit ``row_step`` rows further each.
                # Blocks past blk_end copy the last block again (their results are dropped).
                w_off = []
                for cb in cutlass.range_constexpr(self.blocks):
                    gblk = cutlass.min(blk0 + cb, blk_end - 1)
                    if cutlass.const_expr(self.cfg.bulk_weights):  # the block's first image
                        w_off.append(gblk * (self.k_tiles * A_TILE))
                    else:
                        w_off.append(self.weight_row(gblk, row0) * self.k + chunk * 16)
                b_row = []
                for i in cutlass.range_constexpr(self.b_chunks):
                    b_row.append(self._token_row(tt, row0 + i * rows_per_pass, row_index))
                x_row = self._token_row(tt, cutlass.min(tidx, self.bn - 1), row_index)
                for kt in cutlass.range(self.k_tiles, unroll=1):
                    it = done + kt
                    s = it % self.stages
                    cute.arch.mbarrier_wait(empty + s, ((it // self.stages) % 2) ^ 1)
                    if cutlass.const_expr(self.cfg.bulk_weights):
                        self._bulk_weights(tidx, s, kt, w_base, w_off, full, sa_addr)
                    else:
                        for i in cutlass.range_constexpr(self.a_chunks):
                            cb, j = divmod(i, self.a_chunks // self.blocks)
                            r = row0 + j * rows_per_pass  # row in block cb
                            dst = (sa_addr + (s * self.blocks + cb) * A_TILE
                                   + self.swizzled(r, chunk))
                            cp_async_16(dst, w_base + Int64(w_off[cb] + j * self.row_step
                                                            * self.k + kt * K_TILE))
                    for i in cutlass.range_constexpr(self.b_chunks):
                        n = row0 + i * rows_per_pass
                        cp_async_16(sb_addr + s * self.stage_b + self.swizzled(n, chunk),
                                    a_base + Int64(b_row[i]) * self.k + (kt * K_TILE + chunk * 16))
                    if tidx < self.bn:
                        cp_async_4(sx_addr + s * self.stage_x + tidx * 4,
                                   xs_base + (Int64(x_row) * self.k_tiles + kt) * 4)
                    cute.arch.cp_async_commit_group()
                    if it >= self.lag:
                        cute.arch.cp_async_wait_group(self.lag)
                        self._publish((it - self.lag) % self.stages, full)
                done = done + self.k_tiles
        # the CTA's last ``lag`` stages (fewer if it loaded fewer): wait for all, publish
        cute.arch.cp_async_wait_group(0)
        for d in cutlass.range_constexpr(self.lag):
            if done - self.lag + d >= 0:
                self._publish((done - self.lag + d) % self.stages, full)

    @cute.jit
    def _produce_tma(self, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a_scale,
                     tile_expert, tensor_of, local_of, full, empty, addrs, num_token_tiles,
                     a_layout, b_layout, storage, tma):
        """``tma``: warp 0, one elected lane issuing. Per stage: wait for the slot, expect the
        stage's bytes on ``full[s]``, copy each CTA block's weight K tile (``boxes``
        tensor-map boxes of the expert's tensor, rows by ``weight_row``), the token tile's K
        tile (one box of the pre-permuted rows) and its ``bn`` scales (one ``cp.async.bulk``
        of the transposed scales); the copy engine completes ``full[s]``."""
        _, _, sx_addr = addrs
        x_atom, x_tma, w_tmas = tma
        xs_base = a_scale.iterator.toint()
        m_rows = num_token_tiles * self.bn
        slots = self.stages * self.blocks * self.boxes
        box_modes = cute.rank(self._box_layout())
        sA_box = storage.sA.get_tensor(
            cute.append(self._box_layout(), cute.make_layout(slots, stride=A_TILE // self.boxes)),
            swizzle=a_layout.inner)
        sB = storage.sB.get_tensor(b_layout.outer, swizzle=b_layout.inner)
        x_rows = self.bn
        if cutlass.const_expr(self.cfg.mcast_tokens):  # the token tile as two 64-row halves
            x_rows = BLOCK_ROWS
            sB = storage.sB.get_tensor(
                cute.make_layout((BLOCK_ROWS, K_TILE, self.stages * CONSUMER_WGS),
                                 stride=(K_TILE, 1, BLOCK_ROWS * K_TILE)),
                swizzle=b_layout.inner)
        one = cute.make_layout(1)
        tBsB, tBgB = cpasync.tma_partition(
            x_atom, 0, one, cute.group_modes(sB, 0, 2),
            cute.group_modes(cute.local_tile(x_tma, (x_rows, K_TILE), (None, None)), 0, 2))
        w_parts = []
        for t in cutlass.range_constexpr(self.num_tensors):
            w_atom, w_tma = w_tmas[t]
            tiles = cute.local_tile(w_tma, self._box_tile(), (None,) * box_modes)
            w_parts.append(cpasync.tma_partition(
                w_atom, 0, one, cute.group_modes(sA_box, 0, box_modes),
                cute.group_modes(tiles, 0, box_modes)))
        stage_bytes = self.stage_a + self.stage_b + self.stage_x
        # clusters: this CTA's place (token tile rm, block pair rn) and the multicast masks
        cm = self.cfg.cluster_m
        rank, rm, rn = self.cluster_place(bid)
        self_mask = cutlass.Int16(1) << cutlass.Int16(rank)
        w_mask = cutlass.Int16(3) << cutlass.Int16(cm * rn)  # (0, rn) and (1, rn)
        x_mask = (cutlass.Int16(1) << cutlass.Int16(rm)) | (
            cutlass.Int16(1) << cutlass.Int16(rm + cm))  # (rm, 0) and (rm, 1)
        done = Int32(0)
        for j in cutlass.range(my_tiles, unroll=1):
            tt, blk0, expert, run, _, share = self._unit(bid, grid, j, n_groups, blk_begin,
                                                         num_token_tiles, tile_expert)
            if run == 1:
                tensor = tensor_of[expert]
                # the box row of each (CTA block, box) in the expert's tensor; blocks past
                # blk_end copy the last block again (their results are dropped)
                first = local_of[expert] * (self.n_weight // self.box_rows)
                box_row = []
                for cb in cutlass.range_constexpr(self.blocks):
                    gblk = cutlass.min(blk0 + cb, blk_end - 1)
                    for b in cutlass.range_constexpr(self.boxes):
                        if cutlass.const_expr(self.one_box):  # 4 groups from up row 32 gblk
                            box_row.append(local_of[expert] * (self.n_weight // 32) + gblk)
                        else:
                            box_row.append(first + self.weight_row(gblk, b * self.box_rows)
                                           // self.box_rows)
                for kt in cutlass.range(self.k_tiles, unroll=1):
                    it = done + kt
                    s = it % self.stages
                    cute.arch.mbarrier_wait(empty + s, ((it // self.stages) % 2) ^ 1)
                    bar = full + s
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive_and_expect_tx(bar, stage_bytes)
                    for t in cutlass.range_constexpr(self.num_tensors):
                        if tensor == t:
                            w_atom, _ = w_tmas[t]
                            tAsA, tAgA = w_parts[t]
                            for i in cutlass.range_constexpr(self.blocks * self.boxes):
                                if cutlass.const_expr(self.one_box):
                                    src = tAgA[(None, 0, 0, box_row[i], kt)]
                                else:
                                    src = tAgA[(None, box_row[i], kt)]
                                dst = tAsA[(None, s * self.blocks * self.boxes + i)]
                                if cutlass.const_expr(self.cfg.cluster2):
                                    # shared: blocks cb = rm mod 2 from here to both CTAs
                                    # (the wide tile: 0 and 2 from rank 0); else every box to
                                    # this CTA alone
                                    if share == 1:
                                        if (i // self.boxes) % 2 == rm:
                                            cute.copy(w_atom, src, dst, tma_bar_ptr=bar,
                                                      mcast_mask=w_mask)
                                    else:
                                        cute.copy(w_atom, src, dst, tma_bar_ptr=bar,
                                                  mcast_mask=self_mask)
                                else:
                                    cute.copy(w_atom, src, dst, tma_bar_ptr=bar)
                    if cutlass.const_expr(self.cfg.mcast_tokens):  # half rn, to both pairs
                        cute.copy(x_atom, tBgB[(None, CONSUMER_WGS * tt + rn, kt)],
                                  tBsB[(None, CONSUMER_WGS * s + rn)], tma_bar_ptr=bar,
                                  mcast_mask=x_mask)
                    else:
                        cute.copy(x_atom, tBgB[(None, tt, kt)], tBsB[(None, s)], tma_bar_ptr=bar)
                    with cute.arch.elect_one():
                        cp_async_bulk(sx_addr + s * self.stage_x,
                                      xs_base + (Int64(kt) * m_rows + tt * self.bn) * 4,
                                      self.stage_x, bar.toint())
                done = done + self.k_tiles

    @cute.jit
    def _bulk_weights(self, tidx, s, kt, w_base, w_off, full, sa_addr):
        """``bulk_weights``: producer thread 0 expects the stage's weight bytes on ``full[s]``
        (its previous phase completed: the consumers released the slot only after it) and
        moves each CTA block's K tile, one contiguous 8 KiB image in the preshuffled layout
        (``fp8_preshuffle``), with one ``cp.async.bulk``."""
        if tidx == 0:
            cute.arch.mbarrier_expect_tx(full + s, self.stage_a)
            for cb in cutlass.range_constexpr(self.blocks):
                cp_async_bulk(sa_addr + (s * self.blocks + cb) * A_TILE,
                              w_base + Int64(w_off[cb] + kt * A_TILE), A_TILE,
                              (full + s).toint())

    def _token_row(self, tt, n, row_index):
        """Row of ``a`` that column ``n`` of token tile ``tt`` reads: FC1 the gathered token
        (padding rows, -1, read token 0), FC2 the permuted row itself."""
        m = tt * self.bn + n
        if cutlass.const_expr(self.epilogue == "swiglu"):
            m = cutlass.max(row_index[m], Int32(0))
        return m

    @cute.jit
    def _publish(self, s, full):
        """Stage ``s``'s copies of this thread have landed: fence them to the async proxy
        (WGMMA reads shared memory through it) and arrive on ``full[s]``."""
        cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared,
                              space=cute.arch.SharedSpace.shared_cta)
        cute.arch.mbarrier_arrive(full + s)

    # ---------------------------------------------------------------- consumers
    @cute.jit
    def _mma_k_tile(self, tiled_mma, partial, tCrA, tCrB, s, q):
        """Stage ``s``'s K tile: 4 k32 QGMMAs into a fresh ``partial`` (A: this warpgroup's
        64-row slice of stage s, B: the stage), then wait for them: the promotion point."""
        warpgroup.fence()
        for step in cutlass.range_constexpr(self.k_steps):
            tiled_mma.set(warpgroup.Field.ACCUMULATE, step != 0)
            cute.gemm(tiled_mma, partial, tCrA[(None, None, step, s * CONSUMER_WGS + q)],
                      tCrB[(None, None, step, s)], partial)
        warpgroup.commit_group()
        warpgroup.wait_group(0)

    def _consumer_fragments(self, tidx, tiled_mma, sA, sB, n):
        """A consumer thread's place and MMA state: (warpgroup q, warp, lane // 4, lane % 4,
        A and B fragments, partial and total fp32 accumulators of a 64 x ``n`` tile)."""
        tq = tidx % 128
        lane = tidx % 32
        thr_mma = tiled_mma.get_slice(tq)
        c_shape = thr_mma.partition_shape_C((BLOCK_ROWS, n))
        return (tidx // 128 - 1, tq // 32, lane // 4, lane % 4,
                tiled_mma.make_fragment_A(thr_mma.partition_A(sA)),
                tiled_mma.make_fragment_B(thr_mma.partition_B(sB)),
                cute.make_rmem_tensor(c_shape, Float32), cute.make_rmem_tensor(c_shape, Float32))

    @cute.jit
    def _consumer(self, tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, row_index,
                  tile_expert, tensor_of, local_of, b_table, topk_w, out, tiled_mma, sA, sB,
                  full, empty, addrs):
        _, _, sx_addr = addrs
        # consumer warpgroup q = its block of the CTA's two
        q, warp, g, c, tCrA, tCrB, partial, total = self._consumer_fragments(
            tidx, tiled_mma, sA, sB, self.bn)
        done = Int32(0)
        for j in cutlass.range(my_tiles, unroll=1):
            tile = bid + j * grid
            tt = tile // n_groups
            gblk = blk_begin + (tile % n_groups) * self.blocks + q
            expert = tile_expert[tt]
            if expert >= 0:
                _, sf_base = self._expert_bases(expert, tensor_of, local_of, b_table)
                sfs = self._scale_addrs(sf_base, (cutlass.min(gblk, blk_end - 1),))
                total.fill(0.0)
                ws = self._weight_scales(sfs, Int32(0))
                for kt in cutlass.range(self.k_tiles, unroll=1):
                    ws = self._k_tile(done + kt, kt, q, c, sfs, ws, sx_addr, partial, total,
                                      tiled_mma, tCrA, tCrB, full, empty)
                if gblk < blk_end:  # the last group's missing block was a clamped copy
                    self._epilogue(total, tt, gblk, blk_begin, warp, g, c, row_index, topk_w,
                                   out)
                done = done + self.k_tiles

    @cute.jit
    def _k_tile(self, it, kt, q, c, sfs, ws, sx_addr, partial, total, tiled_mma, tCrA, tCrB,
                full, empty):
        """K tile ``kt`` of the work tile (stage counter ``it``): 4 QGMMAs into ``partial``,
        then ``total = fma(partial, x_scale[column] * w_scale[row half], total)``; returns the
        weight scales the next K tile promotes with (``_next_scales``)."""
        s = it % self.stages
        ws_now, ws_next = self._next_scales(sfs, ws, kt)
        ws0, ws1 = ws_now[0], ws_now[-1]  # accumulator rows g, g + 8 (FC2: one row block)
        cute.arch.mbarrier_wait(full + s, (it // self.stages) % 2)
        # this thread's token columns 8 qn + 2 c + (0, 1): their scales, before the slot frees
        xs = [ld_shared_v2_f32(sx_addr + s * self.stage_x + (8 * qn + 2 * c) * 4)
              for qn in range(self.bn // 8)]
        self._mma_k_tile(tiled_mma, partial, tCrA, tCrB, s, q)
        self._release(empty + s, ())
        # accumulator element v0 + 2 v1 + 4 qn: row 16 warp + 8 v1 + g, column 8 qn + 2 c + v0;
        # the two scales multiply first (DeepGEMM's order), the promotion is one FMA
        for qn in cutlass.range_constexpr(self.bn // 8):
            for v0 in cutlass.range_constexpr(2):
                sc0 = xs[qn][v0] * ws0
                sc1 = sc0
                if cutlass.const_expr(self.epilogue == "swiglu"):
                    sc1 = xs[qn][v0] * ws1
                for v1 in cutlass.range_constexpr(2):
                    i = v0 + 2 * v1 + 4 * qn
                    total[i] = partial[i] * (sc0 if v1 == 0 else sc1) + total[i]
        return ws_next

    def _scale_addrs(self, sf_base, gblks):
        """Addresses of K tile 0's weight scales for the 64-row blocks ``gblks``: each block's
        row block (FC1: its up rows'; its gate rows' sit ``gate_scales`` bytes further, a
        constant the loads fold in: one 64-bit address per block; ``scale_rows``)."""
        return tuple(sf_base + Int64(self.scale_rows(gblk)[0] * self.k_tiles) * 4
                     for gblk in gblks)

    @property
    def gate_scales(self) -> int:
        """FC1: bytes from an up row block's scales to its gate row block's (``I / 128`` rows
        of ``k_tiles`` fp32 further)."""
        return self.half // FP8_BLOCK * self.k_tiles * 4

    @cute.jit
    def _weight_scales(self, sfs, kt):
        """The weight block scales of K tile ``kt`` for the addresses ``sfs``: per block its
        one (FC2) or its up and gate scales (FC1)."""
        ws = []
        for a in sfs:
            ws.append(ld_global_f32(a + kt * 4))
            if cutlass.const_expr(self.epilogue == "swiglu"):
                ws.append(ld_global_f32(a + (self.gate_scales + kt * 4)))
        return tuple(ws)

    @cute.jit
    def _next_scales(self, sfs, ws, kt):
        """(the scales K tile ``kt`` promotes with, those the next one will). scale_lookahead:
        ``ws`` were loaded one K tile ago and the next tile's load is issued now (the last tile
        reloads its own), so the load's L2 latency hides behind a whole K tile instead of the
        stage's wait; else both are this tile's, loaded now."""
        if cutlass.const_expr(self.cfg.scale_lookahead):
            return ws, self._weight_scales(sfs, cutlass.min(kt + 1, self.k_tiles - 1))
        now = self._weight_scales(sfs, kt)
        return now, now

    @cute.jit
    def _release(self, bar, peers):
        """This consumer thread is done with the slot of ``bar`` (its QGMMAs waited for, its
        scales read): arrive on this CTA's ``empty`` barrier and on each of ``peers`` (cluster
        ranks whose copies multicast into the slot). ``release_per_warp``: after a warp
        barrier (which orders every lane's reads before lane 0's release) one lane per target
        arrives for the warp's 32 threads - 1 + len(peers) arrivals per warp instead of 32
        each (DeepGEMM's release; with clusters the per-thread arrivals are remote
        transactions, 256 per slot and partner); the barrier counts stay per thread."""
        if cutlass.const_expr(self.cfg.release_per_warp):
            cute.arch.sync_warp()
            lane = cute.arch.lane_idx()
            if lane == 0:
                cute.arch.mbarrier_arrive(bar, arrive_count=32)
            for i in cutlass.range_constexpr(len(peers)):
                if lane == i + 1:
                    cute.arch.mbarrier_arrive(bar, peer_cta_rank_in_cluster=peers[i],
                                              arrive_count=32)
        else:
            cute.arch.mbarrier_arrive(bar)
            for i in cutlass.range_constexpr(len(peers)):
                cute.arch.mbarrier_arrive(bar, peer_cta_rank_in_cluster=peers[i])

    # ---------------------------------------------------------------- consumers, tokens_m
    @cute.jit
    def _consumer_tm(self, tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, row_index,
                     tile_expert, tensor_of, local_of, b_table, topk_w, out, tiled_mma, sA, sB,
                     full, empty, addrs, num_token_tiles):
        """``tokens_m``: warpgroup q multiplies tokens ``[64 q, 64 q + 64)`` of the tile by the
        CTA's weight blocks. Accumulator element ``v0 + 2 v1 + 4 qn`` is (token
        ``64 q + 16 warp + 8 v1 + g``, weight column ``n = 8 qn + 2 c + v0``: block
        ``blk0 + n // 64``, its row ``n % 64``). Two blocks are 128 rows of one scale block
        (FC1: 64 up rows and their 64 gate rows; ``blk_begin`` is even), so one (FC2) or two
        (FC1) scales per K tile; the wide tile's three blocks load theirs apiece
        (``_scale_of``)."""
        _, _, sx_addr = addrs
        q, warp, g, c, tCrA, tCrB, partial, total = self._consumer_fragments(
            tidx, tiled_mma, sA, sB, self.blocks * BLOCK_ROWS)
        row0 = 64 * q + 16 * warp + g  # this thread's first token row in the tile (+8: second)
        # clusters: the CTAs whose copies multicast into this one (weights, tokens)
        rank, _, _ = self.cluster_place(bid)
        peers = (rank ^ 1, rank ^ self.cfg.cluster_m)
        done = Int32(0)
        for j in cutlass.range(my_tiles, unroll=1):
            tt, blk0, expert, run, write, _ = self._unit(bid, grid, j, n_groups, blk_begin,
                                                         num_token_tiles, tile_expert)
            if run == 1:
                _, sf_base = self._expert_bases(expert, tensor_of, local_of, b_table)
                gblks = (blk0,)  # pair_scales: the pair's one scale block
                if cutlass.const_expr(not self.cfg.pair_scales):
                    gblks = tuple(cutlass.min(blk0 + b, blk_end - 1)
                                  for b in range(self.blocks))
                sfs = self._scale_addrs(sf_base, gblks)
                total.fill(0.0)
                ws = self._weight_scales(sfs, Int32(0))
                for kt in cutlass.range(self.k_tiles, unroll=1):
                    ws = self._k_tile_tm(done + kt, kt, q, row0, sfs, ws, sx_addr, partial,
                                         total, tiled_mma, tCrA, tCrB, full, empty, peers)
                if write == 1:
                    self._epilogue_tm(total, tt, blk0, blk_begin, blk_end, row0, c, row_index,
                                      topk_w, out)
                done = done + self.k_tiles

    @cute.jit
    def _k_tile_tm(self, it, kt, q, row0, sfs, ws, sx_addr, partial, total, tiled_mma, tCrA,
                   tCrB, full, empty, peers):
        """K tile ``kt``: 4 QGMMAs (A: this warpgroup's 64 tokens, B: the CTA's weight rows)
        into ``partial``, then ``total += partial * (x_scale[token] * w_scale[column group])``;
        returns the next K tile's weight scales (``_next_scales``)."""
        s = it % self.stages
        ws_now, ws_next = self._next_scales(sfs, ws, kt)
        cute.arch.mbarrier_wait(full + s, (it // self.stages) % 2)
        xs0 = ld_shared_f32(sx_addr + s * self.stage_x + row0 * 4)
        xs1 = ld_shared_f32(sx_addr + s * self.stage_x + (row0 + 8) * 4)
        self._mma_k_tile(tiled_mma, partial, tCrA, tCrB, s, q)
        # the partners multicast into this slot too, so they wait for its release
        targets = []
        if cutlass.const_expr(self.cfg.cluster2):
            targets.append(peers[0])
        if cutlass.const_expr(self.cfg.mcast_tokens):
            targets.append(peers[1])
        self._release(empty + s, tuple(targets))
        sc = [[x * w for w in ws_now] for x in (xs0, xs1)]
        for qn in cutlass.range_constexpr(self.blocks * BLOCK_ROWS // 8):
            for v1 in cutlass.range_constexpr(2):
                for v0 in cutlass.range_constexpr(2):
                    i = v0 + 2 * v1 + 4 * qn
                    total[i] = partial[i] * sc[v1][self._scale_of(qn)] + total[i]
        return ws_next

    def _scale_of(self, qn):
        """Index in ``_scale_addrs``' scales of tokens_m's column group ``qn`` (8 weight rows):
        FC1's groups alternate up / gate rows (``weight_row``); the wide tile's block ``qn //
        8`` has its own."""
        per_block = 2 if self.epilogue == "swiglu" else 1
        block = 0 if self.cfg.pair_scales else qn // 8
        return per_block * block + (qn % 2 if self.epilogue == "swiglu" else 0)

    @cute.jit
    def _epilogue_tm(self, acc, tt, blk0, blk_begin, blk_end, row0, c, row_index, topk_w,
                     out):
        """FC1: h = silu(gate) * up -> bf16 pairs at ``h[m, 32 gblk + 8 p + 2 c]`` (up column
        group qn = 2 p + 8 cb, gate qn + 1). FC2: y = acc * router weight -> fp32 pairs at
        ``y[slot, 64 (gblk - blk_begin) + 8 (qn % 8) + 2 c]`` for real rows (slot >= 0;
        ``y_bf16``: bf16 pairs).
        Blocks ``blk0 + cb`` past ``blk_end`` were clamped copies: not written."""
        out_base = out.iterator.toint()
        for v1 in cutlass.range_constexpr(2):
            m = tt * self.bn + row0 + 8 * v1
            if cutlass.const_expr(self.epilogue == "swiglu"):
                for cb in cutlass.range_constexpr(self.blocks):
                    if blk0 + cb < blk_end:
                        for p in cutlass.range_constexpr(4):
                            qn = 8 * cb + 2 * p
                            vals = []
                            for v0 in cutlass.range_constexpr(2):
                                up = acc[v0 + 2 * v1 + 4 * qn]
                                gate = acc[v0 + 2 * v1 + 4 * (qn + 1)]
                                sig = cute.arch.rcp_approx(
                                    1.0 + cute.math.exp(-gate, fastmath=True))
                                vals.append(gate * sig * up)
                            col = (blk0 + cb) * 32 + 8 * p + 2 * c
                            st_global_bf16x2(out_base + (Int64(m) * self.half + col) * 2,
                                             vals[0], vals[1])
            else:
                slot = row_index[m]
                if slot >= 0:
                    rw = ld_global_f32(topk_w.iterator.toint() + Int64(slot) * 4)
                    for cb in cutlass.range_constexpr(self.blocks):
                        if blk0 + cb < blk_end:
                            for r8 in cutlass.range_constexpr(BLOCK_ROWS // 8):
                                i = 2 * v1 + 4 * (8 * cb + r8)
                                ycol = (blk0 + cb - blk_begin) * BLOCK_ROWS + 8 * r8 + 2 * c
                                at = Int64(slot) * self.y_cols + ycol
                                if cutlass.const_expr(self.cfg.y_bf16):
                                    st_global_bf16x2(out_base + at * 2, acc[i] * rw,
                                                     acc[i + 1] * rw)
                                else:
                                    st_global_v2_f32(out_base + at * 4, acc[i] * rw,
                                                     acc[i + 1] * rw)

    @cute.jit
    def _epilogue(self, acc, tt, gblk, blk_begin, warp, g, c, row_index, topk_w, out):
        """Accumulator element ``v0 + 2 v1 + 4 qn`` is (row 16 warp + 8 v1 + g, token column
        8 qn + 2 c + v0) of the block.
        FC1: h = silu(gate) * up -> bf16 at ``h[m, 32 gblk + 8 warp + g]``.
        FC2: y = acc * router weight -> fp32 (``y_bf16``: bf16) at ``y[slot, 64 (gblk -
        blk_begin) + row]`` for real rows (slot >= 0)."""
        out_base = out.iterator.toint()
        if cutlass.const_expr(self.epilogue == "swiglu"):
            col = gblk * 32 + 8 * warp + g
            for qn in cutlass.range_constexpr(self.bn // 8):
                for v0 in cutlass.range_constexpr(2):
                    m = tt * self.bn + 8 * qn + 2 * c + v0
                    up = acc[v0 + 4 * qn]
                    gate = acc[v0 + 2 + 4 * qn]
                    sig = cute.arch.rcp_approx(1.0 + cute.math.exp(-gate, fastmath=True))
                    st_global_bf16(out_base + (Int64(m) * self.half + col) * 2, gate * sig * up)
        else:
            cols = self.bn // 4  # token columns of this thread: 8 qn + 2 c + v0
            slots = [row_index[tt * self.bn + 8 * (i // 2) + 2 * c + i % 2] for i in range(cols)]
            w_base = topk_w.iterator.toint()
            rws = [ld_global_f32(w_base + Int64(cutlass.max(sl, Int32(0))) * 4) for sl in slots]
            for i in cutlass.range_constexpr(cols):
                self._scatter_pair(acc, rws[i], slots[i], (i % 2) + 4 * (i // 2),
                                   gblk - blk_begin, warp, g, out_base)

    @cute.jit
    def _scatter_pair(self, acc, scale, slot, i0, chunk_blk, warp, g, out_base):
        """FC2: the two rows (g, g + 8) of one token column, if it is a real (token, slot)."""
        if slot >= 0:
            for v1 in cutlass.range_constexpr(2):
                at = Int64(slot) * self.y_cols + chunk_blk * BLOCK_ROWS + 16 * warp + 8 * v1 + g
                if cutlass.const_expr(self.cfg.y_bf16):
                    st_global_bf16(out_base + at * 2, acc[i0 + 2 * v1] * scale)
                else:
                    st_global_f32(out_base + at * 4, acc[i0 + 2 * v1] * scale)
