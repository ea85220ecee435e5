"""FP8 block-128 experts: the torch reference's quantized math against float64 oracles, DWDP's
multi-tensor views bitwise equal to one tensor, torch-grouped's bf16-dequantized baseline, and
the cutedsl refusal."""
import pytest
import torch
import torch.nn.functional as F

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.moe.backends import expert_weight_layout
from tensorrt_llm_dwdp.moe.backends.torch_grouped import TorchGroupedMoeBackend
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.fp8 import (
    dequantize_act_per_token, dequantize_weight_blocks, quantize_act_per_token,
    quantize_weight_blocks,
)

H, I = 256, 128


def make_fp8_experts(num_experts, bias=False, seed=0):
    """Random experts with a per-expert magnitude (a swapped expert or scale changes the output)
    quantized with the checkpoints' recipe."""
    gen = torch.Generator().manual_seed(seed)
    mag = (1 + torch.arange(num_experts, dtype=torch.float32))[:, None, None] / num_experts
    w13 = torch.randn(num_experts, 2 * I, H, generator=gen) * mag / H**0.5
    w2 = torch.randn(num_experts, H, I, generator=gen) * mag / I**0.5
    w13[:, :, :128] *= 8  # scale blocks of very different range within one expert
    w13[:, :I] *= 3  # up and gate of different range
    w2[:, :128] *= 5
    q13, s13 = quantize_weight_blocks(w13)
    q2, s2 = quantize_weight_blocks(w2)
    params = {"w3_w1_weight": q13, "w3_w1_weight_scale_inv": s13,
              "w2_weight": q2, "w2_weight_scale_inv": s2}
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


def oracle_f64(x, ids, topk_w, weights, quantize_acts):
    """Per (token, slot) in float64 with dequantized weights; with ``quantize_acts`` the
    activations go through the same per-token-per-128 quantization (x, and h after a bf16
    rounding), so only float32-vs-float64 accumulation separates it from the backend."""
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            p = weights.expert(int(ids[t, j]))
            w13 = dequantize_weight_blocks(p["w3_w1_weight"], p["w3_w1_weight_scale_inv"]).double()
            w2 = dequantize_weight_blocks(p["w2_weight"], p["w2_weight_scale_inv"]).double()
            a = x[t:t + 1]
            a = dequantize_act_per_token(*quantize_act_per_token(a)) if quantize_acts else a
            g = a.double() @ w13.T
            if "w3_w1_bias" in p:
                g = g + p["w3_w1_bias"].double()
            h = F.silu(g[:, I:]) * g[:, :I]
            if quantize_acts:
                h = dequantize_act_per_token(*quantize_act_per_token(h.to(torch.bfloat16)))
            y = (h.double() @ w2.T)[0]
            if "w2_bias" in p:
                y = y + p["w2_bias"].double()
            out[t] += topk_w[t, j].double() * y
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_reference_is_the_quantized_math(bias):
    weights = make_fp8_experts(8, bias=bias)
    assert weights.quant == "fp8" and (weights.hidden_size, weights.intermediate_size) == (H, I)
    x, ids, w = make_routing(24, 8, 3)
    got = TorchMoeBackend().run_experts(x, ids, w, weights).double()
    same_math = oracle_f64(x, ids, w, weights, quantize_acts=True)
    scale = same_math.abs().max().item()
    # Same quantization steps; float32 sums against float64 and the final bf16 rounding (2^-9)
    # leave ~1e-3 of the output scale. A requantized h code may flip where fp32 and fp64 g
    # round to different sides of an e4m3 midpoint: one code step of one channel (2^-4 of it)
    # per flip, rare, bounded well inside 1e-2.
    assert (got - same_math).abs().max().item() < 1e-2 * scale
    assert ((got - same_math).norm() / same_math.norm()).item() < 4e-3
    # Against unquantized activations (weights still e4m3): e4m3 rounding of x and h is up to
    # 2^-4 relative per element, averaging out over K; a few percent of the output, not more.
    unquantized = oracle_f64(x, ids, w, weights, quantize_acts=False)
    rel = ((got - unquantized).norm() / unquantized.norm()).item()
    assert 1e-3 < rel < 6e-2, rel  # the activations really were quantized, and only that


