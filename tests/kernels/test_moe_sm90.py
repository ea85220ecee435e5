"""Hopper CuTeDSL MoE kernels against the torch reference backend, on the device (H100/H200).

The kernels read preshuffled experts only: every test hands them a set shuffled once
(``preshuffled_experts``, tagged ``weight_layout="preshuffled"``) and compares with the torch
reference, which unshuffles it exactly. Loud by construction: every expert has its own scales
and alpha, routing is skewed with experts that get no token, token counts sit on and around
tile boundaries, outputs are poisoned with NaN before the kernels run, multi-B views split the
experts unevenly, one forward passes 2^31 permuted rows x hidden, and odd sizes (K = 2880,
64-wide layers) run.
"""
from __future__ import annotations

import pytest
import torch

from bench.rs_variants import occupancy_configs
from tensorrt_llm_dwdp.kernels.testing import (
    MODELS,
    preshuffled_experts,
    random_nvfp4_experts,
    random_tokens,
    skewed_routing,
    split_sizes,
)
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend, dequantized_expert
from tensorrt_llm_dwdp.moe.permute import build_permutation, tile_bound

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _fc1_reference(x, plan, weights):
    """fp32 h per permuted row from the reference's pieces (exact weights, fp32 math)."""
    inter = weights.intermediate_size
    h = torch.zeros(plan.num_rows, inter, dtype=torch.float32, device=x.device)
    offsets = plan.expert_offsets.tolist()
    counts = plan.counts.tolist()
    for e in range(weights.num_experts):
        if counts[e] == 0:
            continue
        rows = slice(offsets[e], offsets[e] + counts[e])
        w13, _, p = dequantized_expert(weights, e)
        g = (x[plan.gather_index[rows].long()].float() @ w13.t()) * p["fc31_alpha"]
        h[rows] = torch.nn.functional.silu(g[:, inter:]) * g[:, :inter]
    return h


@pytest.mark.parametrize("bn", [16, 128])
@pytest.mark.parametrize("tokens", [37, 300])
def test_fc1_matches_reference_rows(backend, experts, tokens, bn):
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu

    weights = experts("qwen3_30b_a3b")
    hidden, _, num_experts, top_k = MODELS["qwen3_30b_a3b"]
    x = random_tokens(tokens, hidden, seed=tokens)
    ids, _ = skewed_routing(tokens, num_experts, top_k, seed=tokens)
    plan = build_permutation(ids, num_experts, tile_m=bn)
    w13 = backend._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    out = torch.full((plan.num_rows, weights.intermediate_size), float("nan"),
                     dtype=torch.bfloat16, device="cuda")
    h = fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=out,
                          tile_count=plan.tile_count)
    torch.cuda.synchronize()
    ref = _fc1_reference(x, plan, weights)
    real = plan.gather_index >= 0
    live = int(plan.tile_count[0]) * bn  # rows of the real tiles; the plan's bound is larger
    assert live < plan.num_rows  # no empty slot here: the bound's last tile stays unused
    assert torch.isfinite(h[:live]).all(), "FC1 left rows unwritten (NaN poison survived)"
    assert torch.isnan(h[live:].float()).all(), "FC1 wrote past the real tiles (tile_count)"
    assert rel_err(h[real].float(), ref[real]) < 8e-3


@pytest.mark.parametrize("model,tokens", [
    ("qwen3_30b_a3b", 1), ("qwen3_30b_a3b", 129), ("qwen3_30b_a3b", 1000),
    ("qwen3_30b_a3b", 16384), ("deepseek_v3", 1), ("deepseek_v3", 2048),
])
def test_run_experts_matches_torch_ref(backend, experts, model, tokens):
    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=tokens + 1)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=tokens + 2)
    out = backend.run_experts(x, ids, tw, weights)
    ref = TorchMoeBackend().run_experts(x, ids, tw, weights)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("model,tokens", [("qwen3_30b_a3b", 777), ("deepseek_v3", 300)])
def test_multi_b_is_bitwise_single_b(backend, experts, model, tokens):
    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=11)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=12)
    single = backend.run_experts(x, ids, tw, weights)
    again = backend.run_experts(x, ids, tw, weights)
    assert torch.equal(single, again), "run-to-run results differ"
    for parts in (2, 4):
        view = weights.split(split_sizes(num_experts, parts))
        multi = backend.run_experts(x, ids, tw, view)
        assert torch.equal(multi, single), f"S={parts} differs from S=1"


