"""Inline-PTX building blocks for the sm_90 W4A16 kernels.

Each helper wraps one or a few PTX instructions that the CuTe DSL (4.3.5) does not expose
in the form these kernels need: 16 / 8 / 4-byte ``cp.async`` and ``cp.async.bulk`` to a raw
shared-memory address
(token rows are gathered by index, so no tiled copy fits), vector shared-memory loads and
stores at computed addresses, and scalar / vector global loads and stores at 64-bit
addresses. The NVFP4 conversion lives in ``nvfp4_dequant``.

Addresses: shared memory as 32-bit ``.shared`` addresses (Int32), global memory as 64-bit
generic addresses (Int64): every global offset is computed in 64 bits, so no tensor size limits
an index to 2^31 elements.
"""
from __future__ import annotations

from cutlass import Float32, Int32, Int64
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import T, dsl_user_op


def asm(ret, args, text: str, constraints: str, side_effects: bool = True):
    """``llvm.inline_asm`` in AT&T dialect; pure conversions pass ``side_effects=False`` so the
    compiler may schedule them freely (memory instructions keep the default)."""
    return llvm.inline_asm(
        ret, args, text, constraints, has_side_effects=side_effects, is_align_stack=False,
        asm_dialect=llvm.AsmDialect.AD_ATT,
    )


def _cp_async(smem_addr: Int32, gmem_addr: Int64, size: int, loc, ip) -> None:
    """``size``-byte ``cp.async`` from global to shared memory: ``.cg`` (bypasses L1) for 16
    bytes, ``.ca`` for 8 and 4 (``.cg`` takes only 16)."""
    asm(
        None,
        [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
        f"cp.async.{'cg' if size == 16 else 'ca'}.shared.global [$0], [$1], {size};",
        "r,l",
    )


@dsl_user_op
def cp_async_16(smem_addr: Int32, gmem_addr: Int64, *, loc=None, ip=None) -> None:
    """16-byte ``cp.async.cg`` (bypasses L1) from global to shared memory."""
    _cp_async(smem_addr, gmem_addr, 16, loc, ip)


@dsl_user_op
def cp_async_8(smem_addr: Int32, gmem_addr: Int64, *, loc=None, ip=None) -> None:
    """8-byte ``cp.async.ca`` from global to shared memory."""
    _cp_async(smem_addr, gmem_addr, 8, loc, ip)


@dsl_user_op
def cp_async_4(smem_addr: Int32, gmem_addr: Int64, *, loc=None, ip=None) -> None:
    """4-byte ``cp.async.ca`` from global to shared memory."""
    _cp_async(smem_addr, gmem_addr, 4, loc, ip)


@dsl_user_op
def cp_async_bulk(smem_addr: Int32, gmem_addr: Int64, size: int, mbar_addr: Int32, *, loc=None,
                  ip=None) -> None:
    """``cp.async.bulk`` (1D TMA) of ``size`` bytes (a multiple of 16, both addresses 16-byte
    aligned) from global to shared memory, completing as ``size`` transaction bytes on the
    mbarrier at ``mbar_addr`` (which must expect them)."""
    if size % 16 or size <= 0:
        raise ValueError(f"cp.async.bulk moves a positive multiple of 16 bytes, got {size}")
    asm(
        None,
        [Int32(smem_addr).ir_value(loc=loc, ip=ip), Int64(gmem_addr).ir_value(loc=loc, ip=ip),
         Int32(mbar_addr).ir_value(loc=loc, ip=ip)],
        f"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], {size}, "
        "[$2];",
        "r,l,r",
    )


@dsl_user_op
def ld_shared_v4(smem_addr: Int32, *, loc=None, ip=None):
    """Load four 32-bit words from a 16-byte aligned shared-memory address."""
    res = asm(
        llvm.StructType.get_literal([T.i32(), T.i32(), T.i32(), T.i32()]),
        [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
        "ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];",
        "=r,=r,=r,=r,r",
    )
    return tuple(Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def ld_shared_v2(smem_addr: Int32, *, loc=None, ip=None):
    """Load two 32-bit words from an 8-byte aligned shared-memory address."""
    res = asm(
        llvm.StructType.get_literal([T.i32(), T.i32()]),
        [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
        "ld.shared.v2.b32 {$0, $1}, [$2];",
        "=r,=r,r",
    )
    return tuple(Int32(llvm.extractvalue(T.i32(), res, [i], loc=loc, ip=ip)) for i in range(2))


@dsl_user_op
def ld_shared_u32(smem_addr: Int32, *, loc=None, ip=None) -> Int32:
    """Load one 32-bit word from shared memory."""
    return Int32(
        asm(T.i32(), [Int32(smem_addr).ir_value(loc=loc, ip=ip)], "ld.shared.b32 $0, [$1];",
             "=r,r")
    )


@dsl_user_op
def st_shared_v2(smem_addr: Int32, w0, w1, *, loc=None, ip=None) -> None:
    """Store two 32-bit words to an 8-byte aligned shared-memory address."""
    asm(
        None,
        [Int32(smem_addr).ir_value(loc=loc, ip=ip)]
        + [Int32(w).ir_value(loc=loc, ip=ip) for w in (w0, w1)],
        "st.shared.v2.b32 [$0], {$1, $2};",
        "r,r,r",
    )


@dsl_user_op
def ld_global_nc_v4_f32(gmem_addr: Int64, *, loc=None, ip=None):
    """Read-only 16-byte global load of four fp32 values."""
    res = asm(
        llvm.StructType.get_literal([T.f32(), T.f32(), T.f32(), T.f32()]),
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
        "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];",
        "=f,=f,=f,=f,l",
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def ld_global_nc_bf16x4_f32(gmem_addr: Int64, *, loc=None, ip=None):
    """Read-only 8-byte global load of four bf16 values, widened to fp32 exactly (a bf16 is
    the upper half of its fp32)."""
    res = asm(
        llvm.StructType.get_literal([T.f32(), T.f32(), T.f32(), T.f32()]),
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)],
        "{\n\t.reg .b32 p0, p1;\n\t"
        "ld.global.nc.v2.b32 {p0, p1}, [$4];\n\t"
        "shl.b32 $0, p0, 16;\n\t"
        "and.b32 $1, p0, 0xffff0000;\n\t"
        "shl.b32 $2, p1, 16;\n\t"
        "and.b32 $3, p1, 0xffff0000;\n\t}",
        "=f,=f,=f,=f,l",
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(4))


@dsl_user_op
def st_global_bf16x4(gmem_addr: Int64, v0, v1, v2, v3, *, loc=None, ip=None) -> None:
    """Round four fp32 values to bf16 (RN) and store them as one 8-byte global write."""
    asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)]
        + [Float32(v).ir_value(loc=loc, ip=ip) for v in (v0, v1, v2, v3)],
        "{\n\t.reg .b32 p0, p1;\n\t"
        "cvt.rn.bf16x2.f32 p0, $2, $1;\n\t"
        "cvt.rn.bf16x2.f32 p1, $4, $3;\n\t"
        "st.global.v2.b32 [$0], {p0, p1};\n\t}",
        "l,f,f,f,f",
    )