@pytest.mark.parametrize("name, dim", [("w3_w1_weight_scale_inv", 1), ("w3_w1_weight_scale_inv", 2),
                                       ("w2_weight_scale_inv", 1)])
def test_scale_blocks_are_not_interchangeable(name, dim):
    """A kernel reading the up block's scale for gate rows, or the wrong K block's, is loud: ten
    times the drift the reference is allowed against its own float64 math (4e-3)."""
    weights = make_fp8_experts(4)
    x, ids, w = make_routing(10, 4, 2)
    base = TorchMoeBackend().run_experts(x, ids, w, weights).float()
    swapped = {n: ts[0].clone() for n, ts in weights.tensors.items()}
    swapped[name] = swapped[name].flip(dim)
    other = TorchMoeBackend().run_experts(x, ids, w, ExpertWeights.single(swapped)).float()
    assert (other - base).norm() > 0.04 * base.norm()


@pytest.mark.parametrize("num_experts,size,w,p", [(10, 3, 4, 3), (8, 2, 5, 3), (8, 4, 2, 2)])
def test_multi_tensor_views_bitwise_equal_single(num_experts, size, w, p):
    full = make_fp8_experts(num_experts, bias=True, seed=num_experts)
    x, ids, topk_w = make_routing(21, num_experts, 4, seed=size)
    want = TorchMoeBackend().run_experts(x, ids, topk_w, full)
    for rank in range(size):
        layout = ExpertLayout(num_experts, size, w, p, rank)
        view = {name: [ts[0][o:o + n].clone() for o, n in zip(layout.tensor_offsets,
                                                              layout.tensor_sizes)]
                for name, ts in full.tensors.items()}
        multi = ExpertWeights.from_view(view, layout.tensor_offsets)
        assert torch.equal(TorchMoeBackend().run_experts(x, ids, topk_w, multi), want), rank


def test_torch_grouped_dequantized_baseline_within_activation_quantization_error():
    weights = make_fp8_experts(8, bias=True)
    x, ids, w = make_routing(40, 8, 3)
    ref = TorchMoeBackend().run_experts(x, ids, w, weights).double()
    grouped = TorchGroupedMoeBackend(chunk_experts=3).run_experts(x, ids, w, weights).double()
    unquantized = oracle_f64(x, ids, w, weights, quantize_acts=False)
    # torch-grouped keeps activations bf16: it tracks the unquantized oracle to bf16 error and
    # the FP8 reference to the activation quantization error (module docstrings).
    assert ((grouped - unquantized).norm() / unquantized.norm()).item() < 1e-2
    rel = ((grouped - ref).norm() / ref.norm()).item()
    assert rel < 6e-2, rel


def test_cutedsl_refuses_fp8_before_anything_is_read():
    with pytest.raises(ValueError, match="no FP8 expert kernel yet"):
        expert_weight_layout("cutedsl", "auto", "fp8", H, I)
    assert expert_weight_layout("torch", "auto", "fp8", H, I) == "linear"
    with pytest.raises(ValueError, match="no FP8 expert kernel yet"):
        expert_weight_layout("torch", "preshuffled", "fp8", H, I)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    weights = make_fp8_experts(8, bias=True)
    x, ids, w = make_routing(64, 8, 2)
    cpu = TorchMoeBackend().run_experts(x, ids, w, weights)
    cuda_weights = ExpertWeights.single({n: ts[0].cuda() for n, ts in weights.tensors.items()})
    gpu = TorchMoeBackend().run_experts(x.cuda(), ids.cuda(), w.cuda(), cuda_weights)
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=2e-2, atol=2e-2)
