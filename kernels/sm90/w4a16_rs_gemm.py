"""Grouped W4A16 MoE GEMM for Hopper: NVFP4 weights as WGMMA's register operand (RS).

Operands swapped: ``C^T [weight rows, tokens] = W_e [weight rows, K] . X^T`` for one expert's
token tile, so tokens are WGMMA's N (``bn`` = 16..128 per tile, from the per-expert load) and
the weights are its M. Packed e2m1 rows and their e4m3 block scales stay 4.5 bits per weight
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

Warp roles (384 threads; persistent CTAs over (token tile, block group) work tiles in a static
round robin, all roles walking the same tiles):
  producer warpgroup 0 (``producer_regs``): per stage, wait for the slot, 16 B cp.async of the
      packed weight rows (-> sW, rows padded by 16 B so 8 rows x 16 B reads hit distinct banks),
      the raw e4m3 scales (-> sRaw) and the gathered token rows (-> sB, the 128 B-swizzled WGMMA
      layout), one cp.async group per stage; then wait for its own group of the stage before
      (``cp.async.wait_group 1``), turn its scale rows of that stage into bf16x2 splats (-> sSpl,
      each scale converted once per CTA), fence the async proxy and arrive on ``full``.
  consumer warpgroups 1, 2 (``consumer_regs``): per k32 pair p of the stage: wait until at most
      ring - 1 wgmma groups are in flight (pair p's A registers are then free), LDS.128 of its
      two rows per block, byte gather + dequant into the A fragments of 2 k16 steps, wgmma x 4
      (2 blocks x 2 steps), commit; release the previous stage once its groups are done; after
      the last K tile: epilogue from registers to global memory.
Weights move by cp.async, not TMA: per-row TMA bulk copies (the rows of one stage are not
contiguous) issue from the uniform datapath one lane at a time (a ``BRA.U.ANY`` loop per
instruction in the SASS), 256 serial issues per stage; one 16 B cp.async per thread moves a
warp's 512 B per instruction. (A tensor-map TMA needs one descriptor per multi-B tensor.)

Pipelines (``stages`` slots of [sW | sRaw | sSpl | sB], mbarriers in shared memory):
  full[s]   producer -> consumers: 128 arrivals, one per producer thread once its copies of
            stage s landed and its splats are written.
  empty[s]  consumers -> producer: 256 arrivals, every consumer thread once every wgmma that
            read stage s completed (wgmma reads B asynchronously; A came through registers). All
            threads arrive: a lane-0 branch between wgmmas in flight makes ptxas serialize them.
Steady state (global K-tile counter i, slot s = i % stages):
  producer: wait empty[s] | cp.async weights(i), raw scales(i), B(i) | wait own copies(i-1) |
            splats(i-1) | fence | arrive full[(i-1) % stages]
  consumer: wait full[s] | for pair p: wait_group(ring-1) ; dequant(p) ; wgmma(p) ; commit
            | (at pair ring-1) arrive empty[(i-1) % stages]
so up to ``stages - 1`` K tiles of loads are in flight (``stages - 2`` published ahead of the
consumers), and the dequant of pair p overlaps the wgmma group of pair p-1.

Preshuffled weights (``RsConfig.weights = "preshuffled"``, ``preshuffle.py``; a variant under
measurement): a block's stage of weights is one contiguous range copied unpadded (per thread
16 B cp.async, or with ``weight_copy = "bulk"`` one ``cp.async.bulk`` per block from producer
thread 0, its bytes expected on ``full``); the producer writes the scales as bf16 pairs at
each consumer thread's slot; a consumer thread loads 16 B per block for two pairs and 16 B of
scale pairs per pair, and decodes each shuffled word with 4 shifts and 5 logic ops into its 4
A-fragment words of a row (``fragment_preshuffled_bf16x8``): the same bf16 values, bitwise.

64-bit offsets everywhere an address is formed; token indices and tile counts are int32.
"""

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64, Uint32
from cutlass.cute.nvgpu import warpgroup

