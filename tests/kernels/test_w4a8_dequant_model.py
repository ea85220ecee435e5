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


def _f16(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _e4m3(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def _run_e4m3_ptx(text: str, word: int, scales: int) -> list[int]:
    """Interpret the W4A8 decode's PTX text (PTX semantics: the low byte / half of a pair is
    its first element; prmt selector nibble i picks byte i of the result) on one preshuffled
    ``word`` and f16x2 ``scales``: returns the two output registers."""
    regs = {"$2": word, "$3": scales}
    outs = [0, 0]
    for ins in (i.strip() for i in text.replace("\n", "").split(";")):
        ins = ins.lstrip("{").strip()
        if not ins or ins.startswith((".reg", "}")):
            continue
        op, args = ins.split(None, 1)
        a = [x.strip() for x in args.replace("{", "").replace("}", "").split(",")]
        val = lambda x: regs[x] if x in regs else int(x, 0)  # noqa: E731
        if op == "mov.b32" and len(a) == 3 and a[0] == "lo":  # unpack {lo, hi}, src
            regs["lo"], regs["hi"] = val(a[2]) & 0xFFFF, val(a[2]) >> 16
        elif op == "mov.b32" and len(a) == 3:  # pack dst, {h0, h1}
            regs[a[0]] = val(a[1]) | val(a[2]) << 16
        elif op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op in ("and.b32", "or.b32"):
            regs[a[0]] = val(a[1]) & val(a[2]) if op == "and.b32" else val(a[1]) | val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & 0xFFFFFFFF
        elif op == "shf.l.wrap.b32":
            n = val(a[3]) % 32
            regs[a[0]] = ((val(a[2]) << 32 | val(a[1])) << n >> 32) & 0xFFFFFFFF
        elif op == "cvt.rn.f16x2.e4m3x2":
            pair = [_e4m3((val(a[1]) >> (8 * i)) & 0xFF) for i in range(2)]
            halves = np.array(pair, dtype=np.float16).view(np.uint16).astype(int)
            regs[a[0]] = int(halves[0]) | int(halves[1]) << 16
        elif op == "mul.rn.f16x2":
            x, y = val(a[1]), val(a[2])
            prod = [_f16((x >> s) & 0xFFFF) * _f16((y >> s) & 0xFFFF) for s in (0, 16)]
            halves = np.array(prod, dtype=np.float16).view(np.uint16).astype(int)
            regs[a[0]] = int(halves[0]) | int(halves[1]) << 16
        elif op == "cvt.rn.satfinite.e4m3x2.f16x2":
            x = val(a[1])
            pair = torch.tensor([_f16(x & 0xFFFF), _f16(x >> 16)]).clamp(-448, 448)
            b = pair.to(torch.float8_e4m3fn).view(torch.uint8).tolist()
            regs[a[0]] = b[0] | b[1] << 8
        elif op == "prmt.b32":
            src, sel = val(a[1]) | val(a[2]) << 32, val(a[3])
            regs[a[0]] = sum(((src >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i)
                             for i in range(4))
            if a[0].startswith("$"):
                outs[int(a[0][1:])] = regs[a[0]]
        else:
            raise AssertionError(f"unmodelled PTX instruction {ins!r}")
    return outs


def test_e4m3_ptx_text_is_the_modelled_decode():
    """The PTX the kernel inlines computes ``emulate_preshuffled_e4m3x8``: the same bytes in
    the same fragment slots, for random words and scale pairs (subnormal scales included)."""
    gen = np.random.default_rng(4)
    finite = [c for c in range(256) if (c & 0x7F) != 0x7F]
    for word in [0, 0xFFFFFFFF, 0x80000001] + gen.integers(0, 2**32, 100).tolist():
        c0, c1 = (int(gen.choice(finite)) for _ in range(2))
        s0, s1 = _e4m3(c0), _e4m3(c1)
        scales = np.array([s0 * 8, s1 * 8], dtype=np.float16).view(np.uint16).astype(int)
        regs = _run_e4m3_ptx(_preshuffled_e4m3_ptx(), int(word), int(scales[0]) | int(scales[1]) << 16)
        got = [_e4m3((regs[t] >> (8 * b)) & 0xFF) for t in range(2) for b in range(4)]
        want = emulate_preshuffled_e4m3x8(np.array([word], np.uint32), np.array([s0]),
                                          np.array([s1]))[0]
        np.testing.assert_array_equal(np.array(got), want, err_msg=hex(int(word)))


def test_scale_pairs_ptx_is_the_f16_scale_times_8():
    from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import _E4M3X4_F16_PTX

    text = _E4M3X4_F16_PTX.replace("$0", "$o0").replace("$1", "$o1")
    assert "0x48004800" in text  # f16 8.0 in both halves
    for raw in (0x01020304, 0x7E7EFEFE, 0x00080800):
        regs = {"$2": raw}
        for ins in (i.strip() for i in text.replace("\n", "").split(";")):
            ins = ins.lstrip("{").strip()
            if not ins or ins.startswith((".reg", "}")):
                continue
            op, args = ins.split(None, 1)
            a = [x.strip() for x in args.replace("{", "").replace("}", "").split(",")]
            if op == "mov.b32" and a[0] == "lo":
                regs["lo"], regs["hi"] = raw & 0xFFFF, raw >> 16
            elif op == "mov.b32":
                regs[a[0]] = int(a[1], 0)
            elif op == "cvt.rn.f16x2.e4m3x2":
                v = [_e4m3((regs[a[1]] >> (8 * i)) & 0xFF) for i in range(2)]
                regs[a[0]] = v
            elif op == "mul.rn.f16x2":
                regs[a[0]] = [x * 8.0 for x in regs[a[1]]]
        want = [_e4m3((raw >> (8 * i)) & 0xFF) * 8 for i in range(4)]
        assert regs["$o0"] + regs["$o1"] == want
        assert all(np.float16(v) == v for v in want)  # exact in f16
