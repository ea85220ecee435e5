"""The W4A8 rounding statement (``kernels/sm90/w4a8_numerics.py``), exhaustively where it is
a claim about codes and on random and ModelOpt-quantized experts where it is a measurement."""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.sm90.w4a8_numerics import (
    expert_shift,
    nvfp4_to_e4m3,
    rounding_error,
    w4a8_weights,
)
from tensorrt_llm_dwdp.kernels.testing import random_nvfp4_experts
from tensorrt_llm_dwdp.quant.nvfp4 import pack_e2m1, quantize_nvfp4_per_leading

pytestmark = pytest.mark.kernels

ALL_SCALES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
POSITIVE = ALL_SCALES[torch.isfinite(ALL_SCALES.float()) & (ALL_SCALES.float() > 0)]


def _one_expert(codes: torch.Tensor, scales: torch.Tensor):
    """Packed [1, rows, 16] weights with one e2m1 code per row repeated over its block, and one
    scale per row."""
    rows = codes.numel()
    packed = pack_e2m1(codes.to(torch.uint8)[:, None].expand(rows, 16).reshape(1, rows, 16))
    return packed, scales.reshape(1, rows, 1)


def test_every_code_and_scale_in_the_experts_range():
    """Every e2m1 magnitude times every e4m3 scale within 2^8 of the expert's largest (the
    shift's range kept normal): nothing saturates, exact whenever the product has at most 4
    significant bits, else within half an e4m3 ulp (relative error <= 2^-4)."""
    top = POSITIVE.float().max()
    scales = POSITIVE[POSITIVE.float() >= top / 2**8]
    codes = torch.arange(1, 8).repeat_interleave(scales.numel())
    packed, sf = _one_expert(codes, scales.repeat(7))
    shift = expert_shift(sf)
    q8 = nvfp4_to_e4m3(packed, sf, shift)[0, :, 0]
    got = w4a8_weights(q8[None, :, None], shift)[0, :, 0].double()
    exact = torch.tensor([0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64).repeat_interleave(
        scales.numel()) * scales.double().repeat(7)
    assert q8.float().abs().max() <= 448
    assert torch.isfinite(q8.float()).all()
    mant, _ = torch.frexp(exact)
    four_bits = (mant * 2**4) == torch.round(mant * 2**4)
    assert torch.equal(got[four_bits], exact[four_bits])
    assert ((got - exact).abs() / exact).max() <= 2**-4


def test_shift_is_the_largest_without_saturation():
    sf = POSITIVE[torch.randperm(POSITIVE.numel(), generator=torch.Generator().manual_seed(0))]
    sf = sf[:120].reshape(6, 20, 1)
    shift = expert_shift(sf)
    top = sf.float().reshape(6, -1).amax(1).double()
    assert (6 * top * torch.exp2(shift.double()) <= 448).all()
    assert (6 * top * torch.exp2(shift.double() + 1) > 448).all()
    assert expert_shift(torch.zeros(1, 2, 1, dtype=torch.float8_e4m3fn)).item() == 0


def test_measured_error_against_w4a16():
    """Random experts (the kernel tests' scale band) and ModelOpt-quantized Gaussian weights:
    W4A8 weights within 2.5% (Frobenius) of the exact W4A16 ones, no subnormals, about three
    in four weights exact (measured 2.36% / 2.14%, 73% / 76%: kernels/NOTES.md)."""
    w = random_nvfp4_experts(2, 512, 256, seed=3, device="cpu")
    t = {n: v[0] for n, v in w.tensors.items()}
    q = quantize_nvfp4_per_leading(torch.randn(2, 256, 512, generator=torch.Generator()
                                               .manual_seed(4)))
    for packed, scale in ((t["w3_w1_weight"], t["w3_w1_weight_scale"]), (q.packed, q.scale)):
        err = rounding_error(packed, scale)
        assert 0.015 < err["rel_fro"] < 0.025, err
        assert err["max_rel_normal"] <= 2**-4, err
        assert err["subnormal_fraction"] == 0.0, err
        assert 0.65 < err["exact_fraction"] < 0.85, err


def test_bad_inputs_are_refused():
    packed, sf = _one_expert(torch.tensor([1, 2]), POSITIVE[:2])
    with pytest.raises(ValueError, match="do not fit"):
        nvfp4_to_e4m3(packed, sf[:, :1], expert_shift(sf))
    with pytest.raises(ValueError, match="uint8"):
        nvfp4_to_e4m3(packed.float(), sf, expert_shift(sf))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        expert_shift(sf.float())
