"""Torch reference backend: float64 dense reference (NVFP4 and bf16), biases, multi-tensor
views bitwise equal to one tensor, determinism, edge cases, argument errors, registry."""
import pytest
import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.moe.backends import get_backend
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

H, I = 64, 32


def make_experts(num_experts, quant, bias=False, seed=0):
    """Random experts with a per-expert magnitude, so a swapped expert changes the output."""
    gen = torch.Generator().manual_seed(seed)
    mag = (1 + torch.arange(num_experts, dtype=torch.float32))[:, None, None] / num_experts
    w13 = torch.randn(num_experts, 2 * I, H, generator=gen) * mag / H**0.5
    w2 = torch.randn(num_experts, H, I, generator=gen) * mag / I**0.5
    if quant == "nvfp4":
        q13, q2 = quantize_nvfp4_per_leading(w13), quantize_nvfp4_per_leading(w2)
        params = {
            "w3_w1_weight": q13.packed, "w3_w1_weight_scale": q13.scale,
            "fc31_alpha": q13.global_scale, "w2_weight": q2.packed,
            "w2_weight_scale": q2.scale, "fc2_alpha": q2.global_scale,
        }
    else:
        params = {"w3_w1_weight": w13.bfloat16(), "w2_weight": w2.bfloat16()}
    if bias:
        params["w3_w1_bias"] = torch.randn(num_experts, 2 * I, generator=gen) * 0.1
        params["w2_bias"] = torch.randn(num_experts, H, generator=gen) * 0.1
    return ExpertWeights.single(params)


def make_routing(tokens, num_experts, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).bfloat16()
    ids = torch.argsort(torch.rand(tokens, num_experts, generator=gen), dim=-1)[:, :k].int()
    w = torch.rand(tokens, k, generator=gen) + 0.1
    return x, ids, w / w.sum(-1, keepdim=True)


def dense_reference_f64(x, ids, topk_w, weights: ExpertWeights):
    """Per-token loop in float64 with fully dequantized weights (global scale included)."""
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            p = weights.expert(int(ids[t, j]))
            if weights.quant == "nvfp4":
                from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4

                w13 = dequantize_nvfp4(p["w3_w1_weight"], p["w3_w1_weight_scale"]).double()
                w13 = w13 * p["fc31_alpha"].double()
                w2 = dequantize_nvfp4(p["w2_weight"], p["w2_weight_scale"]).double()
                w2 = w2 * p["fc2_alpha"].double()
            else:
                w13, w2 = p["w3_w1_weight"].double(), p["w2_weight"].double()
            g = w13 @ x[t].double()
            if "w3_w1_bias" in p:
                g = g + p["w3_w1_bias"].double()
            up, gate = g[:I], g[I:]
            h = gate * torch.sigmoid(gate) * up
            y = w2 @ h
            if "w2_bias" in p:
                y = y + p["w2_bias"].double()
            out[t] += topk_w[t, j].double() * y
    return out


