"""Fused FP8 activation quantization per token per 128 channels (sm_90a), bit for bit the recipe
of ``quant.fp8.quantize_act_per_token`` as torch runs it on a CUDA device.

``x`` bf16 ``[T, K]`` (K a multiple of 128, rows contiguous and 16-byte aligned, any row stride)
-> ``q`` float8_e4m3fn ``[T, K]`` (contiguous) and ``scale`` float32 ``[T, K/128]`` stored
row-major (``"row"``: what the MoE kernels read) or K/128-major (``"col"``: the
``scale.t().contiguous().t()`` layout ``torch._scaled_mm`` takes as a blockwise 1x128 scale_a),
written directly in either layout. One pass over HBM: 2 bytes read and ~1 byte written per
element.

Work split: a work item is one (token, 128-channel group); a quarter warp (8 lanes) owns one
item at a time, each lane 16 consecutive channels: two 16 B read-only loads of bf16, one 16 B
store of e4m3. A CTA (256 threads, 32 quarter warps) takes 64 consecutive items per step, each
quarter warp two of them 32 apart with the loads of both issued before either is reduced
(64 B in flight per lane), and ``iters`` steps of consecutive items. Items are numbered
``t * G + g`` for ``"row"`` and ``g * T + t`` for ``"col"``, so the item number is also the
scale's offset in either layout and the 4 quarter warps of a warp store 4 adjacent scales.
The host picks ``iters`` (1 to 4) so the grid stays at least 4 waves of CTAs deep (T = 1 runs
one CTA per 64 groups; large T folds steps to cut CTA launches).

Numerics (each step inline PTX, so no compiler flag can contract, approximate or flush it):

- ``amax``: max of ``|x|`` over the group; bf16 magnitudes are compared as bf16 pairs
  (``max.NaN.bf16x2``, exact: the values are the same in fp32), then across the 8 lanes with
  butterfly shuffles (``max.NaN.f32``);
- ``a = max(amax, ACT_AMAX_FLOOR)`` with the floor rounded to fp32, as torch's clamp;
- ``r = rn(rn(1 / a) * 448)``: ``rcp.rn.f32`` then ``mul.rn.f32``. The reference writes
  ``448 / amax``, which torch evaluates as ``amax.reciprocal() * 448`` (``Tensor.__rtruediv__``),
  not as one division;
- ``q = e4m3(rn(x * r))``: ``mul.rn.f32`` then ``cvt.rn.satfinite.e4m3x2.f32`` (round to nearest
  even; saturating at +-448 as the reference's clamp then cast does);
- ``scale = rn(a * rn(1 / 448))``: torch's CUDA division by a Python scalar multiplies by the
  scalar's fp32 reciprocal (``div_true_kernel_cuda``); on the CPU torch divides, so the
  reference's scales differ by the device it runs on, and this kernel matches the CUDA one.

No subnormal is flushed (no ``.ftz``): ``r`` is subnormal when amax is near the bf16 maximum.
Inputs are not checked for inf / NaN (that check would sync the host); they propagate instead:
a NaN in a group gives that group a NaN scale (``max.NaN``), an inf gives an inf scale.
No allocation beyond the outputs, no host sync: launches are CUDA-graph capturable.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from .fp8_quant import GROUP, ITEMS_PER_STEP, LANES_PER_ITEM, SLOTS_PER_CTA, THREADS
from .ptx import asm, st_global_f32

CHANNELS_PER_LANE = GROUP // LANES_PER_ITEM  # 16 bf16 = two 16 B loads, one 16 B store

# fp32 bit patterns as PTX immediates: the floor 1e-4 rounded to fp32, 448, and rn(1 / 448)
# computed in fp32 (what torch's CUDA division by the scalar 448 multiplies by).
_FLOOR = "0f38D1B717"
_E4M3_MAX = "0f43E00000"
_INV_E4M3_MAX = "0f3B124925"


@dsl_user_op
def ld_global_nc_v4_b32(gmem_addr: Int64, *, loc=None, ip=None):
    """Read-only 16-byte global load of four 32-bit words."""
    res = asm(
        llvm.StructType.get_literal([T.i32(), T.i32(), T.i32(), T.i32()]),
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
        "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];",
        "=r,=r,=r,=r,l",
    )
    return tuple(Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def st_global_v4_b32(gmem_addr: Int64, w0, w1, w2, w3, *, loc=None, ip=None) -> None:
    """16-byte global store of four 32-bit words."""
    asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)]
        + [Int32(w).ir_value(loc=loc, ip=ip) for w in (w0, w1, w2, w3)],
        "st.global.v4.b32 [$0], {$1, $2, $3, $4};",
        "l,r,r,r,r",
    )


@dsl_user_op
def bf16x16_absmax(words, *, loc=None, ip=None) -> Float32:
    """``max |v|`` of the 16 bf16 values packed in 8 words, as fp32 (exact). Sign bits are
    cleared by a mask; ``max.NaN`` keeps a NaN (an inf stays inf)."""
    if len(words) != 8:
        raise ValueError(f"bf16x16_absmax takes 8 words, got {len(words)}")
    return Float32(asm(
        T.f32(),
        [Int32(w).ir_value(loc=loc, ip=ip) for w in words],
        "{\n\t.reg .b32 a<8>, lo, hi;\n\t.reg .f32 flo, fhi;\n\t"
        + "".join(f"and.b32 a{i}, ${i + 1}, 0x7FFF7FFF;\n\t" for i in range(8))
        + "max.NaN.bf16x2 a0, a0, a1;\n\tmax.NaN.bf16x2 a2, a2, a3;\n\t"
        "max.NaN.bf16x2 a4, a4, a5;\n\tmax.NaN.bf16x2 a6, a6, a7;\n\t"
        "max.NaN.bf16x2 a0, a0, a2;\n\tmax.NaN.bf16x2 a4, a4, a6;\n\t"
        "max.NaN.bf16x2 a0, a0, a4;\n\t"
        "shl.b32 lo, a0, 16;\n\tand.b32 hi, a0, 0xFFFF0000;\n\t"
        "mov.b32 flo, lo;\n\tmov.b32 fhi, hi;\n\t"
        "max.NaN.f32 $0, flo, fhi;\n\t}",
        "=f," + ",".join(["r"] * 8),
        side_effects=False,
    ))


@dsl_user_op
def fmax_nan(a, b, *, loc=None, ip=None) -> Float32:
    """``max(a, b)`` in fp32, NaN if either is NaN."""
    return Float32(asm(
        T.f32(),
        [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
        "max.NaN.f32 $0, $1, $2;",
        "=f,f,f",
        side_effects=False,
    ))


@dsl_user_op
def act_group_scales(amax, *, loc=None, ip=None):
    """``(r, scale)`` of a group from its ``amax``: ``a = max(amax, floor)``,
    ``r = rn(rcp.rn(a) * 448)``, ``scale = rn(a * rn(1/448))`` (module docstring)."""
    res = asm(
        llvm.StructType.get_literal([T.f32(), T.f32()]),
        [Float32(amax).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .f32 a, inv;\n\t"
        f"max.NaN.f32 a, $2, {_FLOOR};\n\t"
        "rcp.rn.f32 inv, a;\n\t"
        f"mul.rn.f32 $0, inv, {_E4M3_MAX};\n\t"
        f"mul.rn.f32 $1, a, {_INV_E4M3_MAX};\n\t}}",
        "=f,=f,f",
        side_effects=False,
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2))


@dsl_user_op
def bf16x4_to_e4m3x4(r, w0, w1, *, loc=None, ip=None) -> Int32:
    """Four bf16 (two words, first value in the low half) times ``r``, rounded once to fp32
    (``mul.rn``), then to e4m3 (nearest even, saturating): one word, first value in byte 0."""
    return Int32(asm(
        T.i32(),
        [Float32(r).ir_value(loc=loc, ip=ip), Int32(w0).ir_value(loc=loc, ip=ip),
         Int32(w1).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 t<4>;\n\t.reg .f32 f<4>;\n\t.reg .b16 lo, hi;\n\t"
        "shl.b32 t0, $2, 16;\n\tand.b32 t1, $2, 0xFFFF0000;\n\t"
        "shl.b32 t2, $3, 16;\n\tand.b32 t3, $3, 0xFFFF0000;\n\t"
        + "".join(f"mov.b32 f{i}, t{i};\n\tmul.rn.f32 f{i}, f{i}, $1;\n\t" for i in range(4))
        + "cvt.rn.satfinite.e4m3x2.f32 lo, f1, f0;\n\t"
        "cvt.rn.satfinite.e4m3x2.f32 hi, f3, f2;\n\t"
        "mov.b32 $0, {lo, hi};\n\t}",
        "=r,f,r,r",
        side_effects=False,
    ))


class Fp8ActQuant:
    """Compiled per scale layout (``"row"`` or ``"col"``); tokens, groups, the input's row
    stride and the launch geometry are dynamic."""

    def __init__(self, scale_layout: str):
        if scale_layout not in ("row", "col"):
            raise ValueError(f"scale_layout must be 'row' or 'col', got {scale_layout!r}")
        self.scale_layout = scale_layout

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, q_ptr: cute.Pointer, s_ptr: cute.Pointer,
                 tokens: Int32, groups: Int32, x_row_stride: Int32, iters: Int32, ctas: Int32,
                 stream):
        """``x [tokens, groups * 128]`` bf16 with row stride ``x_row_stride`` elements,
        ``q [tokens, groups * 128]`` e4m3 contiguous, ``scale`` fp32 (layout as configured);
        ``ctas * iters * 64 >= tokens * groups``."""
        x = cute.make_tensor(x_ptr, cute.make_layout(1))
        q = cute.make_tensor(q_ptr, cute.make_layout(1))
        s = cute.make_tensor(s_ptr, cute.make_layout(1))
        self.kernel(x, q, s, tokens, groups, x_row_stride, iters).launch(
            grid=[ctas, 1, 1], block=[THREADS, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, x: cute.Tensor, q: cute.Tensor, s: cute.Tensor, tokens: Int32,
               groups: Int32, x_row_stride: Int32, iters: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % LANES_PER_ITEM
        total = tokens * groups
        for step in cutlass.range(iters, unroll=1):
            first = (bidx * iters + step) * ITEMS_PER_STEP + tidx // LANES_PER_ITEM
            # Both items' loads are issued before either is reduced: 64 B in flight per lane.
            tok0, col0, w0 = self._load(x, first, total, tokens, groups, x_row_stride, lane)
            tok1, col1, w1 = self._load(x, first + SLOTS_PER_CTA, total, tokens, groups,
                                        x_row_stride, lane)
            self._quantize_store(q, s, first, total, groups, tok0, col0, w0, lane)
            self._quantize_store(q, s, first + SLOTS_PER_CTA, total, groups, tok1, col1, w1,
                                 lane)

    @cute.jit
    def _load(self, x, item, total, tokens, groups, x_row_stride, lane):
        """``(token, first channel, 8 words)``: this lane's 16 bf16 of ``item``. Lanes past the
        end load the last item (every lane takes part in the shuffles; they store nothing)."""
        src_item = cutlass.min(item, total - 1)
        if cutlass.const_expr(self.scale_layout == "row"):
            tok = src_item // groups
            grp = src_item - tok * groups
        else:
            grp = src_item // tokens
            tok = src_item - grp * tokens
        col = grp * GROUP + lane * CHANNELS_PER_LANE
        src = x.iterator.toint() + (Int64(tok) * x_row_stride + col) * 2
        a0, a1, a2, a3 = ld_global_nc_v4_b32(src)
        b0, b1, b2, b3 = ld_global_nc_v4_b32(src + 16)
        return tok, col, (a0, a1, a2, a3, b0, b1, b2, b3)

    @cute.jit
    def _quantize_store(self, q, s, item, total, groups, tok, col, words, lane):
        """Group amax across the quarter warp, the group's ``r`` and scale, 16 e4m3 codes
        stored by each lane, the scale by the item's first lane (at offset ``item``)."""
        amax = bf16x16_absmax(words)
        for width in cutlass.range_constexpr(3):
            amax = fmax_nan(amax, cute.arch.shuffle_sync_bfly(amax, offset=4 >> width))
        r, scale = act_group_scales(amax)
        e0 = bf16x4_to_e4m3x4(r, words[0], words[1])
        e1 = bf16x4_to_e4m3x4(r, words[2], words[3])
        e2 = bf16x4_to_e4m3x4(r, words[4], words[5])
        e3 = bf16x4_to_e4m3x4(r, words[6], words[7])
        if item < total:
            dst = q.iterator.toint() + Int64(tok) * (groups * GROUP) + col
            st_global_v4_b32(dst, e0, e1, e2, e3)
            if lane == 0:
                st_global_f32(s.iterator.toint() + Int64(item) * 4, scale)
