"""NVFP4 -> bf16 in registers: eight e2m1 weights times their e4m3 block scale, exactly.

Hopper has no FP4 MMA, so the kernels turn each weight tile into bf16 before WGMMA. An e2m1
value (sign, 2 exponent bits, 1 mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6) times an e4m3 scale
has at most 6 significant bits and stays inside bf16's range, so the product is exact in bf16.

Per 32-bit word of packed weights (element 2i in the low nibble of byte i):
  1. magnitudes ``w & 0x77777777`` index two 8-entry byte tables with ``prmt`` (high and low
     byte of the bf16 encoding of each magnitude), four elements per ``prmt``;
  2. two more ``prmt`` per output word interleave low/high bytes into bf16x2 words;
  3. each element's sign bit (nibble bit 3) moves to bit 15 / 31 with one ``prmt`` + mask;
  4. ``mul.rn.bf16x2`` by the block scale (both halves) gives the exact weights.
``emulate_e2m1x8_bf16`` runs the same steps on the CPU (numpy) so tests can check every code
against ``quant.nvfp4`` without a GPU.
"""
from __future__ import annotations

import numpy as np
from cutlass import Int32
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op

from .ptx import asm

# bf16 bytes of the e2m1 magnitudes 0, 0.5, 1, 1.5 (table word A) and 2, 3, 4, 6 (word B).
LUT_LO = (0xC0800000, 0xC0804000)
LUT_HI = (0x3F3F3F00, 0x40404040)
INTERLEAVE = (0x5140, 0x7362)  # (lo.b0, hi.b0, lo.b1, hi.b1) and (lo.b2, hi.b2, lo.b3, hi.b3)
SIGN_SELECT = (0x4000, 0x5010, 0x6020, 0x7030)  # byte 1 <- (w << 4).b_i, byte 3 <- w.b_i

_E2M1X8_PTX = (
    "{\n\t"
    ".reg .b32 mag, magh, lo0, hi0, lo1, hi1, sx, sg, o0, o1, o2, o3, la, lb, ha, hb;\n\t"
    f"mov.b32 la, {LUT_LO[0]:#x};\n\tmov.b32 lb, {LUT_LO[1]:#x};\n\t"
    f"mov.b32 ha, {LUT_HI[0]:#x};\n\tmov.b32 hb, {LUT_HI[1]:#x};\n\t"
    "and.b32 mag, $4, 0x77777777;\n\t"
    "shr.b32 magh, mag, 16;\n\t"
    "prmt.b32 lo0, la, lb, mag;\n\tprmt.b32 hi0, ha, hb, mag;\n\t"
    "prmt.b32 lo1, la, lb, magh;\n\tprmt.b32 hi1, ha, hb, magh;\n\t"
    f"prmt.b32 o0, lo0, hi0, {INTERLEAVE[0]:#x};\n\tprmt.b32 o1, lo0, hi0, {INTERLEAVE[1]:#x};\n\t"
    f"prmt.b32 o2, lo1, hi1, {INTERLEAVE[0]:#x};\n\tprmt.b32 o3, lo1, hi1, {INTERLEAVE[1]:#x};\n\t"
    "shl.b32 sx, $4, 4;\n\t"
    + "".join(
        f"prmt.b32 sg, sx, $4, {sel:#x};\n\tand.b32 sg, sg, 0x80008000;\n\tor.b32 o{i}, o{i}, sg;\n\t"
        for i, sel in enumerate(SIGN_SELECT))
    + "mul.rn.bf16x2 $0, o0, $5;\n\tmul.rn.bf16x2 $1, o1, $5;\n\t"
    "mul.rn.bf16x2 $2, o2, $5;\n\tmul.rn.bf16x2 $3, o3, $5;\n\t"
    "}"
)

