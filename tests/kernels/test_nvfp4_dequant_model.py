"""The register NVFP4 -> bf16 conversion of the sm90 kernels, checked on the CPU.

``emulate_e2m1x8_bf16`` replays the kernel's PTX steps (same table constants, prmt semantics)
in numpy; it must equal ``quant.nvfp4.dequantize_nvfp4`` for every e2m1 code in every nibble
position and every finite e4m3 scale.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import emulate_e2m1x8_bf16  # noqa: E402
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4  # noqa: E402


def test_every_code_every_position_every_scale():
    gen = torch.Generator().manual_seed(0)
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]  # drop the two e4m3 NaN codes
    # Each code 0..15 appears in every nibble position across these 16 rows per scale.
    base = torch.arange(16, dtype=torch.int64)
    nibbles = torch.stack([(base + p) % 16 for p in range(8)], dim=1)  # [16, 8]
    nibbles = torch.cat([nibbles, torch.randint(0, 16, (48, 8), generator=gen)])  # + random
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)  # [64, 4] bytes
    words = packed.numpy().view(np.uint32).reshape(-1)  # little-endian: byte i -> bits 8i
    for scale_code in finite.tolist():
        scale = torch.tensor([scale_code], dtype=torch.uint8).view(torch.float8_e4m3fn)
        got = emulate_e2m1x8_bf16(words, np.full(len(words), float(scale.float())))
        # Reference: one 16-element block per row (the 8 elements padded with zeros).
        row = torch.cat([packed, torch.zeros(len(packed), 4, dtype=torch.uint8)], dim=1)
        ref = dequantize_nvfp4(row, scale.expand(len(packed), 1).contiguous(), None,
                               torch.bfloat16)[:, :8].float().numpy()
        np.testing.assert_array_equal(got, ref, err_msg=f"scale code {scale_code:#x}")


def test_sign_bits_land_on_their_elements():
    # Only element i negative (code 0xA = -1.0) in turn; every other element +0.5 (code 1).
    for i in range(8):
        nib = [1] * 8
        nib[i] = 0xA
        word = sum(n << (4 * j) for j, n in enumerate(nib))
        got = emulate_e2m1x8_bf16(np.array([word], dtype=np.uint32), np.ones(1))[0]
        want = np.full(8, 0.5, dtype=np.float32)
        want[i] = -1.0
        np.testing.assert_array_equal(got, want)


def test_register_fragment_every_code_every_lane_every_scale():
    """``fragment_bf16x8`` (the RS kernel's A-fragment dequant): for each lane c of a quad, the
    8 weights of its A-fragment words across two k16 steps of one row, every e2m1 code in
    every byte position and nibble, every finite e4m3 scale (subnormal scales included)."""
    from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import (
        WEIGHT_EXP2,
        emulate_fragment_bf16x8,
    )

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
