"""W4A8: NVFP4 weights on FP8 (e4m3 x e4m3) tensor cores -- the numerics every W4A8 kernel is
held to.

An NVFP4 weight is ``e2m1 * s * alpha`` (``quant.nvfp4``: e2m1 code, e4m3 block scale ``s`` per
16 along K, fp32 global scale ``alpha`` per expert). Hopper's FP8 MMA takes e4m3 operands, and
``e2m1 * s`` is not always an e4m3 value: it has up to 6 significant bits (e4m3 has 4) and
reaches 6 x 448 = 2688 (e4m3 stops at 448). The mapping chosen here:

1. weights (:func:`nvfp4_to_e4m3`): ``wq = RN_e4m3(e2m1 * s * 2^-3)``. The product
   ``e2m1 * s * 2^-3`` is exact (in f16 on the GPU, f32 here); the cast to e4m3 is the ONLY
   rounding, to nearest, ties to even. ``|e2m1 * s| * 2^-3 <= 336 < 448``: it never saturates
   and needs no per-expert or per-block data (a fixed power of two, undone in the epilogue).
   Products ``|e2m1 * s| < 2^-3`` land in e4m3's subnormal range (absolute spacing 2^-9 after
   the shift), i.e. blocks whose scale is below 0.25 -- blocks 1/300 of the tensor's largest
   under ModelOpt's recipe, which maps the largest block scale to 448. A product rounds when
   it has more than 4 significant bits (e.g. 1.5 x 1.875 = 2.8125 -> 2.75); about 27% of the
   (code, scale) pairs of a real scale distribution do, by at most 1/21 relative.
2. activations: ``xq, xs = quantize_act_per_token(x)`` (``quant.fp8``: e4m3 per token per 128
   channels, DeepGEMM's recipe) -- the single call site is :func:`quantize_activations`.
3. GEMM (:func:`w4a8_matmul_ref`), DeepGEMM's promotion: for every 128-column block ``kb`` of K
   the e4m3 products ``xq[:, kb] @ wq[:, kb]^T`` (exact in fp32) are summed in fp32 and
   promoted as ``acc += partial * xs[:, kb]`` (fp32 multiply, fp32 add); the epilogue applies
   ``alpha * 2^3``: ``y = acc * (alpha * 8)`` (fp32). Only the fp32 sums, the promotion and the
   epilogue multiply round besides steps 1 and 2; kernels may sum a block in another order and
   are compared against this within a tolerance, not bitwise.

The measured error of this path against the exact W4A16 path (bf16 activations, exact NVFP4
weights, fp32 accumulation) is in :data:`STATED_ERROR` and ``bench/w4a8_error.py``.
"""
from __future__ import annotations

import torch

from .fp8 import FP8_BLOCK, FP8_DTYPE, quantize_act_per_token
from .nvfp4 import BLOCK_SIZE, dequantize_nvfp4

# The fixed power of two applied to e2m1 x e4m3 before the e4m3 cast, undone in the epilogue.
WEIGHT_EXP2 = -3
E4M3_WEIGHT_MAX = 6.0 * 448.0 * 2.0 ** WEIGHT_EXP2  # 336: below e4m3's 448, no saturation

# Relative Frobenius error of W4A8 against the exact W4A16 GEMM output, the bound the tests
# hold the reference to. Measured on the CPU (bench/w4a8_error.py, fixed seeds, K = 2048 and
# 7168): weights alone 2.1-2.3% (27% of the e2m1 x e4m3 products round, by at most 1/21),
# activations alone 1.4-2.6% (2.6% on Gaussian rows, 1.4-1.5% on model-like rows with outlier
# channels), both 2.6-3.3%. A whole layer (FC1, SwiGLU, h requantized, FC2) compounds them: the
# sm90 W4A8 kernels measured 6.2% against the W4A16 kernels on an H100 (bench/results/w4a8_h100/,
# DeepSeek-V3 and Qwen3-235B shapes), while running 0.71-0.89x their speed.
STATED_ERROR = {"weights_only": 0.025, "activations_only": 0.03, "w4a8": 0.04}


