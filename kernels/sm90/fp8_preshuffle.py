"""Load-time layout of FP8 expert weights for the bulk-copy variant of ``fp8_gemm``.

Each expert's e4m3 weight ``[rows, K]`` becomes, in the same bytes, the sequence of the shared-
memory images the kernel's consumers read: for every 64-row block b (``rows / 64``) and every
K tile t (``K / 128``), 8 KiB = 64 rows x 128 B with row r holding expert row
``Fp8BlockGemm.weight_row(b, r)`` (FC1: up / gate interleaved) and its 16 B chunk c at chunk
``c ^ (r % 8)`` (the 128 B swizzle), so one ``cp.async.bulk`` moves a block's K tile ready for
WGMMA. Shapes and dtype are unchanged and the permutation stays inside each expert (DWDP moves
whole experts' bytes as they are). The block scales (``weight_scale_inv``) are not permuted.
"""
from __future__ import annotations

import torch

BLOCK_ROWS = 64
K_TILE = 128
CHUNK = 16


def image_rows(rows: int, fc1: bool) -> torch.Tensor:
    """int64 ``[rows / 64, 64]``: the expert row at row r of block b's image (``weight_row`` of
    ``fp8_gemm``: FC1 interleaves up rows ``32 b + 8 (r // 16) + r % 8`` with their gate rows
    ``I + ...``; FC2 is ``64 b + r``)."""
    b = torch.arange(rows // BLOCK_ROWS)[:, None]
    r = torch.arange(BLOCK_ROWS)[None, :]
    if fc1:
        return (r // 8) % 2 * (rows // 2) + b * 32 + (r // 16) * 8 + r % 8
    return b * BLOCK_ROWS + r


def _chunk_source() -> torch.Tensor:
    """int64 ``[64, 8]``: the linear chunk that lands at chunk c of image row r (XOR is its own
    inverse, so it is also where chunk c of row r goes)."""
    r = torch.arange(BLOCK_ROWS)[:, None]
    c = torch.arange(K_TILE // CHUNK)[None, :]
    return c ^ (r % 8)


def _check(w: torch.Tensor, who: str) -> tuple[int, int, int]:
    if w.dtype != torch.float8_e4m3fn or w.dim() != 3:
        raise ValueError(f"{who}: weights must be float8_e4m3fn [n, rows, K], got {w.dtype} "
                         f"{tuple(w.shape)}")
    n, rows, k = w.shape
    if rows % (2 * BLOCK_ROWS) or k % K_TILE:
        raise ValueError(f"{who}: rows {rows} must be a multiple of 128 and K {k} of {K_TILE}")
    return n, rows, k


def preshuffle_fp8(w: torch.Tensor, fc1: bool, chunk_experts: int = 16) -> torch.Tensor:
    """A new tensor: ``w`` (float8_e4m3fn ``[n, rows, K]``, checkpoint rows) in the bulk-copy
    layout (module docstring); ``fc1``: the weight is ``w3_w1`` (up / gate interleave).
    ``chunk_experts`` experts are permuted at a time (temporaries ~2x their bytes)."""
    n, rows, k = _check(w, "preshuffle_fp8")
    src_rows = image_rows(rows, fc1).reshape(-1).to(w.device)
    chunks = _chunk_source().to(w.device)
    out = torch.empty_like(w)
    blocks, tiles = rows // BLOCK_ROWS, k // K_TILE
    for e0 in range(0, n, chunk_experts):
        part = w[e0:e0 + chunk_experts].view(torch.uint8)
        m = part.shape[0]
        g = part[:, src_rows].view(m, blocks, BLOCK_ROWS, tiles, K_TILE // CHUNK, CHUNK)
        idx = chunks[None, None, :, None, :, None].expand(m, blocks, -1, tiles, -1, CHUNK)
        g = torch.gather(g, 4, idx)  # image chunk c of row r <- linear chunk c ^ (r % 8)
        out[e0:e0 + m].view(torch.uint8).copy_(
            g.permute(0, 1, 3, 2, 4, 5).reshape(m, rows, k))
    return out


def unshuffle_fp8(w: torch.Tensor, fc1: bool) -> torch.Tensor:
    """The inverse of ``preshuffle_fp8``: checkpoint rows again."""
    n, rows, k = _check(w, "unshuffle_fp8")
    blocks, tiles = rows // BLOCK_ROWS, k // K_TILE
    g = w.view(torch.uint8).view(n, blocks, tiles, BLOCK_ROWS, K_TILE // CHUNK, CHUNK)
    g = g.permute(0, 1, 3, 2, 4, 5)  # [n, block, row, tile, chunk, 16]
    idx = _chunk_source().to(w.device)[None, None, :, None, :, None].expand(
        n, blocks, -1, tiles, -1, CHUNK)
    g = torch.gather(g, 4, idx).reshape(n, rows, k)
    out = torch.empty_like(w)
    out.view(torch.uint8)[:, image_rows(rows, fc1).reshape(-1).to(w.device)] = g
    return out
