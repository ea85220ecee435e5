"""NVFP4 format: code tables, rounding, packing, the ModelOpt recipe, round-trip error, errors."""
import pytest
import torch

from tensorrt_llm_dwdp.quant.nvfp4 import (
    E2M1_VALUES,
    Nvfp4Tensor,
    dequantize_nvfp4,
    e2m1_e4m3_exact_in,
    e2m1_e4m3_products,
    e2m1_to_float,
    float_to_e2m1,
    pack_e2m1,
    quantize_nvfp4,
    quantize_nvfp4_per_leading,
    unpack_e2m1,
)

MAGS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_code_table_exhaustive():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_to_float(codes)
    assert values.tolist() == MAGS + [-m for m in MAGS]
    assert torch.signbit(values[8])  # code 8 is -0.0
    back = float_to_e2m1(values)
    expected = codes.clone()
    expected[8] = 0  # -0.0 is not < 0: it encodes as +0
    assert torch.equal(back, expected)


@pytest.mark.parametrize(
    "x,code",
    [
        (0.25, 0), (0.2500001, 1), (0.75, 2), (0.7499999, 1), (1.25, 2), (1.2500001, 3),
        (1.75, 4), (1.7499999, 3), (2.5, 4), (2.5000002, 5), (3.5, 6), (3.4999998, 5),
        (5.0, 6), (5.0000005, 7), (6.0, 7), (100.0, 7), (-0.1, 8), (-0.75, 10), (-2.5, 12),
        (-3.5, 14), (-1e9, 15),
    ],
)
def test_rounding_ties_to_even_and_saturation(x, code):
    assert float_to_e2m1(torch.tensor([x], dtype=torch.float32)).item() == code


def test_rounding_is_nearest_even_on_dense_grid():
    # Every multiple of 1/64 in [-7, 7]: the chosen magnitude is a nearest one, ties to even.
    x = torch.arange(-7 * 64, 7 * 64 + 1, dtype=torch.float32) / 64
    got = e2m1_to_float(float_to_e2m1(x)).abs()
    mags = torch.tensor(MAGS)
    dist = (x.abs().clamp(max=6)[:, None] - mags[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal((got - x.abs().clamp(max=6)).abs(), best)
    ties = (dist == best[:, None]).sum(dim=1) > 1
    tie_codes = float_to_e2m1(x[ties]) & 0x7
    assert ties.sum() > 10 and torch.all(tie_codes % 2 == 0)


def test_float_to_e2m1_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        float_to_e2m1(torch.tensor([1.0, float("nan")]))


def test_pack_layout_hand_computed_bytes():
    codes = torch.tensor([[0x1, 0x2, 0xF, 0x0, 0x7, 0x8, 0xA, 0x5]], dtype=torch.uint8)
    packed = pack_e2m1(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87, 0x5A]]
    assert torch.equal(unpack_e2m1(packed), codes)


def test_pack_layout_matches_torch_float4_e2m1fn_x2():
    # torch documents float4_e2m1fn_x2 as "val1 : val0" = bits 7654 : 3210; its ONNX exporter
    # unpacks the low nibble to element 0. Our bytes must read the same way.
    unpack = pytest.importorskip(
        "torch.onnx._internal.exporter._type_casting",
        reason="torch build without the ONNX exporter's float4 helper",
    ).unpack_float4x2_as_uint8
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 32), dtype=torch.uint8, generator=gen)
    packed = pack_e2m1(codes).view(torch.float4_e2m1fn_x2)
    assert packed.shape == (6, 16)
    assert torch.equal(torch.from_numpy(unpack(packed)), codes)


def test_quantize_hand_computed():
    # global scale 1, block amax 6 -> block scale e4m3(1.0); codes are plain e2m1 roundings.
    x = torch.tensor(
        [0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, -0.1, -0.75, 0.3, 2.6, 4.9, 5.1, -6]
    )
    q = quantize_nvfp4(x, global_scale=1.0)
    assert q.packed.tolist() == [0x00, 0x22, 0x44, 0x66, 0x87, 0x1A, 0x65, 0xF7]
    assert q.scale.float().tolist() == [1.0]
    assert q.global_scale.item() == 1.0
    # Recipe: amax 2688 -> global scale 1; block amax 3 -> scale 0.5; second block all zero -> 1.
    w = torch.zeros(2, 32)
    w[0, 0] = 2688.0
    w[1, :16] = torch.linspace(-3, 3, 16)
    q = quantize_nvfp4(w)
    assert q.global_scale.item() == 1.0
    assert q.scale.float().tolist() == [[448.0, 1.0], [0.5, 1.0]]
    assert q.packed[0, 0].item() == 0x07 and q.packed[0, 1:].eq(0).all()
    assert torch.equal(q.dequantize()[1, :16], e2m1_to_float(float_to_e2m1(w[1, :16] / 0.5)) * 0.5)


def test_block_scale_is_rounded_e4m3_of_recipe():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 1, 8)[:, None]
    q = quantize_nvfp4(w.bfloat16())
    amax = w.bfloat16().float().abs().amax()
    assert q.global_scale.item() == pytest.approx((amax / 2688).item(), rel=0, abs=0)
    block_amax = w.bfloat16().float().reshape(8, 4, 16).abs().amax(-1)
    assert torch.equal(q.scale, (block_amax / (6 * q.global_scale)).to(torch.float8_e4m3fn))