@pytest.mark.parametrize("quant", ["nvfp4", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_dense_reference(quant, bias):
    weights = make_experts(8, quant, bias=bias)
    x, ids, w = make_routing(40, 8, 3)
    got = TorchMoeBackend().run_experts(x, ids, w, weights)
    assert got.dtype == torch.bfloat16 and got.shape == (40, H)
    ref = dense_reference_f64(x, ids, w, weights)
    scale = ref.abs().max().item()
    # bf16 rounding of h and of the output: well under 1% of the output scale.
    assert (got.double() - ref).abs().max().item() < 1e-2 * scale
    assert ((got.double() - ref).norm() / ref.norm()).item() < 5e-3


@pytest.mark.parametrize("quant", ["nvfp4", "bf16"])
@pytest.mark.parametrize("num_experts,size,w,p", [(10, 3, 4, 3), (8, 2, 5, 3), (8, 4, 2, 2)])
def test_multi_tensor_views_bitwise_equal_single(quant, num_experts, size, w, p):
    full = make_experts(num_experts, quant, bias=True, seed=num_experts)
    x, ids, topk_w = make_routing(33, num_experts, 4, seed=size)
    want = TorchMoeBackend().run_experts(x, ids, topk_w, full)
    for rank in range(size):
        layout = ExpertLayout(num_experts, size, w, p, rank)
        # Separate allocations per tensor, as a DWDP view has.
        view = {
            name: [ts[0][o:o + n].clone() for o, n in zip(layout.tensor_offsets,
                                                         layout.tensor_sizes)]
            for name, ts in full.tensors.items()
        }
        multi = ExpertWeights.from_view(view, layout.tensor_offsets)
        got = TorchMoeBackend().run_experts(x, ids, topk_w, multi)
        assert torch.equal(got, want), f"rank {rank}"


def test_deterministic_and_token_independent():
    weights = make_experts(8, "nvfp4")
    x, ids, w = make_routing(50, 8, 2)
    backend = TorchMoeBackend()
    a = backend.run_experts(x, ids, w, weights)
    assert torch.equal(a, backend.run_experts(x, ids, w, weights))
    # Each token's output depends only on that token (no cross-token leakage through the plan).
    single = torch.cat([backend.run_experts(x[t:t + 1], ids[t:t + 1], w[t:t + 1], weights)
                        for t in range(0, 50, 7)])
    torch.testing.assert_close(single, a[0:50:7], rtol=0, atol=2e-2 * a.abs().max().item())


def test_router_weight_scales_output_and_slot_order():
    weights = make_experts(4, "bf16")
    x, _, _ = make_routing(6, 4, 1)
    ids = torch.tensor([[2, 1]] * 6, dtype=torch.int32)
    backend = TorchMoeBackend()
    only2 = backend.run_experts(x, ids[:, :1], torch.ones(6, 1), weights).float()
    only1 = backend.run_experts(x, ids[:, 1:], torch.ones(6, 1), weights).float()
    both = backend.run_experts(x, ids, torch.tensor([[0.25, 0.75]] * 6), weights).float()
    torch.testing.assert_close(both, 0.25 * only2 + 0.75 * only1, rtol=2e-2, atol=2e-2)
    zero = backend.run_experts(x, ids, torch.zeros(6, 2), weights)
    assert zero.eq(0).all()


def test_edge_cases_no_tokens_and_unused_experts():
    weights = make_experts(16, "nvfp4")
    backend = TorchMoeBackend()
    out = backend.run_experts(torch.zeros(0, H, dtype=torch.bfloat16),
                              torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2), weights)
    assert out.shape == (0, H)
    x, _, _ = make_routing(5, 16, 1)
    ids = torch.full((5, 1), 15, dtype=torch.int32)
    got = backend.run_experts(x, ids, torch.ones(5, 1), weights)
    ref = dense_reference_f64(x, ids, torch.ones(5, 1), weights)
    assert (got.double() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_empty_slots_add_nothing():
    """An id of -1 (an EP receiver's slot whose expert is elsewhere) is bitwise a slot of
    weight 0; a row with every slot empty is 0."""
    weights = make_experts(16, "nvfp4")
    x, ids, w = make_routing(9, 16, 4)
    empty = torch.rand(9, 4, generator=torch.Generator().manual_seed(3)) < 0.4
    empty[4] = True
    masked = torch.where(empty, torch.full_like(ids, -1), ids)
    zeroed = torch.where(empty, torch.zeros_like(w), w)
    backend = TorchMoeBackend()
    got = backend.run_experts(x, masked, w, weights)
    assert torch.equal(got, backend.run_experts(x, ids, zeroed, weights))
    assert (got[4] == 0).all()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.zeros(3, H)), "x must be bf16"),
        (dict(x=torch.zeros(3, H + 16, dtype=torch.bfloat16)), "hidden size"),
        (dict(ids=torch.zeros(3, 2, dtype=torch.int64)), "topk_ids must be int32"),
        (dict(ids=torch.zeros(4, 2, dtype=torch.int32)), "topk_ids must be int32"),
        (dict(w=torch.zeros(3, 2, dtype=torch.bfloat16)), "topk_weights must be float32"),
        (dict(ids=torch.full((3, 2), 4, dtype=torch.int32)), "expert id 4 out of range"),
    ],
)
def test_argument_errors(change, match):
    args = dict(x=torch.zeros(3, H, dtype=torch.bfloat16), ids=torch.zeros(3, 2, dtype=torch.int32),
                w=torch.zeros(3, 2))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        TorchMoeBackend().run_experts(args["x"], args["ids"], args["w"], make_experts(4, "bf16"))


def test_registry():
    assert isinstance(get_backend("torch"), TorchMoeBackend)
    with pytest.raises(ValueError, match="unknown MoE backend 'triton'"):
        get_backend("triton")


def test_cutedsl_unavailable_is_a_clear_error():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        pytest.skip("an sm90+ GPU is present; the unavailable path is not reachable here")
    with pytest.raises(RuntimeError, match="MoE backend 'cutedsl' needs .*GPU"):
        get_backend("cutedsl")


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nvfp4", "bf16"])
def test_cuda_matches_cpu(quant):
    weights = make_experts(8, quant, bias=True)
    x, ids, w = make_routing(64, 8, 2)
    cpu = TorchMoeBackend().run_experts(x, ids, w, weights)
    cuda_weights = ExpertWeights.single({n: ts[0].cuda() for n, ts in weights.tensors.items()})
    gpu = TorchMoeBackend().run_experts(x.cuda(), ids.cuda(), w.cuda(), cuda_weights)
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=2e-2, atol=2e-2)
