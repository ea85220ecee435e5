"""ExpertWeights: quant detection, validation errors, multi-tensor locate/expert/split."""
import pytest
import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

E, H, I = 6, 32, 16


def _bf16_params(n=E, bias=False):
    # Expert e's tensors are filled with e: a misplaced expert is visible at every element.
    fill = torch.arange(n, dtype=torch.float32)[:, None, None]
    params = {
        "w3_w1_weight": (fill.expand(n, 2 * I, H)).bfloat16().contiguous(),
        "w2_weight": (fill.expand(n, H, I)).bfloat16().contiguous(),
    }
    if bias:
        params["w3_w1_bias"] = fill[:, :, 0].expand(n, 2 * I).contiguous()
        params["w2_bias"] = fill[:, :, 0].expand(n, H).contiguous()
    return params


def _nvfp4_params(n=E):
    gen = torch.Generator().manual_seed(0)
    w13 = quantize_nvfp4_per_leading(torch.randn(n, 2 * I, H, generator=gen))
    w2 = quantize_nvfp4_per_leading(torch.randn(n, H, I, generator=gen))
    return {
        "w3_w1_weight": w13.packed, "w3_w1_weight_scale": w13.scale,
        "fc31_alpha": w13.global_scale, "w2_weight": w2.packed,
        "w2_weight_scale": w2.scale, "fc2_alpha": w2.global_scale,
    }


def test_detects_quant_and_sizes():
    w = ExpertWeights.single(_bf16_params())
    assert (w.quant, w.num_experts, w.hidden_size, w.intermediate_size) == ("bf16", E, H, I)
    assert not w.has_bias and w.num_tensors == 1
    w = ExpertWeights.single(_nvfp4_params())
    assert (w.quant, w.num_experts, w.hidden_size, w.intermediate_size) == ("nvfp4", E, H, I)
    assert ExpertWeights.single(_bf16_params(bias=True)).has_bias


@pytest.mark.parametrize("num_experts,size,w,p", [(6, 2, 4, 2), (6, 3, 2, 2), (8, 2, 4, 4),
                                                   (7, 3, 3, 2)])
def test_layout_views_locate_every_expert_once(num_experts, size, w, p):
    full = ExpertWeights.single(_bf16_params(num_experts, bias=True))
    for rank in range(size):
        layout = ExpertLayout(num_experts, size, w, p, rank)
        view = {
            name: [ts[0][o:o + n].clone() for o, n in zip(layout.tensor_offsets, layout.tensor_sizes)]
            for name, ts in full.tensors.items()
        }
        mv = ExpertWeights.from_view(view, layout.tensor_offsets)
        assert mv.num_tensors == size and mv.num_experts == num_experts
        assert mv.tensor_sizes() == tuple(layout.tensor_sizes)
        split = full.split(layout.tensor_sizes)
        for e in range(num_experts):
            assert mv.locate(e) == layout.locate(e) == split.locate(e)
            for name, t in mv.expert(e).items():
                assert t.eq(e).all(), (rank, e, name)
                assert torch.equal(t, split.expert(e)[name])


def test_split_is_a_view_and_checks_sizes():
    full = ExpertWeights.single(_nvfp4_params())
    parts = full.split([2, 0, 4])
    assert parts.expert_offsets == (0, 2, 2)
    assert parts.locate(2) == (2, 0) and parts.locate(1) == (0, 1)
    assert parts.tensors["w2_weight"][2].data_ptr() == full.tensors["w2_weight"][0][2].data_ptr()
    with pytest.raises(ValueError, match="sum to 6"):
        full.split([2, 3])
    with pytest.raises(ValueError, match="single-tensor"):
        parts.split([6])


def test_locate_out_of_range():
    w = ExpertWeights.single(_bf16_params())
    with pytest.raises(IndexError, match=r"expert 6 not in \[0, 6\)"):
        w.locate(6)
    with pytest.raises(IndexError):
        w.locate(-1)


def test_missing_and_unknown_names():
    p = _nvfp4_params()
    del p["fc2_alpha"]
    with pytest.raises(ValueError, match=r"missing parameters \['fc2_alpha'\]"):
        ExpertWeights.single(p)
    p = _bf16_params()
    p["w2_weight_scale"] = torch.zeros(E, H, 1, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="unknown parameters"):
        ExpertWeights.single(p)
    with pytest.raises(ValueError, match="missing 'w3_w1_weight'"):
        ExpertWeights.single({"w2_weight": _bf16_params()["w2_weight"]})


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("w2_weight", torch.zeros(E, H, I + 1, dtype=torch.bfloat16), "'w2_weight'\\[0\\]"),
        ("w2_weight", torch.zeros(E - 1, H, I, dtype=torch.bfloat16), "expected torch.bfloat16"),
        ("w2_weight", torch.zeros(E, H, I), "expected torch.bfloat16"),
        ("w3_w1_bias", torch.zeros(E, 2 * I, dtype=torch.bfloat16), "'w3_w1_bias'"),
        ("w3_w1_weight", torch.zeros(E, 2 * I, H, dtype=torch.float16),
         r"is not uint8 \(nvfp4\), bfloat16 or float8_e4m3fn"),
        ("w3_w1_weight", torch.zeros(E, 2 * I + 1, H, dtype=torch.bfloat16), "2\\*I"),
    ],
)
def test_bad_shapes_and_dtypes(name, bad, match):
    p = _bf16_params()
    p[name] = bad
    with pytest.raises(ValueError, match=match):
        ExpertWeights.single(p)


def test_nvfp4_scale_shape_checked():
    p = _nvfp4_params()
    p["w3_w1_weight_scale"] = p["w3_w1_weight_scale"][:, :, :1]
    with pytest.raises(ValueError, match="'w3_w1_weight_scale'\\[0\\]"):
        ExpertWeights.single(p)


def test_view_offsets_and_lengths_checked():
    full = ExpertWeights.single(_bf16_params())
    view = {n: [ts[0][:3], ts[0][3:]] for n, ts in full.tensors.items()}
    with pytest.raises(ValueError, match="tensor 1 starts at expert 4, expected 3"):
        ExpertWeights.from_view(view, [0, 4])
    with pytest.raises(ValueError, match="2 expert offsets for 2 tensors|1 expert offsets"):
        ExpertWeights.from_view(view, [0])
    view["w2_weight"] = view["w2_weight"][:1]
    with pytest.raises(ValueError, match="'w2_weight' has 1 tensors"):
        ExpertWeights.from_view(view, [0, 3])
