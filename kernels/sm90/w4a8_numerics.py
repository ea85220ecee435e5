"""W4A8 numerics: NVFP4 weights rounded to e4m3 for Hopper's fp8 tensor cores.

The statement a W4A8 kernel (NVFP4 weights dequantized in registers, fp8 WGMMA with fp8
activations) is held to; the kernel itself is not written yet (kernels/NOTES.md).

An fp8 WGMMA reduces 32 of K per instruction, across two 16-wide NVFP4 blocks with their own
e4m3 scales, so the block scale cannot be applied after the MMA: every weight enters it as ONE
e4m3 number

    w8 = e4m3_rn(e2m1 * block_scale * 2^shift)     (round to nearest even, saturating)

with ``shift`` a power-of-two exponent per expert (``expert_shift``), the largest that keeps
the expert's largest product ``6 * max(block_scale) * 2^shift <= 448`` (so nothing saturates),
undone exactly with alpha (times ``2^-shift``) in the epilogue. The product e2m1 x e4m3 has at
most 5 significant bits (exact in fp32, and in bf16: the W4A16 path); e4m3 keeps 4, so
- a product with at most 4 significant bits is exact (all products with the magnitudes 0.5,
  1, 2, 4; about three in four weights of random experts);
- a normal result (>= 2^-6 after the shift) is within half an ulp: relative error <= 2^-4;
- a result below 2^-6 is an e4m3 subnormal (steps of 2^-9): absolute error <= 2^-10 after the
  shift, so blocks whose scale sits more than ~2^8 below the expert's largest lose relative
  precision (to zero for products under 2^-10): ``rounding_error`` measures both.
The exact W4A16 weights are ``e2m1 * block_scale`` (``quant.nvfp4.dequantize_nvfp4`` without
the global scale); ``rounding_error`` compares the two.
"""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.quant.fp8 import E4M3_MAX, cast_e4m3
from tensorrt_llm_dwdp.quant.nvfp4 import BLOCK_SIZE, E2M1_MAX, e2m1_to_float, unpack_e2m1

E4M3_MIN_NORMAL = 2.0 ** -6


def expert_shift(block_scale: torch.Tensor) -> torch.Tensor:
    """int32 ``[n]``: per leading index of ``block_scale`` (float8_e4m3fn ``[n, ...]``) the
    largest e with ``6 * max(scale) * 2^e <= 448`` (0 for an all-zero expert)."""
    if block_scale.dtype != torch.float8_e4m3fn or block_scale.dim() < 1:
        raise ValueError(f"expert_shift: block scales must be float8_e4m3fn [n, ...], got "
                         f"{block_scale.dtype} {tuple(block_scale.shape)}")
    top = block_scale.float().reshape(block_scale.shape[0], -1).amax(dim=1).double()
    top = torch.where(top > 0, top, torch.ones_like(top) * (E4M3_MAX / E2M1_MAX))
    return torch.floor(torch.log2(E4M3_MAX / (E2M1_MAX * top))).to(torch.int32)


def _per_lead(shift: torch.Tensor, ndim: int) -> torch.Tensor:
    return torch.exp2(shift.double()).float().reshape(-1, *([1] * (ndim - 1)))


def nvfp4_to_e4m3(packed: torch.Tensor, block_scale: torch.Tensor,
                  shift: torch.Tensor) -> torch.Tensor:
    """e4m3 ``[n, rows, K]`` = ``e4m3_rn(e2m1 * block_scale * 2^shift[n])`` for packed NVFP4
    ``[n, rows, K/2]`` (uint8, linear layout) with float8_e4m3fn scales ``[n, rows, K/16]``
    and ``shift`` from ``expert_shift``. The fp32 product is exact; the one rounding is the
    cast."""
    if packed.dtype != torch.uint8 or packed.dim() != 3:
        raise ValueError(f"nvfp4_to_e4m3: packed weights must be uint8 [n, rows, K/2], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    n, rows, half_k = packed.shape
    if tuple(block_scale.shape) != (n, rows, 2 * half_k // BLOCK_SIZE):
        raise ValueError(f"nvfp4_to_e4m3: scales {tuple(block_scale.shape)} do not fit weights "
                         f"{tuple(packed.shape)} (one per {BLOCK_SIZE} of K)")
    values = e2m1_to_float(unpack_e2m1(packed))
    scale = block_scale.float().repeat_interleave(BLOCK_SIZE, dim=-1)
    return cast_e4m3(values * scale * _per_lead(shift, 3))


def w4a8_weights(q8: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """fp32 weights a W4A8 kernel multiplies by (before alpha): ``q8 * 2^-shift[n]``."""
    return q8.float() / _per_lead(shift, q8.dim())


def rounding_error(packed: torch.Tensor, block_scale: torch.Tensor) -> dict[str, float]:
    """The W4A8 weights against the exact W4A16 ones (``e2m1 * block_scale``), per-expert
    shift: relative Frobenius error, the largest relative error of a nonzero weight whose
    rounded value is normal, and the fractions of weights that are exact / subnormal."""
    shift = expert_shift(block_scale)
    q8 = nvfp4_to_e4m3(packed, block_scale, shift)
    approx = w4a8_weights(q8, shift).double()
    exact = (e2m1_to_float(unpack_e2m1(packed)).double()
             * block_scale.double().repeat_interleave(BLOCK_SIZE, dim=-1))
    nonzero = exact != 0
    normal = nonzero & (q8.float().abs() >= E4M3_MIN_NORMAL)
    rel = (approx - exact).abs() / exact.abs().clamp_min(1e-300)
    return {
        "rel_fro": ((approx - exact).norm() / exact.norm()).item(),
        "max_rel_normal": rel[normal].max().item() if normal.any() else 0.0,
        "exact_fraction": (approx == exact)[nonzero].double().mean().item(),
        "subnormal_fraction": (nonzero & ~normal).double().mean().item(),
    }
