"""Deterministic MoE finalize: ``out[t] = bf16(sum_{j=0..k-1} y[inverse[t, j]])``.

FC2 writes one router-weighted fp32 row per (token, slot); this kernel sums each token's k
rows in slot order in fp32 and rounds once to bf16 (the torch reference's order), with no
atomics, so the result is bitwise reproducible. One CTA per (token, 512-column chunk); each
thread loads 16 B of every slot row (read-only path) and stores 8 B of bf16.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from .ptx import ld_global_nc_v4_f32, st_global_bf16x4

THREADS = 128
COLS_PER_CTA = THREADS * 4


class SlotSum:
    """Compiled per (hidden, top_k); tokens and permuted rows are dynamic."""

    def __init__(self, hidden: int, top_k: int):
        if hidden % 4:
            raise ValueError(f"slot sum: hidden {hidden} must be a multiple of 4")
        self.hidden = hidden
        self.top_k = top_k

    @cute.jit
    def __call__(self, y_ptr: cute.Pointer, inverse_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 tokens: Int32, stream):
        """``y [*, hidden]`` fp32, ``inverse [tokens, top_k]`` int32, ``out [tokens, hidden]``."""
        inverse = cute.make_tensor(inverse_ptr, cute.make_layout(
            (tokens, self.top_k), stride=(self.top_k, 1)))
        y = cute.make_tensor(y_ptr, cute.make_layout(self.hidden))
        out = cute.make_tensor(out_ptr, cute.make_layout(self.hidden))
        chunks = (self.hidden + COLS_PER_CTA - 1) // COLS_PER_CTA
        self.kernel(y, inverse, out).launch(grid=[tokens, chunks, 1], block=[THREADS, 1, 1],
                                            stream=stream)

    @cute.kernel
    def kernel(self, y: cute.Tensor, inverse: cute.Tensor, out: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        tok, chunk, _ = cute.arch.block_idx()
        col = chunk * COLS_PER_CTA + tidx * 4
        if col < self.hidden:
            y_base = y.iterator.toint()
            acc = [Float32(0.0)] * 4
            for j in cutlass.range_constexpr(self.top_k):
                row = Int64(inverse[tok, j])
                v = ld_global_nc_v4_f32(y_base + (row * self.hidden + col) * 4)
                if cutlass.const_expr(j == 0):
                    acc = list(v)
                else:
                    acc = [a + b for a, b in zip(acc, v)]
            dst = out.iterator.toint() + (Int64(tok) * self.hidden + col) * 2
            st_global_bf16x4(dst, acc[0], acc[1], acc[2], acc[3])