_E4M3X4_PTX = (
    "{\n\t"
    ".reg .b16 lo, hi;\n\t.reg .b32 h01, h23;\n\t.reg .f16 a0, a1, a2, a3;\n\t"
    ".reg .f32 f0, f1, f2, f3;\n\t"
    "mov.b32 {lo, hi}, $4;\n\t"
    "cvt.rn.f16x2.e4m3x2 h01, lo;\n\tcvt.rn.f16x2.e4m3x2 h23, hi;\n\t"
    "mov.b32 {a0, a1}, h01;\n\tmov.b32 {a2, a3}, h23;\n\t"
    "cvt.f32.f16 f0, a0;\n\tcvt.f32.f16 f1, a1;\n\tcvt.f32.f16 f2, a2;\n\tcvt.f32.f16 f3, a3;\n\t"
    "cvt.rn.bf16x2.f32 $0, f0, f0;\n\tcvt.rn.bf16x2.f32 $1, f1, f1;\n\t"
    "cvt.rn.bf16x2.f32 $2, f2, f2;\n\tcvt.rn.bf16x2.f32 $3, f3, f3;\n\t"
    "}"
)


def _four(res, loc, ip):
    return tuple(Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


def _i32x4():
    return llvm.StructType.get_literal([T.i32(), T.i32(), T.i32(), T.i32()])


@dsl_user_op
def e4m3x4_to_bf16x2_splats(word: Int32, *, loc=None, ip=None):
    """Four e4m3 block scales (bytes 0..3 of ``word``) -> four bf16x2 words, each holding its
    scale in both halves. e4m3 -> f16 (cvt, sm_89+) and f16 -> f32 -> bf16 are exact: every
    e4m3 value (3 mantissa bits, 2^-9 .. 448) is a bf16 value."""
    res = asm(_i32x4(), [Int32(word).ir_value(loc=loc, ip=ip)], _E4M3X4_PTX,
              "=r,=r,=r,=r,r", side_effects=False)
    return _four(res, loc, ip)


@dsl_user_op
def e2m1x8_to_bf16x8_scaled(packed: Int32, scale_bf16x2: Int32, *, loc=None, ip=None):
    """Eight packed e2m1 weights times one bf16 scale -> four bf16x2 words in element order
    (element 2i in the low half of word i). See the module docstring for the steps."""
    res = asm(_i32x4(),
              [Int32(packed).ir_value(loc=loc, ip=ip), Int32(scale_bf16x2).ir_value(loc=loc, ip=ip)],
              _E2M1X8_PTX, "=r,=r,=r,=r,r,r", side_effects=False)
    return _four(res, loc, ip)


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PTX ``prmt.b32`` (default mode) on uint32 arrays."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for i in range(4):
        sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
        byte = (src >> ((sel & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)
        byte = np.where(sel & np.uint32(8), np.where(byte & np.uint64(0x80), 0xFF, 0), byte)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def emulate_e2m1x8_bf16(words: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """CPU model of ``e2m1x8_to_bf16x8_scaled``: uint32 ``words [n]``, float32 ``scale [n]``
    (e4m3 values) -> float32 ``[n, 8]`` (exact bf16 values), element order as in the kernel."""
    w = words.astype(np.uint32)
    u = np.uint32
    mag = w & u(0x77777777)
    magh = mag >> u(16)
    la, lb, ha, hb = (np.full_like(w, v) for v in (*LUT_LO, *LUT_HI))
    lo0, hi0, lo1, hi1 = _prmt(la, lb, mag), _prmt(ha, hb, mag), _prmt(la, lb, magh), _prmt(ha, hb, magh)
    outs = [_prmt(lo0, hi0, u(INTERLEAVE[0])), _prmt(lo0, hi0, u(INTERLEAVE[1])),
            _prmt(lo1, hi1, u(INTERLEAVE[0])), _prmt(lo1, hi1, u(INTERLEAVE[1]))]
    sx = (w << u(4)) & u(0xFFFFFFFF)
    for i, sel in enumerate(SIGN_SELECT):
        outs[i] = outs[i] | (_prmt(sx, w, u(sel)) & u(0x80008000))
    halves = np.stack([np.stack([o & u(0xFFFF), o >> u(16)], axis=-1) for o in outs], axis=1)
    values = (halves.reshape(len(w), 8).astype(np.uint32) << u(16)).view(np.float32)
    return values * scale.astype(np.float32)[:, None]
