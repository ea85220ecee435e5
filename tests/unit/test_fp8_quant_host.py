"""Host side of the fused FP8 activation quantization, on the CPU: launch geometry, argument
checks, the dispatcher's reference path, and the reference's arithmetic the kernel reproduces
(``kernels/sm90/fp8_quant_kernel.py``'s docstring)."""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.sm90.fp8_quant import (
    ITEMS_PER_STEP,
    MAX_ITERS,
    check_input,
    launch_geometry,
    scale_strides,
)
from tensorrt_llm_dwdp.quant.fp8 import ACT_AMAX_FLOOR, E4M3_MAX, quantize_act_per_token
from tensorrt_llm_dwdp.quant.fp8_device import kernel_applies, quantize_act_per_token_fast


@pytest.mark.parametrize("sms", [1, 114, 132])
@pytest.mark.parametrize("groups", [1, 4, 12, 56, 144])
def test_launch_geometry_covers_every_item_once(sms, groups):
    """Every item has a CTA step, no CTA is wholly past the end, and the grid fills the SMs
    whenever there are enough steps (T from 1 to 64K)."""
    for tokens in (1, 2, 3, 17, 300, 1024, 4096, 16384, 65536):
        items = tokens * groups
        iters, ctas = launch_geometry(items, sms)
        steps = -(-items // ITEMS_PER_STEP)
        assert MAX_ITERS >= iters >= 1
        assert ctas * iters * ITEMS_PER_STEP >= items
        assert (ctas - 1) * iters < steps, "a CTA with no item"
        assert ctas >= min(steps, sms), f"{ctas} CTAs leave SMs idle ({steps} steps)"


def test_launch_geometry_folds_steps_only_for_large_grids():
    assert launch_geometry(56, 132) == (1, 1)  # one token of DeepSeek-V3's hidden size
    assert launch_geometry(4096 * 56, 132) == (1, 3584)
    iters, ctas = launch_geometry(65536 * 144, 132)
    assert iters == MAX_ITERS and ctas == 65536 * 144 // ITEMS_PER_STEP // MAX_ITERS
    with pytest.raises(ValueError, match="items > 0"):
        launch_geometry(0, 132)


def test_check_input_names_the_problem():
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_input([[1.0]])
    with pytest.raises(TypeError, match="bfloat16"):
        check_input(torch.zeros(2, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        check_input(torch.zeros(2, 2, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="K = 200 must be a positive multiple of 128"):
        check_input(torch.zeros(2, 200, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="K = 0"):
        check_input(torch.zeros(2, 0, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="CUDA device"):
        check_input(torch.zeros(2, 256, dtype=torch.bfloat16))


def test_scale_strides():
    assert scale_strides(300, 56, "row") == (56, 1)
    assert scale_strides(300, 56, "col") == (1, 300)
    assert torch.zeros(56, 300).t().stride() == scale_strides(300, 56, "col")
    with pytest.raises(ValueError, match="scale_layout"):
        scale_strides(3, 1, "column")


@pytest.mark.parametrize("layout", ["row", "col"])
def test_dispatcher_falls_back_to_the_reference(layout):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 384, generator=gen) * 5).to(torch.bfloat16)
    assert not kernel_applies(x)
    q, scale = quantize_act_per_token_fast(x, scale_layout=layout)
    want_q, want_s = quantize_act_per_token(x)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale, want_s)
    assert scale.stride() == ((3, 1) if layout == "row" else (1, 37))
    odd = x[:, :300].float()  # fp32, K not a multiple of 128: the reference takes it
    q, scale = quantize_act_per_token_fast(odd, scale_layout=layout)
    assert q.shape == (37, 300) and scale.shape == (37, 3)
    with pytest.raises(ValueError, match="scale_layout"):
        quantize_act_per_token_fast(x, scale_layout="rows")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_act_per_token_fast(torch.full((2, 128), float("nan"), dtype=torch.bfloat16))


def test_reference_scales_by_reciprocal_then_multiply():
    """The reference's ``448 / amax`` runs as ``amax.reciprocal() * 448`` (two roundings;
    ``Tensor.__rtruediv__``), which the kernel reproduces with rcp.rn then mul.rn. A single
    IEEE division would differ: this sample has codes where it does."""
    gen = torch.Generator().manual_seed(0)
    t, g = 2048, 8
    mag = torch.exp2(torch.randint(-10, 10, (t, g, 1), generator=gen).float())
    x = (torch.randn(t, g, 128, generator=gen) * mag).reshape(t, g * 128).to(torch.bfloat16)
    want_q, _ = quantize_act_per_token(x)
    groups = x.float().reshape(t, g, 128)
    amax = groups.abs().amax(dim=-1).clamp(min=ACT_AMAX_FLOOR)

    def codes(r: torch.Tensor) -> torch.Tensor:
        q = (groups * r[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return q.view(torch.uint8).reshape(t, g * 128)

    assert torch.equal(codes(torch.mul(torch.reciprocal(amax), E4M3_MAX)),
                       want_q.view(torch.uint8))
    one_division = torch.div(torch.full_like(amax, E4M3_MAX), amax)
    assert (codes(one_division) != want_q.view(torch.uint8)).any()


def test_dispatcher_fills_preallocated_outputs_on_the_reference_path():
    x = (torch.randn(5, 256, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16)
    want_q, want_s = quantize_act_per_token(x)
    out = torch.empty(5, 256, dtype=torch.float8_e4m3fn)
    scale_out = torch.empty(2, 5).t()
    q, scale = quantize_act_per_token_fast(x, scale_layout="col", out=out, scale_out=scale_out)
    assert q.data_ptr() == out.data_ptr() and scale.data_ptr() == scale_out.data_ptr()
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale, want_s)
    with pytest.raises(ValueError, match="scale_out must be"):
        quantize_act_per_token_fast(x, scale_layout="col", scale_out=torch.empty(5, 2))
