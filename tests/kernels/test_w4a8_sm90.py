"""The W4A8 kernels (NVFP4 weights on FP8 tensor cores) against their numerics reference
(``quant/w4a8.py``), on the device (H100/H200); skipped only without an sm90 GPU.

Every test hands the kernels preshuffled experts (the bf16 kernel's bytes and tag) and checks
``quant.w4a8``'s math on the unshuffled ones: FC1's h on every real row, the layer output with
skewed routing (experts without tokens), token counts 1, 3, 17 and off the tile, every token
tile (16, 32, 64, 128), run-to-run and S > 1 multi-B views bitwise equal to S = 1. The W4A8
output must also differ from the W4A16 kernel's by the stated weight / activation rounding,
not by less (a kernel that silently ran bf16 would fail).
"""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.testing import MODELS, random_tokens, skewed_routing, split_sizes
from tensorrt_llm_dwdp.moe.permute import build_permutation
from tensorrt_llm_dwdp.quant.w4a8 import STATED_ERROR, w4a8_expert_mlp, w4a8_matmul_ref

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def fp8_backend(backend):
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend

    return CuteDslMoeBackend(nvfp4_compute="fp8")


def w4a8_moe_ref(x, ids, tw, weights) -> torch.Tensor:
    """The layer the W4A8 way: per (token, slot) ``w4a8_expert_mlp`` x router weight in fp32,
    summed in slot order, one rounding to bf16."""
    tokens, top_k = ids.shape
    y = torch.zeros(tokens, top_k, x.shape[1], dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if e < 0:
            continue
        t, j = (ids == e).nonzero(as_tuple=True)
        p = weights.linear_expert(e)
        y[t, j] = w4a8_expert_mlp(x[t], p, weights.intermediate_size) * tw[t, j, None]
    out = torch.zeros(tokens, x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(top_k):
        out = out + y[:, j]
    return out.to(torch.bfloat16)


def _fc1_w4a8_reference(x, plan, weights) -> torch.Tensor:
    inter = weights.intermediate_size
    h = torch.zeros(plan.num_rows, inter, dtype=torch.float32, device=x.device)
    offsets, counts = plan.expert_offsets.tolist(), plan.counts.tolist()
    for e in range(weights.num_experts):
        if counts[e] == 0:
            continue
        rows = slice(offsets[e], offsets[e] + counts[e])
        p = weights.linear_expert(e)
        g = w4a8_matmul_ref(x[plan.gather_index[rows].long()], p["w3_w1_weight"],
                            p["w3_w1_weight_scale"], p["fc31_alpha"])
        h[rows] = torch.nn.functional.silu(g[:, inter:]) * g[:, :inter]
    return h


@pytest.mark.parametrize("tokens", [1, 3, 17, 300])
def test_fc1_matches_the_w4a8_reference_rows(fp8_backend, experts, tokens):
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
    from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile

    weights = experts("qwen3_30b_a3b")
    hidden, _, num_experts, top_k = MODELS["qwen3_30b_a3b"]
    x = random_tokens(tokens, hidden, seed=tokens + 40)
    ids, _ = skewed_routing(tokens, num_experts, top_k, seed=tokens + 41)
    bn = choose_token_tile(tokens * top_k, num_experts)
    plan = build_permutation(ids, num_experts, tile_m=bn)
    w13 = fp8_backend._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    h = fc1_gather_swiglu(fp8_backend.cache, x, plan.gather_index, plan.tile_expert, w13, bn,
                          tile_count=plan.tile_count, compute="e4m3")
    bf16 = fc1_gather_swiglu(fp8_backend.cache, x, plan.gather_index, plan.tile_expert, w13,
                             bn, tile_count=plan.tile_count)
    torch.cuda.synchronize()
    real = plan.gather_index >= 0
    ref = _fc1_w4a8_reference(x, plan, weights)[real]
    # the W4A16 tests' bound for h (bf16 rounding, fast exp, summation order)
    assert rel_err(h[real].float(), ref) < 8e-3, f"bn={bn}"
    # the fp8 path, not the bf16 one: W4A8 differs from W4A16 by its stated rounding (~3%)
    assert 1e-2 < rel_err(h[real].float(), bf16[real].float()) < 2 * STATED_ERROR["w4a8"]


@pytest.mark.parametrize("model,tokens", [
    ("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 3), ("qwen3_30b_a3b", 17),
    ("qwen3_30b_a3b", 300), ("qwen3_30b_a3b", 700), ("qwen3_30b_a3b", 2000),
    ("deepseek_v3", 1), ("deepseek_v3", 300),
])
def test_run_experts_matches_the_w4a8_reference(fp8_backend, backend, experts, model, tokens):
    """Token tiles 16 (1, 3, 17 tokens), 32 (300), 64 (700), 128 (2000) on Qwen3-30B-A3B;
    DeepSeek-V3 at 1 and 300 tokens. Deterministic run to run."""
    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=tokens + 50)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=tokens + 51)
    out = fp8_backend.run_experts(x, ids, tw, weights)
    assert out.shape == (tokens, hidden) and out.dtype == torch.bfloat16
    assert rel_err(out, w4a8_moe_ref(x, ids, tw, weights)) < 1e-2
    assert torch.equal(fp8_backend.run_experts(x, ids, tw, weights), out), "run-to-run differs"
    w4a16 = backend.run_experts(x, ids, tw, weights)
    assert 5e-3 < rel_err(out, w4a16) < 2 * STATED_ERROR["w4a8"]


@pytest.mark.parametrize("model,tokens", [("qwen3_30b_a3b", 17), ("qwen3_30b_a3b", 777),
                                          ("deepseek_v3", 300)])
def test_multi_b_is_bitwise_single_b(fp8_backend, experts, model, tokens):
    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=61)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=62)
    single = fp8_backend.run_experts(x, ids, tw, weights)
    for parts in (2, 4):
        view = weights.split(split_sizes(num_experts, parts))
        assert torch.equal(fp8_backend.run_experts(x, ids, tw, view), single), \
            f"S={parts} differs from S=1"


