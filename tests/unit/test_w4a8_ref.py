"""The W4A8 numerics reference (quant/w4a8.py): the e4m3 weight mapping, the promoted GEMM,
and the stated error against the exact W4A16 path."""
import pytest
import torch

from tensorrt_llm_dwdp.quant.fp8 import FP8_DTYPE, quantize_act_per_token
from tensorrt_llm_dwdp.quant.nvfp4 import E2M1_VALUES, pack_e2m1, quantize_nvfp4
from tensorrt_llm_dwdp.quant.w4a8 import (
    E4M3_WEIGHT_MAX,
    STATED_ERROR,
    WEIGHT_EXP2,
    gemm_errors,
    nvfp4_to_e4m3,
    promoted_matmul,
    w4a8_matmul_ref,
    weight_rounding_stats,
)


def _all_codes_and_scales():
    """Every e2m1 code against every finite e4m3 scale: packed [254, 8], scale [254, 1]."""
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)
    scales = scales[torch.isfinite(scales.float())]
    codes = torch.arange(16, dtype=torch.uint8).repeat(scales.numel(), 1)
    return pack_e2m1(codes), scales.reshape(-1, 1)


def _rn_e4m3_by_search(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest e4m3, ties to the even code, by searching the finite e4m3 grid
    (independent of torch's cast)."""
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8_DTYPE)
    keep = torch.isfinite(grid.float())
    vals, codes = grid.float()[keep].double(), torch.arange(256)[keep]
    d = (x.double().reshape(-1, 1) - vals[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    even = cand & (codes[None, :] % 2 == 0)
    pick = torch.where(even.any(dim=1, keepdim=True), even, cand).float().argmax(dim=1)
    out = vals[pick]
    return torch.where(x.double().reshape(-1) == 0, x.double().reshape(-1) * 0, out).reshape(x.shape)


def test_weight_mapping_is_one_round_to_nearest_even_of_the_exact_product():
    packed, scale = _all_codes_and_scales()
    q = nvfp4_to_e4m3(packed, scale)
    assert q.dtype == FP8_DTYPE and q.shape == (scale.shape[0], 16)
    exact = (torch.tensor(E2M1_VALUES, dtype=torch.float64)[None, :]
             * scale.double() * 2.0 ** WEIGHT_EXP2)
    assert torch.equal(q.double(), _rn_e4m3_by_search(exact))
    # the largest product 6 x 448 / 8 = 336 is below 448 (no saturation) and ties to 320
    assert exact.abs().max() == E4M3_WEIGHT_MAX == 336.0
    assert q.float().abs().max() == 320.0
    # a normal-range product is kept exactly when it has at most 4 significant bits
    normal = exact.abs() >= 2.0 ** -6
    m, _ = torch.frexp(exact[normal])
    four_bits = (m * 16).eq((m * 16).round())
    assert torch.equal(q.double()[normal].eq(exact[normal]), four_bits)


def test_rounding_stats_over_every_scale():
    _, scale = _all_codes_and_scales()
    # scales >= 0.25 keep every product in e4m3's normal range: at most half an ulp (1/16)
    normal = weight_rounding_stats(scale[scale.float() >= 0.25])
    assert 0.1 < normal["fraction_rounded"] < 0.6
    assert normal["max_relative_change"] > 1 / 32 and normal["max_relative_change"] <= 1 / 16
    # below, products reach e4m3's subnormals (spacing 2^-9) and the smallest flush to zero
    assert weight_rounding_stats(scale[scale.float() < 0.25])["max_relative_change"] == 1.0


def test_promoted_matmul_promotes_per_128_columns():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 256, generator=g) * torch.linspace(0.1, 10, 256)).to(torch.bfloat16)
    w = quantize_nvfp4(torch.randn(24, 256, generator=g))
    xq, xs = quantize_act_per_token(x)
    wq = nvfp4_to_e4m3(w.packed, w.scale)
    y = promoted_matmul(xq, xs, wq, w.global_scale)
    # independent float64 evaluation of the same math (the scales differ per 128 block)
    assert xs[:, 0].ne(xs[:, 1]).all()
    expect = sum((xq[:, kb].double() @ wq[:, kb].double().T) * xs[:, i:i + 1].double()
                 for i, kb in enumerate((slice(0, 128), slice(128, 256))))
    expect = expect * float(w.global_scale) * 8.0
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-6 * expect.abs().max())
    assert torch.equal(y, w4a8_matmul_ref(x, w.packed, w.scale, w.global_scale))


@pytest.mark.parametrize("bad", ["k", "dtype", "scales"])
def test_bad_operands_are_refused(bad):
    x = torch.randn(2, 256).to(torch.bfloat16)
    w = quantize_nvfp4(torch.randn(8, 256))
    xq, xs = quantize_act_per_token(x)
    wq = nvfp4_to_e4m3(w.packed, w.scale)
    if bad == "k":
        with pytest.raises(ValueError, match="multiple of 128"):
            w4a8_matmul_ref(x[:, :64].contiguous(), w.packed[:, :32], w.scale[:, :4], 1.0)
    elif bad == "dtype":
        with pytest.raises(TypeError, match="e4m3"):
            promoted_matmul(xq.float(), xs, wq, 1.0)
    else:
        with pytest.raises(ValueError, match="activation scales"):
            promoted_matmul(xq, xs[:, :1], wq, 1.0)


@pytest.mark.parametrize("kind", ["random", "model"])
def test_error_against_exact_w4a16_is_within_the_stated_bound(kind):
    from bench.w4a8_error import measure

    rec = measure(kind, 2048, rows=128, tokens=32, seed=3)
    for key, bound in STATED_ERROR.items():
        assert rec[key] <= bound, (key, rec[key], bound)
    # and it is a real error, not a copy of the exact path
    assert rec["weights_only"] > 0.005 and rec["w4a8"] > 0.005
    assert rec["w4a8"] < rec["nvfp4_weight_error"]


def test_gemm_errors_sees_a_broken_mapping(monkeypatch):
    """The error measurement is sensitive: truncating instead of rounding the weights shows."""
    import tensorrt_llm_dwdp.quant.w4a8 as mod

    g = torch.Generator().manual_seed(4)
    w = quantize_nvfp4(torch.randn(64, 256, generator=g))
    x = torch.randn(16, 256, generator=g).to(torch.bfloat16)
    good = gemm_errors(x, w.packed, w.scale, w.global_scale)["weights_only"]
    real = mod.nvfp4_to_e4m3
    monkeypatch.setattr(mod, "nvfp4_to_e4m3", lambda p, s: (real(p, s).float() * 0.9).to(FP8_DTYPE))
    assert gemm_errors(x, w.packed, w.scale, w.global_scale)["weights_only"] > 1.2 * good
