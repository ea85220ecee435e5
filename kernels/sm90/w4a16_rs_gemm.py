"""Grouped W4A16 MoE GEMM for Hopper: NVFP4 weights as WGMMA's register operand (RS).

Operands swapped: ``C^T [weight rows, tokens] = W_e [weight rows, K] . X^T`` for one expert's
token tile, so tokens are WGMMA's N (``bn`` = 16..128 per tile, from the per-expert load) and
the weights are its M. Packed e2m1 codes and their e4m3 block scales stay 4.5 bits per weight
until registers: each consumer thread loads the bytes of its A fragment from shared memory,
turns them into exact bf16 (e2m1 x e4m3, ``nvfp4_dequant``) and issues ``wgmma`` with A from
registers and the token rows (B) from shared memory. No bf16 weight ever goes to shared memory.

CTA tile: 256 weight rows (4 blocks of 64, two per consumer warpgroup) x ``bn`` tokens; the
per-``bn`` shape (K tile, CTAs per SM, register split) is ``rs_config``'s (``RsConfig``).
FC1 (``epilogue="swiglu"``): block b holds up rows ``[32b, 32b+32)`` and their gate rows
``I + [32b, 32b+32)``, interleaved so that accumulator rows g and g+8 of every 16-row group are
the up and gate row of one output column: SwiGLU is thread-local. FC2 (``"scatter"``): block b is
rows ``[64b, 64b+64)`` of ``w2``; the epilogue scales by alpha and the router weight and writes
fp32 rows indexed by (token, slot) into a column chunk ``[64 blk_begin, 64 blk_end)`` of the
hidden size (the caller sums the slots in fixed order, ``slot_sum``).

The weights are read only in the preshuffled layout (``preshuffle.py``, applied once at load
and tagged ``weight_layout="preshuffled"``): every expert is ``[64-row block][64-wide K chunk]``
atoms in the order the consumer threads read them, so a block's K tile is one contiguous byte
range and each consumer thread decodes one 32-bit word per (row, k32 pair) into its 4
A-fragment words with 4 shifts and 5 logic ops (``fragment_preshuffled_bf16x8``). That beat
the kernels on the checkpoint's linear rows by 1.22-1.63x (H200, DeepSeek-V3 and Qwen3-235B,
16-1024 tokens per expert, bitwise equal results; kernels/NOTES.md, device call 10); the linear
path is gone (one code path).

Warp roles (384 threads; persistent CTAs over (token tile, block group) work tiles in a static
round robin, all roles walking the same tiles):
  producer warpgroup 0 (``producer_regs``): per stage, wait for the slot; thread 0 expects the
      stage's weight bytes on ``full`` and issues one ``cp.async.bulk`` per CTA block (its K
      tile, 2 or 4 KiB, contiguous in the preshuffled layout; one uniform-datapath issue per
      block, no per-lane loop); every thread cp.asyncs its 4-16 B of the raw e4m3 scale atoms
      (-> sRaw) and 16 B chunks of the gathered token rows (-> sB, the 128 B-swizzled WGMMA
      layout), one cp.async group per stage; then waits for its own group of the stage before
      (``cp.async.wait_group 1``), turns each raw scale word into two bf16x2 (step 0 scale low,
      step 1 high, x 2^SCALE_EXP2) at its consumer's slot (-> sSpl), fences the async proxy and
      arrives on ``full``.
  consumer warpgroups 1, 2 (``consumer_regs``): per k32 pair p of the stage: wait until at most
      ring - 1 wgmma groups are in flight (pair p's A registers are then free), one LDS.128 of
      its weight words per block for two pairs (at even p) and one of its scale pairs, decode
      into the A fragments of 2 k16 steps (HMUL2 with ``.H0_H0`` / ``.H1_H1`` scale halves),
      wgmma x 4 (2 blocks x 2 steps), commit; release the previous stage once its groups are
      done; after the last K tile: epilogue from registers to global memory.
Alignment: the bulk copies need 16-byte aligned global and shared addresses. Shared stages are
2 KiB multiples; every block / K-tile offset inside an expert is a multiple of 2 KiB and an
expert's weights are ``rows K / 2`` bytes (a multiple of 2 KiB), so each weight tensor's base
must be 16-byte aligned (and each scale tensor's 8-byte aligned, for the 8 B scale copies):
``expert_table.build_expert_table`` raises ValueError before any launch otherwise.

Pipelines (``stages`` slots of [sW | sRaw | sSpl | sB], mbarriers in shared memory):
  full[s]   producer -> consumers: 128 arrivals, one per producer thread once its cp.asyncs of
            stage s landed and its scale pairs are written, plus the stage's weight bytes
            (transaction count) from the bulk copies.
  empty[s]  consumers -> producer: 256 arrivals, every consumer thread once every wgmma that
            read stage s completed (wgmma reads B asynchronously; A came through registers). All
            threads arrive: a lane-0 branch between wgmmas in flight makes ptxas serialize them.
Steady state (global K-tile counter i, slot s = i % stages):
  producer: wait empty[s] | bulk weights(i) -> full[s], cp.async scales(i), B(i) | wait own
            copies(i-1) | scale pairs(i-1) | fence | arrive full[(i-1) % stages]
  consumer: wait full[s] | for pair p: wait_group(ring-1) ; dequant(p) ; wgmma(p) ; commit
            | (at pair ring-1) arrive empty[(i-1) % stages]
so up to ``stages - 1`` K tiles of loads are in flight (``stages - 2`` published ahead of the
consumers), and the dequant of pair p overlaps the wgmma group of pair p-1.

64-bit offsets everywhere an address is formed; token indices and tile counts are int32.

W4A8 (``compute="e4m3"``; numerics in ``quant/w4a8.py``, the reference the device tests hold it
to): the same preshuffled experts, pipeline and roles, with
  weights   each preshuffled word -> two e4m3 A-fragment registers (``nvfp4_dequant.
            fragment_preshuffled_e4m3x8``): codes placed as e4m3 bytes (code x 2^-6), -> f16,
            x (block scale x 8) in f16 (exact), one round-to-nearest-even cvt to e4m3 =
            ``RN_e4m3(e2m1 x s x 2^-3)``, never saturating (<= 336); alpha x 8 in the epilogue;
  tokens    e4m3 rows with fp32 scales per token per 128 channels (``w4a8_act``: one torch
            pass before each GEMM, h requantized for FC2), their values permuted inside each
            16-wide K group (``preshuffle.permute_act_k16``) to the slots where the decode puts
            the matching weight codes: the bf16 kernel's weight bytes and tag serve both;
  MMA       ``wgmma`` e4m3 x e4m3 (QGMMA 64xNx32, A from registers), one per block and k32 pair;
  promotion K tile 128 = one activation block: the 4 pairs accumulate into per-block partial
            accumulators (zeroed by the first), then ``wait_group(0)``, the stage is released
            and ``acc (+)= part x token scale`` in fp32 (the producer copies the tile's token
            scales of the stage into sAs with its other cp.asyncs);
  configs   ``rs_config(bn, K, "e4m3")``: K tile 128, one 64-row block per consumer warpgroup
            at bn 32 and 128 (partials double the accumulator registers), else two.
CPU compile (sm_90a, ``test_compile_sm90.py``): no spills, pipelined, K loop per block and k32
pair 56-68 instructions (bn 16: 541 per stage of 8 block-pairs; the decode is 5 LOP3-class, 4
e4m3->f16, 4 HMUL2, 4 f16->e4m3 and 1 PRMT per word); not yet measured on a device.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float8E4M3FN, Float32, Int32, Int64, Uint32
from cutlass.cute.nvgpu import warpgroup

from .grouped_launch import BLOCK_ROWS, TOKEN_TILES
from .nvfp4_dequant import (
    E4M3_WEIGHT_EXP2,
    SCALE_EXP2,
    WEIGHT_EXP2,
    e4m3x4_to_bf16x2_pairs,
    e4m3x4_to_f16x2_pairs,
    fragment_preshuffled_bf16x8,
    fragment_preshuffled_e4m3x8,
)
from .preshuffle import SCALE_ATOM, WEIGHT_ATOM
from .ptx import (
    cp_async_4,
    cp_async_bulk,
    cp_async_8,
    cp_async_16,
    ld_global_f32,
    ld_shared_f32,
    ld_shared_u32,
    ld_shared_v2,
    ld_shared_v4,
    st_global_bf16,
    st_global_f32,
    st_shared_v2,
)

EPILOGUES = ("swiglu", "scatter")
# The WGMMA operand format: "bf16" (W4A16: exact bf16 weights x bf16 tokens, k16 steps) or
# "e4m3" (W4A8: RN_e4m3 weights x e4m3 tokens quantized per token per 128 channels, k32
# steps, the token scales promoted in fp32 once per 128 of K; quant/w4a8.py's numerics).
COMPUTES = ("bf16", "e4m3")
ACT_BLOCK = 128  # e4m3: channels per activation scale = K tile = one promotion
CONSUMER_WGS = 2
PRODUCER_THREADS = 128
THREADS = PRODUCER_THREADS + 128 * CONSUMER_WGS
SMEM_PER_SM = 220 * 1024
MAX_STAGES = 8


@dataclass(frozen=True)
class RsConfig:
    """The static shape of one compiled kernel beyond the GEMM sizes.

    bn: token tile (WGMMA N); k_tile: K elements per pipeline stage (64 or 128);
    blocks_per_wg: 64-row weight blocks per consumer warpgroup (CTA rows = 128 x this);
    ring: k32 pairs of A fragments in registers (wgmma groups in flight + 1), divides the pairs
        of a stage; ctas_per_sm: CTAs resident per SM (2 halves shared memory and registers);
    producer_regs: setmaxnreg of the producer warpgroup (the consumers take the rest);
    persistent: CTAs loop over work tiles (grid = resident CTAs), else one CTA per work tile;
    y_bf16 (FC2): the router-weighted scratch rows ``y`` in bf16 (rounded once before the slot
    sum, as the FP8 kernels' default: 1.00-1.16x there on an H100), half the bytes written and
    re-read and half the column chunks; off by default here until measured on this kernel.
    There is no weight-layout field: the kernel reads preshuffled NVFP4 experts only
    (``preshuffle``), a stage's weights moving by one ``cp.async.bulk`` per CTA block (module
    docstring; the linear layout and per-thread weight copies lost on the H200, NOTES.md)."""

    bn: int
    k_tile: int
    blocks_per_wg: int
    ring: int
    ctas_per_sm: int
    producer_regs: int
    persistent: bool
    y_bf16: bool = False

    @property
    def blocks_per_cta(self) -> int:
        return CONSUMER_WGS * self.blocks_per_wg

    @property
    def register_pool(self) -> int:
        """Registers per thread at launch (what ptxas sizes the kernel to; setmaxnreg moves
        them between warpgroups): the most, in steps of 8, that ``ctas_per_sm`` CTAs fit."""
        return 65536 // (self.ctas_per_sm * THREADS) // 8 * 8

    @property
    def consumer_regs(self) -> int:
        return (self.register_pool * THREADS - self.producer_regs * PRODUCER_THREADS) \
            // (THREADS - PRODUCER_THREADS) // 8 * 8


def rs_config(bn: int, k: int, compute: str = "bf16", **overrides) -> RsConfig:
    """The configuration for token tile ``bn`` and reduction size ``k`` (see ``RsConfig``;
    measured on the H200, kernels/NOTES.md); ``overrides`` replace fields (benchmarks).

    bn <= 32 (memory-bound): two CTAs per SM (twice the warps to hide shared-memory and
    dequant latency; 80 registers at launch, consumers 96), K tile 64 (5 stages fit in half
    the shared memory). bn = 64: one CTA, K tile 128 (half the stage hand-offs). bn = 128
    (compute-bound): the two 64 x 128 accumulators per consumer warpgroup take 224 registers
    (producer 56). Every configuration is persistent, with a ring of 2 A-fragment pairs.
    ``compute="e4m3"`` (W4A8): K tile 128 (one activation scale and one fp32 promotion per
    stage); the per-128 partial accumulators double the accumulator registers, so bn 32 and
    128 keep one 64-row block per consumer warpgroup (not yet measured on a device)."""
    if bn not in TOKEN_TILES:
        raise ValueError(f"token tile bn must be one of {TOKEN_TILES}, got {bn}")
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if compute == "e4m3":
        fields = dict(k_tile=ACT_BLOCK, blocks_per_wg=1 if bn in (32, 128) else 2,
                      ctas_per_sm=2 if bn <= 32 else 1, producer_regs=40 if bn <= 32 else 56,
                      persistent=True)
    elif bn <= 32:
        fields = dict(k_tile=64, blocks_per_wg=2, ctas_per_sm=2, producer_regs=40,
                      persistent=True)
    elif bn == 64:
        fields = dict(k_tile=128, blocks_per_wg=2, ctas_per_sm=1, producer_regs=112,
                      persistent=True)
    else:
        fields = dict(k_tile=64, blocks_per_wg=2, ctas_per_sm=1, producer_regs=56,
                      persistent=True)
    fields.update(bn=bn, ring=2)
    fields.update(overrides)
    if k % fields["k_tile"] and compute == "bf16":
        fields["k_tile"] = 64
    pairs = fields["k_tile"] // 32
    fields["ring"] = min(fields["ring"] or pairs, pairs)
    return RsConfig(**fields)


class W4A16RsGemm:
    """One compiled configuration (see the module docstring).

    n_weight: rows of each expert's weight (2I for FC1, H for FC2), a multiple of 64;
    k: the reduction size (H for FC1, I for FC2), a multiple of 64; bn: token tile (N);
    y_cols: row length of FC2's fp32 output chunk (a multiple of 64), unused for FC1;
    config: the tile configuration (default ``rs_config(bn, k, compute)``);
    compute: "bf16" (W4A16) or "e4m3" (W4A8: ``a`` is e4m3 in ``permute_act_k16`` order with
    fp32 scales per token per 128 channels, K a multiple of 128; ``COMPUTES``).
    """

    def __init__(self, *, epilogue: str, n_weight: int, k: int, bn: int, y_cols: int = 0,
                 config: RsConfig | None = None, compute: str = "bf16"):
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
        if bn not in TOKEN_TILES:
            raise ValueError(f"token tile bn must be one of {TOKEN_TILES}, got {bn}")
        if k % 64 or k <= 0:
            raise ValueError(f"K={k} must be a positive multiple of 64")
        if n_weight % 64 or n_weight <= 0:
            raise ValueError(f"{n_weight} weight rows: must be a positive multiple of 64")
        if n_weight * k // 2 >= 2**31:
            raise ValueError(f"one expert's weight ({n_weight} x {k}) has 2^31 bytes or more")
        if epilogue == "scatter" and (y_cols % 64 or y_cols <= 0):
            raise ValueError(f"y_cols={y_cols} must be a positive multiple of 64")
        if compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
        if compute == "e4m3" and k % ACT_BLOCK:
            raise ValueError(f"W4A8 (e4m3): K={k} must be a multiple of {ACT_BLOCK} (one "
                             f"activation scale per token per {ACT_BLOCK} channels)")
        self.compute = compute
        self.fp8 = compute == "e4m3"
        self.eb = 1 if self.fp8 else 2  # bytes per token element
        self.epilogue = epilogue
        self.n_weight = n_weight
        self.k = k
        self.bn = bn
        self.y_cols = y_cols
        self.half = n_weight // 2  # FC1: I, the gate rows' offset
        cfg = config or rs_config(bn, k, compute)
        if cfg.bn != bn or k % cfg.k_tile or (cfg.k_tile // 32) % cfg.ring:
            raise ValueError(f"{cfg} does not fit bn={bn}, K={k}")
        if self.fp8 and cfg.k_tile != ACT_BLOCK:
            raise ValueError(f"W4A8 (e4m3) promotes once per stage: K tile must be "
                             f"{ACT_BLOCK}, got {cfg}")
        self.cfg = cfg
        self.kt = cfg.k_tile
        self.k_tiles = k // self.kt
        self.pairs = self.kt // 32  # k32 pairs per stage (2 or 4: even, so the ring is static)
        self.sub = self.kt * self.eb // 128  # B sub-tiles of one 128 B swizzle atom per row
        self.bpw = cfg.blocks_per_wg
        self.bpc = cfg.blocks_per_cta
        self.cta_rows = BLOCK_ROWS * self.bpc
        self.persistent = cfg.persistent
        self.ring = cfg.ring
        if self.bpw not in (1, 2):
            raise ValueError(f"the consumers' 16 B scale-pair loads need 1 or 2 blocks per "
                             f"warpgroup, got {cfg}")
        # [block][K chunk] atoms (``preshuffle``), unpadded: a block's K tile is one contiguous
        # range (one bulk copy) and a warp's 16 B loads are 512 contiguous bytes. Scale pairs:
        # one bf16x2 per (row, pair) at the consumer's slot.
        self.chunks = self.kt // 64  # 64-wide K chunks per stage
        self.block_w = self.chunks * WEIGHT_ATOM  # bytes per block per stage (one bulk copy)
        self.stage_w = self.bpc * self.block_w
        self.stage_raw = self.bpc * self.chunks * SCALE_ATOM
        self.stage_spl = self.cta_rows * self.pairs * 4
        self.raw_bytes = self.stage_raw // PRODUCER_THREADS  # per producer thread: 4..16
        self.stage_b = self.sub * bn * 128
        self.stage_as = bn * 4 if self.fp8 else 0  # e4m3: the tile's token scales (fp32)
        stage_bytes = self.stage_w + self.stage_raw + self.stage_spl + self.stage_b \
            + self.stage_as
        smem_budget = SMEM_PER_SM // cfg.ctas_per_sm - 2048 * (cfg.ctas_per_sm - 1)
        self.stages = min(MAX_STAGES, smem_budget // stage_bytes)
        if self.stages < 3:
            raise ValueError(f"only {self.stages} pipeline stages fit ({stage_bytes} B each)")
        self.b_chunks = bn * self.kt * self.eb // 16 // PRODUCER_THREADS  # 16 B B-chunks / thread
        # the A operand is the weights x 2^exp2 (nvfp4_dequant); the epilogue undoes it
        self.weight_exp2 = E4M3_WEIGHT_EXP2 if self.fp8 else WEIGHT_EXP2

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, a_scale_ptr: cute.Pointer,
                 row_index_ptr: cute.Pointer,
                 tile_expert_ptr: cute.Pointer, tile_count_ptr: cute.Pointer,
                 tensor_of_ptr: cute.Pointer, local_of_ptr: cute.Pointer,
                 table_ptr: cute.Pointer, topk_w_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 num_token_tiles: Int32,
                 num_experts: Int32, num_b: Int32, blk_begin: Int32, blk_end: Int32,
                 grid: Int32, stream):
        """``a``: bf16 rows (FC1: tokens ``[T, K]`` gathered by ``row_index``; FC2: ``h``
        ``[M_pad, K]``); ``row_index`` int32 ``[M_pad]`` (FC1: gather index, FC2: slot index,
        -1 on padding); ``tile_expert [num_token_tiles]``; ``tile_count`` int32 ``[1]``: the
        real token tiles, a prefix of the ``num_token_tiles`` the host sized the buffers and
        the grid for (the permutation plan's upper bound: the kernel reads the real count, so
        no host sync precedes the launch); multi-B maps and table (see ``expert_table``);
        ``topk_w`` fp32 flat router weights (FC2); ``out``: FC1 bf16 ``h [M_pad, I]``, FC2
        fp32 ``y [T*k, y_cols]``. ``grid`` <= number of work tiles of the bound.
        ``a_scale`` (e4m3 only; unused for bf16): fp32 ``[rows of a, K / 128]``, the
        activations' per-token scales (FC1 gathered by ``row_index`` like ``a``)."""
        ab = Float8E4M3FN if self.fp8 else BFloat16
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            ab, ab, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
            Float32, (1, 1, 1), tiler_mn=(BLOCK_ROWS, self.bn),
            a_source=warpgroup.OperandSource.RMEM)
        b_layout = sm90_utils.make_smem_layout_b(
            utils.LayoutEnum.ROW_MAJOR, (BLOCK_ROWS, self.bn, 128 // self.eb), ab,
            self.stages * self.sub)
        m_rows = num_token_tiles * self.bn
        tensors = (
            cute.make_tensor(a_ptr, cute.make_layout(1)),
            cute.make_tensor(a_scale_ptr, cute.make_layout(1)),
            cute.make_tensor(row_index_ptr, cute.make_layout(m_rows)),
            cute.make_tensor(tile_expert_ptr, cute.make_layout(num_token_tiles)),
            cute.make_tensor(tile_count_ptr, cute.make_layout(1)),
            cute.make_tensor(tensor_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(local_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(table_ptr, cute.make_layout((3, num_b), stride=(num_b, 1))),
            cute.make_tensor(topk_w_ptr, cute.make_layout(1)),
            cute.make_tensor(out_ptr, cute.make_layout(1)),
        )
        self.shared_storage = self._shared_storage(b_layout)
        # minctasm lets ptxas size the entry register count (the pool), which setmaxnreg needs.
        self.kernel(*tensors, tiled_mma, b_layout, num_token_tiles, blk_begin, blk_end).launch(
            grid=[grid, 1, 1], block=[THREADS, 1, 1], stream=stream,
            min_blocks_per_mp=self.cfg.ctas_per_sm)

    def _shared_storage(self, b_layout):
        stages = self.stages
        if self.fp8:
            return self._shared_storage_e4m3(b_layout)

        @cute.struct
        class SharedStorage:
            full: cute.struct.MemRange[cutlass.Int64, stages]
            empty: cute.struct.MemRange[cutlass.Int64, stages]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_layout)], 1024]
            sW: cute.struct.Align[cute.struct.MemRange[Uint32, stages * self.stage_w // 4], 128]
            sSpl: cute.struct.Align[
                cute.struct.MemRange[Uint32, stages * self.stage_spl // 4], 128]
            sRaw: cute.struct.Align[
                cute.struct.MemRange[Uint32, stages * self.stage_raw // 4], 128]

        return SharedStorage

    def _shared_storage_e4m3(self, b_layout):
        """The bf16 storage with e4m3 token rows and a stage ring of fp32 token scales."""
        stages = self.stages

        @cute.struct
        class SharedStorageE4m3:
            full: cute.struct.MemRange[cutlass.Int64, stages]
            empty: cute.struct.MemRange[cutlass.Int64, stages]
            sB: cute.struct.Align[
                cute.struct.MemRange[Float8E4M3FN, cute.cosize(b_layout)], 1024]
            sW: cute.struct.Align[cute.struct.MemRange[Uint32, stages * self.stage_w // 4], 128]
            sSpl: cute.struct.Align[
                cute.struct.MemRange[Uint32, stages * self.stage_spl // 4], 128]
            sRaw: cute.struct.Align[
                cute.struct.MemRange[Uint32, stages * self.stage_raw // 4], 128]
            sAs: cute.struct.Align[cute.struct.MemRange[Float32, stages * self.bn], 16]

        return SharedStorageE4m3

    @cute.kernel
    def kernel(self, a: cute.Tensor, a_scale: cute.Tensor, row_index: cute.Tensor,
               tile_expert: cute.Tensor, tile_count: cute.Tensor, tensor_of: cute.Tensor,
               local_of: cute.Tensor, b_table: cute.Tensor, topk_w: cute.Tensor, out: cute.Tensor, tiled_mma: cute.TiledMma,
               b_layout: cute.ComposedLayout, num_token_tiles: Int32, blk_begin: Int32,
               blk_end: Int32):
        # ``num_token_tiles`` (the host's bound) sized the grid; the real tiles are the first
        # ``tile_count[0]``: CTAs past them get no work tile (``my_tiles`` 0).
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
                cute.arch.mbarrier_init(full + s, PRODUCER_THREADS)
                cute.arch.mbarrier_init(empty + s, 128 * CONSUMER_WGS)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        n_groups = (blk_end - blk_begin + self.bpc - 1) // self.bpc
        real_tiles = cutlass.min(tile_count[0], num_token_tiles)
        my_tiles = (real_tiles * n_groups - bid + grid - 1) // grid
        addrs = (storage.sW.data_ptr().toint(), storage.sRaw.data_ptr().toint(),
                 storage.sSpl.data_ptr().toint(), storage.sB.data_ptr().toint())
        sB = storage.sB.get_tensor(b_layout.outer, swizzle=b_layout.inner)
        as_addr = Int32(0)
        if cutlass.const_expr(self.fp8):
            as_addr = storage.sAs.data_ptr().toint()
        if wg == 0:
            cute.arch.warpgroup_reg_dealloc(self.cfg.producer_regs)
            self._produce(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a, row_index,
                          tile_expert, tensor_of, local_of, b_table, full, empty, addrs,
                          a_scale, as_addr)
        else:
            cute.arch.warpgroup_reg_alloc(self.cfg.consumer_regs)
            self._consumer(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end,
                           row_index, tile_expert, tensor_of, local_of, b_table, topk_w,
                           out, tiled_mma, sB, full, empty, addrs, as_addr)

    # ---------------------------------------------------------------- shared arithmetic
    def _expert_bases(self, tt, tile_expert, tensor_of, local_of, b_table):
        """(weight base, scale base, alpha address) of token tile ``tt``'s expert, 64-bit."""
        expert = tile_expert[tt]
        t = tensor_of[expert]
        local = Int64(local_of[expert])
        w_base = b_table[0, t] + local * (self.n_weight * self.k // 2)
        sf_base = b_table[1, t] + local * (self.n_weight * self.k // 16)
        return w_base, sf_base, b_table[2, t] + local * 4

    # ---------------------------------------------------------------- producer
    @cute.jit
    def _produce(self, tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a, row_index,
                 tile_expert, tensor_of, local_of, b_table, full, empty, addrs, a_scale,
                 as_addr):
        """Producer thread: per stage, wait for the slot, (thread 0) the bulk weight copies,
        cp.async its share of the raw scales and gathered token rows (one cp.async group), then
        wait for its own copies of the stage before (``cp.async.wait_group 1``) and publish
        that one (``_publish``): one stage of its copies is always in flight while it
        converts."""
        _, _, _, sb_addr = addrs
        words = self.raw_bytes // 4
        # where this thread's scale words go (the same every stage)
        slots = [self._pair_slot(tidx * words + u) for u in range(words)]
        a_base = a.iterator.toint()
        as_base = a_scale.iterator.toint()
        chunks_per_row = self.kt * self.eb // 16
        copiers = PRODUCER_THREADS
        for j in cutlass.range(my_tiles, unroll=1):
            tile = bid + j * grid
            tt = tile // n_groups
            blk0 = blk_begin + (tile % n_groups) * self.bpc
            w_base, sf_base, _ = self._expert_bases(tt, tile_expert, tensor_of, local_of,
                                                    b_table)
            # B rows (16 B chunk tidx + copiers i of the stage: a warp covers whole 128 B row
            # segments, so the gathered reads coalesce); int32 row numbers, 64-bit per copy.
            b_row = []
            for i in cutlass.range_constexpr(self.b_chunks):
                m = tt * self.bn + (tidx + i * copiers) // chunks_per_row
                if cutlass.const_expr(self.epilogue == "swiglu"):
                    m = cutlass.max(row_index[m], Int32(0))  # padding rows read token 0
                b_row.append(m)
            w_off, sf_off = self._tile_offsets(tidx, blk0, blk_end)
            as_row = Int32(0)
            if cutlass.const_expr(self.fp8):  # producer thread n < bn: token n's scale row
                as_row = tt * self.bn + cutlass.min(tidx, Int32(self.bn - 1))
                if cutlass.const_expr(self.epilogue == "swiglu"):
                    as_row = cutlass.max(row_index[as_row], Int32(0))
            for kt_idx in cutlass.range(self.k_tiles, unroll=1):
                it = j * self.k_tiles + kt_idx
                s = it % self.stages
                cute.arch.mbarrier_wait(empty + s, ((it // self.stages) % 2) ^ 1)
                self._bulk_weights(tidx, s, kt_idx, w_base, w_off, full, addrs)
                self._copy_scales(tidx, s, kt_idx, sf_base, sf_off, addrs)
                for i in cutlass.range_constexpr(self.b_chunks):
                    q = tidx + i * copiers
                    n = q // chunks_per_row
                    cc = q % chunks_per_row
                    c8 = cc % 8
                    dst = (sb_addr + (s * self.sub + cc // 8) * (self.bn * 128) + n * 128
                           + ((c8 ^ (n % 8)) * 16))
                    cp_async_16(dst, a_base + Int64(b_row[i]) * (self.k * self.eb)
                                + (kt_idx * (self.kt * self.eb) + cc * 16))
                if cutlass.const_expr(self.fp8):
                    if tidx < self.bn:
                        cp_async_4(as_addr + (s * self.bn + tidx) * 4,
                                   as_base + (Int64(as_row) * (self.k // ACT_BLOCK) + kt_idx) * 4)
                cute.arch.cp_async_commit_group()
                if it > 0:
                    cute.arch.cp_async_wait_group(1)
                    self._publish(tidx, (it - 1) % self.stages, full, addrs, slots)
        total = my_tiles * self.k_tiles
        if total > 0:
            cute.arch.cp_async_wait_group(0)
            self._publish(tidx, (total - 1) % self.stages, full, addrs, slots)

    def _tile_offsets(self, tidx, blk0, blk_end):
        """Producer thread ``tidx``'s int32 offsets inside the expert for one work tile: of each
        CTA block's weights (``[block][K chunk]`` atoms: a block's K tile is one contiguous
        range), and of its share of the scales (offsets inside one expert fit int32:
        constructor check). Blocks past ``blk_end`` copy the last block again."""
        w_off = [self._block_offsets(cutlass.min(blk0 + cb, blk_end - 1))[0]
                 for cb in range(self.bpc)]
        cb, _, within = self._sf_copy(tidx)
        return w_off, self._block_offsets(cutlass.min(blk0 + cb, blk_end - 1))[1] + within

    @cute.jit
    def _bulk_weights(self, tidx, s, kt_idx, w_base, w_off, full, addrs):
        """Producer thread 0: the stage's packed weights as one bulk copy per CTA block
        (``_bulk_copy``), their bytes expected on ``full[s]`` first (its previous phase
        completed: the consumers released the slot only after waiting on it)."""
        if tidx == 0:
            cute.arch.mbarrier_expect_tx(full + s, self.stage_w)
            for cb in cutlass.range_constexpr(self.bpc):
                dst, src, size = self._bulk_copy(cb, kt_idx)
                cp_async_bulk(addrs[0] + s * self.stage_w + dst, w_base + Int64(w_off[cb] + src),
                              size, (full + s).toint())

    def _copy_scales(self, tidx, s, kt_idx, sf_base, sf_off, addrs):
        """Producer thread ``tidx``: cp.async its ``raw_bytes`` of K tile ``kt_idx``'s raw
        scales into stage ``s`` (4 B, or 8 B copies: the scale tensors are only 8-byte aligned,
        ``expert_table``)."""
        _, sraw_addr, _, _ = addrs
        _, dst, _ = self._sf_copy(tidx)
        src = sf_base + Int64(sf_off + kt_idx * (self.chunks * SCALE_ATOM))
        dst = sraw_addr + s * self.stage_raw + dst
        if self.raw_bytes == 4:
            cp_async_4(dst, src)
        else:
            for h in range(self.raw_bytes // 8):
                cp_async_8(dst + 8 * h, src + 8 * h)

    @cute.jit
    def _publish(self, ptid, s, full, addrs, slots):
        """Producer thread ``ptid`` publishes stage ``s``: each raw scale word it copied (rows
        (warp, 0, g) and (warp, 1, g) of block cb, steps 0 and 1 of pair (kc, pp)) -> two
        bf16x2 (step 0 low, step 1 high, ``scale x 2^SCALE_EXP2``) at the consumer's place
        (``slots``, ``_pair_slot``: per (kc, pp, warpgroup, warp, g) the words (block j, row
        half h) at ``8 j + 4 h``, one 16 B load per consumer thread and pair); fence the async
        proxy (wgmma reads the sB chunks it copied), arrive on ``full``."""
        _, sraw_addr, sspl_addr, _ = addrs
        words = self.raw_bytes // 4
        for u in cutlass.range_constexpr(words):
            wi = ptid * words + u  # word of the stage's [block][K chunk][64 words] scales
            raw = ld_shared_u32(sraw_addr + s * self.stage_raw + 4 * wi)
            if cutlass.const_expr(self.fp8):
                h0, h1 = e4m3x4_to_f16x2_pairs(raw)
            else:
                h0, h1 = e4m3x4_to_bf16x2_pairs(raw, SCALE_EXP2)
            st_shared_v2(sspl_addr + s * self.stage_spl + slots[u], h0, h1)
        cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared,
                              space=cute.arch.SharedSpace.shared_cta)
        cute.arch.mbarrier_arrive(full + s)

    # ------------------------------------------------------ index math (plain, CPU-tested)
    def _block_offsets(self, gblk):
        """(weights, scales): byte offsets of block ``gblk``'s first atom inside the expert
        (``[block][K chunk]`` atoms)."""
        return gblk * (self.k // 64 * WEIGHT_ATOM), gblk * (self.k // 64 * SCALE_ATOM)

    def _bulk_copy(self, cb, kt_idx):
        """CTA block ``cb``'s weights of K tile ``kt_idx``: (byte offset in the stage's sW,
        byte offset from the block's first atom in the expert, bytes): ``chunks`` atoms,
        contiguous in both."""
        return cb * self.block_w, kt_idx * self.block_w, self.block_w

    def _sf_copy(self, tidx):
        """Producer thread ``tidx``'s ``raw_bytes`` of a stage's scales: (CTA block, byte
        offset in the stage's sRaw, byte offset in that block's range of the stage)."""
        block_raw = self.chunks * SCALE_ATOM
        ob = tidx * self.raw_bytes
        return ob // block_raw, ob, ob % block_raw

    def _pair_slot(self, wi):
        """Byte offset in a stage's sSpl of raw scale word ``wi``'s two bf16x2 words (row
        half 0, 1): slot (pair, warpgroup, warp, g) of ``8 bpw`` bytes, block j at ``8 j``."""
        per_block = self.chunks * 64  # raw words per block per stage
        cb, a, pair = wi // per_block, wi % 64, (wi % per_block) // 32  # pair = 2 kc + pp
        slot = ((pair * CONSUMER_WGS + cb // self.bpw) * 4 + (a // 8) % 4) * 8 + a % 8
        return slot * (8 * self.bpw) + (cb % self.bpw) * 8

    def _consumer_offsets(self, q, tq):
        """Consumer thread ``tq`` of warpgroup ``q``: (its 16 B in its first block's first
        weight atom of a stage, its scale-pair slot of pair 0)."""
        warp, g = tq // 32, (tq % 32) // 4
        return (q * self.bpw * self.chunks * WEIGHT_ATOM + tq * 16,
                ((q * 4 + warp) * 8 + g) * (8 * self.bpw))

    def _consumer_step(self, j, p):
        """Static offsets of block ``j``, pair ``p`` from ``_consumer_offsets``: (weight
        atom, scale slot); the pair's words are 2 (p % 2) + h of the 16 B and 2 j + h."""
        return ((j * self.chunks + p // 2) * WEIGHT_ATOM,
                p * (CONSUMER_WGS * 32 * 8 * self.bpw))

    # ---------------------------------------------------------------- consumers
    @cute.jit
    def _consumer(self, tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, row_index,
                  tile_expert, tensor_of, local_of, b_table, topk_w, out, tiled_mma, sB, full,
                  empty, addrs, as_addr):
        sw_addr, _, sspl_addr, _ = addrs
        q = tidx // 128 - 1  # consumer warpgroup
        tq = tidx % 128
        warp = tq // 32
        lane = tidx % 32
        g = lane // 4
        c = lane % 4
        thr_mma = tiled_mma.get_slice(tq)
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        a_shape = thr_mma.partition_shape_A((BLOCK_ROWS, 16))
        # A fragments of ``ring`` k32 pairs: [block][pair % ring][step in pair], each 4 bf16x2
        # words. A pair's registers are rewritten once wait_group(ring - 1) says the wgmma
        # that read them is done (up to ring - 1 groups stay in flight meanwhile).
        # e4m3: one k32 step per pair, its 4 registers (2 k16 halves x 2 row halves).
        steps = 1 if self.fp8 else 2
        if cutlass.const_expr(self.fp8):
            a_shape = thr_mma.partition_shape_A((BLOCK_ROWS, 32))
        frags = [[[tiled_mma.make_fragment_A(a_shape) for _ in range(steps)]
                  for _ in range(self.ring)] for _ in range(self.bpw)]
        words = [[[cute.recast_tensor(f, Int32) for f in pr] for pr in blk] for blk in frags]
        accs = [cute.make_rmem_tensor(thr_mma.partition_shape_C((BLOCK_ROWS, self.bn)), Float32)
                for _ in range(self.bpw)]
        # e4m3: the per-128 partial sums that are promoted into ``accs``
        parts = [cute.make_rmem_tensor(thr_mma.partition_shape_C((BLOCK_ROWS, self.bn)), Float32)
                 for _ in range(self.bpw if self.fp8 else 0)]
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        # this thread's bytes in its blocks' weight atoms and its scale-pair slot
        offs = self._consumer_offsets(q, tq)
        args = (q, warp, g, c, offs, words, frags, accs, tCrB, tiled_mma,
                n_groups, blk_begin, blk_end, row_index, tile_expert, tensor_of, local_of,
                b_table, topk_w, out, full, empty, sw_addr, sspl_addr, parts, as_addr)
        if cutlass.const_expr(self.persistent):
            for jt in cutlass.range(my_tiles, unroll=1):
                self._consumer_tile(jt, bid + jt * grid, *args)
        else:  # one work tile per CTA (grid = work tiles of the bound): a static body
            if my_tiles > 0:
                self._consumer_tile(0, bid, *args)

    @cute.jit
    def _consumer_tile(self, jt, tile, q, warp, g, c, offs, words, frags, accs, tCrB,
                       tiled_mma, n_groups, blk_begin, blk_end, row_index, tile_expert,
                       tensor_of, local_of, b_table, topk_w, out, full, empty, sw_addr,
                       sspl_addr, parts, as_addr):
        """Work tile ``tile`` (the CTA's ``jt``-th): K loop, then the epilogue."""
        tt = tile // n_groups
        blk0 = blk_begin + (tile % n_groups) * self.bpc
        # alpha is needed only in the epilogue: load it now, its latency hides in the loop.
        _, _, alpha_addr = self._expert_bases(tt, tile_expert, tensor_of, local_of, b_table)
        alpha = ld_global_f32(alpha_addr)
        # K tile 0 is peeled so the tile's first k16 step overwrites the accumulators with a
        # static zero-init (a dynamic one, or a fill, makes ptxas serialize the wgmmas).
        if cutlass.const_expr(self.fp8):
            # every stage ends with its wgmmas done, its slot released and its promotion
            self._k_tile_e4m3(jt * self.k_tiles, True, full, empty, sw_addr, sspl_addr, offs,
                              words, frags, accs, parts, tiled_mma, tCrB, as_addr, c)
            for kt_idx in cutlass.range(1, self.k_tiles, unroll=1):
                self._k_tile_e4m3(jt * self.k_tiles + kt_idx, False, full, empty, sw_addr,
                                  sspl_addr, offs, words, frags, accs, parts, tiled_mma, tCrB,
                                  as_addr, c)
        else:
            self._k_tile(jt * self.k_tiles, True, full, empty, sw_addr, sspl_addr, offs, words,
                         frags, accs, tiled_mma, tCrB)
            for kt_idx in cutlass.range(1, self.k_tiles, unroll=1):
                self._k_tile(jt * self.k_tiles + kt_idx, False, full, empty, sw_addr,
                             sspl_addr, offs, words, frags, accs, tiled_mma, tCrB)
            warpgroup.wait_group(0)
            cute.arch.mbarrier_arrive(
                empty + (jt * self.k_tiles + self.k_tiles - 1) % self.stages)
        # The A operand is the weights times 2^weight_exp2 (nvfp4_dequant): undo it here.
        alpha = alpha * (2.0 ** -self.weight_exp2)
        for j in cutlass.range_constexpr(self.bpw):
            gblk = blk0 + q * self.bpw + j
            if gblk < blk_end:  # the last group's missing blocks were clamped copies
                self._epilogue(accs[j], alpha, tt, gblk, blk_begin, warp, g, c, row_index,
                               topk_w, out)

    @cute.jit
    def _k_tile(self, it, first, full, empty, sw_addr, sspl_addr, offs, words, frags, accs,
                tiled_mma, tCrB):
        """One K tile (global counter ``it``) of a consumer warpgroup; ``first``: the work
        tile's first K tile (static), whose first k16 step zero-initializes the accumulators.
        ``offs``: ``_consumer_offsets`` of this thread."""
        s = it % self.stages
        cute.arch.mbarrier_wait(full + s, (it // self.stages) % 2)
        w_stage = sw_addr + s * self.stage_w
        spl_stage = sspl_addr + s * self.stage_spl
        for p in cutlass.range_constexpr(self.pairs):
            rp = p % self.ring  # pairs is a multiple of ring: the buffer index is static
            warpgroup.wait_group(self.ring - 1)
            if cutlass.const_expr(p == self.ring - 1 and not first):
                # every wgmma of the previous stage has completed
                # every consumer thread arrives: a lane-0 branch here, between wgmmas in
                # flight, makes ptxas serialize them at bn 128 x 2 blocks (C7513)
                cute.arch.mbarrier_arrive(empty + (it - 1) % self.stages)
            pp = p % 2
            if cutlass.const_expr(pp == 0):  # one 16 B load: both pairs of the K chunk
                packed = [ld_shared_v4(w_stage + offs[0] + self._consumer_step(j, p)[0])
                          for j in range(self.bpw)]
            slot = spl_stage + offs[1] + self._consumer_step(0, p)[1]
            if cutlass.const_expr(self.bpw == 2):
                scales = ld_shared_v4(slot)
            else:
                scales = ld_shared_v2(slot)
            for j in cutlass.range_constexpr(self.bpw):
                for h in cutlass.range_constexpr(2):
                    # (block j, row half h): A-fragment rows g (h = 0) and g + 8 (h = 1)
                    o0, o1, o2, o3 = fragment_preshuffled_bf16x8(packed[j][2 * pp + h],
                                                                 scales[2 * j + h])
                    words[j][rp][0][h] = o0
                    words[j][rp][0][2 + h] = o1
                    words[j][rp][1][h] = o2
                    words[j][rp][1][2 + h] = o3
            warpgroup.fence()
            for t in cutlass.range_constexpr(2):
                step = 2 * p + t
                tiled_mma.set(warpgroup.Field.ACCUMULATE, not (first and step == 0))
                for j in cutlass.range_constexpr(self.bpw):
                    cute.gemm(tiled_mma, accs[j], frags[j][rp][t][(None, None, 0)],
                              tCrB[(None, None, step % 4, s * self.sub + step // 4)], accs[j])
            warpgroup.commit_group()

    @cute.jit
    def _k_tile_e4m3(self, it, first, full, empty, sw_addr, sspl_addr, offs, words, frags,
                     accs, parts, tiled_mma, tCrB, as_addr, c):
        """One K tile = one 128-channel activation block (W4A8, global counter ``it``): per
        k32 pair, decode the A fragments to e4m3 and issue one wgmma per block into ``parts``
        (zeroed by the stage's first step); then, once they are done, release the slot and
        promote: ``acc = part x scale`` (``first``: the work tile's first K tile) or
        ``acc += part x scale`` in fp32, with the scale of each accumulator's token column."""
        s = it % self.stages
        cute.arch.mbarrier_wait(full + s, (it // self.stages) % 2)
        w_stage = sw_addr + s * self.stage_w
        spl_stage = sspl_addr + s * self.stage_spl
        for p in cutlass.range_constexpr(self.pairs):
            rp = p % self.ring
            warpgroup.wait_group(self.ring - 1)
            pp = p % 2
            if cutlass.const_expr(pp == 0):  # one 16 B load: both pairs of the K chunk
                packed = [ld_shared_v4(w_stage + offs[0] + self._consumer_step(j, p)[0])
                          for j in range(self.bpw)]
            slot = spl_stage + offs[1] + self._consumer_step(0, p)[1]
            if cutlass.const_expr(self.bpw == 2):
                scales = ld_shared_v4(slot)
            else:
                scales = ld_shared_v2(slot)
            for j in cutlass.range_constexpr(self.bpw):
                for h in cutlass.range_constexpr(2):
                    # (block j, row half h): register 2 t + h holds k16 half t of the step
                    r0, r1 = fragment_preshuffled_e4m3x8(packed[j][2 * pp + h],
                                                         scales[2 * j + h])
                    words[j][rp][0][h] = r0
                    words[j][rp][0][2 + h] = r1
            warpgroup.fence()
            tiled_mma.set(warpgroup.Field.ACCUMULATE, p != 0)
            for j in cutlass.range_constexpr(self.bpw):
                cute.gemm(tiled_mma, parts[j], frags[j][rp][0][(None, None, 0)],
                          tCrB[(None, None, p, s * self.sub)], parts[j])
            warpgroup.commit_group()
        # this thread's token columns 8 qn + 2 c + v0, read before the slot is released
        xs = [ld_shared_f32(as_addr + (s * self.bn + 8 * (i // 2) + 2 * c + i % 2) * 4)
              for i in range(self.bn // 4)]
        warpgroup.wait_group(0)
        cute.arch.mbarrier_arrive(empty + s)
        for j in cutlass.range_constexpr(self.bpw):
            for i in cutlass.range_constexpr(self.bn // 2):
                scale = xs[2 * (i // 4) + i % 2]
                if cutlass.const_expr(first):
                    accs[j][i] = parts[j][i] * scale
                else:
                    accs[j][i] = accs[j][i] + parts[j][i] * scale

    @cute.jit
    def _epilogue(self, acc, alpha, tt, gblk, blk_begin, warp, g, c, row_index, topk_w, out):
        """Accumulator element ``v0 + 2 v1 + 4 qn`` is (row 16 warp + 8 v1 + g, token column
        8 qn + 2 c + v0) of the block (the WGMMA C layout).
        FC1: h = silu(alpha gate) * (alpha up) -> bf16 at ``h[m, 32 gblk + 8 warp + g]``.
        FC2: y = alpha acc * router weight -> fp32 at ``y[slot, 64 (gblk - blk_begin) + row]``
        for real rows (slot >= 0); the slots and their weights load up front, independently."""
        out_base = out.iterator.toint()
        if cutlass.const_expr(self.epilogue == "swiglu"):
            for qn in cutlass.range_constexpr(self.bn // 8):
                for v0 in cutlass.range_constexpr(2):
                    m = tt * self.bn + 8 * qn + 2 * c + v0
                    up = acc[v0 + 4 * qn] * alpha
                    gate = acc[v0 + 2 + 4 * qn] * alpha
                    sig = cute.arch.rcp_approx(1.0 + cute.math.exp(-gate, fastmath=True))
                    col = gblk * 32 + 8 * warp + g
                    st_global_bf16(out_base + (Int64(m) * self.half + col) * 2, gate * sig * up)
        else:
            cols = self.bn // 4  # token columns of this thread: 8 qn + 2 c + v0
            slots = [row_index[tt * self.bn + 8 * (i // 2) + 2 * c + i % 2] for i in range(cols)]
            w_base = topk_w.iterator.toint()
            rws = [ld_global_f32(w_base + Int64(cutlass.max(sl, Int32(0))) * 4) for sl in slots]
            for i in cutlass.range_constexpr(cols):
                self._scatter_pair(acc, alpha * rws[i], slots[i], (i % 2) + 4 * (i // 2),
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
