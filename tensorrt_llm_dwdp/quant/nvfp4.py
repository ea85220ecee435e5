"""NVFP4: the numerical ground truth of every NVFP4 kernel in this project.

Format (NVIDIA's, as written by ModelOpt and read by TensorRT-LLM):

- values: e2m1 (1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6),
  packed two per byte along K: element ``2j`` of a row in the LOW nibble of byte ``j``,
  element ``2j+1`` in the HIGH nibble (the bit layout of ``torch.float4_e2m1fn_x2``);
- block scale: one ``torch.float8_e4m3fn`` per 16 consecutive elements along K, row-major
  ``[..., K/16]`` (the "linear" layout; :func:`swizzle_scales_128x4` gives the MMA layout);
- global scale: float32 (ModelOpt's ``weight_scale_2``, TensorRT-LLM's ``alpha``), one per
  tensor or one per leading index (e.g. per expert).

A value decodes as ``e2m1 * e4m3 * global_scale``. ``e2m1 * e4m3`` is exact in bf16
(:func:`e2m1_e4m3_exact_in` proves it over all 16 x 256 codes), which is why W4A16 kernels
dequantize a tile to bf16 exactly, run bf16 MMA with fp32 accumulation and apply the global
scale in the epilogue; :func:`dequantize_nvfp4` with ``global_scale=None`` gives that tile.

Quantization follows ModelOpt's recipe (``NVFP4QTensor``):
``global_scale = amax / (6 * 448)``; ``block_scale = e4m3(block_amax / (6 * global_scale))``
(1.0 for an all-zero block); codes = round-to-nearest-even of
``x / (float(block_scale) * global_scale)`` to e2m1, saturating at +-6 (the rounding of
``cvt.rn.satfinite.e2m1x2.f32``). The sign bit is set for x < 0, so small negatives give -0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_SIZE = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4

# e2m1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0.0).
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_VALUES = tuple(_E2M1_MAGNITUDES) + tuple(-v for v in _E2M1_MAGNITUDES)

# Midpoints between neighbouring magnitudes. A value exactly on a midpoint rounds to the even
# code (mantissa bit 0): down at 0.25, 1.25, 2.5, 5 (codes 0, 2, 4, 6), up at 0.75, 1.75, 3.5.
_ROUND_DOWN_AT_TIE = (0.25, 1.25, 2.5, 5.0)
_ROUND_UP_AT_TIE = (0.75, 1.75, 3.5)


@dataclass(frozen=True)
class Nvfp4Tensor:
    """A quantized tensor: ``packed`` uint8 ``[..., K/2]``, ``scale`` float8_e4m3fn
    ``[..., K/16]`` (linear layout), ``global_scale`` float32 of shape ``lead`` (``()`` for one
    per tensor, ``[n]`` for one per leading index)."""

    packed: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        """Shape of the unquantized tensor ``[..., K]``."""
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self.packed, self.scale, self.global_scale, dtype)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, values 0..15) -> float32 values."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"e2m1_to_float: codes must be uint8, got {codes.dtype}")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[(codes & 0xF).long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float values to e2m1 codes (uint8 0..15): nearest, ties to even, saturating at
    +-6. Raises on NaN (a NaN input has no e2m1 code and means the scales are broken)."""
    if not x.is_floating_point():
        raise TypeError(f"float_to_e2m1: expected a floating tensor, got {x.dtype}")
    x = x.float()
    if torch.isnan(x).any():
        raise ValueError("float_to_e2m1: input contains NaN")
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for bound in _ROUND_DOWN_AT_TIE:
        code += (mag > bound).to(torch.uint8)
    for bound in _ROUND_UP_AT_TIE:
        code += (mag >= bound).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., K]`` -> packed bytes ``[..., K/2]``: element 2j in the low nibble."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_e2m1: codes must be uint8, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_e2m1: last dim must be even, got shape {tuple(codes.shape)}")
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """Packed bytes ``[..., K/2]`` -> uint8 codes ``[..., K]`` (inverse of :func:`pack_e2m1`)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_e2m1: packed must be uint8, got {packed.dtype}")
    pair = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return pair.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's per-tensor scale: ``amax / (6 * 448)`` in float32."""
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def _check_k(k: int, what: str) -> None:
    if k == 0 or k % BLOCK_SIZE:
        raise ValueError(
            f"{what}: K (last dim) must be a positive multiple of {BLOCK_SIZE}, got {k}"
        )