def nvfp4_to_e4m3(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 codes ``packed`` uint8 ``[..., K/2]`` and block scales ``scale`` float8_e4m3fn
    ``[..., K/16]`` (linear layout) -> e4m3 ``[..., K]`` = ``RN_e4m3(e2m1 * s * 2^-3)`` (module
    docstring, step 1; the global scale is not applied)."""
    exact = dequantize_nvfp4(packed, scale, None, torch.float32)  # e2m1 * s: exact in fp32
    return (exact * 2.0 ** WEIGHT_EXP2).to(FP8_DTYPE)  # in range: RN-even, never saturates


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one call site of the W4A8 activation quantization (module docstring, step 2):
    ``x [T, K]`` -> ``(xq float8_e4m3fn [T, K], xs float32 [T, ceil(K/128)])``."""
    return quantize_act_per_token(x)


def _check_gemm(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor) -> None:
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE or xs.dtype != torch.float32:
        raise TypeError(f"w4a8: expected e4m3 values and fp32 scales, got {xq.dtype}, "
                        f"{wq.dtype}, {xs.dtype}")
    if xq.dim() != 2 or wq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(f"w4a8: x {tuple(xq.shape)} and w {tuple(wq.shape)} are not [T, K] "
                         f"and [N, K]")
    k = xq.shape[1]
    if k % FP8_BLOCK:
        raise ValueError(f"w4a8: K={k} must be a multiple of {FP8_BLOCK}")
    if tuple(xs.shape) != (xq.shape[0], k // FP8_BLOCK):
        raise ValueError(f"w4a8: activation scales {tuple(xs.shape)} do not fit x "
                         f"{tuple(xq.shape)} (one per token per {FP8_BLOCK} channels)")


def promoted_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor,
                    alpha: torch.Tensor | float) -> torch.Tensor:
    """Step 3 on already quantized operands: ``xq`` e4m3 ``[T, K]``, ``xs`` fp32
    ``[T, K/128]``, ``wq`` e4m3 ``[N, K]`` (:func:`nvfp4_to_e4m3`), ``alpha`` the expert's fp32
    global scale -> fp32 ``[T, N]``: per 128 of K an fp32 partial sum promoted with the
    activation scale, then ``* (alpha * 8)``."""
    _check_gemm(xq, xs, wq)
    xf, wf = xq.float(), wq.float()
    acc = torch.zeros(xq.shape[0], wq.shape[0], dtype=torch.float32, device=xq.device)
    for kb in range(xq.shape[1] // FP8_BLOCK):
        cols = slice(kb * FP8_BLOCK, (kb + 1) * FP8_BLOCK)
        acc += (xf[:, cols] @ wf[:, cols].T) * xs[:, kb:kb + 1]
    factor = torch.as_tensor(alpha, dtype=torch.float32, device=xq.device) * 2.0 ** -WEIGHT_EXP2
    return acc * factor


def w4a8_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                    alpha: torch.Tensor | float) -> torch.Tensor:
    """``x [T, K] @ W^T`` the W4A8 way (module docstring): ``x`` bf16/fp16/fp32 ``[T, K]``,
    ``packed`` uint8 ``[N, K/2]``, ``scale`` e4m3 ``[N, K/16]`` (linear), ``alpha`` fp32 scalar
    -> fp32 ``[T, N]``. K must be a multiple of 128."""
    if x.dim() != 2 or packed.dim() != 2 or x.shape[1] != packed.shape[1] * 2:
        raise ValueError(f"w4a8_matmul_ref: x {tuple(x.shape)} and packed "
                         f"{tuple(packed.shape)} are not [T, K] and [N, K/2]")
    if x.shape[1] % FP8_BLOCK:
        raise ValueError(f"w4a8_matmul_ref: K={x.shape[1]} must be a multiple of {FP8_BLOCK}")
    xq, xs = quantize_activations(x)
    return promoted_matmul(xq, xs, nvfp4_to_e4m3(packed, scale), alpha)


def w4a16_matmul_exact(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                       alpha: torch.Tensor | float) -> torch.Tensor:
    """The exact W4A16 path W4A8 is measured against: bf16 ``x`` times the exact NVFP4 weights
    (``e2m1 * s`` exact, then ``alpha``), accumulated in float64 and returned as fp32."""
    w = dequantize_nvfp4(packed, scale, None, torch.float64)
    a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device)
    return ((x.to(torch.bfloat16).double() @ w.T) * a).float()


