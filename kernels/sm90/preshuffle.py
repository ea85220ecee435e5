"""Load-time pre-shuffle of NVFP4 expert weights: the only layout the sm90 RS kernel reads.

Pure torch on any device (no CUTLASS import): ``shuffle_weight`` / ``shuffle_scale`` permute one
or more experts' packed e2m1 bytes / e4m3 block scales into the order in which the kernel's
consumer threads read them; ``unshuffle_weight`` / ``unshuffle_scale`` undo it exactly. Shapes
and dtypes do not change (uint8 ``[n, rows, K/2]``, float8_e4m3fn ``[n, rows, K/16]``), and
every expert's bytes stay inside that expert's byte range: DWDP's whole-expert copies (peer
prefetch, host tiers, composite views) move shuffled experts unchanged. A tensor's layout is
not visible in its bytes, so whoever shuffles must tag it (``LAYOUT``) and every reader of the
tag either runs the kernel or unshuffles (``moe/layouts.py``, kernels/NOTES.md); checkpoints on
disk stay linear.

Kernel order of the rows (one 64-row WGMMA block ``b``, row ``r64 = 16 warp + 8 h + g`` of it):
plain (``w2``): expert row ``64 b + r64``; gated (``w3_w1``, FC1's SwiGLU pairs): up row
``32 b + 8 warp + g`` (h = 0) and gate row ``I + 32 b + 8 warp + g`` (h = 1), so accumulator
rows g and g + 8 of each 16-row group are one output column's up and gate. K is cut in
64-wide chunks ``kc``: ``k = 64 kc + 32 pp + 16 t + 8 kk + 2 c + n`` (pair ``pp``, WGMMA k16
step ``t``, the fragment's low / high 8 columns ``kk``, quad lane ``c``, nibble ``n``).

Weights: expert -> ``[block][kc]`` atoms of 2048 bytes; in an atom, consumer thread ``tq = 32
warp + 4 g + c`` of a warpgroup owns bytes ``[16 tq, 16 tq + 16)``: word ``v = 2 pp + h`` holds
the 8 codes of row (warp, h, g) that thread's A fragments need for pair ``pp``: output word
``j = 2 t + kk`` (A-fragment register ``2 kk + h`` of step ``t``) from codes ``n = 0, 1`` of
byte ``j``, with the 32 bits placed (``WORD_BITS``) so that the kernel's decode
(``nvfp4_dequant.fragment_preshuffled_bf16x8``, modelled by ``decode_word``) needs 4 shifts
and 5 logic ops per word (the checkpoint's linear rows needed a byte select and 4 more per
OUTPUT word, the kernel's former path):
  o0 = w & M;  o1 = (w << 4) & M;  o2 = rotl(w, 10) & M;
  o3 = ((w << 6) & 0x80C080C0) | (rotl(w, 14) & 0x01000100);   M = 0x81C081C0
each ``o`` being two bf16 ``sign | 0 .. 0 E1 E0 | M 0 .. 0`` = code x 2^-126 (the same bits the
linear rows' decode built; no placement needs fewer: the four shifted copies of M cannot tile the
32 bits). A block's K tile (one or two atoms) is one contiguous range, copied in one piece,
and one 16-byte shared load gives a thread two pairs of one block.

Scales: expert -> ``[block][kc]`` atoms of 256 bytes, byte ``((pp 4 + warp) 8 + g) 4 + 2 h + t``
is the scale of row (warp, h, g), K block ``4 kc + 2 pp + t``: one 4-byte word per (pair, row
pair) that the producer turns into two bf16x2 words (step 0 scale low, step 1 high) and the
consumer multiplies with ``.H0_H0`` / ``.H1_H1`` half selectors (no splat words).
"""
from __future__ import annotations

import torch

from .grouped_launch import BLOCK_ROWS

LAYOUT = "preshuffled"  # the tag shuffled experts carry (``ExpertWeights.weight_layout``)
K_CHUNK = 64
WEIGHT_ATOM = BLOCK_ROWS * K_CHUNK // 2  # bytes per (block, K chunk)
SCALE_ATOM = BLOCK_ROWS * K_CHUNK // 16