def _expand_lead(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a leading-dims tensor broadcasts against ``ndim``."""
    return t.reshape(*t.shape, *([1] * (ndim - t.dim())))


def _resolve_global_scale(w: torch.Tensor, global_scale: torch.Tensor | float | None) -> torch.Tensor:
    if global_scale is None:
        return global_scale_from_amax(w.abs().amax())
    gs = torch.as_tensor(global_scale, dtype=torch.float32, device=w.device)
    lead = tuple(w.shape[: gs.dim()])
    if gs.dim() >= w.dim() or tuple(gs.shape) != lead:
        raise ValueError(
            f"quantize_nvfp4: global_scale shape {tuple(gs.shape)} must be () or a prefix of the "
            f"leading dims of w {tuple(w.shape[:-1])}"
        )
    if not (torch.isfinite(gs).all() and (gs > 0).all()):
        raise ValueError("quantize_nvfp4: global_scale must be finite and > 0")
    return gs


def quantize_nvfp4(
    w: torch.Tensor, global_scale: torch.Tensor | float | None = None
) -> Nvfp4Tensor:
    """Quantize ``w [..., K]`` (bf16/fp16/fp32, K a multiple of 16) with ModelOpt's recipe.

    ``global_scale``: None -> ``amax(w) / 2688`` (one per tensor); a float or 0-d tensor; or a
    float32 tensor whose shape is a prefix of ``w.shape[:-1]`` (e.g. ``[n]`` for one scale per
    expert, see :func:`quantize_nvfp4_per_leading`). A block whose scale would pass 448 (a
    global scale smaller than the recipe's) is clamped to 448 and its codes saturate.
    """
    if not w.is_floating_point() or w.dtype.itemsize < 2:
        raise TypeError(f"quantize_nvfp4: w must be bf16/fp16/fp32, got {w.dtype}")
    if w.dim() == 0:
        raise ValueError("quantize_nvfp4: w must have at least one dim (K)")
    _check_k(w.shape[-1], "quantize_nvfp4")
    if not torch.isfinite(w).all():
        raise ValueError("quantize_nvfp4: w contains inf or NaN")
    gs = _resolve_global_scale(w, global_scale)

    blocks = w.float().reshape(*w.shape[:-1], w.shape[-1] // BLOCK_SIZE, BLOCK_SIZE)
    block_amax = blocks.abs().amax(dim=-1)
    gs_b = _expand_lead(gs, block_amax.dim())
    block_scale = block_amax / (E2M1_MAX * gs_b)
    # ModelOpt maps an all-zero block to scale 1.0; gs == 0 (all-zero tensor) lands here too.
    block_scale = torch.where(block_amax == 0, torch.ones_like(block_scale), block_scale)
    scale = block_scale.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)

    denom = (scale.float() * gs_b).unsqueeze(-1)
    # A block scale that underflows e4m3 to 0 (block_amax < ~2e-6 * amax) decodes to 0 anyway.
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    scaled = torch.where(denom > 0, blocks / safe, torch.zeros_like(blocks))
    codes = float_to_e2m1(scaled.reshape(w.shape))
    return Nvfp4Tensor(pack_e2m1(codes), scale, gs.float())


def quantize_nvfp4_per_leading(w: torch.Tensor, lead_dims: int = 1) -> Nvfp4Tensor:
    """Quantize with one global scale per index of the first ``lead_dims`` dims (per expert for
    ``[n, rows, K]``): ``global_scale[i] = amax(w[i]) / 2688``, as ModelOpt does per module."""
    if not 0 < lead_dims < w.dim():
        raise ValueError(
            f"quantize_nvfp4_per_leading: lead_dims must be in [1, {w.dim() - 1}], got {lead_dims}"
        )
    amax = w.abs().reshape(*w.shape[:lead_dims], -1).amax(dim=-1)
    gs = global_scale_from_amax(amax)
    # A leading slice of zeros keeps codes 0; any positive scale decodes it to 0.
    gs = torch.where(gs > 0, gs, torch.ones_like(gs))
    return quantize_nvfp4(w, gs)


def dequantize_nvfp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``packed [..., K/2]`` with ``scale [..., K/16]`` (e4m3, linear) to ``[..., K]``.

    Computes ``(e2m1 * e4m3)`` exactly in float32, then multiplies by ``global_scale`` (float32,
    one rounding; shape ``()`` or a prefix of the leading dims) unless it is None, then casts to
    ``dtype``. With ``global_scale=None`` and ``dtype=bf16`` the result is exact: the weight tile
    a W4A16 kernel feeds its MMA.
    """
    if packed.dtype != torch.uint8:
        raise TypeError(f"dequantize_nvfp4: packed must be uint8, got {packed.dtype}")
    if scale.dtype != torch.float8_e4m3fn:
        raise TypeError(f"dequantize_nvfp4: scale must be float8_e4m3fn, got {scale.dtype}")
    k = packed.shape[-1] * 2
    _check_k(k, "dequantize_nvfp4")
    expected = (*packed.shape[:-1], k // BLOCK_SIZE)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"dequantize_nvfp4: scale shape {tuple(scale.shape)} != {expected} for packed "
            f"shape {tuple(packed.shape)}"
        )
    # One gather through a byte -> (low, high) value table decodes both nibbles at once.
    codes = torch.arange(256, device=packed.device, dtype=torch.int32).to(torch.uint8)
    pair_table = e2m1_to_float(unpack_e2m1(codes.view(256, 1)))  # [256, 2]
    values = pair_table.index_select(0, packed.reshape(-1).int()).reshape(*expected, BLOCK_SIZE)
    out = values * scale.float().unsqueeze(-1)
    if global_scale is not None:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=packed.device)
        if gs.dim() >= packed.dim() or tuple(gs.shape) != tuple(packed.shape[: gs.dim()]):
            raise ValueError(
                f"dequantize_nvfp4: global_scale shape {tuple(gs.shape)} must be () or a prefix "
                f"of the leading dims {tuple(packed.shape[:-1])}"
            )
        out = out * _expand_lead(gs, out.dim())
    return out.reshape(*packed.shape[:-1], k).to(dtype)


def e2m1_e4m3_products(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Table ``[16, 256]`` of ``e2m1(code_a) * e4m3(code_b)`` computed in float64 (exact) and
    cast to ``dtype``. The e4m3 NaN codes (0x7F, 0xFF) give NaN columns."""
    e2m1 = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    e4m3 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()
    return (e2m1[:, None] * e4m3[None, :]).to(dtype)


def e2m1_e4m3_exact_in(dtype: torch.dtype) -> bool:
    """True when every finite ``e2m1 * e4m3`` product is exactly representable in ``dtype``
    (bf16: at most 2+4-1 = 5 significant bits, exponents 2^-10 .. 2^11, well inside bf16)."""
    exact = e2m1_e4m3_products(torch.float64)
    finite = ~torch.isnan(exact)
    round_trip = exact.to(dtype).double()
    return bool(torch.equal(round_trip[finite], exact[finite]))


def swizzled_scale_shape(rows: int, cols: int) -> tuple[int, int]:
    """Padded ``(rows, cols)`` of the 128x4 layout: rows up to a multiple of 128, cols of 4."""
    return (
        -(-rows // SWIZZLE_ROWS) * SWIZZLE_ROWS,
        -(-cols // SWIZZLE_COLS) * SWIZZLE_COLS,
    )


def swizzled_scale_offset(row, col, cols: int):
    """Byte offset of scale ``[row, col]`` inside one swizzled matrix with ``cols`` scale
    columns (unpadded). Works on ints or integer tensors.

    The layout (cuBLAS / CUTLASS Blackwell block-scaled MMA, TensorRT-LLM ``swizzle_sf``):
    512-byte tiles of 128 rows x 4 cols, tiles ordered row-tile major then col-tile; inside a
    tile, offset = ``(row % 32) * 16 + ((row % 128) // 32) * 4 + col % 4``.
    """
    col_tiles = -(-cols // SWIZZLE_COLS)
    tile = (row // SWIZZLE_ROWS) * col_tiles + col // SWIZZLE_COLS
    return tile * 512 + (row % 32) * 16 + ((row % SWIZZLE_ROWS) // 32) * 4 + col % SWIZZLE_COLS


def swizzle_scales_128x4(scale: torch.Tensor) -> torch.Tensor:
    """Linear scales ``[..., rows, cols]`` -> swizzled ``[..., rows_pad * cols_pad]``.

    One flat, zero-padded buffer per matrix (the bytes the MMA's scale TMA reads); same dtype
    as the input (float8_e4m3fn or uint8). See :func:`swizzled_scale_offset` for the map.
    """
    if scale.dim() < 2:
        raise ValueError(f"swizzle_scales_128x4: need [..., rows, cols], got {tuple(scale.shape)}")
    *lead, rows, cols = scale.shape
    rows_pad, cols_pad = swizzled_scale_shape(rows, cols)
    raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    full = torch.zeros(*lead, rows_pad, cols_pad, dtype=torch.uint8, device=scale.device)
    full[..., :rows, :cols] = raw
    # [rt, 4 (row%128 // 32), 32 (row%32), ct, 4 (col%4)] -> [rt, ct, row%32, row%128//32, col%4]
    tiles = full.reshape(*lead, rows_pad // 128, 4, 32, cols_pad // 4, 4)
    n = len(lead)
    order = [*range(n), n, n + 3, n + 2, n + 1, n + 4]
    out = tiles.permute(order).reshape(*lead, rows_pad * cols_pad).contiguous()
    return out.view(scale.dtype) if scale.dtype != torch.uint8 else out


def unswizzle_scales_128x4(swizzled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_scales_128x4`: ``[..., rows_pad * cols_pad]`` -> ``[..., rows,
    cols]`` (padding dropped)."""
    rows_pad, cols_pad = swizzled_scale_shape(rows, cols)
    if swizzled.dim() < 1 or swizzled.shape[-1] != rows_pad * cols_pad:
        raise ValueError(
            f"unswizzle_scales_128x4: last dim must be {rows_pad * cols_pad} "
            f"(rows={rows} -> {rows_pad}, cols={cols} -> {cols_pad}), got {tuple(swizzled.shape)}"
        )
    lead = swizzled.shape[:-1]
    raw = swizzled.view(torch.uint8) if swizzled.dtype != torch.uint8 else swizzled
    tiles = raw.reshape(*lead, rows_pad // 128, cols_pad // 4, 32, 4, 4)
    n = len(lead)
    order = [*range(n), n, n + 3, n + 2, n + 1, n + 4]
    full = tiles.permute(order).reshape(*lead, rows_pad, cols_pad)
    out = full[..., :rows, :cols].contiguous()
    return out.view(swizzled.dtype) if swizzled.dtype != torch.uint8 else out
