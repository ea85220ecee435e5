"""FP8 block-128: the numerical ground truth of every FP8 path in this project.

Format (DeepSeek-V3/R1 and Qwen3-*-FP8 checkpoints; ``quantization_config: {quant_method: fp8,
fmt: e4m3, weight_block_size: [128, 128], activation_scheme: dynamic}``):

- weight ``[..., N, K]``: ``torch.float8_e4m3fn`` (finite max 448, no inf; 3 mantissa bits);
- ``weight_scale_inv``: float32 ``[..., ceil(N/128), ceil(K/128)]``, one per 128 x 128 block
  (edge blocks partial). The dequantized weight is ``float(q) * scale_inv`` of its block.
- activations: quantized at run time per token per 128 channels (``[T, K]`` -> e4m3 ``[T, K]``
  and float32 scale ``[T, ceil(K/128)]``), dequantized as ``float(q) * scale``.

Recipes (what the checkpoints and DeepGEMM do, reproduced bit for bit here):

- weights: ``scale_inv = max(amax(block), ACT_AMAX_FLOOR) / 448`` in float32,
  ``q = e4m3(clamp(w / scale_inv, -448, 448))`` (round to nearest even, saturating);
- activations (DeepGEMM's ``per_token_cast_to_fp8``): ``amax`` over each token's 128-channel
  group in float32, ``scale = max(amax, ACT_AMAX_FLOOR) / 448``,
  ``q = e4m3(clamp(x * (448 / max(amax, ACT_AMAX_FLOOR)), -448, 448))``.
  An all-zero block / group gets the floor's scale and codes 0, so it decodes to exact zeros.

The quantized GEMM every kernel is held to (:func:`blockwise_matmul_ref`, DeepGEMM's Hopper
scheme): for each 128-column block ``kb`` of K, the partial product of the e4m3 values
``xq[:, kb] @ wq[:, kb]^T`` is summed in float32, then promoted into a float32 accumulator as
``out += partial * xs[:, kb] * ws[nb, kb]`` (one promotion per 128 of K, activation scale
first, then the weight scale of the output row's block ``nb``). The e4m3 values and the products
of two of them are exact in float32; only the float32 summations round. Kernels may sum a block
in another order and are compared against this within a tolerance, not bitwise.
"""
from __future__ import annotations

import torch

FP8_BLOCK = 128
E4M3_MAX = 448.0
ACT_AMAX_FLOOR = 1e-4

FP8_DTYPE = torch.float8_e4m3fn