OUT_MASK = 0x81C081C0  # sign 15 / 31, E1 E0 M at 8..6 / 24..22 of a bf16x2 word
# Output word j = rotl(word, shift) & mask, or the OR of two such pieces (j = 3).
PIECES = (
    ((0, OUT_MASK),),
    ((4, OUT_MASK),),
    ((10, OUT_MASK),),
    ((6, 0x80C080C0), (14, 0x01000100)),
)
_NIBBLE_BITS = (6, 7, 8, 15)  # M, E0, E1, sign of a code -> bit of its bf16 half


def _word_bits() -> tuple[int, ...]:
    """``WORD_BITS[8 j + 4 n + b]``: the bit of a shuffled word holding bit ``b`` of code ``n``
    of output word ``j`` (a bijection of 0..31, checked)."""
    dst = []
    for j, pieces in enumerate(PIECES):
        for n in range(2):
            for b in range(4):
                p = 16 * n + _NIBBLE_BITS[b]
                shift = next(s for s, mask in pieces if mask >> p & 1)
                dst.append((p - shift) % 32)
    if sorted(dst) != list(range(32)):
        raise AssertionError(f"the word bit placement is not a bijection: {dst}")
    return tuple(dst)


WORD_BITS = _word_bits()


def decode_word(word: int) -> tuple[int, ...]:
    """The four bf16x2 output words of one shuffled word, as the kernel computes them."""
    out = []
    for pieces in PIECES:
        o = 0
        for shift, mask in pieces:
            o |= ((word << shift) | (word >> (32 - shift))) & mask if shift else word & mask
        out.append(o)
    return tuple(out)


def _check(t: torch.Tensor, dtype: torch.dtype, name: str, per_k: int):
    if t.dtype != dtype or t.dim() not in (2, 3):
        raise ValueError(f"{name}: expected {dtype} [n, rows, K/{per_k}] or [rows, K/{per_k}], "
                         f"got {t.dtype} {tuple(t.shape)}")
    rows, cols = t.shape[-2:]
    k = cols * per_k
    if rows % BLOCK_ROWS or k % K_CHUNK:
        raise ValueError(f"{name}: rows {rows} and K {k} must be multiples of {BLOCK_ROWS} and "
                         f"{K_CHUNK} (the kernel's blocks and K chunks); got {tuple(t.shape)}")
    return rows, k