from .grouped_launch import BLOCK_ROWS, TOKEN_TILES
from .nvfp4_dequant import (
    SCALE_EXP2,
    WEIGHT_EXP2,
    e4m3x4_to_bf16x2_pairs,
    e4m3x4_to_bf16x2_splats,
    fragment_bf16x8,
    fragment_preshuffled_bf16x8,
    fragment_selector,
)
from .preshuffle import SCALE_ATOM, WEIGHT_ATOM
from .ptx import (
    cp_async_4,
    cp_async_bulk,
    cp_async_8,
    cp_async_16,
    ld_global_f32,
    ld_shared_u32,
    ld_shared_v2,
    ld_shared_v4,
    st_global_bf16,
    st_global_f32,
    st_shared_v2,
)

EPILOGUES = ("swiglu", "scatter")
WEIGHT_LAYOUTS = ("linear", "preshuffled")
WEIGHT_COPIES = ("cp_async", "bulk")
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
    weights: the NVFP4 layout the kernel reads: "linear" (the checkpoint's rows) or
        "preshuffled" (``preshuffle.shuffle_weight`` / ``shuffle_scale``: contiguous per
        block and stage, one shuffled word per row and pair, 4 shifts + 5 logic ops for 4
        A-fragment words; measured against "linear" before it can become the default);
    weight_copy: how the producer moves a stage's packed weights: "cp_async" (every producer
        thread 16 B at a time) or, preshuffled only, "bulk" (one thread issues one
        ``cp.async.bulk`` per block of the stage, completing on ``full`` as transaction bytes)."""

    bn: int
    k_tile: int
    blocks_per_wg: int
    ring: int
    ctas_per_sm: int
    producer_regs: int
    persistent: bool
    weights: str = "linear"
    weight_copy: str = "cp_async"

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


def rs_config(bn: int, k: int, **overrides) -> RsConfig:
    """The configuration for token tile ``bn`` and reduction size ``k`` (see ``RsConfig``;
    measured on the H200, kernels/NOTES.md); ``overrides`` replace fields (benchmarks).

    bn <= 32 (memory-bound): two CTAs per SM (twice the warps to hide shared-memory and
    dequant latency; 80 registers at launch, consumers 96), K tile 64 (5 stages fit in half
    the shared memory). bn = 64: one CTA, K tile 128 (half the stage hand-offs). bn = 128
    (compute-bound): the two 64 x 128 accumulators per consumer warpgroup take 224 registers
    (producer 56). Every configuration is persistent, with a ring of 2 A-fragment pairs."""
    if bn not in TOKEN_TILES:
        raise ValueError(f"token tile bn must be one of {TOKEN_TILES}, got {bn}")
    if bn <= 32:
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
    if k % fields["k_tile"]:
        fields["k_tile"] = 64
    pairs = fields["k_tile"] // 32
    fields["ring"] = min(fields["ring"] or pairs, pairs)
    return RsConfig(**fields)


class W4A16RsGemm:
    """One compiled configuration (see the module docstring).

    n_weight: rows of each expert's weight (2I for FC1, H for FC2), a multiple of 64;
    k: the reduction size (H for FC1, I for FC2), a multiple of 64; bn: token tile (N);
    y_cols: row length of FC2's fp32 output chunk (a multiple of 64), unused for FC1;
    config: the tile configuration (default ``rs_config(bn, k)``).
    """

    def __init__(self, *, epilogue: str, n_weight: int, k: int, bn: int, y_cols: int = 0,
                 config: RsConfig | None = None):
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
        self.epilogue = epilogue
        self.n_weight = n_weight
        self.k = k
        self.bn = bn
        self.y_cols = y_cols
        self.num_blocks = n_weight // BLOCK_ROWS  # FC1: I / 32 (32 up + 32 gate rows each)
        self.half = n_weight // 2  # FC1: I, the gate rows' offset
        cfg = config or rs_config(bn, k)
        if cfg.bn != bn or k % cfg.k_tile or (cfg.k_tile // 32) % cfg.ring:
            raise ValueError(f"{cfg} does not fit bn={bn}, K={k}")
        self.cfg = cfg
        self.kt = cfg.k_tile
        self.k_tiles = k // self.kt
        self.pairs = self.kt // 32  # k32 pairs per stage (2 or 4: even, so the ring is static)
        self.sub = self.kt // 64  # 64-wide B sub-tiles (one 128 B swizzle atom each)
        self.w_row = self.kt // 2  # packed bytes per weight row per stage
        self.w_stride = self.w_row + 16  # padded: 8 rows x 16 B reads hit distinct banks
        self.raw_row = self.kt // 16  # e4m3 scales per row per stage
        # bf16x2 splat per scale; 8-byte reads of 8 rows hit distinct banks at a 16 or 40 B
        # row stride (kt 64: 4 splats per row, kt 128: 8 plus 8 B of padding).
        self.spl_stride = self.kt // 4 + (8 if self.kt >= 128 else 0)
        self.bpw = cfg.blocks_per_wg
        self.bpc = cfg.blocks_per_cta
        self.cta_rows = BLOCK_ROWS * self.bpc
        self.persistent = cfg.persistent
        self.ring = cfg.ring
        if cfg.weights not in WEIGHT_LAYOUTS:
            raise ValueError(f"weights must be one of {WEIGHT_LAYOUTS}, got {cfg.weights!r}")
        self.shuffled = cfg.weights == "preshuffled"
        if cfg.weight_copy not in WEIGHT_COPIES or (cfg.weight_copy == "bulk"
                                                    and not self.shuffled):
            raise ValueError(f"weight_copy must be one of {WEIGHT_COPIES} ('bulk' needs "
                             f"preshuffled weights: a stage's linear rows are not contiguous), "
                             f"got {cfg}")
        self.bulk = cfg.weight_copy == "bulk"
        if self.shuffled and self.bpw not in (1, 2):
            raise ValueError(f"preshuffled weights need 1 or 2 blocks per warpgroup, got {cfg}")
        self.stage_w = self.cta_rows * self.w_stride
        self.stage_raw = self.cta_rows * self.raw_row
        self.stage_spl = self.cta_rows * self.spl_stride
        if self.shuffled:
            # [block][K chunk] atoms (``preshuffle``), unpadded: a warp's 16 B loads are 512
            # contiguous bytes. Scale pairs: one bf16x2 per (row, pair), no splats.
            self.chunks = self.kt // 64  # 64-wide K chunks per stage
            self.stage_w = self.bpc * self.chunks * WEIGHT_ATOM
            self.stage_raw = self.bpc * self.chunks * SCALE_ATOM
            self.stage_spl = self.cta_rows * self.pairs * 4
            self.raw_bytes = self.stage_raw // PRODUCER_THREADS  # per producer thread: 4..16
        self.stage_b = self.sub * bn * 128
        stage_bytes = self.stage_w + self.stage_raw + self.stage_spl + self.stage_b
        smem_budget = SMEM_PER_SM // cfg.ctas_per_sm - 2048 * (cfg.ctas_per_sm - 1)
        self.stages = min(MAX_STAGES, smem_budget // stage_bytes)
        if self.stages < 3:
            raise ValueError(f"only {self.stages} pipeline stages fit ({stage_bytes} B each)")
        copiers = PRODUCER_THREADS
        self.b_chunks = bn * self.kt // 8 // copiers  # 16 B B-chunks per copy thread
        self.w_chunks = self.w_row // 16  # 16 B chunks per weight row per stage
        self.w_copies = self.cta_rows * self.w_chunks // copiers
        self.w_rows = self.w_copies // self.bpc  # weight rows per block per copy thread
        step = copiers // self.w_chunks  # CTA rows between them (16, 32 or 64)
        # ... as expert weight rows: FC1 interleaves 8 up / 8 gate rows per 16 CTA rows
        self.w_row_step = step // 2 if epilogue == "swiglu" else step

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, row_index_ptr: cute.Pointer,
                 tile_expert_ptr: cute.Pointer, tensor_of_ptr: cute.Pointer,
                 local_of_ptr: cute.Pointer, table_ptr: cute.Pointer,
                 topk_w_ptr: cute.Pointer, out_ptr: cute.Pointer, num_token_tiles: Int32,
                 num_experts: Int32, num_b: Int32, blk_begin: Int32, blk_end: Int32,
                 grid: Int32, stream):
        """``a``: bf16 rows (FC1: tokens ``[T, K]`` gathered by ``row_index``; FC2: ``h``
        ``[M_pad, K]``); ``row_index`` int32 ``[M_pad]`` (FC1: gather index, FC2: slot index,
        -1 on padding); ``tile_expert [num_token_tiles]``; multi-B maps and table (see
        ``expert_table``); ``topk_w`` fp32 flat router weights (FC2); ``out``: FC1 bf16 ``h
        [M_pad, I]``, FC2 fp32 ``y [T*k, y_cols]``. ``grid`` <= number of work tiles."""
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16, warpgroup.OperandMajorMode.K, warpgroup.OperandMajorMode.K,
            Float32, (1, 1, 1), tiler_mn=(BLOCK_ROWS, self.bn),
            a_source=warpgroup.OperandSource.RMEM)
        b_layout = sm90_utils.make_smem_layout_b(
            utils.LayoutEnum.ROW_MAJOR, (BLOCK_ROWS, self.bn, 64), BFloat16,
            self.stages * self.sub)
        m_rows = num_token_tiles * self.bn
        tensors = (
            cute.make_tensor(a_ptr, cute.make_layout(1)),
            cute.make_tensor(row_index_ptr, cute.make_layout(m_rows)),
            cute.make_tensor(tile_expert_ptr, cute.make_layout(num_token_tiles)),
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

    @cute.kernel
    def kernel(self, a: cute.Tensor, row_index: cute.Tensor, tile_expert: cute.Tensor,
               tensor_of: cute.Tensor, local_of: cute.Tensor, b_table: cute.Tensor,
               topk_w: cute.Tensor, out: cute.Tensor, tiled_mma: cute.TiledMma,
               b_layout: cute.ComposedLayout, num_token_tiles: Int32, blk_begin: Int32,
               blk_end: Int32):
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
        my_tiles = (num_token_tiles * n_groups - bid + grid - 1) // grid
        addrs = (storage.sW.data_ptr().toint(), storage.sRaw.data_ptr().toint(),
                 storage.sSpl.data_ptr().toint(), storage.sB.data_ptr().toint())
        sB = storage.sB.get_tensor(b_layout.outer, swizzle=b_layout.inner)
        if wg == 0:
            cute.arch.warpgroup_reg_dealloc(self.cfg.producer_regs)
            self._produce(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end, a, row_index,
                          tile_expert, tensor_of, local_of, b_table, full, empty, addrs)
        else:
            cute.arch.warpgroup_reg_alloc(self.cfg.consumer_regs)
            self._consumer(tidx, bid, grid, my_tiles, n_groups, blk_begin, blk_end,
                           row_index, tile_expert, tensor_of, local_of, b_table, topk_w,
                           out, tiled_mma, sB, full, empty, addrs)

    # ---------------------------------------------------------------- shared arithmetic
    def _weight_row(self, r64, gblk):
        """Expert weight row held at row ``r64`` (0..63) of block ``gblk``'s smem rows."""
        if cutlass.const_expr(self.epilogue == "swiglu"):
            # r64 = 16 w + 8 h + g  ->  (gate if h else up) row 32 gblk + 8 w + g
            return ((r64 // 8) % 2) * self.half + gblk * 32 + (r64 // 16) * 8 + r64 % 8
        return gblk * BLOCK_ROWS + r64

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
                 tile_expert, tensor_of, local_of, b_table, full, empty, addrs):
        """Producer thread: per stage, wait for the slot, cp.async its share of the packed
        weight rows, raw scales and gathered token rows (one cp.async group), then wait for its
        own copies of the stage before (``cp.async.wait_group 1``) and publish that one
        (``_publish``): one stage of its copies is always in flight while it converts."""
        sw_addr, sraw_addr, _, sb_addr = addrs
        slots = None  # preshuffled: where this thread's scale words go (the same every stage)
        if cutlass.const_expr(self.shuffled):
            words = self.raw_bytes // 4
            slots = [self._pair_slot(tidx * words + u) for u in range(words)]
        a_base = a.iterator.toint()
        chunks_per_row = self.kt // 8
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
            for kt_idx in cutlass.range(self.k_tiles, unroll=1):
                it = j * self.k_tiles + kt_idx
                s = it % self.stages
                cute.arch.mbarrier_wait(empty + s, ((it // self.stages) % 2) ^ 1)
                if cutlass.const_expr(self.bulk):
                    self._bulk_weights(tidx, s, kt_idx, w_base, w_off, full, addrs)
                self._copy_weights(tidx, s, kt_idx, w_base, sf_base, w_off, sf_off, addrs)
                for i in cutlass.range_constexpr(self.b_chunks):
                    q = tidx + i * copiers
                    n = q // chunks_per_row
                    cc = q % chunks_per_row
                    c8 = cc % 8
                    dst = (sb_addr + (s * self.sub + cc // 8) * (self.bn * 128) + n * 128
                           + ((c8 ^ (n % 8)) * 16))
                    cp_async_16(dst, a_base + Int64(b_row[i]) * (self.k * 2)
                                + (kt_idx * (self.kt * 2) + cc * 16))
                cute.arch.cp_async_commit_group()
                if it > 0:
                    cute.arch.cp_async_wait_group(1)
                    self._publish(tidx, (it - 1) % self.stages, full, addrs, slots)
        total = my_tiles * self.k_tiles
        if total > 0:
            cute.arch.cp_async_wait_group(0)
            self._publish(tidx, (total - 1) % self.stages, full, addrs, slots)

    def _tile_offsets(self, tidx, blk0, blk_end):
        """Producer thread ``tidx``'s int32 offsets inside the expert for one work tile: per
        CTA block of its weight copies, and of its scale copies (offsets inside one expert
        fit int32: constructor check). Blocks past ``blk_end`` copy the last block again."""
        w_off, sf_off = [], []
        if self.shuffled:
            # [block][K chunk] atoms: a block's stage is one contiguous byte range.
            for cb in range(self.bpc):
                gblk = cutlass.min(blk0 + cb, blk_end - 1)
                w_off.append(gblk * (self.k // 64 * WEIGHT_ATOM))
            cb, _, within = self._shuffled_sf_copy(tidx)
            gblk = cutlass.min(blk0 + cb, blk_end - 1)
            sf_off.append(gblk * (self.k // 64 * SCALE_ATOM) + within)
        else:
            # Weight rows: 16 B chunk tidx + copiers i is chunk (.. % w_chunks) of CTA row
            # (.. // w_chunks): ``w_rows`` rows per block, ``w_step`` CTA rows apart, so one
            # offset per block.
            for cb in range(self.bpc):
                gblk = cutlass.min(blk0 + cb, blk_end - 1)
                grow = self._weight_row(tidx // self.w_chunks, gblk)
                w_off.append(grow * (self.k // 2) + (tidx % self.w_chunks) * 16)
            for i in range(self.cta_rows // PRODUCER_THREADS):
                r = tidx + PRODUCER_THREADS * i  # scale rows: CTA rows tidx + copiers i
                gblk = cutlass.min(blk0 + r // BLOCK_ROWS, blk_end - 1)
                sf_off.append(self._weight_row(r % BLOCK_ROWS, gblk) * (self.k // 16))
        return w_off, sf_off

    @cute.jit
    def _bulk_weights(self, tidx, s, kt_idx, w_base, w_off, full, addrs):
        """Producer thread 0: the stage's packed weights as one bulk copy per CTA block (a
        block's ``chunks`` atoms are contiguous in the preshuffled layout), their bytes
        expected on ``full[s]`` first (its previous phase completed: the consumers released
        the slot only after waiting on it)."""
        if tidx == 0:
            per_block = self.chunks * WEIGHT_ATOM
            cute.arch.mbarrier_expect_tx(full + s, self.stage_w)
            for cb in cutlass.range_constexpr(self.bpc):
                cp_async_bulk(addrs[0] + s * self.stage_w + cb * per_block,
                              w_base + Int64(w_off[cb] + kt_idx * per_block), per_block,
                              (full + s).toint())

    def _copy_weights(self, tidx, s, kt_idx, w_base, sf_base, w_off, sf_off, addrs):
        """Producer thread ``tidx``: cp.async its share of K tile ``kt_idx``'s packed weights
        (none with bulk weight copies) and raw scales into stage ``s``."""
        sw_addr, sraw_addr, _, _ = addrs
        copiers = PRODUCER_THREADS
        if self.shuffled:
            for i in range(0 if self.bulk else self.stage_w // 16 // copiers):
                cb, dst, within = self._shuffled_w_copy(tidx, i)
                cp_async_16(sw_addr + s * self.stage_w + dst,
                            w_base + Int64(w_off[cb] + kt_idx * (self.chunks * WEIGHT_ATOM)
                                           + within))
            _, dst, _ = self._shuffled_sf_copy(tidx)
            src = sf_base + Int64(sf_off[0] + kt_idx * (self.chunks * SCALE_ATOM))
            dst = sraw_addr + s * self.stage_raw + dst
            if self.raw_bytes == 4:
                cp_async_4(dst, src)
            else:  # 8 B copies: the scale tensors are only 8-byte aligned (expert_table)
                for h in range(self.raw_bytes // 8):
                    cp_async_8(dst + 8 * h, src + 8 * h)
        else:
            for i in range(self.w_copies):
                r = (tidx + i * copiers) // self.w_chunks
                dst = (sw_addr + s * self.stage_w + r * self.w_stride
                       + (tidx % self.w_chunks) * 16)
                row_add = (i % self.w_rows) * self.w_row_step * (self.k // 2)
                cp_async_16(dst, w_base + Int64(w_off[i // self.w_rows] + row_add
                                                + kt_idx * self.w_row))
            for i in range(self.cta_rows // copiers):
                r = tidx + copiers * i
                src = sf_base + Int64(sf_off[i] + kt_idx * self.raw_row)
                dst = sraw_addr + s * self.stage_raw + r * self.raw_row
                if self.raw_row == 8:
                    cp_async_8(dst, src)
                else:
                    cp_async_4(dst, src)

    @cute.jit
    def _publish(self, ptid, s, full, addrs, slots):
        """Producer thread ``ptid`` publishes stage ``s``: its raw e4m3 scales (the ones it
        copied) -> bf16x2 splats (one word per scale, ``scale * 2^SCALE_EXP2`` in both halves,
        each scale converted once per CTA; preshuffled: bf16x2 pairs at the consumers' slots,
        ``slots``), fence the async proxy (wgmma reads the sB chunks it copied), arrive on
        ``full``."""
        _, sraw_addr, sspl_addr, _ = addrs
        if cutlass.const_expr(self.shuffled):
            self._publish_pairs(ptid, s, sraw_addr, sspl_addr, slots)
        else:
            self._publish_splats(ptid, s, sraw_addr, sspl_addr)
        cute.arch.fence_proxy(cute.arch.ProxyKind.async_shared,
                              space=cute.arch.SharedSpace.shared_cta)
        cute.arch.mbarrier_arrive(full + s)

    @cute.jit
    def _publish_splats(self, ptid, s, sraw_addr, sspl_addr):
        for i in cutlass.range_constexpr(self.cta_rows // PRODUCER_THREADS):
            r = ptid + PRODUCER_THREADS * i
            raw = sraw_addr + s * self.stage_raw + r * self.raw_row
            spl = sspl_addr + s * self.stage_spl + r * self.spl_stride
            for w in cutlass.range_constexpr(self.raw_row // 4):
                s0, s1, s2, s3 = e4m3x4_to_bf16x2_splats(ld_shared_u32(raw + 4 * w),
                                                         SCALE_EXP2)
                st_shared_v2(spl + 16 * w, s0, s1)
                st_shared_v2(spl + 16 * w + 8, s2, s3)

    @cute.jit
    def _publish_pairs(self, ptid, s, sraw_addr, sspl_addr, slots):
        """Preshuffled scales: each raw word this thread copied (rows (warp, 0, g) and
        (warp, 1, g) of block cb, steps 0 and 1 of pair (kc, pp)) -> two bf16x2 (step 0 low,
        step 1 high) at the consumer's place: per (kc, pp, warpgroup, warp, g) the words
        (block j, row half h) at ``8 j + 4 h``, one 16 B load per consumer thread and pair."""
        words = self.raw_bytes // 4
        for u in cutlass.range_constexpr(words):
            wi = ptid * words + u  # word of the stage's [block][K chunk][64 words] scales
            h0, h1 = e4m3x4_to_bf16x2_pairs(
                ld_shared_u32(sraw_addr + s * self.stage_raw + 4 * wi), SCALE_EXP2)
            st_shared_v2(sspl_addr + s * self.stage_spl + slots[u], h0, h1)

    # ------------------------------------------- preshuffled index math (plain, CPU-tested)
    def _shuffled_w_copy(self, tidx, i):
        """Producer thread ``tidx``'s ``i``-th 16 B weight copy of a stage: (CTA block, byte
        offset in the stage's sW, byte offset in that block's contiguous range of the stage).
        A block's range is ``chunks`` atoms; ``i`` picks the block statically."""
        per_block = self.chunks * WEIGHT_ATOM
        per_thread = per_block // (16 * PRODUCER_THREADS)  # copies per thread per block
        cb = i // per_thread
        within = (tidx + PRODUCER_THREADS * (i % per_thread)) * 16
        return cb, cb * per_block + within, within

    def _shuffled_sf_copy(self, tidx):
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
                  empty, addrs):
        sw_addr, _, sspl_addr, _ = addrs
        q = tidx // 128 - 1  # consumer warpgroup
        tq = tidx % 128
        warp = tq // 32
        lane = tidx % 32
        g = lane // 4
        c = lane % 4
        selector = fragment_selector(c)
        thr_mma = tiled_mma.get_slice(tq)
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        a_shape = thr_mma.partition_shape_A((BLOCK_ROWS, 16))
        # A fragments of ``ring`` k32 pairs: [block][pair % ring][step in pair], each 4 bf16x2
        # words. A pair's registers are rewritten once wait_group(ring - 1) says the wgmma
        # that read them is done (up to ring - 1 groups stay in flight meanwhile).
        frags = [[[tiled_mma.make_fragment_A(a_shape) for _ in range(2)]
                  for _ in range(self.ring)] for _ in range(self.bpw)]
        words = [[[cute.recast_tensor(f, Int32) for f in pr] for pr in blk] for blk in frags]
        accs = [cute.make_rmem_tensor(thr_mma.partition_shape_C((BLOCK_ROWS, self.bn)), Float32)
                for _ in range(self.bpw)]
        tiled_mma.set(warpgroup.Field.ACCUMULATE, True)
        if cutlass.const_expr(self.shuffled):
            # this thread's bytes in its blocks' weight atoms and its scale-pair slot
            rows = self._consumer_offsets(q, tq)
        else:
            # smem row of (block j, row half h) for this thread: A-fragment rows g and g + 8.
            rows = [[(q * self.bpw + j) * BLOCK_ROWS + 16 * warp + 8 * h + g for h in range(2)]
                    for j in range(self.bpw)]
        args = (q, warp, lane, g, c, selector, rows, words, frags, accs, tCrB, tiled_mma,
                n_groups, blk_begin, blk_end, row_index, tile_expert, tensor_of, local_of,
                b_table, topk_w, out, full, empty, sw_addr, sspl_addr)
        if cutlass.const_expr(self.persistent):
            for jt in cutlass.range(my_tiles, unroll=1):
                self._consumer_tile(jt, bid + jt * grid, *args)
        else:  # one work tile per CTA (grid = work tiles): a static body
            self._consumer_tile(0, bid, *args)

    @cute.jit
    def _consumer_tile(self, jt, tile, q, warp, lane, g, c, selector, rows, words, frags, accs,
                       tCrB, tiled_mma, n_groups, blk_begin, blk_end, row_index, tile_expert,
                       tensor_of, local_of, b_table, topk_w, out, full, empty, sw_addr,
                       sspl_addr):
        """Work tile ``tile`` (the CTA's ``jt``-th): K loop, then the epilogue."""
        tt = tile // n_groups
        blk0 = blk_begin + (tile % n_groups) * self.bpc
        # alpha is needed only in the epilogue: load it now, its latency hides in the loop.
        _, _, alpha_addr = self._expert_bases(tt, tile_expert, tensor_of, local_of, b_table)
        alpha = ld_global_f32(alpha_addr)
        # K tile 0 is peeled so the tile's first k16 step overwrites the accumulators with a
        # static zero-init (a dynamic one, or a fill, makes ptxas serialize the wgmmas).
        self._k_tile(jt * self.k_tiles, True, full, empty, lane, sw_addr, sspl_addr, rows,
                     selector, words, frags, accs, tiled_mma, tCrB)
        for kt_idx in cutlass.range(1, self.k_tiles, unroll=1):
            self._k_tile(jt * self.k_tiles + kt_idx, False, full, empty, lane,
                         sw_addr, sspl_addr, rows, selector, words, frags, accs, tiled_mma,
                         tCrB)
        warpgroup.wait_group(0)
        cute.arch.mbarrier_arrive(empty + (jt * self.k_tiles + self.k_tiles - 1) % self.stages)
        # The A operand is the weights times 2^WEIGHT_EXP2 (nvfp4_dequant): undo it here.
        alpha = alpha * (2.0 ** -WEIGHT_EXP2)
        for j in cutlass.range_constexpr(self.bpw):
            gblk = blk0 + q * self.bpw + j
            if gblk < blk_end:  # the last group's missing blocks were clamped copies
                self._epilogue(accs[j], alpha, tt, gblk, blk_begin, warp, g, c, row_index,
                               topk_w, out)

    @cute.jit
    def _k_tile(self, it, first, full, empty, lane, sw_addr, sspl_addr, rows, selector,
                words, frags, accs, tiled_mma, tCrB):
        """One K tile (global counter ``it``) of a consumer warpgroup; ``first``: the work
        tile's first K tile (static), whose first k16 step zero-initializes the accumulators."""
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
            if cutlass.const_expr(self.shuffled):
                pp = p % 2
                if cutlass.const_expr(pp == 0):  # one 16 B load: both pairs of the K chunk
                    packed = [ld_shared_v4(w_stage + rows[0] + self._consumer_step(j, p)[0])
                              for j in range(self.bpw)]
                slot = spl_stage + rows[1] + self._consumer_step(0, p)[1]
                if cutlass.const_expr(self.bpw == 2):
                    scales = ld_shared_v4(slot)
                else:
                    scales = ld_shared_v2(slot)
            for j in cutlass.range_constexpr(self.bpw):
                for h in cutlass.range_constexpr(2):
                    if cutlass.const_expr(self.shuffled):
                        o0, o1, o2, o3 = fragment_preshuffled_bf16x8(packed[j][2 * pp + h],
                                                                     scales[2 * j + h])
                    else:
                        row = rows[j][h]
                        v0, v1, v2, v3 = ld_shared_v4(w_stage + row * self.w_stride + p * 16)
                        sc0, sc1 = ld_shared_v2(spl_stage + row * self.spl_stride + p * 8)
                        o0, o1, o2, o3 = fragment_bf16x8(v0, v1, v2, v3, selector, sc0, sc1)
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
                ycol = chunk_blk * BLOCK_ROWS + 16 * warp + 8 * v1 + g
                st_global_f32(out_base + (Int64(slot) * self.y_cols + ycol) * 4,
                              acc[i0 + 2 * v1] * scale)