def test_zero_tokens_and_one_expert_slices(backend, experts):
    weights = experts("qwen3_30b_a3b")
    hidden, _, num_experts, top_k = MODELS["qwen3_30b_a3b"]
    x = random_tokens(0, hidden, seed=1)
    ids = torch.empty(0, top_k, dtype=torch.int32, device="cuda")
    tw = torch.empty(0, top_k, dtype=torch.float32, device="cuda")
    assert backend.run_experts(x, ids, tw, weights).shape == (0, hidden)
    # Every expert in its own tensor: S = E, the extreme of unequal slices.
    x = random_tokens(50, hidden, seed=2)
    ids, tw = skewed_routing(50, num_experts, top_k, seed=3)
    view = weights.split([1] * num_experts)
    assert torch.equal(backend.run_experts(x, ids, tw, view),
                       backend.run_experts(x, ids, tw, weights))


def test_fc2_one_hot_rows_read_exact_weight_columns(backend, experts):
    """h row m = e_{k(m)}, top-1 with router weight 1: out[m] = bf16(alpha_e * W2_e[:, k(m)])
    exactly (one product per output, every e2m1 code incl. +-0.5 and every scale). A wrong
    K position in the A or B staging names the column it read."""
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize

    weights = experts("qwen3_30b_a3b")
    hidden, inter, num_experts, _ = MODELS["qwen3_30b_a3b"]
    ids = torch.tensor([[5], [9]], dtype=torch.int32, device="cuda").repeat(inter // 2, 1)
    ids = ids.view(-1, 1)[:inter]  # token t on expert 5 (even t) or 9 (odd t)
    bn = 16
    plan = build_permutation(ids, num_experts, tile_m=bn)
    k_of_token = torch.arange(inter, device="cuda")  # token t reads column t
    h = torch.zeros(plan.num_rows, inter, dtype=torch.bfloat16, device="cuda")
    real = plan.gather_index >= 0
    h[real] = torch.nn.functional.one_hot(k_of_token[plan.gather_index[real].long()],
                                          inter).to(torch.bfloat16)
    w2 = backend._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
    tw = torch.ones(inter, 1, device="cuda")
    out = fc2_finalize(backend.cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                       tile_count=plan.tile_count)
    torch.cuda.synchronize()
    for e in (5, 9):
        tokens = torch.arange(0 if e == 5 else 1, inter, 2, device="cuda")
        _, w2_e, p = dequantized_expert(weights, e)
        want = (w2_e[:, tokens].t() * p["fc2_alpha"]).to(torch.bfloat16)
        got = out[tokens]
        if not torch.equal(got, want):
            bad = (got != want).any(dim=1).nonzero()[0].item()
            cols = (w2_e.t() * p["fc2_alpha"] - got[bad].float()).abs().sum(dim=1)
            raise AssertionError(
                f"expert {e} token {tokens[bad].item()}: expected column "
                f"{tokens[bad].item()}, closest column {cols.argmin().item()} (err "
                f"{cols.min().item():.3g}); {(got != want).any(dim=1).sum().item()} of "
                f"{len(tokens)} tokens differ")


def _subset_ref(x, ids, tw, weights, rows):
    return TorchMoeBackend().run_experts(x[rows].contiguous(), ids[rows].contiguous(),
                                         tw[rows].contiguous(), weights)


def test_past_2_31_rows_times_hidden(backend):
    """65,600 tokens x top-8 x hidden 4096 = 2.15e9 > 2^31 elements of FC2 output rows, and
    the permuted h passes 2^31 bytes (I = 2048): 64-bit offsets throughout. FC2 scratch stays
    within 2x the bf16 output. Checked on the first and last tokens (largest offsets)."""
    hidden, inter, num_experts, top_k, tokens = 4096, 2048, 16, 8, 65_600
    weights = preshuffled_experts(random_nvfp4_experts(num_experts, hidden, inter, seed=5))
    x = random_tokens(tokens, hidden, seed=6)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=7, empty_experts=2)
    assert tokens * top_k * hidden >= 2**31
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = backend.run_experts(x, ids, tw, weights)
    torch.cuda.synchronize()
    out_bytes = out.numel() * 2
    h_bytes = tile_bound(tokens, top_k, num_experts, 128) * 128 * inter * 2  # h, the plan's bound
    scratch = torch.cuda.max_memory_allocated() - before - out_bytes - h_bytes
    assert scratch <= 2 * out_bytes + (64 << 20), f"FC2 scratch {scratch} B > 2x output"
    rows = torch.cat([torch.arange(64), torch.arange(tokens - 64, tokens)]).cuda()
    assert rel_err(out[rows], _subset_ref(x, ids, tw, weights, rows)) < 1e-2
    del x, out


