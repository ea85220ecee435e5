"""The W4A8 register decode of the sm90 kernel, checked on the CPU: a preshuffled NVFP4 word
-> e4m3 A-fragment bytes (``emulate_preshuffled_e4m3x8``, the same rotates, masks, e4m3 byte
placement, f16 scale multiply and byte permute as the inlined PTX) equals
``quant.w4a8.nvfp4_to_e4m3`` for every code in every slot and every finite e4m3 scale; and the
whole datapath (shuffled weights, fragment slots, ``permute_act_k16`` activations) contracts to
the reference GEMM of the unshuffled weights."""
import numpy as np
import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90 import preshuffle as ps  # noqa: E402
from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import (  # noqa: E402
    E4M3_PIECES,
    _preshuffled_e4m3_ptx,
    emulate_preshuffled_e4m3x8,
)
from tensorrt_llm_dwdp.quant.nvfp4 import pack_e2m1, quantize_nvfp4  # noqa: E402
from tensorrt_llm_dwdp.quant.w4a8 import nvfp4_to_e4m3  # noqa: E402


def _word(codes) -> int:
    word = 0
    for slot, code in enumerate(codes):
        for bit in range(4):
            word |= ((code >> bit) & 1) << ps.WORD_BITS[4 * slot + bit]
    return word


def test_placement_pieces_are_a_bijection_of_the_word():
    seen = 0
    for pieces in E4M3_PIECES:
        for shift, mask in pieces:
            src = ((mask >> shift) | (mask << (32 - shift))) & 0xFFFFFFFF if shift else mask
            assert not seen & src
            seen |= src
    assert seen == 0xFFFFFFFF
    assert _preshuffled_e4m3_ptx().count("cvt.rn.satfinite.e4m3x2.f16x2") == 4


def test_every_code_every_slot_every_scale_is_the_reference_rounding():
    gen = torch.Generator().manual_seed(2)
    rows = []
    for slot in range(8):
        for code in range(16):
            row = torch.randint(0, 16, (8,), generator=gen).tolist()
            row[slot] = code
            rows.append(row)
    codes = np.array(rows + torch.randint(0, 16, (64, 8), generator=gen).tolist())
    words = np.array([_word(r) for r in codes], dtype=np.uint32)
    finite = [c for c in range(256) if (c & 0x7F) != 0x7F]
    e4m3 = torch.tensor(finite, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for i in range(len(finite)):
        s0, s1 = e4m3[i], e4m3[(7 * i + 3) % len(finite)]
        got = emulate_preshuffled_e4m3x8(words, np.full(len(words), float(s0)),
                                         np.full(len(words), float(s1)))
        # reference: codes 0..3 (output words 0, 1: step 0) take s0, 4..7 take s1; one
        # 16-wide scale block per step (pad each half to 16 codes)
        half = torch.zeros(len(codes), 2, 16, dtype=torch.uint8)
        half[:, :, :4] = torch.as_tensor(codes, dtype=torch.uint8).reshape(-1, 2, 4)
        scale = torch.stack([s0.repeat(len(codes)), s1.repeat(len(codes))], dim=1)
        want = nvfp4_to_e4m3(pack_e2m1(half.reshape(len(codes), 32)), scale.view(-1, 2))
        want = want.float().reshape(-1, 2, 16)[:, :, :4].reshape(-1, 8).double().numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"scales {s0}, {s1}")


@pytest.mark.parametrize("gated", [False, True])
def test_datapath_contracts_to_the_reference(gated):
    """Replay the kernel's fragments from a preshuffled expert: for block b, K chunk kc, pair
    pp, consumer thread (warp, g, c) and row half h, the thread's word of the atom decodes to
    8 e4m3 weights at K slots 16 t + 4 c + b of the pair; dotted with the permuted
    activations at those slots this is the reference x @ nvfp4_to_e4m3(W)^T."""
    rows, k = 128, 128
    gen = torch.Generator().manual_seed(5)
    q = quantize_nvfp4(torch.randn(rows, k, generator=gen))
    shuffled = ps.shuffle_weight(q.packed, gated=gated)
    x = torch.randn(3, k, generator=gen)
    xp = ps.permute_act_k16(x).double()
    words = shuffled.reshape(-1, 4).contiguous().view(torch.int32).reshape(-1).numpy().view(np.uint32)
    # weights at (kernel row, slot) from the atoms; scales from the linear tensor
    wq = torch.zeros(rows, k, dtype=torch.float64)
    inter = rows // 2
    for b in range(rows // 64):
        for kc in range(k // 64):
            atom = (b * (k // 64) + kc) * 2048 // 4
            for warp in range(4):
                for g in range(8):
                    for c in range(4):
                        tq = 32 * warp + 4 * g + c
                        for pp in range(2):
                            for h in range(2):
                                if gated:
                                    row = h * inter + 32 * b + 8 * warp + g
                                else:
                                    row = 64 * b + 16 * warp + 8 * h + g
                                kb = 64 * kc + 32 * pp
                                s = q.scale[row, kb // 16: kb // 16 + 2].float()
                                v = emulate_preshuffled_e4m3x8(
                                    np.array([words[atom + 4 * tq + 2 * pp + h]], np.uint32),
                                    np.array([float(s[0])]), np.array([float(s[1])]))[0]
                                for t in range(2):
                                    for bb in range(4):
                                        wq[row, kb + 16 * t + 4 * c + bb] = v[4 * t + bb]
    got = xp @ wq.T
    want = x.double() @ nvfp4_to_e4m3(q.packed, q.scale).double().T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
