"""Grouped W4A16 GEMM for Hopper: bf16 activations x NVFP4 expert weights, WGMMA in bf16.

One CTA computes one M tile (``tile_m`` rows of ONE expert: the permutation plan pads every
expert's rows to a multiple of ``tile_m``) times two B sub-tiles of ``n_sub`` weight rows each.
FC1 (``epilogue="swiglu"``) takes sub-tile 0 from the up rows ``[n0, n0+n_sub)`` and sub-tile 1
from the matching gate rows ``[I+n0, I+n0+n_sub)`` of ``w3_w1``, so both accumulators share one
register layout and SwiGLU is element-wise. FC2 (``epilogue="weighted"``) takes two adjacent
sub-tiles of ``w2``.

Warp roles: none; every thread of the ``tile_m // 64`` consumer warpgroups loads, dequantizes
and issues WGMMA (warpgroup w owns rows ``[64w, 64w+64)`` of the tile).

Pipelines (``stages`` = 4 slots for the raw loads, 3 buffers for dequantized B):
  cp.async (each thread) -> slot s:  A rows (gathered by index, 16 B chunks into the 128 B
      swizzled WGMMA layout), packed e2m1 rows (32 B per row per K tile) and their e4m3 block
      scales (4 B). One commit group per K tile, issued two tiles ahead.
  dequant (each thread, its own B rows) -> sB buffer kt % 3: e2m1 x e4m3 -> exact bf16.
  WGMMA (async) reads sA slot kt % 4 and sB buffer kt % 3; ``wait_group(1)`` keeps one in flight.
Steady state of K tile kt, every thread:
  wait cp.async(kt) | dequant(kt) | proxy fence + barrier | issue cp.async(kt+2) into the slot
  WGMMA(kt-2) used | issue WGMMA(kt) | wait WGMMA(kt-1).
So the dequant of kt and the loads of kt+1, kt+2 overlap WGMMA(kt-1). A buffer is rewritten
only after the barrier that follows every warpgroup's wait on the WGMMA that read it.

Multi-B: the B operand is a list of S tensors. ``b_table`` (int64 ``[3, S]``) holds each
tensor's base address of weights, block scales and alphas; ``tensor_of_expert[E]`` and
``local_of_expert[E]`` (int32) map a global expert to (tensor, local index). The kernel reads
them once per CTA; S = 1 is the same code with a one-column table.
"""

import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Int32, Int64, Uint32

from .nvfp4_dequant import e2m1x8_to_bf16x8_scaled, e4m3x4_to_bf16x2_splats
from .ptx import (
    cp_async_4,
    cp_async_8,
    cp_async_16,
    ld_shared_u32,
    ld_shared_v2,
    ld_shared_v4,
    st_shared_v4,
)

TILE_K = 64  # bf16 elements per K tile: one 128 B swizzle row
ROW_BYTES = TILE_K * 2
EPILOGUES = ("swiglu", "weighted")