@pytest.mark.parametrize("hidden,inter,num_experts,top_k,tokens", [
    (2880, 2880, 32, 4, 500),  # K = 2880: not a multiple of 128 (64-wide K tiles), 90 blocks
    (64, 64, 16, 4, 5),        # the tiny presets' 64-wide layers (clamped block groups)
])
def test_sizes_multiple_of_64(backend, hidden, inter, num_experts, top_k, tokens):
    weights = preshuffled_experts(random_nvfp4_experts(num_experts, hidden, inter, seed=9))
    x = random_tokens(tokens, hidden, seed=10)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=11, empty_experts=1)
    out = backend.run_experts(x, ids, tw, weights)
    assert rel_err(out, TorchMoeBackend().run_experts(x, ids, tw, weights)) < 1e-2
    view = weights.split(split_sizes(num_experts, 3))
    assert torch.equal(backend.run_experts(x, ids, tw, view), out), "S = 3 differs"


def _fc1_fc2(backend, x, ids, tw, weights, bn, overrides=None):
    """FC1 and FC2 of the kernels on token tile ``bn`` (default configurations, or
    ``rs_config(bn, K, **overrides)``): (plan, h, output), h poisoned with NaN before FC1."""
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import fc2_finalize
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config

    c1 = c2 = None
    if overrides is not None:
        c1 = rs_config(bn, weights.hidden_size, **overrides)
        c2 = rs_config(bn, weights.intermediate_size, **overrides)
    plan = build_permutation(ids, weights.num_experts, tile_m=bn)
    w13 = backend._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    w2 = backend._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
    h = torch.full((plan.num_rows, weights.intermediate_size), float("nan"),
                   dtype=torch.bfloat16, device="cuda")
    h = fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, bn, out=h,
                          config=c1, tile_count=plan.tile_count)
    out = fc2_finalize(backend.cache, h, plan.slot_index, plan.tile_expert, ids, tw, w2, bn,
                       config=c2, tile_count=plan.tile_count)
    torch.cuda.synchronize()
    return plan, h, out


@pytest.mark.parametrize("model,tokens", [
    ("qwen3_30b_a3b", 37), ("qwen3_30b_a3b", 400), ("qwen3_30b_a3b", 1000),
    ("qwen3_30b_a3b", 16384), ("deepseek_v3", 300), ("deepseek_v3", 2048),
])
def test_every_token_tile_matches_torch_ref_and_is_deterministic(backend, experts, model,
                                                                 tokens):
    """Token tiles 16, 32, 64, 128 (by the rows per expert): FC1's h against the reference's
    fp32 h on every real row, the output against the torch reference; a second run and S = 3
    views of the shuffled tensors bitwise equal to the first; ``run_experts`` launches exactly
    these kernels (bitwise the direct FC1 / FC2 calls)."""
    from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile

    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=tokens + 5)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=tokens + 6)
    bn = choose_token_tile(tokens * top_k, num_experts)
    plan, h, out = _fc1_fc2(backend, x, ids, tw, weights, bn)
    real = plan.gather_index >= 0
    assert torch.isfinite(h[real]).all(), f"FC1 left rows unwritten at bn={bn}"
    assert rel_err(h[real].float(), _fc1_reference(x, plan, weights)[real]) < 8e-3, f"bn={bn}"
    assert rel_err(out, TorchMoeBackend().run_experts(x, ids, tw, weights)) < 1e-2, f"bn={bn}"
    _, h2, out2 = _fc1_fc2(backend, x, ids, tw, weights, bn)
    assert torch.equal(h2[real], h[real]) and torch.equal(out2, out), "run-to-run results differ"
    view = weights.split(split_sizes(num_experts, 3))
    assert torch.equal(_fc1_fc2(backend, x, ids, tw, view, bn)[2], out), "S = 3 differs"
    assert torch.equal(backend.run_experts(x, ids, tw, weights), out), "run_experts differs"


