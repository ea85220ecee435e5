"""NVFP4 -> bf16 weight decode as one Triton kernel (GPU benchmark helper).

Reads each packed byte and its e4m3 block scale once and writes the two exact bf16 values
(``e2m1 * e4m3`` is exact in bf16), so decoding costs one pass over the output instead of the
four passes of the PyTorch spelling in ``fast_moe.decode_bf16``; the values are bitwise the
same. Both nibbles and the scale are decoded arithmetically from their bits (no lookup
tables, no fp8 loads), which also lets Triton's CPU interpreter run it in tests.

e2m1 ``s e1 e0 m``: ``|v| = m/2`` when ``e == 0``, else ``2^(e-1) * (1 + m/2)``.
e4m3fn ``s e3..e0 m2..m0`` (bias 7): ``|v| = m/8 * 2^-6`` when ``e == 0``, else
``(1 + m/8) * 2^(e-7)`` (the quantizer never writes the NaN code 0x7F).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the benchmark falls back to fast_moe.decode_bf16
    triton = None


def available(device: torch.device) -> bool:
    """Triton is importable and can run on ``device`` (a GPU, or the CPU interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _e2m1(code):
        mag = code & 7
        e = mag >> 1
        m = (mag & 1).to(tl.float32)
        val = tl.where(e == 0, m * 0.5, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m))
        return val * tl.where((code & 8) != 0, -1.0, 1.0)   # keeps -0.0 (0 - x would not)

    @triton.jit
    def _decode_kernel(packed_ptr, scale_ptr, out_ptr, n_bytes, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        b = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        sb = tl.load(scale_ptr + offs // 8, mask=mask, other=0).to(tl.int32)
        se = (sb >> 3) & 15
        sm = (sb & 7).to(tl.float32)
        scale = tl.where(se == 0, sm * 0.125 * 0.015625,
                         tl.exp2((se - 7).to(tl.float32)) * (1.0 + 0.125 * sm))
        scale = scale * tl.where((sb & 128) != 0, -1.0, 1.0)
        lo = (_e2m1(b & 15) * scale).to(tl.bfloat16)
        hi = (_e2m1(b >> 4) * scale).to(tl.bfloat16)
        tl.store(out_ptr + 2 * offs, lo, mask=mask)
        tl.store(out_ptr + 2 * offs + 1, hi, mask=mask)


def decode_bf16_triton(packed: torch.Tensor, scale: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``packed [..., K/2]`` uint8 with ``scale [..., K/16]`` e4m3 -> bf16 ``[..., K]``, exact."""
    if triton is None:
        raise ImportError("decode_bf16_triton needs triton (pip install triton)")
    if packed.dtype != torch.uint8 or scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"packed must be uint8 and scale float8_e4m3fn, got {packed.dtype}, {scale.dtype}")
    k = packed.shape[-1] * 2
    if k % 16 or tuple(scale.shape) != (*packed.shape[:-1], k // 16):
        raise ValueError(f"scale {tuple(scale.shape)} does not match packed {tuple(packed.shape)}")
    packed = packed.contiguous()
    scale_bytes = scale.contiguous().view(torch.uint8)
    out = torch.empty(*packed.shape[:-1], k, dtype=torch.bfloat16, device=packed.device)
    n = packed.numel()
    if n:
        _decode_kernel[(triton.cdiv(n, block),)](packed, scale_bytes, out, n, BLOCK=block)
    return out