@dsl_user_op
def st_global_bf16x2(gmem_addr: Int64, v0, v1, *, loc=None, ip=None) -> None:
    """Round two fp32 values to bf16 (RN) and store them as one 4-byte global write."""
    asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)]
        + [Float32(v).ir_value(loc=loc, ip=ip) for v in (v0, v1)],
        "{\n\t.reg .b32 p0;\n\tcvt.rn.bf16x2.f32 p0, $2, $1;\n\tst.global.b32 [$0], p0;\n\t}",
        "l,f,f",
    )


@dsl_user_op
def st_global_v2_f32(gmem_addr: Int64, v0, v1, *, loc=None, ip=None) -> None:
    """Store two fp32 values as one 8-byte global write."""
    asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip)]
        + [Float32(v).ir_value(loc=loc, ip=ip) for v in (v0, v1)],
        "st.global.v2.f32 [$0], {$1, $2};",
        "l,f,f",
    )


def _st_global_f32(gmem_addr: Int64, v, text: str, loc, ip) -> None:
    """One fp32 value ``$1`` stored at ``$0`` by the PTX ``text``."""
    asm(
        None,
        [Int64(gmem_addr).ir_value(loc=loc, ip=ip), Float32(v).ir_value(loc=loc, ip=ip)],
        text,
        "l,f",
    )


@dsl_user_op
def st_global_bf16(gmem_addr: Int64, v, *, loc=None, ip=None) -> None:
    """Round one fp32 value to bf16 (RN) and store its 2 bytes."""
    _st_global_f32(gmem_addr, v,
                   "{\n\t.reg .b16 h;\n\tcvt.rn.bf16.f32 h, $1;\n\tst.global.b16 [$0], h;\n\t}",
                   loc, ip)


@dsl_user_op
def st_global_f32(gmem_addr: Int64, v, *, loc=None, ip=None) -> None:
    """Store one fp32 value."""
    _st_global_f32(gmem_addr, v, "st.global.f32 [$0], $1;", loc, ip)


@dsl_user_op
def ld_global_f32(gmem_addr: Int64, *, loc=None, ip=None) -> Float32:
    """Load one fp32 value (read-only path)."""
    return Float32(
        asm(T.f32(), [Int64(gmem_addr).ir_value(loc=loc, ip=ip)], "ld.global.nc.f32 $0, [$1];",
            "=f,l")
    )


@dsl_user_op
def ld_global_i32(gmem_addr: Int64, *, loc=None, ip=None) -> Int32:
    """Load one int32 value (read-only path)."""
    return Int32(
        asm(T.i32(), [Int64(gmem_addr).ir_value(loc=loc, ip=ip)], "ld.global.nc.b32 $0, [$1];",
            "=r,l")
    )



@dsl_user_op
def ld_shared_v2_f32(smem_addr: Int32, *, loc=None, ip=None):
    """Load two fp32 values from an 8-byte aligned shared-memory address."""
    res = asm(
        llvm.StructType.get_literal([T.f32(), T.f32()]),
        [Int32(smem_addr).ir_value(loc=loc, ip=ip)],
        "ld.shared.v2.f32 {$0, $1}, [$2];",
        "=f,=f,r",
    )
    return tuple(Float32(llvm.extractvalue(T.f32(), res, [i], loc=loc, ip=ip)) for i in range(2))


@dsl_user_op
def ld_shared_f32(smem_addr: Int32, *, loc=None, ip=None) -> Float32:
    """Load one fp32 value from shared memory."""
    return Float32(
        asm(T.f32(), [Int32(smem_addr).ir_value(loc=loc, ip=ip)], "ld.shared.f32 $0, [$1];",
            "=f,r")
    )
