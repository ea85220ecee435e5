"""Warp-specialized variant of the grouped W4A16 GEMM (same contract and epilogues).

Warp roles (``tile_m // 64`` consumer warpgroups after P producer warpgroups; P = 2 when
there is one consumer, so the dequant has 8 warps, else P = 1):
  producer WGs (few registers): cp.async of A rows (gathered) and packed NVFP4 rows + scales
      into a 4-slot load ring, then dequantize each tile into a 2-buffer bf16 ring and publish;
  consumer WG c: WGMMA on rows ``[64c, 64c+64)`` of the tile, then the epilogue.

Pipelines (mbarriers in shared memory):
  full[b]   producer -> consumers: tile t's A slot (t % 4) has landed and its B is dequantized
            into buffer b = t % 2 (one arrival per producer thread, proxy fence before);
  mma_done[b] consumers -> producer: WGMMA of tile t finished reading A slot t % 4 and
            B buffer t % 2 (every consumer thread arrives after ``wait_group``).
Steady state:
  producer, tile i: wait mma_done(i-2) | cp.async tile i+2 into slot (i+2) % 4 | wait own
      cp.async of tile i | dequant into buffer i % 2 | fence | arrive full(i % 2)
  consumer, tile t: wait full(t % 2) | issue WGMMA(t) | wait WGMMA(t-1) | arrive mma_done(t-1)
so dequant of tile t+1 and loads of t+2, t+3 overlap WGMMA(t).
"""

import cutlass
import cutlass.cute as cute
import cutlass.utils as utils
from cutlass import BFloat16, Float32, Int64, Uint32

from .w4a16_grouped_gemm import W4A16GroupedGemm

LOAD_SLOTS = 4
B_BUFS = 2