def _row_dims(rows: int, gated: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view sizes of the row axis in expert order, their positions as (b, warp, h, g))."""
    if gated:  # expert row = h I + 32 b + 8 warp + g
        return (2, rows // BLOCK_ROWS, 4, 8), (1, 2, 0, 3)
    return (rows // BLOCK_ROWS, 4, 2, 8), (0, 1, 2, 3)  # 64 b + 16 warp + 8 h + g


def _weight_order(rows: int, k: int, gated: bool):
    """(view of ``[n, rows, K/2]`` bytes, permutation to atom order, inverse permutation).
    Atom order dims: n, b, kc, warp, g, c, pp, h, t, kk (one byte = codes n of word j)."""
    rdims, (b, warp, h, g) = _row_dims(rows, gated)
    view = (-1, *rdims, k // K_CHUNK, 2, 2, 2, 4)  # rows, then kc, pp, t, kk, c
    kc, pp, t, kk, c = 5, 6, 7, 8, 9
    perm = (0, 1 + b, kc, 1 + warp, 1 + g, c, pp, 1 + h, t, kk)
    return view, perm, _inverse(perm)


def _scale_order(rows: int, k: int, gated: bool):
    """Same for ``[n, rows, K/16]`` scales: atom order n, b, kc, pp, warp, g, h, t."""
    rdims, (b, warp, h, g) = _row_dims(rows, gated)
    view = (-1, *rdims, k // K_CHUNK, 2, 2)  # rows, then kc, pp, t
    kc, pp, t = 5, 6, 7
    perm = (0, 1 + b, kc, pp, 1 + warp, 1 + g, 1 + h, t)
    return view, perm, _inverse(perm)


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _scatter_bits(words: torch.Tensor, table, inverse: bool) -> torch.Tensor:
    """Move bit ``i`` of each int64 word to bit ``table[i]`` (``inverse``: the other way),
    one masked shift per distinct distance."""
    moves: dict[int, int] = {}
    for i, d in enumerate(table):
        src, dst = (d, i) if inverse else (i, d)
        moves[dst - src] = moves.get(dst - src, 0) | 1 << src
    out = torch.zeros_like(words)
    for delta, mask in moves.items():
        part = words & mask
        out |= part << delta if delta >= 0 else part >> -delta
    return out


def _bytes_to_words(b: torch.Tensor) -> torch.Tensor:
    q = b.reshape(-1, 4).to(torch.int64)
    return q[:, 0] | q[:, 1] << 8 | q[:, 2] << 16 | q[:, 3] << 24


def _words_to_bytes(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=1).to(torch.uint8)


def shuffle_weight(w: torch.Tensor, *, gated: bool) -> torch.Tensor:
    """Packed e2m1 ``[n, rows, K/2]`` (or one expert ``[rows, K/2]``) in the linear NVFP4
    layout -> the same shape in the preshuffled layout (a new tensor on ``w``'s device).
    ``gated``: ``w3_w1`` (rows ``[0, I)`` up, ``[I, 2I)`` gate), else ``w2``."""
    rows, k = _check(w, torch.uint8, "shuffle_weight", 2)
    view, perm, _ = _weight_order(rows, k, gated)
    atoms = w.reshape(view).permute(perm).contiguous()
    words = _scatter_bits(_bytes_to_words(atoms), WORD_BITS, inverse=False)
    return _words_to_bytes(words).reshape(w.shape)


def unshuffle_weight(w: torch.Tensor, *, gated: bool) -> torch.Tensor:
    """The inverse of ``shuffle_weight`` (bit-exact)."""
    rows, k = _check(w, torch.uint8, "unshuffle_weight", 2)
    view, perm, inv = _weight_order(rows, k, gated)
    words = _scatter_bits(_bytes_to_words(w), WORD_BITS, inverse=True)
    atoms = _words_to_bytes(words).reshape(_atom_shape(view, perm, w.numel() * 2 // (rows * k)))
    return atoms.permute(inv).contiguous().reshape(w.shape)


def _atom_shape(view, perm, experts: int) -> list[int]:
    sizes = [experts, *view[1:]]
    return [sizes[p] for p in perm]


def shuffle_scale(sf: torch.Tensor, *, gated: bool) -> torch.Tensor:
    """e4m3 block scales ``[n, rows, K/16]`` (or ``[rows, K/16]``), linear -> preshuffled."""
    rows, k = _check(sf, torch.float8_e4m3fn, "shuffle_scale", 16)
    view, perm, _ = _scale_order(rows, k, gated)
    raw = sf.view(torch.uint8).reshape(view).permute(perm).contiguous()
    return raw.reshape(sf.shape).view(torch.float8_e4m3fn)


def unshuffle_scale(sf: torch.Tensor, *, gated: bool) -> torch.Tensor:
    """The inverse of ``shuffle_scale``."""
    rows, k = _check(sf, torch.float8_e4m3fn, "unshuffle_scale", 16)
    view, perm, inv = _scale_order(rows, k, gated)
    atoms = _atom_shape(view, perm, sf.numel() * 16 // (rows * k))
    raw = sf.view(torch.uint8).reshape(atoms).permute(inv).contiguous()
    return raw.reshape(sf.shape).view(torch.float8_e4m3fn)


def permute_act_k16(x: torch.Tensor) -> torch.Tensor:
    """The W4A8 kernel's activation order: inside every 16-wide group of K, element
    ``8 kk + 2 c + n`` moves to ``4 c + 2 kk + n`` (kk, n in {0, 1}, c in 0..3), the fp8 A-fragment
    slot where the fp8 kernel puts that weight code of a preshuffled word
    (``nvfp4_dequant.fragment_preshuffled_e4m3x8``): a permutation of the contraction, so
    ``permute_act_k16(x) . W'^T`` with the kernel's fragments equals ``x . W^T``. ``x [..., K]``
    with K a multiple of 16, any dtype; returns a new contiguous tensor (scales per 128 of K
    are unchanged: groups never cross a 16-boundary)."""
    k = x.shape[-1]
    if k % 16:
        raise ValueError(f"permute_act_k16: K={k} must be a multiple of 16")
    groups = x.reshape(*x.shape[:-1], k // 16, 2, 4, 2)  # kk, c, n
    return groups.transpose(-3, -2).contiguous().reshape(x.shape)