def test_sizes_not_multiple_of_128_are_refused_before_launch(fp8_backend):
    from tensorrt_llm_dwdp.kernels.testing import preshuffled_experts, random_nvfp4_experts

    weights = preshuffled_experts(random_nvfp4_experts(4, 256, 192, seed=1))
    x = random_tokens(5, 256, seed=1)
    ids, tw = skewed_routing(5, 4, 2, seed=2, empty_experts=0)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_backend.run_experts(x, ids, tw, weights)


def test_past_2_31_rows_times_hidden(fp8_backend):
    """65,600 tokens x top-8 x hidden 4096 > 2^31 elements of FC2 output rows: 64-bit offsets
    in the W4A8 path too (e4m3 rows, their scales, the fp32 scatter). Checked on the first and
    last tokens (largest offsets) against the reference on those tokens alone (per-token
    quantization: a token's result does not depend on the others)."""
    from tensorrt_llm_dwdp.kernels.testing import preshuffled_experts, random_nvfp4_experts

    hidden, inter, num_experts, top_k, tokens = 4096, 2048, 16, 8, 65_600
    weights = preshuffled_experts(random_nvfp4_experts(num_experts, hidden, inter, seed=5))
    x = random_tokens(tokens, hidden, seed=6)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=7, empty_experts=2)
    assert tokens * top_k * hidden >= 2**31
    out = fp8_backend.run_experts(x, ids, tw, weights)
    torch.cuda.synchronize()
    rows = torch.cat([torch.arange(64), torch.arange(tokens - 64, tokens)]).cuda()
    ref = w4a8_moe_ref(x[rows].contiguous(), ids[rows].contiguous(), tw[rows].contiguous(),
                       weights)
    assert rel_err(out[rows], ref) < 1e-2
    del x, out