class W4A16GroupedGemmWS(W4A16GroupedGemm):
    """Same arguments as :class:`W4A16GroupedGemm`; extra (producer) warpgroups."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.fuse_n:
            raise ValueError("the warp-specialized schedule has no fuse_n variant")
        if self.tile_m == 256:
            raise ValueError("the warp-specialized schedule supports tile_m 64 or 128, got 256")
        self.stages = LOAD_SLOTS
        self.b_bufs = B_BUFS
        self.num_cwg = self.mma_wgs
        # One consumer WG leaves the SM with few warps to dequantize: give it two producers.
        self.producer_threads = 128 * (2 if self.num_cwg == 1 else 1)
        self.threads = self.producer_threads + 128 * self.num_cwg
        # setmaxnreg: the CTA keeps the registers it launched with (168 x 384 = 64512 for two
        # consumer WGs), so producer + consumers must fit in that pool or the consumers' alloc
        # spins forever: 96 x 128 + 200 x 256 = 63488.
        # One consumer: 112 x 256 + 232 x 128 = 58368 of 168 x 384.
        self.producer_regs = 96 if self.num_cwg == 2 else 112
        self.consumer_regs = 200 if self.num_cwg == 2 else 232
        self.row_split = self._row_split(self.producer_threads)

    def _shared_storage(self, a_layout, b_layout):
        """The base class's buffers plus the full / mma_done mbarrier rings."""

        @cute.struct
        class SharedStorage:
            full: cute.struct.MemRange[cutlass.Int64, B_BUFS]
            mma_done: cute.struct.MemRange[cutlass.Int64, B_BUFS]
            sA: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(a_layout)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[BFloat16, cute.cosize(b_layout)], 1024]
            sW: cute.struct.Align[cute.struct.MemRange[Uint32, LOAD_SLOTS * self.b_rows * 8], 128]
            sSF: cute.struct.Align[
                cute.struct.MemRange[Uint32, LOAD_SLOTS * self.b_rows * self.row_split], 128]

        return SharedStorage

    @cute.kernel
    def kernel(self, a: cute.Tensor, row_index: cute.Tensor, tile_expert: cute.Tensor,
               tensor_of_expert: cute.Tensor, local_of_expert: cute.Tensor,
               b_table: cute.Tensor, row_weight: cute.Tensor, out: cute.Tensor,
               tiled_mma: cute.TiledMma, a_layout: cute.ComposedLayout,
               b_layout: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        m_tile, n_tile, _ = cute.arch.block_idx()
        wg = cute.arch.make_warp_uniform(tidx // 128)
        smem = utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)
        full = storage.full.data_ptr()
        mma_done = storage.mma_done.data_ptr()
        if tidx == 0:
            for b in cutlass.range_constexpr(B_BUFS):
                cute.arch.mbarrier_init(full + b, self.producer_threads)
                cute.arch.mbarrier_init(mma_done + b, 128 * self.num_cwg)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_threads()
        sA = storage.sA.get_tensor(a_layout.outer, swizzle=a_layout.inner)
        sB = storage.sB.get_tensor(b_layout.outer, swizzle=b_layout.inner)
        smem_addrs = (storage.sA.data_ptr().toint(), storage.sB.data_ptr().toint(),
                      storage.sW.data_ptr().toint(), storage.sSF.data_ptr().toint())

        if wg < self.producer_threads // 128:
            cute.arch.warpgroup_reg_dealloc(self.producer_regs)
            alpha, w_row, sf_row, b_local, a_src, a_dst = self._thread_setup(
                tidx, self.producer_threads, m_tile, n_tile, a, row_index, tile_expert,
                tensor_of_expert, local_of_expert, b_table)
            ld_args = (smem_addrs, a_src, a_dst, w_row, sf_row, b_local)
            self._load_tile(0, 0, *ld_args)
            cute.arch.cp_async_commit_group()
            if cutlass.const_expr(self.k_tiles > 1):
                self._load_tile(1, 1, *ld_args)
            cute.arch.cp_async_commit_group()
            for i in cutlass.range(self.k_tiles, unroll=1):
                if i >= B_BUFS:
                    done = i - B_BUFS
                    cute.arch.mbarrier_wait(mma_done + done % B_BUFS, (done // B_BUFS) % 2)
                if i + 2 < self.k_tiles:
                    self._load_tile(i + 2, (i + 2) % LOAD_SLOTS, *ld_args)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(2)
                self._dequant_tile(i % LOAD_SLOTS, i % B_BUFS, smem_addrs, b_local)
                cute.arch.fence_proxy(
                    cute.arch.ProxyKind.async_shared, space=cute.arch.SharedSpace.shared_cta)
                cute.arch.mbarrier_arrive(full + i % B_BUFS)
        else:
            cute.arch.warpgroup_reg_alloc(self.consumer_regs)
            thr_mma = tiled_mma.get_slice(tidx - self.producer_threads)
            tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
            tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
            tCcC = thr_mma.partition_C(cute.make_identity_tensor((self.tile_m, self.n_sub)))
            acc0 = cute.make_rmem_tensor(tCcC.shape, Float32)
            acc1 = cute.make_rmem_tensor(tCcC.shape, Float32)
            acc0.fill(0.0)
            acc1.fill(0.0)
            tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)
            num_k_blocks = cute.size(tCrA, mode=[2])
            for t in cutlass.range(self.k_tiles, unroll=1):
                buf = t % B_BUFS
                slot = t % LOAD_SLOTS
                cute.arch.mbarrier_wait(full + buf, (t // B_BUFS) % 2)
                cute.nvgpu.warpgroup.fence()
                for kb in cutlass.range_constexpr(num_k_blocks):
                    a_frag = tCrA[(None, None, kb, slot)]
                    cute.gemm(tiled_mma, acc0, a_frag, tCrB[(None, None, kb, buf * 2)], acc0)
                    cute.gemm(tiled_mma, acc1, a_frag, tCrB[(None, None, kb, buf * 2 + 1)], acc1)
                cute.nvgpu.warpgroup.commit_group()
                cute.nvgpu.warpgroup.wait_group(1)
                if t >= 1:
                    cute.arch.mbarrier_arrive(mma_done + (t - 1) % B_BUFS)
            cute.nvgpu.warpgroup.wait_group(0)
            expert = tile_expert[m_tile]
            tsel = tensor_of_expert[expert]
            local = Int64(local_of_expert[expert])
            alpha_ptr = cute.make_ptr(Float32, b_table[2, tsel] + local * 4,
                                      cute.AddressSpace.gmem, assumed_align=4)
            alpha = cute.make_tensor(alpha_ptr, cute.make_layout(1))[0]
            self._epilogue(acc0, acc1, alpha, thr_mma, tCcC, out, row_weight, m_tile, n_tile)