def _half_spacing(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_bound(dtype):
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(4, 96, 128, generator=gen) * torch.rand(4, 96, 1, generator=gen)).to(dtype)
    q = quantize_nvfp4_per_leading(w)
    deq = q.dequantize(torch.float32)
    x = w.float()
    s_eff = (q.scale.float() * q.global_scale[:, None, None]).repeat_interleave(16, dim=-1)
    # Elementwise: at most half an e2m1 step (in scaled units); saturation near 6 stays inside it.
    err = (deq - x).abs()
    bound = s_eff * _half_spacing(x.abs() / s_eff) * (1 + 1e-6)
    assert torch.all(err <= bound)
    # Per block: at most block_amax * (1/6) * (1 + 2^-4) (e4m3 scale rounding).
    block_err = err.reshape(4, 96, 8, 16).amax(-1)
    block_amax = x.abs().reshape(4, 96, 8, 16).amax(-1)
    assert torch.all(block_err <= block_amax * (17 / 96) * (1 + 1e-6))
    rel = ((deq - x).norm() / x.norm()).item()
    assert 0.05 < rel < 0.12  # Gaussian data: NVFP4's typical ~9% relative error


def test_per_leading_equals_separate_quantization():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 5, 48, generator=gen) * torch.tensor([1e-2, 1.0, 30.0])[:, None, None]
    q = quantize_nvfp4_per_leading(w)
    assert q.global_scale.shape == (3,)
    for i in range(3):
        qi = quantize_nvfp4(w[i])
        assert torch.equal(q.packed[i], qi.packed)
        assert torch.equal(q.scale[i].view(torch.uint8), qi.scale.view(torch.uint8))
        assert q.global_scale[i].item() == qi.global_scale.item()
        assert torch.equal(q.dequantize()[i], qi.dequantize())


def test_zeros_and_odd_leading_shapes():
    q = quantize_nvfp4(torch.zeros(3, 7, 32, dtype=torch.bfloat16))
    assert q.packed.shape == (3, 7, 16) and q.scale.shape == (3, 7, 2)
    assert q.packed.eq(0).all() and q.scale.float().eq(1.0).all()
    assert q.dequantize(torch.bfloat16).eq(0).all()
    assert Nvfp4Tensor(q.packed, q.scale, q.global_scale).shape == (3, 7, 32)
    q = quantize_nvfp4_per_leading(torch.zeros(2, 1, 16))
    assert q.dequantize().eq(0).all() and torch.isfinite(q.global_scale).all()
    w = torch.randn(16)
    assert quantize_nvfp4(w).dequantize().shape == (16,)


def test_small_global_scale_saturates():
    w = torch.full((1, 16), 10.0)
    q = quantize_nvfp4(w, global_scale=torch.tensor(0.001))
    assert q.scale.float().item() == 448.0
    assert q.packed.eq(0x77).all()  # every element saturates to +6
    assert torch.equal(q.dequantize(), torch.full((1, 16), 2688.0) * torch.tensor(0.001))


@pytest.mark.parametrize("k", [8, 24, 0, 17])
def test_k_not_multiple_of_16_is_rejected(k):
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_nvfp4(torch.ones(4, k))


def test_bad_inputs_are_rejected():
    with pytest.raises(TypeError, match="bf16/fp16/fp32"):
        quantize_nvfp4(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_nvfp4(torch.tensor([float("inf")] + [0.0] * 15))
    with pytest.raises(ValueError, match="prefix"):
        quantize_nvfp4(torch.ones(2, 3, 16), global_scale=torch.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        quantize_nvfp4(torch.ones(2, 16), global_scale=0.0)
    q = quantize_nvfp4(torch.ones(2, 32))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_nvfp4(q.packed, q.scale[:, :1])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_nvfp4(q.packed, q.scale.float())
    with pytest.raises(ValueError, match="multiple of 16"):
        dequantize_nvfp4(q.packed[:, :4], q.scale[:, :1])


def test_products_exact_in_bf16_exhaustive():
    table = e2m1_e4m3_products(torch.float64)
    assert table.shape == (16, 256)
    assert torch.isnan(table[:, 0x7F]).all() and torch.isnan(table[:, 0xFF]).all()
    assert e2m1_e4m3_exact_in(torch.bfloat16)
    assert e2m1_e4m3_exact_in(torch.float32)
    # The check can fail: 1.5 * 1.875 = 2.8125 needs 5 significant bits, e4m3 has 4.
    assert not e2m1_e4m3_exact_in(torch.float8_e4m3fn)


def test_dequantize_without_global_scale_is_exact_bf16():
    gen = torch.Generator().manual_seed(4)
    packed = torch.randint(0, 256, (5, 24), dtype=torch.uint8, generator=gen)
    scale_bits = torch.randint(0, 0x7F, (5, 3), dtype=torch.uint8, generator=gen)
    scale = scale_bits.view(torch.float8_e4m3fn)
    got = dequantize_nvfp4(packed, scale, None, torch.bfloat16)
    codes = unpack_e2m1(packed).long()
    values = torch.tensor(E2M1_VALUES, dtype=torch.float64)[codes]
    exact = values * scale.double().repeat_interleave(16, dim=-1)
    assert torch.equal(got.double(), exact)
    with_gs = dequantize_nvfp4(packed, scale, torch.tensor(0.375), torch.float32)
    assert torch.equal(with_gs, (exact.float() * 0.375))


@pytest.mark.gpu
def test_cuda_matches_cpu_bitwise():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 64, 256, generator=gen).bfloat16()
    cpu = quantize_nvfp4_per_leading(w)
    gpu = quantize_nvfp4_per_leading(w.cuda())
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    assert torch.equal(gpu.scale.cpu().view(torch.uint8), cpu.scale.view(torch.uint8))
    assert torch.equal(gpu.dequantize(torch.bfloat16).cpu(), cpu.dequantize(torch.bfloat16))