class W4A16GroupedGemm:
    """Configuration of one compiled grouped W4A16 GEMM (see module docstring).

    n_weight: rows of each expert's weight (2I for FC1, H for FC2); k: the reduction size
    (H for FC1, I for FC2); tile_m in {64, 128, 256}; n_sub in {64, 128} (64 with tile_m 256:
    512 threads leave 128 registers each, and two 64 x 128 accumulators alone take 128);
    ``gather``: A row of permuted row m is ``row_index[m]`` (FC1) instead of m (FC2).

    tile_m 256 (opt-in) serves 256 rows of one expert per dequantized B tile: half the
    NVFP4 -> bf16 work per MMA of the 128 x (2 x 128) default, with four consumer warpgroups.
    ``fuse_n`` (opt-in) issues ONE 64 x (2 n_sub) WGMMA per k16 step over both sub-tiles (they
    sit back to back in shared memory) instead of two 64 x n_sub ones, so each warpgroup reads
    its A block once per step instead of twice; FC1's epilogue pairs accumulator column c
    (up) with c + n_sub (gate).
    When a CTA has more loading threads than B rows, ``row_split`` threads share each row
    (each copies and dequantizes 32 / row_split bytes of it and its own copy of the scales).
    """

    def __init__(self, *, epilogue: str, n_weight: int, k: int, tile_m: int = 128,
                 n_sub: int = 128, gather: bool = True, stages: int = 4, fuse_n: bool = False):
        if epilogue not in EPILOGUES:
            raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
        if tile_m not in (64, 128, 256):
            raise ValueError(f"tile_m must be 64, 128 or 256, got {tile_m}")
        if n_sub not in (64, 128):
            raise ValueError(f"n_sub must be 64 or 128, got {n_sub}")
        if tile_m == 256 and n_sub != 64:
            raise ValueError(f"tile_m=256 needs n_sub=64 (register budget of 512 threads), "
                             f"got n_sub={n_sub}")
        if stages < 3:
            raise ValueError(f"stages must be >= 3 (loads run stages - 2 tiles ahead), got {stages}")
        if k % TILE_K:
            raise ValueError(f"K={k} must be a multiple of {TILE_K}")
        n_cta = n_sub if epilogue == "swiglu" else 2 * n_sub
        rows = n_weight // 2 if epilogue == "swiglu" else n_weight
        if rows % n_cta:
            raise ValueError(f"{rows} output columns are not a multiple of {n_cta} (n_sub={n_sub})")
        self.epilogue = epilogue
        self.fuse_n = fuse_n
        self.mma_n = 2 * n_sub if fuse_n else n_sub  # N of one WGMMA
        self.n_weight = n_weight
        self.k = k
        self.tile_m = tile_m
        self.n_sub = n_sub
        self.gather = gather
        self.stages = stages
        self.b_bufs = 3
        self.mma_wgs = tile_m // 64  # warpgroups issuing WGMMA, 64 rows each
        self.threads = 128 * self.mma_wgs
        self.b_rows = 2 * n_sub
        self.k_tiles = k // TILE_K
        self.n_tiles = rows // n_cta
        # FC1: sub-tile 1 is the gate half, I rows below the up half; FC2: the next n_sub rows.
        self.sub_stride = n_weight // 2 if epilogue == "swiglu" else n_sub
        self.cta_row_step = n_sub if epilogue == "swiglu" else 2 * n_sub
        self.row_split = self._row_split(self.threads)

    def _row_split(self, loaders: int) -> int:
        """Threads per B row: 1 while there are at least as many B rows as loaders."""
        return max(1, loaders // self.b_rows)

    def make_tensors(self, a_ptr, row_index_ptr, tile_expert_ptr, tensor_of_ptr, local_of_ptr,
                     table_ptr, row_weight_ptr, out_ptr, a_rows, num_tiles, num_experts, num_b):
        """Views of the raw pointers with the static row lengths and dynamic counts:
        ``a [a_rows, K]``, ``row_index / row_weight [M_pad]``, ``tile_expert [num_tiles]``,
        maps ``[num_experts]``, ``b_table [3, num_b]``, ``out [M_pad, n_out]``."""
        m_pad = num_tiles * self.tile_m
        n_out = self.n_weight // 2 if self.epilogue == "swiglu" else self.n_weight
        return (
            cute.make_tensor(a_ptr, cute.make_layout((a_rows, self.k), stride=(self.k, 1))),
            cute.make_tensor(row_index_ptr, cute.make_layout(m_pad)),
            cute.make_tensor(tile_expert_ptr, cute.make_layout(num_tiles)),
            cute.make_tensor(tensor_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(local_of_ptr, cute.make_layout(num_experts)),
            cute.make_tensor(table_ptr, cute.make_layout((3, num_b), stride=(num_b, 1))),
            cute.make_tensor(row_weight_ptr, cute.make_layout(m_pad)),
            cute.make_tensor(out_ptr, cute.make_layout((m_pad, n_out), stride=(n_out, 1))),
        )

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, row_index_ptr: cute.Pointer,
                 tile_expert_ptr: cute.Pointer, tensor_of_ptr: cute.Pointer,
                 local_of_ptr: cute.Pointer, table_ptr: cute.Pointer,
                 row_weight_ptr: cute.Pointer, out_ptr: cute.Pointer, a_rows: Int32,
                 num_tiles: Int32, num_experts: Int32, num_b: Int32, stream):
        (a, row_index, tile_expert, tensor_of_expert, local_of_expert, b_table, row_weight,
         out) = self.make_tensors(a_ptr, row_index_ptr, tile_expert_ptr, tensor_of_ptr,
                                  local_of_ptr, table_ptr, row_weight_ptr, out_ptr, a_rows,
                                  num_tiles, num_experts, num_b)
        tiled_mma = sm90_utils.make_trivial_tiled_mma(
            BFloat16, BFloat16,
            utils.LayoutEnum.ROW_MAJOR.sm90_mma_major_mode(),
            utils.LayoutEnum.ROW_MAJOR.sm90_mma_major_mode(),
            Float32, (self.mma_wgs, 1, 1), tiler_mn=(64, self.mma_n),
        )
        tile_mnk = (self.tile_m, self.mma_n, TILE_K)
        a_layout = sm90_utils.make_smem_layout_a(
            utils.LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16, self.stages)
        # K-major, one 128 B swizzle atom in K: row r of a stage lands at r * 128 B, so one
        # 2 n_sub-row stage (fuse_n) is byte for byte two n_sub-row stages.
        b_layout = sm90_utils.make_smem_layout_b(
            utils.LayoutEnum.ROW_MAJOR, tile_mnk, BFloat16,
            self.b_bufs if self.fuse_n else 2 * self.b_bufs)

        self.shared_storage = self._shared_storage(a_layout, b_layout)
        self.kernel(a, row_index, tile_expert, tensor_of_expert, local_of_expert, b_table,
                    row_weight, out, tiled_mma, a_layout, b_layout).launch(
            grid=[num_tiles, self.n_tiles, 1], block=[self.threads, 1, 1], stream=stream)

    def _shared_storage(self, a_layout, b_layout):
        """Shared memory: swizzled A ring, dequantized B buffers, packed-weight and scale ring."""

        @cute.struct
        class SharedStorage:
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(a_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_layout)], 1024]
            sW: cute.struct.Align[
                cute.struct.MemRange[Uint32, self.stages * self.b_rows * 8], 128]
            sSF: cute.struct.Align[
                cute.struct.MemRange[Uint32, self.stages * self.b_rows * self.row_split], 128]

        return SharedStorage

    @cute.kernel
    def kernel(self, a: cute.Tensor, row_index: cute.Tensor, tile_expert: cute.Tensor,
               tensor_of_expert: cute.Tensor, local_of_expert: cute.Tensor,
               b_table: cute.Tensor, row_weight: cute.Tensor, out: cute.Tensor,
               tiled_mma: cute.TiledMma, a_layout: cute.ComposedLayout,
               b_layout: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        m_tile, n_tile, _ = cute.arch.block_idx()
        smem = utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        sA = storage.sA.get_tensor(a_layout.outer, swizzle=a_layout.inner)
        sB = storage.sB.get_tensor(b_layout.outer, swizzle=b_layout.inner)
        sa_addr = storage.sA.data_ptr().toint()
        sb_addr = storage.sB.data_ptr().toint()
        sw_addr = storage.sW.data_ptr().toint()
        ssf_addr = storage.sSF.data_ptr().toint()

        alpha, w_row, sf_row, b_local, a_src, a_dst = self._thread_setup(
            tidx, self.threads, m_tile, n_tile, a, row_index, tile_expert, tensor_of_expert,
            local_of_expert, b_table)

        # ---- MMA partitions
        thr_mma = tiled_mma.get_slice(tidx)  # per-thread: C partitions need the lane
        tCsA = thr_mma.partition_A(sA)
        tCsB = thr_mma.partition_B(sB)
        tCrA = tiled_mma.make_fragment_A(tCsA)
        tCrB = tiled_mma.make_fragment_B(tCsB)
        cC = cute.make_identity_tensor((self.tile_m, self.mma_n))
        tCcC = thr_mma.partition_C(cC)
        acc0 = cute.make_rmem_tensor(tCcC.shape, Float32)
        acc1 = cute.make_rmem_tensor(tCcC.shape, Float32)
        acc0.fill(0.0)
        acc1.fill(0.0)
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
        num_k_blocks = cute.size(tCrA, mode=[2])

        # ---- prologue: `ahead` = stages - 2 K tiles in flight
        smem_addrs = (sa_addr, sb_addr, sw_addr, ssf_addr)
        ld_args = (smem_addrs, a_src, a_dst, w_row, sf_row, b_local)
        ahead = self.stages - 2
        for p in cutlass.range_constexpr(ahead):
            if cutlass.const_expr(p < self.k_tiles):
                self._load_tile(p, p, *ld_args)
            cute.arch.cp_async_commit_group()

        for kt in cutlass.range(self.k_tiles, unroll=1):
            slot = kt % self.stages
            buf = kt % self.b_bufs
            cute.arch.cp_async_wait_group(ahead - 1)
            self._dequant_tile(slot, buf, smem_addrs, b_local)
            cute.arch.fence_proxy(
                cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)
            cute.arch.sync_threads()
            # Slot (kt + ahead) % stages last held tile kt - 2, whose WGMMA every warpgroup
            # waited for before this barrier.
            if kt + ahead < self.k_tiles:
                self._load_tile(kt + ahead, (kt + ahead) % self.stages, *ld_args)
            cute.arch.cp_async_commit_group()
            cute.nvgpu.warpgroup.fence()
            for kb in cutlass.range_constexpr(num_k_blocks):
                a_frag = tCrA[(None, None, kb, slot)]
                if cutlass.const_expr(self.fuse_n):
                    cute.gemm(tiled_mma, acc0, a_frag, tCrB[(None, None, kb, buf)], acc0)
                else:
                    cute.gemm(tiled_mma, acc0, a_frag, tCrB[(None, None, kb, buf * 2)], acc0)
                    cute.gemm(tiled_mma, acc1, a_frag, tCrB[(None, None, kb, buf * 2 + 1)],
                              acc1)
            cute.nvgpu.warpgroup.commit_group()
            cute.nvgpu.warpgroup.wait_group(1)
        cute.nvgpu.warpgroup.wait_group(0)

        if cutlass.const_expr(self.fuse_n):
            self._epilogue_fused(acc0, alpha, thr_mma, tCcC, out, row_weight, m_tile, n_tile)
            return
        self._epilogue(acc0, acc1, alpha, thr_mma, tCcC, out, row_weight, m_tile, n_tile)

    def _thread_setup(self, tidx, loaders, m_tile, n_tile, a, row_index, tile_expert,
                      tensor_of_expert, local_of_expert, b_table):
        """Per-CTA expert lookup (tensor, local index -> weight / scale / alpha addresses) and
        per-thread copy plan for ``loaders`` loading threads (``tidx`` in [0, loaders)):
        the B rows it loads and dequantizes, its A chunks (gathered row, swizzled offset)."""
        expert = tile_expert[m_tile]
        t = tensor_of_expert[expert]
        local = Int64(local_of_expert[expert])
        w_base = b_table[0, t] + local * (self.n_weight * self.k // 2)
        sf_base = b_table[1, t] + local * (self.n_weight * self.k // 16)
        alpha_ptr = cute.make_ptr(Float32, b_table[2, t] + local * 4, cute.AddressSpace.gmem,
                                  assumed_align=4)
        alpha = cute.make_tensor(alpha_ptr, cute.make_layout(1))[0]

        row0 = n_tile * self.cta_row_step
        w_row, sf_row, b_local = [], [], []
        split = self.row_split
        for i in range(max(1, self.b_rows // loaders)):
            # split == 1: rows tidx, tidx + loaders, ...; else part q of row tidx // split.
            j, q = (tidx + i * loaders, 0) if split == 1 else (tidx // split, tidx % split)
            grow = row0 + (j // self.n_sub) * self.sub_stride + j % self.n_sub
            w_off = Int64(grow) * (self.k // 2)
            if split > 1:
                w_off = w_off + q * (32 // split)
            w_row.append(w_base + w_off)
            sf_row.append(sf_base + Int64(grow) * (self.k // 16))
            b_local.append((j, q))

        a_base = a.iterator.toint()
        a_src, a_dst = [], []
        for c in range(self.tile_m * (ROW_BYTES // 16) // loaders):
            q = tidx + c * loaders
            r = q // 8
            cc = q % 8
            src_row = m_tile * self.tile_m + r
            if self.gather:
                src_row = cutlass.max(row_index[src_row], Int32(0))
            a_src.append(a_base + Int64(src_row) * (self.k * 2) + cc * 16)
            a_dst.append(r * ROW_BYTES + ((cc ^ (r % 8)) * 16))
        return alpha, w_row, sf_row, b_local, a_src, a_dst

    def _epilogue(self, acc0, acc1, alpha, thr_mma, tCcC, out, row_weight, m_tile, n_tile):
        """FC1: h = silu(alpha*gate) * (alpha*up) -> bf16. FC2: y = (alpha*acc) * w_row -> fp32.
        ``out`` has a static row length, so column pairs store as one word."""
        if self.epilogue == "swiglu":
            for i in range(cute.size(acc0)):
                up = acc0[i] * alpha
                gate = acc1[i] * alpha
                sig = cute.arch.rcp_approx(1.0 + cute.math.exp(-gate, fastmath=True))
                acc0[i] = gate * sig * up
            g_out = cute.local_tile(out, (self.tile_m, self.n_sub), (m_tile, n_tile))
            t_out = thr_mma.partition_C(g_out)
            frag = cute.make_rmem_tensor(t_out.shape, out.element_type)
            frag.store(acc0.load().to(out.element_type))
            cute.autovec_copy(frag, t_out)
        else:
            m0 = m_tile * self.tile_m
            for i in range(cute.size(acc0)):
                rw = row_weight[m0 + tCcC[i][0]]
                acc0[i] = acc0[i] * alpha * rw
                acc1[i] = acc1[i] * alpha * rw
            for s, acc in enumerate((acc0, acc1)):
                g_out = cute.local_tile(out, (self.tile_m, self.n_sub), (m_tile, 2 * n_tile + s))
                t_out = thr_mma.partition_C(g_out)
                frag = cute.make_rmem_tensor(t_out.shape, out.element_type)
                frag.store(acc.load().to(out.element_type))
                cute.autovec_copy(frag, t_out)

    def _epilogue_fused(self, acc, alpha, thr_mma, tCcC, out, row_weight, m_tile, n_tile):
        """``_epilogue`` for one 64 x (2 n_sub) accumulator per warpgroup. Its fragment is
        ``((2, 2, N / 8), 1, 1)`` (column-pair, row-half, 8-column group): element i + size / 2
        is column + n_sub of element i, so FC1's up / gate pairs are (i, i + size / 2)."""
        if self.epilogue == "swiglu":
            half = cute.size(acc) // 2
            for i in range(half):
                up = acc[i] * alpha
                gate = acc[i + half] * alpha
                sig = cute.arch.rcp_approx(1.0 + cute.math.exp(-gate, fastmath=True))
                acc[i] = gate * sig * up
            g_out = cute.local_tile(out, (self.tile_m, self.n_sub), (m_tile, n_tile))
            # The same rows seen 2 n_sub wide, so the accumulator's partition applies; only
            # the first half (this CTA's n_sub columns) is written.
            wide = cute.make_tensor(g_out.iterator, cute.make_layout(
                (self.tile_m, self.mma_n), stride=(self.n_weight // 2, 1)))
            t_out = thr_mma.partition_C(wide)
            frag = cute.make_rmem_tensor(acc.shape, out.element_type)
            frag.store(acc.load().to(out.element_type))
            for i in range(half):
                t_out[i] = frag[i]
        else:
            m0 = m_tile * self.tile_m
            for i in range(cute.size(acc)):
                acc[i] = acc[i] * alpha * row_weight[m0 + tCcC[i][0]]
            g_out = cute.local_tile(out, (self.tile_m, self.mma_n), (m_tile, n_tile))
            t_out = thr_mma.partition_C(g_out)
            frag = cute.make_rmem_tensor(t_out.shape, out.element_type)
            frag.store(acc.load().to(out.element_type))
            cute.autovec_copy(frag, t_out)

    def _load_tile(self, kt, slot, smem_addrs, a_src, a_dst, w_row, sf_row, b_local):
        """Issue this thread's cp.async copies of K tile ``kt`` into raw slot ``slot``."""
        sa_addr, _, sw_addr, ssf_addr = smem_addrs
        a_slot = sa_addr + slot * (self.tile_m * ROW_BYTES)
        for c in range(len(a_src)):
            cp_async_16(a_slot + a_dst[c], a_src[c] + Int64(kt) * ROW_BYTES)
        split = self.row_split
        for i in range(len(b_local)):
            j, q = b_local[i]
            rw = slot * self.b_rows + j
            wsrc = w_row[i] + Int64(kt) * (TILE_K // 2)
            sfsrc = sf_row[i] + Int64(kt) * (TILE_K // 16)
            if split == 1:
                cp_async_16(sw_addr + rw * 32, wsrc)
                cp_async_16(sw_addr + rw * 32 + 16, wsrc + 16)
                cp_async_4(ssf_addr + rw * 4, sfsrc)
            else:  # this thread's part of the row, and its own copy of the row's scales
                dst = sw_addr + rw * 32 + q * (32 // split)
                if split == 2:
                    cp_async_16(dst, wsrc)
                else:
                    cp_async_8(dst, wsrc)
                cp_async_4(ssf_addr + (rw * split + q) * 4, sfsrc)

    def _dequant_tile(self, slot, buf, smem_addrs, b_local):
        """NVFP4 rows of raw slot ``slot`` (loaded by this thread) -> bf16 in sB buffer ``buf``,
        written at the 128 B-swizzled positions WGMMA reads (16 B chunk c of row j lands at
        chunk ``c ^ (j % 8)``; every sub-tile base is 1024 B aligned)."""
        _, sb_addr, sw_addr, ssf_addr = smem_addrs
        if self.row_split > 1:
            self._dequant_part(slot, buf, smem_addrs, b_local[0])
            return
        for i in range(len(b_local)):
            j, _ = b_local[i]
            rw = slot * self.b_rows + j
            w0, w1, w2, w3 = ld_shared_v4(sw_addr + rw * 32)
            w4, w5, w6, w7 = ld_shared_v4(sw_addr + rw * 32 + 16)
            s01, s23, s45, s67 = e4m3x4_to_bf16x2_splats(ld_shared_u32(ssf_addr + rw * 4))
            words = (w0, w1, w2, w3, w4, w5, w6, w7)
            scales = (s01, s23, s45, s67)
            dst_row = sb_addr + buf * (self.b_rows * ROW_BYTES) + j * ROW_BYTES
            for c in range(8):
                o0, o1, o2, o3 = e2m1x8_to_bf16x8_scaled(words[c], scales[c // 2])
                st_shared_v4(dst_row + ((c ^ (j % 8)) * 16), o0, o1, o2, o3)

    def _dequant_part(self, slot, buf, smem_addrs, row_part):
        """``_dequant_tile`` for a shared row: part q of row j is 16 B chunks
        ``[q * n, q * n + n)`` (n = 8 / row_split) from this thread's own copies."""
        _, sb_addr, sw_addr, ssf_addr = smem_addrs
        j, q = row_part
        split = self.row_split
        n = 8 // split
        rw = slot * self.b_rows + j
        src = sw_addr + rw * 32 + q * (32 // split)
        words = ld_shared_v4(src) if split == 2 else ld_shared_v2(src)
        # Chunk c uses scale byte c // 2; shift this part's first scale down to byte 0.
        sf_word = ld_shared_u32(ssf_addr + (rw * split + q) * 4) >> (q * (4 * n))
        scales = e4m3x4_to_bf16x2_splats(sf_word)
        dst_row = sb_addr + buf * (self.b_rows * ROW_BYTES) + j * ROW_BYTES
        for i in range(n):
            o0, o1, o2, o3 = e2m1x8_to_bf16x8_scaled(words[i], scales[i // 2])
            st_shared_v4(dst_row + (((q * n + i) ^ (j % 8)) * 16), o0, o1, o2, o3)