def num_blocks(n: int) -> int:
    """Number of 128-blocks covering ``n`` elements (the last one partial)."""
    return -(-n // FP8_BLOCK)


def weight_scale_shape(n: int, k: int) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight ``[n, k]``: ``(ceil(n/128), ceil(k/128))``."""
    return num_blocks(n), num_blocks(k)


def _check_float_input(t: torch.Tensor, what: str, min_dim: int) -> None:
    if not t.is_floating_point() or t.dtype.itemsize < 2:
        raise TypeError(f"{what}: expected a bf16/fp16/fp32 tensor, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(f"{what}: expected at least {min_dim} dims, got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{what}: the last dim (K) must be positive, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: input contains inf or NaN")


def _pad_to_blocks(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the given (negative) dims up to multiples of 128; zeros leave amax unchanged."""
    pad: list[int] = []
    for d in range(-1, -t.dim() - 1, -1):
        extra = (-t.shape[d]) % FP8_BLOCK if d in dims else 0
        pad += [0, extra]
    return torch.nn.functional.pad(t, pad) if any(pad) else t


def cast_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Round float32 to e4m3, nearest even, saturating at +-448. The clamp makes saturation
    explicit: e4m3fn has no inf, and what a plain cast gives past 448 (448 or NaN) is up to
    the torch build and device."""
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[..., N, K]`` (bf16/fp16/fp32) per 128 x 128 block.

    Returns ``(q float8_e4m3fn [..., N, K], scale_inv float32 [..., ceil(N/128), ceil(K/128)])``
    with the checkpoints' recipe (module docstring). Leading dims (e.g. experts) are independent.
    """
    _check_float_input(w, "quantize_weight_blocks", 2)
    *lead, n, k = w.shape
    nb, kb = weight_scale_shape(n, k)
    padded = _pad_to_blocks(w.float(), (-1, -2))
    blocks = padded.reshape(*lead, nb, FP8_BLOCK, kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale_inv = amax.clamp(min=ACT_AMAX_FLOOR) / E4M3_MAX
    q = cast_e4m3(blocks / scale_inv[..., :, None, :, None])
    q = q.reshape(*lead, nb * FP8_BLOCK, kb * FP8_BLOCK)[..., :n, :k].contiguous()
    return q, scale_inv


def _check_weight_pair(q: torch.Tensor, scale_inv: torch.Tensor, what: str) -> None:
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"{what}: weight must be float8_e4m3fn, got {q.dtype}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"{what}: weight_scale_inv must be float32, got {scale_inv.dtype}")
    if q.dim() < 2:
        raise ValueError(f"{what}: weight must be [..., N, K], got shape {tuple(q.shape)}")
    expected = (*q.shape[:-2], *weight_scale_shape(q.shape[-2], q.shape[-1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"{what}: weight_scale_inv shape {tuple(scale_inv.shape)} != {expected} for weight "
            f"shape {tuple(q.shape)} (one scale per {FP8_BLOCK}x{FP8_BLOCK} block)"
        )


def expand_weight_scales(scale_inv: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-block scales ``[..., ceil(n/128), ceil(k/128)]`` -> per-element ``[..., n, k]``."""
    full = scale_inv.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return full[..., :n, :k]


def dequantize_weight_blocks(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """``q [..., N, K]`` e4m3 with ``scale_inv [..., ceil(N/128), ceil(K/128)]`` -> float32
    ``[..., N, K]``: ``float(q) * scale_inv`` of each element's block (one float32 rounding)."""
    _check_weight_pair(q, scale_inv, "dequantize_weight_blocks")
    n, k = q.shape[-2:]
    return q.float() * expand_weight_scales(scale_inv, n, k)


def quantize_act_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``[T, K]`` (bf16/fp16/fp32) per token per 128 channels.

    Returns ``(q float8_e4m3fn [T, K], scale float32 [T, ceil(K/128)])``; the recipe is
    DeepGEMM's ``per_token_cast_to_fp8`` (module docstring), K need not be a multiple of 128.
    """
    _check_float_input(x, "quantize_act_per_token", 2)
    if x.dim() != 2:
        raise ValueError(f"quantize_act_per_token: expected [T, K], got shape {tuple(x.shape)}")
    return quantize_act_per_token_unchecked(x)


def quantize_act_per_token_unchecked(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_act_per_token` without its input checks (no host synchronisation, no
    data-dependent branch): for callers that validated ``x`` (a float ``[T, K]``), e.g. the
    one-kernel ``torch.compile`` of it the GPU path of ``Fp8Linear`` runs."""
    t, k = x.shape
    kb = num_blocks(k)
    groups = _pad_to_blocks(x.float(), (-1,)).reshape(t, kb, FP8_BLOCK)
    amax = groups.abs().amax(dim=-1).clamp(min=ACT_AMAX_FLOOR)
    q = cast_e4m3(groups * (E4M3_MAX / amax)[..., None])
    return q.reshape(t, kb * FP8_BLOCK)[:, :k].contiguous(), amax / E4M3_MAX


def dequantize_act_per_token(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q [T, K]`` e4m3 with ``scale [T, ceil(K/128)]`` -> float32 ``[T, K]``."""
    if q.dtype != FP8_DTYPE or scale.dtype != torch.float32:
        raise TypeError(
            f"dequantize_act_per_token: expected float8_e4m3fn values and float32 scales, got "
            f"{q.dtype} and {scale.dtype}"
        )
    if q.dim() != 2 or tuple(scale.shape) != (q.shape[0], num_blocks(q.shape[1])):
        raise ValueError(
            f"dequantize_act_per_token: scale shape {tuple(scale.shape)} does not fit values "
            f"{tuple(q.shape)} (expected [T, ceil(K/128)])"
        )
    return q.float() * scale.repeat_interleave(FP8_BLOCK, dim=1)[:, : q.shape[1]]


def blockwise_matmul_ref(
    xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor
) -> torch.Tensor:
    """The block-scaled FP8 GEMM: ``xq [T, K]`` e4m3 with ``xs [T, ceil(K/128)]`` times
    ``wq [N, K]`` e4m3 with ``ws [ceil(N/128), ceil(K/128)]``, transposed -> float32 ``[T, N]``.

    Float32 partial sums per 128 of K, each promoted once into a float32 accumulator scaled by
    the token's activation scale and then the weight block's scale (module docstring).
    """
    if xq.dtype != FP8_DTYPE or xs.dtype != torch.float32:
        raise TypeError(
            f"blockwise_matmul_ref: activations must be float8_e4m3fn with float32 scales, got "
            f"{xq.dtype} and {xs.dtype}"
        )
    _check_weight_pair(wq, ws, "blockwise_matmul_ref")
    if wq.dim() != 2 or xq.dim() != 2 or xq.shape[1] != wq.shape[1]:
        raise ValueError(
            f"blockwise_matmul_ref: need xq [T, K] and wq [N, K] with the same K, got "
            f"{tuple(xq.shape)} and {tuple(wq.shape)}"
        )
    t, k = xq.shape
    n = wq.shape[0]
    if tuple(xs.shape) != (t, num_blocks(k)):
        raise ValueError(
            f"blockwise_matmul_ref: xs shape {tuple(xs.shape)} != {(t, num_blocks(k))}"
        )
    ws_rows = ws.repeat_interleave(FP8_BLOCK, dim=0)[:n]  # [N, ceil(K/128)]
    xf, wf = xq.float(), wq.float()  # exact
    out = torch.zeros(t, n, dtype=torch.float32, device=xq.device)
    for kb in range(num_blocks(k)):
        cols = slice(kb * FP8_BLOCK, min(k, (kb + 1) * FP8_BLOCK))
        partial = xf[:, cols] @ wf[:, cols].T
        out += partial * xs[:, kb, None] * ws_rows[None, :, kb]
    return out


def fp8_linear_ref(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` (bf16) through an FP8 block-128 linear ``wq [N, K]``, ``ws`` -> bf16
    ``[..., N]``: :func:`quantize_act_per_token` then :func:`blockwise_matmul_ref`, cast once."""
    if x.dim() < 1 or x.shape[-1] != wq.shape[-1]:
        raise ValueError(
            f"fp8_linear_ref: x last dim must equal the weight's K {wq.shape[-1]}, got "
            f"{tuple(x.shape)}"
        )
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return x.new_zeros(*x.shape[:-1], wq.shape[0], dtype=torch.bfloat16)
    xq, xs = quantize_act_per_token(flat)
    out = blockwise_matmul_ref(xq, xs, wq, ws)
    return out.to(torch.bfloat16).reshape(*x.shape[:-1], wq.shape[0])
