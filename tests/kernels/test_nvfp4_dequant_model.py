"""The register NVFP4 -> bf16 conversion of the sm90 kernel, checked on the CPU.

``emulate_preshuffled_bf16x8`` replays the kernel's decode of a preshuffled word (the same
shifts, masks, bf16 bit placement and scale pre-factor) in numpy; each slot's weights must equal
``quant.nvfp4.dequantize_nvfp4`` for every e2m1 code in every slot of the word and every finite
e4m3 scale, subnormal scales included. The PTX text the kernel inlines is interpreted
instruction by instruction against that model.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90 import preshuffle as ps  # noqa: E402
from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import (  # noqa: E402
    WEIGHT_EXP2,
    emulate_preshuffled_bf16x8,
)
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4  # noqa: E402


def _word(codes) -> int:
    """The shuffled word holding ``codes[2 j + n]`` as code n of output word j (``WORD_BITS``)."""
    word = 0
    for slot, code in enumerate(codes):
        for bit in range(4):
            word |= ((code >> bit) & 1) << ps.WORD_BITS[4 * slot + bit]
    return word


def _e2m1(codes: np.ndarray) -> np.ndarray:
    """Exact e2m1 values of ``codes`` (via ``dequantize_nvfp4`` with unit scales)."""
    codes = torch.as_tensor(codes, dtype=torch.uint8).reshape(-1)
    pad = torch.zeros((-len(codes)) % 16, dtype=torch.uint8)
    c = torch.cat([codes, pad]).reshape(-1, 2)
    packed = (c[:, 0] | (c[:, 1] << 4)).reshape(1, -1)
    ones = torch.ones(1, packed.shape[1] // 8).to(torch.float8_e4m3fn)
    return dequantize_nvfp4(packed, ones, None, torch.float32).numpy()[0, :len(codes)]


def test_sign_bits_land_on_their_elements():
    """Only one element negative (code 0xA = -1.0), all others +0.5 (code 1, the bf16
    subnormal case): the minus sign comes out exactly at that element's slot."""
    for neg in range(8):
        codes = [1] * 8
        codes[neg] = 0xA
        got = emulate_preshuffled_bf16x8(np.array([_word(codes)], dtype=np.uint32),
                                         np.ones(1), np.ones(1))[0]
        want = np.where(np.arange(8) == neg, -1.0, 0.5)
        np.testing.assert_array_equal(got * 2.0 ** -WEIGHT_EXP2, want)


def test_preshuffled_fragment_every_code_every_slot_every_scale():
    """``fragment_preshuffled_bf16x8`` (the kernel's A-fragment dequant, modelled): every e2m1
    code in every slot (output word j, nibble n) with random neighbours, times every finite
    e4m3 scale (subnormals included; slots of words 0, 1 take step 0's scale, 2, 3 step 1's),
    equals the exact NVFP4 product x 2^WEIGHT_EXP2 (the model also asserts each product is
    exact in bf16)."""
    gen = torch.Generator().manual_seed(1)
    codes = []
    for slot in range(8):  # every code in every slot, the other slots random
        for code in range(16):
            row = torch.randint(0, 16, (8,), generator=gen).tolist()
            row[slot] = code
            codes.append(row)
    codes = np.array(codes + torch.randint(0, 16, (64, 8), generator=gen).tolist())
    words = np.array([_word(r) for r in codes], dtype=np.uint32)
    values = _e2m1(codes).reshape(codes.shape)
    finite = [c for c in range(256) if (c & 0x7F) != 0x7F]
    e4m3 = torch.tensor(finite, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    for i, s0 in enumerate(e4m3):
        s1 = e4m3[(7 * i + 3) % len(e4m3)]
        got = emulate_preshuffled_bf16x8(words, np.full(len(words), s0),
                                         np.full(len(words), s1))
        want = values * np.array([s0] * 4 + [s1] * 4)
        np.testing.assert_array_equal(got * 2.0 ** -WEIGHT_EXP2, want,
                                      err_msg=f"scales {finite[i]:#x}, {s1}")


def _run_ptx(text: str, word: int, scales: int) -> list:
    """A tiny interpreter of the preshuffled decode's PTX text: the integer ops on ``$4``
    (the shuffled word) and, for each ``mul.rn.bf16x2 $j``, (its integer operand, the scale
    register it multiplies by as (half, half) of ``$5``)."""
    regs = {"$4": word, "$5": scales}
    outs = [None] * 4
    for ins in (i.strip() for i in text.replace("\n", "").split(";")):
        if not ins or ins.startswith((".reg", "{", "}")):
            continue
        ins = ins.lstrip("{").strip()
        op, args = ins.split(None, 1)
        if op == "mov.b32" and args.startswith("{lo, hi}"):
            regs["lo"], regs["hi"] = scales & 0xFFFF, scales >> 16
            continue
        a = [x.strip() for x in args.replace("{", "").replace("}", "").split(",")]
        val = lambda x: regs[x] if x in regs else int(x, 0)  # noqa: E731
        if op == "mov.b32" and len(a) == 3:  # mov.b32 s, {h, h}
            regs[a[0]] = val(a[1]) | val(a[2]) << 16
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "and.b32":
            regs[a[0]] = val(a[1]) & val(a[2])
        elif op == "or.b32":
            regs[a[0]] = val(a[1]) | val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "shf.l.wrap.b32":  # funnel (hi = a[2], lo = a[1]) << n, high word
            n = val(a[3]) % 32
            regs[a[0]] = ((val(a[2]) << 32 | val(a[1])) << n >> 32) & 0xFFFFFFFF
        elif op == "mul.rn.bf16x2":
            outs[int(a[0][1:])] = (val(a[1]), val(a[2]))
        else:
            raise AssertionError(f"unmodelled PTX instruction {ins!r}")
    return outs


def test_preshuffled_ptx_text_is_the_modelled_decode():
    """The PTX the kernel inlines (generated from ``preshuffle.PIECES``, with plain shifts
    where no masked bit wraps) computes ``preshuffle.decode_word`` and scales output words
    0, 1 by step 0's scale (low half of the scale word) and 2, 3 by step 1's (high half)."""
    from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import _PRESHUFFLED_PTX
    from tensorrt_llm_dwdp.kernels.sm90.preshuffle import decode_word

    gen = np.random.default_rng(3)
    for word in [0, 0xFFFFFFFF, 0x80000001] + gen.integers(0, 2**32, 200).tolist():
        scales = 0x1234ABCD
        outs = _run_ptx(_PRESHUFFLED_PTX, int(word), scales)
        assert [o for o, _ in outs] == list(decode_word(int(word))), hex(word)
        assert [s for _, s in outs] == [0xABCDABCD] * 2 + [0x12341234] * 2