def weight_rounding_stats(scale: torch.Tensor) -> dict[str, float]:
    """Which e2m1 x e4m3 products the e4m3 cast rounds, over the block scales in ``scale``
    (e4m3, any shape) and all 15 nonzero codes weighted equally: the fraction of products that
    round and the largest relative change."""
    from .nvfp4 import E2M1_VALUES

    s = scale.float().reshape(-1).unique()
    s = s[torch.isfinite(s) & (s != 0)]
    e2 = torch.tensor([v for v in E2M1_VALUES if v != 0], dtype=torch.float32)
    prod = (e2[:, None] * s[None, :]) * 2.0 ** WEIGHT_EXP2
    back = prod.to(FP8_DTYPE).float()
    rel = ((back - prod).abs() / prod.abs())
    return {"fraction_rounded": float((back != prod).float().mean()),
            "max_relative_change": float(rel.max()) if rel.numel() else 0.0}


__all__ = ["BLOCK_SIZE", "E4M3_WEIGHT_MAX", "STATED_ERROR", "WEIGHT_EXP2", "nvfp4_to_e4m3",
           "promoted_matmul", "quantize_activations", "w4a16_matmul_exact", "w4a8_matmul_ref",
           "weight_rounding_stats", "gemm_errors", "w4a8_expert_mlp"]


def w4a8_expert_mlp(a: torch.Tensor, p: dict[str, torch.Tensor], inter: int) -> torch.Tensor:
    """One NVFP4 expert run the W4A8 way on rows ``a [n, H]`` (bf16): ``p`` holds the linear
    ``w3_w1_weight`` / ``_scale`` (rows ``[0, I)`` up, ``[I, 2I)`` gate), ``w2_weight`` /
    ``_scale``, ``fc31_alpha``, ``fc2_alpha``. FC1 (:func:`w4a8_matmul_ref`), fp32 SwiGLU,
    bf16 h, FC2 with h requantized per row -> fp32 ``[n, H]`` (router weight not applied):
    what the W4A8 kernels compute per (token, slot)."""
    g = w4a8_matmul_ref(a, p["w3_w1_weight"], p["w3_w1_weight_scale"], p["fc31_alpha"])
    h = (torch.nn.functional.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
    return w4a8_matmul_ref(h, p["w2_weight"], p["w2_weight_scale"], p["fc2_alpha"])


def _rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))


def gemm_errors(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                alpha: torch.Tensor | float) -> dict[str, float]:
    """Relative Frobenius errors against :func:`w4a16_matmul_exact` (bf16 ``x [T, K]``, NVFP4
    ``[N, K]``): ``weights_only`` (e4m3 weights, exact bf16 activations), ``activations_only``
    (exact weights, e4m3 activations with their scales) and ``w4a8`` (both, promoted: the
    reference). Products and sums in float64 except ``w4a8``, which is the fp32 reference."""
    ref = w4a16_matmul_exact(x, packed, scale, alpha)
    a = torch.as_tensor(alpha, dtype=torch.float64)
    wq = nvfp4_to_e4m3(packed, scale).double() * 2.0 ** -WEIGHT_EXP2
    xq, xs = quantize_activations(x)
    xd = xq.double() * xs.double().repeat_interleave(FP8_BLOCK, dim=1)[:, :x.shape[1]]
    wexact = dequantize_nvfp4(packed, scale, None, torch.float64)
    xb = x.to(torch.bfloat16).double()
    return {"weights_only": _rel_fro((xb @ wq.T) * a, ref),
            "activations_only": _rel_fro((xd @ wexact.T) * a, ref),
            "w4a8": _rel_fro(w4a8_matmul_ref(x, packed, scale, alpha), ref)}