@pytest.fixture(scope="module")
def default_points():
    """``point(backend, experts, model, bn)``: a skewed-routing point whose step picks token
    tile ``bn``, its default-configuration h / output and the references (computed once)."""
    cache = {}

    def get(backend, experts, model, bn):
        if (model, bn) not in cache:
            from tensorrt_llm_dwdp.moe.backends.cutedsl import tokens_for_tile

            weights = experts(model)
            hidden, _, num_experts, top_k = MODELS[model]
            tokens = tokens_for_tile(bn, num_experts, top_k)
            x = random_tokens(tokens, hidden, seed=bn + 20)
            ids, tw = skewed_routing(tokens, num_experts, top_k, seed=bn + 21, empty_experts=1)
            plan, h, out = _fc1_fc2(backend, x, ids, tw, weights, bn)
            real = plan.gather_index >= 0
            cache[(model, bn)] = dict(
                x=x, ids=ids, tw=tw, real=real, h=h, out=out,
                h_ref=_fc1_reference(x, plan, weights)[real],
                out_ref=TorchMoeBackend().run_experts(x, ids, tw, weights))
        return cache[(model, bn)]

    return get


@pytest.mark.parametrize("bn,overrides", [pytest.param(bn, fields, id=name)
                                          for name, bn, fields in occupancy_configs()])
@pytest.mark.parametrize("model", ["deepseek_v3", "qwen3_235b_a22b"])
def test_occupancy_candidate_matches_torch_ref_and_default_bitwise(backend, experts,
                                                                   default_points, model, bn,
                                                                   overrides):
    """The configurations ``bench/rs_variants.py`` times for more warps in flight (one 64-row
    block per consumer warpgroup, 2 or 3 CTAs per SM; ``OCCUPANCY``) at DeepSeek-V3 and
    Qwen3-235B shapes, on the token tile they are for: FC1's h on every real row against the
    fp32 reference, the output against the torch reference, and both bitwise equal to the
    default configuration's (same K order: any difference is a bug), run to run too."""
    weights = experts(model)
    point = default_points(backend, experts, model, bn)
    x, ids, tw, real = point["x"], point["ids"], point["tw"], point["real"]
    _, h, out = _fc1_fc2(backend, x, ids, tw, weights, bn, overrides)
    assert torch.isfinite(h[real]).all(), "FC1 left rows unwritten (NaN poison survived)"
    assert rel_err(h[real].float(), point["h_ref"]) < 8e-3
    assert rel_err(out, point["out_ref"]) < 1e-2
    assert torch.equal(h[real], point["h"][real]), "h differs from the default configuration's"
    assert torch.equal(out, point["out"]), "output differs from the default configuration's"
    _, h2, out2 = _fc1_fc2(backend, x, ids, tw, weights, bn, overrides)
    assert torch.equal(h2[real], h[real]) and torch.equal(out2, out), "run-to-run differs"


@pytest.mark.parametrize("bn", [16, 64, 128])
def test_y_bf16_scratch_within_rounding_of_the_default(backend, experts, default_points, bn):
    """``RsConfig.y_bf16`` (FC2's router-weighted rows rounded to bf16 before the fixed-order
    slot sum): h bitwise the default's, the output within the rounding of k bf16 rows of the
    default's fp32-scratch output (rel. 4e-3) and the reference's tolerance, run to run the
    same; the bench (``bench/rs_variants.py``, variant ``y_bf16``) decides the default."""
    model = "deepseek_v3"
    weights = experts(model)
    point = default_points(backend, experts, model, bn)
    x, ids, tw, real = point["x"], point["ids"], point["tw"], point["real"]
    _, h, out = _fc1_fc2(backend, x, ids, tw, weights, bn, {"y_bf16": True})
    assert torch.equal(h[real], point["h"][real])
    assert not torch.equal(out, point["out"]), "bf16 rows changed nothing: still fp32 scratch?"
    assert rel_err(out, point["out"]) < 4e-3
    assert rel_err(out, point["out_ref"]) < 1e-2
    _, _, out2 = _fc1_fc2(backend, x, ids, tw, weights, bn, {"y_bf16": True})
    assert torch.equal(out2, out), "run-to-run differs"
