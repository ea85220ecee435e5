"""The load-time NVFP4 pre-shuffle (``kernels/sm90/preshuffle.py``), on the CPU.

Exact round trips at every real expert shape, every expert's bytes staying inside its own
range (DWDP copies whole experts), each code found where an independent scalar statement of
the layout contract says it is, and the kernel's per-word decode turning every code in every
slot into the bf16 bits of ``code x 2^-126``.
"""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.sm90 import preshuffle as ps

pytestmark = pytest.mark.kernels

# (name, rows, K, gated): FC1 = w3_w1 [2I, H] (gated), FC2 = w2 [H, I]
SHAPES = [
    ("deepseek_v3_fc1", 4096, 7168, True), ("deepseek_v3_fc2", 7168, 2048, False),
    ("qwen3_235b_fc1", 3072, 4096, True), ("qwen3_235b_fc2", 4096, 1536, False),
    ("i2880_fc1", 5760, 2880, True), ("i2880_fc2", 2880, 2880, False),
    ("tiny64_fc1", 128, 64, True), ("tiny64_fc2", 64, 64, False),
]


def _experts(n, rows, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, rows, k // 2), generator=gen, dtype=torch.uint8)
    sf = torch.randint(0, 256, (n, rows, k // 16), generator=gen, dtype=torch.uint8)
    return w, sf.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("name,rows,k,gated", SHAPES, ids=[s[0] for s in SHAPES])
def test_round_trip_and_experts_stay_apart(name, rows, k, gated):
    n = 2 if rows * k <= 2**24 else 1
    w, sf = _experts(n, rows, k, seed=rows + k)
    sw, ssf = ps.shuffle_weight(w, gated=gated), ps.shuffle_scale(sf, gated=gated)
    assert sw.shape == w.shape and sw.dtype == w.dtype
    assert ssf.shape == sf.shape and ssf.dtype == sf.dtype
    assert not torch.equal(sw, w), "the shuffle left the bytes in place"
    assert torch.equal(ps.unshuffle_weight(sw, gated=gated), w)
    assert torch.equal(ps.unshuffle_scale(ssf, gated=gated).view(torch.uint8),
                       sf.view(torch.uint8))
    # one expert at a time gives the same bytes: nothing crosses an expert's byte range
    for e in range(n):
        assert torch.equal(ps.shuffle_weight(w[e], gated=gated), sw[e])
        assert torch.equal(ps.shuffle_scale(sf[e], gated=gated).view(torch.uint8),
                           ssf[e].view(torch.uint8))
    # and every code / scale byte value is conserved (a bit permutation inside each word)
    assert torch.equal(torch.bincount(sf.view(torch.uint8).flatten(), minlength=256),
                       torch.bincount(ssf.view(torch.uint8).flatten(), minlength=256))


def _locate(rows, k, gated, row, col):
    """The layout contract (module docstring) in scalar arithmetic, independent of the
    module's view/permute: (byte of the shuffled expert, output word j, nibble n) of weight
    (row, col), and the shuffled byte of its block scale."""
    if gated:
        inter = rows // 2
        h, rem = row // inter, row % inter
        b, warp, g = rem // 32, (rem % 32) // 8, rem % 8
    else:
        b, r64 = row // 64, row % 64
        warp, h, g = r64 // 16, (r64 // 8) % 2, r64 % 8
    kc, pp, t = col // 64, (col % 64) // 32, (col % 32) // 16
    kk, c, n = (col % 16) // 8, (col % 8) // 2, col % 2
    atom = b * (k // 64) + kc
    byte = atom * ps.WEIGHT_ATOM + (32 * warp + 4 * g + c) * 16 + 4 * (2 * pp + h)
    scale = atom * ps.SCALE_ATOM + ((pp * 4 + warp) * 8 + g) * 4 + 2 * h + t
    return byte, 2 * t + kk, n, scale


@pytest.mark.parametrize("name,rows,k,gated", SHAPES, ids=[s[0] for s in SHAPES])
def test_codes_sit_where_the_contract_says(name, rows, k, gated):
    w, sf = _experts(1, rows, k, seed=3)
    sw = ps.shuffle_weight(w, gated=gated)[0].flatten()
    ssf = ps.shuffle_scale(sf, gated=gated)[0].view(torch.uint8).flatten()
    gen = torch.Generator().manual_seed(rows)
    picks = torch.stack([torch.randint(0, rows, (3000,), generator=gen),
                         torch.randint(0, k, (3000,), generator=gen)], dim=1).tolist()
    # the corners of the expert and of its first / last block too
    picks += [[0, 0], [rows - 1, k - 1], [63, 63], [rows - 64, k - 64], [rows // 2, 1]]
    for row, col in picks:
        byte, j, n, sbyte = _locate(rows, k, gated, row, col)
        code = (int(w[0, row, col // 2]) >> (4 * (col % 2))) & 0xF
        word = int.from_bytes(bytes(sw[byte:byte + 4].tolist()), "little")
        got = sum(((word >> ps.WORD_BITS[8 * j + 4 * n + bit]) & 1) << bit for bit in range(4))
        assert got == code, f"{name}: weight ({row}, {col}) expected code {code}, got {got}"
        want = int(sf[0, row, col // 16].view(torch.uint8))
        assert int(ssf[sbyte]) == want, f"{name}: scale of ({row}, {col // 16}) misplaced"


def _bf16_bits(code: int) -> int:
    """bf16 bits of e2m1 ``code`` x 2^-126: sign at 15, E1 E0 M at 8..6."""
    return (code >> 3) << 15 | (code & 7) << 6


def test_decode_turns_every_code_in_every_slot_into_its_bf16():
    """``decode_word`` is the kernel's shift / mask sequence (``PIECES``): for every code in
    every slot (output word j, nibble n), surrounded by random codes, each output half holds
    exactly its own code's bf16 bits (no neighbour's bit leaks in)."""
    gen = torch.Generator().manual_seed(5)
    for slot in range(8):
        for code in range(16):
            for _ in range(8):
                codes = torch.randint(0, 16, (8,), generator=gen).tolist()
                codes[slot] = code
                word = 0
                for s, cv in enumerate(codes):  # slot s = 2 j + n
                    for bit in range(4):
                        word |= ((cv >> bit) & 1) << ps.WORD_BITS[4 * s + bit]
                out = ps.decode_word(word)
                for j in range(4):
                    want = _bf16_bits(codes[2 * j]) | _bf16_bits(codes[2 * j + 1]) << 16
                    assert out[j] == want, (slot, code, codes, j, hex(out[j]), hex(want))


def test_shapes_off_the_kernel_grid_are_refused():
    with pytest.raises(ValueError, match="multiples of 64"):
        ps.shuffle_weight(torch.zeros(1, 96, 32, dtype=torch.uint8), gated=False)
    with pytest.raises(ValueError, match="multiples of 64"):
        ps.shuffle_scale(torch.zeros(1, 64, 6, dtype=torch.uint8).view(torch.float8_e4m3fn),
                         gated=True)
    with pytest.raises(ValueError, match="uint8"):
        ps.shuffle_weight(torch.zeros(1, 64, 32, dtype=torch.int8), gated=False)


def test_model_experts_are_the_preshuffled_copy_of_the_same_draw(monkeypatch):
    """The benches' in-place helper gives the bytes ``preshuffled_experts`` gives from a copy."""
    from tensorrt_llm_dwdp.kernels import testing

    monkeypatch.setitem(testing.MODELS, "tiny", (128, 64, 4, 2))
    got = testing.model_experts("tiny", seed=3, device="cpu")
    want = testing.preshuffled_experts(testing.random_nvfp4_experts(4, 128, 64, seed=3, device="cpu"))
    assert got.weight_layout == want.weight_layout == "preshuffled"
    assert got.tensors.keys() == want.tensors.keys()
    for name, (t,) in got.tensors.items():
        w = want.tensors[name][0]
        assert t.dtype == w.dtype and torch.equal(t.view(torch.uint8), w.view(torch.uint8)), name
