"""The register NVFP4 -> bf16 conversion of the sm90 kernel, checked on the CPU.

``emulate_fragment_bf16x8`` replays the kernel's PTX steps (same masks, prmt semantics, bf16
bit placement and scale pre-factor) in numpy; each lane's A-fragment weights must equal
``quant.nvfp4.dequantize_nvfp4`` for every byte value in every position and every finite e4m3
scale, subnormal scales included.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import (  # noqa: E402
    WEIGHT_EXP2,
    emulate_fragment_bf16x8,
)
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4  # noqa: E402


def test_sign_bits_land_on_their_elements():
    """Only one element negative (code 0xA = -1.0), all others +0.5 (code 1, the bf16
    subnormal case): each lane sees the minus sign exactly at its own fragment position."""
    for neg in range(32):
        codes = np.ones(32, dtype=np.uint8)
        codes[neg] = 0xA
        row = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
        words = row.view(np.uint32).reshape(1, 4)
        for c in range(4):
            cols = [2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9,
                    16 + 2 * c, 17 + 2 * c, 24 + 2 * c, 25 + 2 * c]
            got = emulate_fragment_bf16x8(words, c, np.ones(1), np.ones(1))[0]
            want = np.where(np.array(cols) == neg, -1.0, 0.5)
            np.testing.assert_array_equal(got * 2.0 ** -WEIGHT_EXP2, want)


def test_register_fragment_every_code_every_lane_every_scale():
    """``fragment_bf16x8`` (the RS kernel's A-fragment dequant): for each lane c of a quad, the
    8 weights of its A-fragment words across two k16 steps of one row, every e2m1 code in
    every byte position and nibble, every finite e4m3 scale (subnormal scales included)."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    # 32 rows of 16 packed bytes: rows 0..15 put byte value (16 r + i) % 256 at byte i (all
    # 256 byte values in every byte position), then random rows.
    idx = torch.arange(16)
    rows = torch.stack([(16 * r + idx) % 256 for r in range(16)]).to(torch.uint8)
    rows = torch.cat([rows, torch.randint(0, 256, (16, 16), generator=gen, dtype=torch.uint8)])
    words = rows.numpy().view(np.uint32).reshape(-1, 4)
    for scale_code in finite.tolist()[::3] + [0x01, 0x08, 0x7E]:
        s0 = torch.tensor([scale_code], dtype=torch.uint8).view(torch.float8_e4m3fn)
        s1 = torch.tensor([(scale_code * 7 + 3) % 256], dtype=torch.uint8)
        if (s1.item() & 0x7F) == 0x7F:
            s1 -= 1
        s1 = s1.view(torch.float8_e4m3fn)
        scales = torch.cat([s0, s1]).expand(len(rows), 2).contiguous()
        ref = dequantize_nvfp4(rows, scales, None, torch.float32).numpy()  # [n, 32]
        for c in range(4):
            got = emulate_fragment_bf16x8(words, c, np.full(len(rows), float(s0.float())),
                                          np.full(len(rows), float(s1.float())))
            cols = [2 * c, 2 * c + 1, 2 * c + 8, 2 * c + 9,
                    16 + 2 * c, 17 + 2 * c, 24 + 2 * c, 25 + 2 * c]
            np.testing.assert_array_equal(got * 2.0 ** -WEIGHT_EXP2, ref[:, cols],
                                          err_msg=f"lane {c}, scales {scale_code:#x}")


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
