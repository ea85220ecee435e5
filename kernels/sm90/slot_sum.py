"""Deterministic MoE finalize for one column chunk: ``out[t, c0 + c] = bf16(sum_j y[t k + j, c])``.

FC2 writes one router-weighted row per (token, slot) of a chunk of the hidden columns, indexed
by the flat slot ``t * k + j``, in fp32 (or bf16: ``y_bf16``, half the scratch bytes, each row
rounded once as TensorRT-LLM's finalize reads it); this kernel sums each token's k rows in slot
order in fp32 and rounds once to bf16 (the torch reference's order), with no atomics, so the
result is bitwise reproducible. Empty slots (expert id -1: an expert-parallel receiver's slot
whose expert lives elsewhere) have no row and add nothing. One CTA per (token, 512-column piece
of the chunk); each thread loads 16 B of every slot row (read-only path; 8 B of bf16 rows) and
stores 8 B of bf16. Offsets are 64-bit.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from .ptx import ld_global_i32, ld_global_nc_bf16x4_f32, ld_global_nc_v4_f32, st_global_bf16x4

THREADS = 128
COLS_PER_CTA = THREADS * 4


class SlotSum:
    """Compiled per (chunk row length ``y_cols``, ``top_k``, output row length ``hidden``,
    scratch dtype); tokens, the chunk's first output column and its width are dynamic."""

    def __init__(self, y_cols: int, top_k: int, hidden: int, y_bf16: bool = False):
        if y_cols % 4 or hidden % 4:
            raise ValueError(f"slot sum: y_cols {y_cols} and hidden {hidden} must be multiples of 4")
        self.y_cols = y_cols
        self.top_k = top_k
        self.hidden = hidden
        self.y_bf16 = y_bf16

    @cute.jit
    def __call__(self, y_ptr: cute.Pointer, ids_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 tokens: Int32, col0: Int32, cols: Int32, stream):
        """``y [tokens * top_k, y_cols]`` fp32 (bf16 with ``y_bf16``), ``ids [tokens, top_k]``
        int32 (the routing; -1 = empty slot), ``out [tokens, hidden]`` bf16; writes columns ``[col0, col0 + cols)``
        of ``out`` (``cols`` <= ``y_cols``, a multiple of 4)."""
        y = cute.make_tensor(y_ptr, cute.make_layout(1))
        ids = cute.make_tensor(ids_ptr, cute.make_layout(1))
        out = cute.make_tensor(out_ptr, cute.make_layout(1))
        pieces = (self.y_cols + COLS_PER_CTA - 1) // COLS_PER_CTA
        self.kernel(y, ids, out, col0, cols).launch(grid=[tokens, pieces, 1],
                                                    block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, y: cute.Tensor, ids: cute.Tensor, out: cute.Tensor, col0: Int32,
               cols: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        tok, piece, _ = cute.arch.block_idx()
        col = piece * COLS_PER_CTA + tidx * 4
        if col < cols:
            row0 = Int64(tok) * self.top_k
            acc = [Float32(0.0)] * 4
            for j in cutlass.range_constexpr(self.top_k):
                acc = self._add_slot(acc, y, ids, row0 + j, col)
            dst = out.iterator.toint() + (Int64(tok) * self.hidden + col0 + col) * 2
            st_global_bf16x4(dst, acc[0], acc[1], acc[2], acc[3])

    @cute.jit
    def _add_slot(self, acc, y, ids, slot, col):
        """``acc + y[slot, col:col+4]`` unless the slot is empty (0 + v = v: a token's first
        real slot starts the sum exactly)."""
        a0, a1, a2, a3 = acc
        if ld_global_i32(ids.iterator.toint() + slot * 4) >= 0:
            at = y.iterator.toint() + (slot * self.y_cols + col) * (2 if self.y_bf16 else 4)
            if cutlass.const_expr(self.y_bf16):
                v0, v1, v2, v3 = ld_global_nc_bf16x4_f32(at)
            else:
                v0, v1, v2, v3 = ld_global_nc_v4_f32(at)
            a0 = a0 + v0
            a1 = a1 + v1
            a2 = a2 + v2
            a3 = a3 + v3
        return [a0, a1, a2, a3]
