"""Hopper FP8 block-scaled MoE kernels against ``quant.fp8``'s reference, on the device.

Reference (``kernels.testing.fp8_moe_reference``): per expert ``blockwise_matmul_ref`` + SwiGLU
-> bf16 h -> requantize per token per 128 -> ``blockwise_matmul_ref`` -> router weight ->
slot-order fp32 sum -> bf16. The kernels sum each 128-wide K block in the tensor core's order
(not the reference's), so h and the output are compared within a tolerance: h (bf16) rel. err
< 1e-2 and the layer output < 2e-2 (a requantized h element can round to the neighbouring e4m3
code, ~6% of one element, when the kernel's bf16 h differs from the reference's in the last
bit). Loud by construction: every 128 x 128 weight block has its own scale, routing is skewed
with experts that get no token, token counts sit on and off tile boundaries, outputs are
poisoned with NaN first, multi-B views split the experts unevenly, one forward passes 2^31
permuted rows x intermediate elements.
"""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.testing import (
    fp8_moe_reference,
    random_fp8_experts,
    random_tokens,
    skewed_routing,
    split_sizes,
)
from tensorrt_llm_dwdp.moe.permute import build_permutation

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]

H_TOL = 1e-2
OUT_TOL = 2e-2
SMALL = (1024, 384, 16, 4)  # H, I, E, top-k: fast, 3 row blocks of scales per projection


@pytest.fixture(scope="module")
def cache():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        if torch.cuda.is_available():
            pytest.fail("the FP8 kernels need an sm90 GPU; this one is not")
        pytest.skip("needs an sm90 GPU")
    from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache

    return CompileCache()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in the kernel output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _tables(experts, parts: int):
    """Expert tables over ``parts`` unequal slices (copies; S = 1: the tensors themselves) and
    the tensors they point at (the caller keeps them alive while the kernels run)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import build_fp8_expert_table

    sizes = split_sizes(experts["w2_weight"].shape[0], parts)
    offsets = [sum(sizes[:i]) for i in range(parts)]
    held = {name: [t.clone() for t in torch.split(experts[name], sizes)] if parts > 1
            else [experts[name]] for name in experts}
    w13 = build_fp8_expert_table(held["w3_w1_weight"], held["w3_w1_weight_scale_inv"], offsets)
    w2 = build_fp8_expert_table(held["w2_weight"], held["w2_weight_scale_inv"], offsets)
    return w13, w2, held


def _forward(cache, x, ids, tw, experts, bn, parts=1, plan=None, config=None):
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import fp8_moe_forward

    w13, w2, held = _tables(experts, parts)
    plan = plan or build_permutation(ids, experts["w2_weight"].shape[0], tile_m=bn)
    out, h = fp8_moe_forward(cache, x, ids, tw, w13, w2, plan, bn, return_h=True,
                             config=config)
    torch.cuda.synchronize()
    del held
    return out, h[:_real_rows(plan, bn)], plan


def _real_rows(plan, bn: int) -> int:
    """Rows of the plan's real tiles: the device plan sizes h by an upper bound of tiles, and
    rows past ``tile_count`` are never written (their bytes are whatever the allocator had)."""
    return int(plan.tile_count.item()) * bn


def _h_by_slot(h, plan, tokens, top_k):
    """Kernel h rows (permuted order) as ``[T, k, I]`` via the plan's inverse."""
    return h[plan.inverse.long().reshape(-1)].float().view(tokens, top_k, -1)


@pytest.mark.parametrize("tokens", [1, 3, 17, 300])
@pytest.mark.parametrize("bn", [16, 32, 64, 128])
def test_moe_fp8_matches_reference(cache, tokens, bn):
    """FC1 h and the layer output at every token tile, token counts on and off the tiles."""
    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=5)
    x = random_tokens(tokens, hidden, seed=tokens)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=tokens, empty_experts=2)
    out, h, plan = _forward(cache, x, ids, tw, experts, bn)
    want, h_ref = fp8_moe_reference(x, ids, tw, experts)
    assert rel_err(_h_by_slot(h, plan, tokens, top_k), h_ref) < H_TOL
    assert rel_err(out, want) < OUT_TOL


@pytest.mark.parametrize("model,tokens", [
    ((7168, 2048, 256, 8), 2048), ((7168, 2048, 256, 8), 8192), ((4096, 1536, 128, 8), 2048)],
    ids=["deepseek_v3", "deepseek_v3_bn128", "qwen3_235b_a22b"])
def test_moe_fp8_model_shapes(cache, model, tokens):
    """DeepSeek-V3 and Qwen3-235B sizes (the benched shapes), skewed routing (the hot experts
    take many tiles); 8192 DeepSeek-V3 tokens pick the 128-token tile, whose default there
    multicasts the token tile over CTA pairs; a sample of tokens against the reference."""
    hidden, inter, num_experts, top_k = model
    experts = random_fp8_experts(num_experts, hidden, inter, seed=11)
    x = random_tokens(tokens, hidden, seed=1)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=2)
    from tensorrt_llm_dwdp.moe.backends.cutedsl import choose_token_tile

    bn = choose_token_tile(tokens * top_k, num_experts)
    assert bn == 128 or tokens != 8192
    out, _, _ = _forward(cache, x, ids, tw, experts, bn)
    sample = torch.tensor([0, 1, 777, tokens - 1], device=x.device)
    want, _ = fp8_moe_reference(x, ids, tw, experts, tokens=sample)
    assert rel_err(out[sample], want) < OUT_TOL


@pytest.mark.parametrize("parts", [2, 3])
def test_multi_view_bitwise_equal_composite(cache, parts):
    """S tensors (unequal expert slices) give the composite view's h and output bit for bit."""
    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=9)
    x = random_tokens(200, hidden, seed=3)
    ids, tw = skewed_routing(200, num_experts, top_k, seed=4, empty_experts=1)
    out1, h1, _ = _forward(cache, x, ids, tw, experts, 32)
    out_s, h_s, _ = _forward(cache, x, ids, tw, experts, 32, parts=parts)
    assert torch.equal(h1, h_s)
    assert torch.equal(out1, out_s)
    out2, _, _ = _forward(cache, x, ids, tw, experts, 32)
    assert torch.equal(out1, out2), "run to run"


def test_tiles_of_expert_minus_one_are_skipped(cache):
    """A plan padded to an upper bound of tiles with expert -1 (the device plan's contract):
    the same output, and the -1 tiles' h rows are never written (they keep their poison)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import fc1_fp8_gather_swiglu, fp8_moe_forward
    from tensorrt_llm_dwdp.quant.fp8 import quantize_act_per_token

    hidden, inter, num_experts, top_k = SMALL
    bn = 16
    experts = random_fp8_experts(num_experts, hidden, inter, seed=13)
    x = random_tokens(50, hidden, seed=5)
    ids, tw = skewed_routing(50, num_experts, top_k, seed=6)
    plan = build_permutation(ids, num_experts, tile_m=bn)
    extra = 3
    pad = torch.full((extra * bn,), -1, dtype=torch.int32, device=x.device)
    tile_expert = torch.cat([plan.tile_expert, torch.full((extra,), -1, dtype=torch.int32,
                                                          device=x.device)])
    gather = torch.cat([plan.gather_index, pad])
    w13, w2, _ = _tables(experts, 1)
    xq, xs = quantize_act_per_token(x)
    h = torch.full((gather.numel(), inter), float("nan"), dtype=torch.bfloat16, device=x.device)
    fc1_fp8_gather_swiglu(cache, xq, xs, gather, tile_expert, w13, bn, out=h)
    out_ref, h_ref = fp8_moe_forward(cache, x, ids, tw, w13, w2, plan, bn, return_h=True)
    torch.cuda.synchronize()
    rows = _real_rows(plan, bn)
    assert torch.equal(h[:rows], h_ref[:rows])
    assert torch.isnan(h[rows:].float()).all()


def test_forward_past_2_31_elements(cache):
    """65,600 tokens x top-8 over 8 experts with I = 4096: h is 524,800 permuted rows x 4096
    (2.15e9 elements > 2^31), so every h / hq address needs 64 bits; the first and last tokens
    against the reference."""
    hidden, inter, num_experts, top_k = 1024, 4096, 8, 8
    tokens = 65_600
    experts = random_fp8_experts(num_experts, hidden, inter, seed=17)
    x = random_tokens(tokens, hidden, seed=7)
    gen = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(tokens)])
    ids = ids.to(torch.int32).to(x.device)
    tw = torch.softmax(torch.randn(tokens, top_k, generator=gen), -1).to(x.device)
    out, h, plan = _forward(cache, x, ids, tw, experts, 128)
    assert h.numel() > 2**31
    del h
    sample = torch.tensor([0, 1, tokens - 2, tokens - 1], device=x.device)
    want, _ = fp8_moe_reference(x, ids, tw, experts, tokens=sample)
    assert rel_err(out[sample], want) < OUT_TOL


@pytest.mark.parametrize("tokens", [5, 700])
def test_cutedsl_backend_runs_fp8_experts(cache, tokens):
    """The backend picks the FP8 kernels from the experts' format: ``run_experts`` on FP8
    ``ExpertWeights`` (linear layout) matches the torch reference backend's FP8 math, and a
    multi-tensor view (DWDP) gives the single-tensor result bit for bit."""
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend
    from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
    from tensorrt_llm_dwdp.moe.weights import ExpertWeights

    hidden, inter, num_experts, top_k = SMALL
    weights = ExpertWeights.single(random_fp8_experts(num_experts, hidden, inter, seed=21))
    assert weights.quant == "fp8" and weights.weight_layout == "linear"
    x = random_tokens(tokens, hidden, seed=22)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=23, empty_experts=2)
    backend = CuteDslMoeBackend()
    out = backend.run_experts(x, ids, tw, weights)
    want = TorchMoeBackend().run_experts(x, ids, tw, weights)
    assert rel_err(out, want) < OUT_TOL
    multi = backend.run_experts(x, ids, tw, weights.split(split_sizes(num_experts, 3)))
    assert torch.equal(out, multi)


def _bench_variants():
    from bench.moe_kernels_fp8 import VARIANTS

    for name, (tiles, vbn, overrides) in sorted(VARIANTS.items()):
        # clusters: their own test, near the end (a hang stops there); y_fp32 keeps FC2's
        # scratch rows in fp32, so it is not bitwise the default (its own test)
        clustered = overrides.get("cluster2") or overrides.get("mcast_tokens")
        if not clustered and overrides.get("y_bf16", True):
            yield pytest.param(tiles[0], vbn or tiles[0], overrides, id=name)


@pytest.mark.parametrize("bn,vbn,overrides", list(_bench_variants()))
def test_bench_variants_bitwise_equal_default(cache, bn, vbn, overrides):
    """Every configuration the bench times (``--variants``) gives the default configuration's
    output bit for bit, and the reference within tolerance."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = SMALL
    experts = experts_linear = random_fp8_experts(num_experts, hidden, inter, seed=31)
    tokens = bn * num_experts // top_k + 5
    x = random_tokens(tokens, hidden, seed=32)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=33, empty_experts=1)
    out, _, _ = _forward(cache, x, ids, tw, experts, bn)
    if overrides.get("bulk_weights"):  # reads the bulk-copy layout
        from tensorrt_llm_dwdp.kernels.sm90.fp8_preshuffle import preshuffle_fp8

        experts = dict(experts, w3_w1_weight=preshuffle_fp8(experts["w3_w1_weight"], fc1=True),
                       w2_weight=preshuffle_fp8(experts["w2_weight"], fc1=False))
    out_v, _, _ = _forward(cache, x, ids, tw, experts, vbn, config=fp8_config(vbn, **overrides))
    assert torch.equal(out, out_v)
    want, _ = fp8_moe_reference(x, ids, tw, experts_linear)
    assert rel_err(out_v, want) < OUT_TOL


@pytest.mark.parametrize("old_way", ["release_per_warp", "scale_lookahead"])
@pytest.mark.parametrize("bn", [16, 64])
def test_consumers_old_ways_bitwise_equal_default(cache, bn, old_way):
    """The cp.async consumers (tokens as N) with every thread releasing the slot, or loading
    each K tile's weight scales just before its wait: the default's bits (the bench variants
    check bn 128)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=41)
    tokens = bn * num_experts // top_k + 3
    x = random_tokens(tokens, hidden, seed=42)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=43, empty_experts=1)
    out, h, plan = _forward(cache, x, ids, tw, experts, bn)
    out_o, h_o, _ = _forward(cache, x, ids, tw, experts, bn, plan=plan,
                             config=fp8_config(bn, **{old_way: False}))
    assert torch.equal(h, h_o) and torch.equal(out, out_o)


@pytest.mark.parametrize("bn,tokens", [(16, 1), (16, 37), (32, 300), (64, 17), (128, 700)])
def test_tma_bitwise_equal_default(cache, bn, tokens):
    """The copy-engine configuration (``Fp8Config.tma``: weights by tensor-map boxes from the
    checkpoint layout, token rows pre-permuted) fills shared memory with the same bytes as the
    cp.async path: h and the output bit for bit, over the composite view and a 3-tensor
    multi view, and with a plan sized by its tile bound (tiles of expert -1 skipped)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=51)
    x = random_tokens(tokens, hidden, seed=52)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=53, empty_experts=1)
    out, h, plan = _forward(cache, x, ids, tw, experts, bn,
                            config=fp8_config(bn, tma=False, tokens_m=False))
    cfg = fp8_config(bn, tma=True, tokens_m=False)
    for parts in (1, 3):
        out_t, h_t, _ = _forward(cache, x, ids, tw, experts, bn, parts=parts, plan=plan,
                                 config=cfg)
        assert torch.equal(h, h_t), parts
        assert torch.equal(out, out_t), parts


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("tokens", [3, 700, 2500])
def test_tokens_m_matches_reference(cache, tokens, tma):
    """``Fp8Config.tokens_m`` (tokens as WGMMA M, bn 128): h and the output against the
    reference, over the composite view and a 3-tensor multi view (bitwise equal to each
    other), at a token count whose FC2 takes several hidden-column chunks."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = 1024, 512, 16, 4
    experts = random_fp8_experts(num_experts, hidden, inter, seed=61)
    x = random_tokens(tokens, hidden, seed=62)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=63, empty_experts=1)
    cfg = fp8_config(128, tma=tma, tokens_m=True)
    out, h, plan = _forward(cache, x, ids, tw, experts, 128, config=cfg)
    want, h_ref = fp8_moe_reference(x, ids, tw, experts)
    assert rel_err(_h_by_slot(h, plan, tokens, top_k), h_ref) < H_TOL
    assert rel_err(out, want) < OUT_TOL
    out3, h3, _ = _forward(cache, x, ids, tw, experts, 128, parts=3, plan=plan, config=cfg)
    assert torch.equal(h, h3)
    assert torch.equal(out, out3)


def test_tokens_m_bitwise_equal_tokens_n(cache):
    """Both MMA orientations promote ``fma(partial, x_scale * w_scale, total)`` on the same
    fp8 products: the layer's bits do not depend on which operand is WGMMA's A (bn 128's
    default, tma + tokens_m, against the cp.async kernel with the tokens as N)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=71)
    x = random_tokens(600, hidden, seed=72)
    ids, tw = skewed_routing(600, num_experts, top_k, seed=73, empty_experts=1)
    out, h, plan = _forward(cache, x, ids, tw, experts, 128,
                            config=fp8_config(128, tma=False, tokens_m=False))
    assert fp8_config(128).tokens_m and fp8_config(128).tma
    out_m, h_m, _ = _forward(cache, x, ids, tw, experts, 128, plan=plan)
    assert torch.equal(h, h_m)
    assert torch.equal(out, out_m)


@pytest.mark.parametrize("bn,tokens", [(16, 37), (32, 300), (128, 700), (128, 2500)])
def test_y_bf16_within_rounding_of_fp32_scratch(cache, bn, tokens):
    """``Fp8Config.y_bf16`` (the default: FC2's router-weighted rows rounded to bf16 before the
    slot sum) against ``y_bf16=False`` (fp32 rows): FC1's h bit for bit, the output within the
    rounding of k bf16 rows (rel. 4e-3; one bf16 rounding is 2^-9 relative) and the
    reference's tolerance, bitwise the same over a 3-tensor multi view (the sum's order is
    fixed)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = 1024, 512, 16, 4
    experts = random_fp8_experts(num_experts, hidden, inter, seed=91)
    x = random_tokens(tokens, hidden, seed=92)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=93, empty_experts=1)
    assert fp8_config(bn).y_bf16
    out, h, plan = _forward(cache, x, ids, tw, experts, bn,
                            config=fp8_config(bn, y_bf16=False))
    cfg = fp8_config(bn)
    out_b, h_b, _ = _forward(cache, x, ids, tw, experts, bn, plan=plan)
    assert torch.equal(h, h_b)
    assert not torch.equal(out, out_b), "the bf16 rows changed nothing: still fp32 scratch?"
    assert rel_err(out_b, out) < 4e-3
    want, _ = fp8_moe_reference(x, ids, tw, experts)
    assert rel_err(out_b, want) < OUT_TOL
    out3, _, _ = _forward(cache, x, ids, tw, experts, bn, parts=3, plan=plan, config=cfg)
    assert torch.equal(out_b, out3)


WIDE = {"alone": {}, "mcast_x": dict(mcast_tokens=True),
        "cluster4_one_box": dict(cluster2=True, mcast_tokens=True, fc1_one_box=True)}


@pytest.mark.parametrize("variant", sorted(WIDE))
@pytest.mark.parametrize("tokens,empty", [(700, 1), (2500, 0)])
def test_wide_tile_bitwise_equal_default(cache, variant, tokens, empty):
    """``blocks=3`` (128 tokens x 192 weight rows, QGMMA 64x192x32; alone, with the token
    tile multicast, and in 4-CTA clusters with the weights multicast too): h and the output
    bit for bit the default's. The shapes leave every ragged case: FC1's 20 blocks are 6 whole
    groups and one of 2 (its third block a clamped copy), FC2's chunks of 9 blocks start at
    odd blocks (a group's blocks straddle scale blocks, one scale per block) and the last
    chunk has 2; skewed routing (token-tile pairs straddling experts); composite and 3-tensor
    views."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    hidden, inter, num_experts, top_k = 1280, 640, 16, 4
    experts = random_fp8_experts(num_experts, hidden, inter, seed=91)
    x = random_tokens(tokens, hidden, seed=92)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=93, empty_experts=empty)
    out, h, plan = _forward(cache, x, ids, tw, experts, 128)
    cfg = fp8_config(128, blocks=3, **WIDE[variant])
    for parts in (1, 3):
        out_w, h_w, _ = _forward(cache, x, ids, tw, experts, 128, parts=parts, plan=plan,
                                 config=cfg)
        assert torch.equal(h, h_w), parts
        assert torch.equal(out, out_w), parts
    want, _ = fp8_moe_reference(x, ids, tw, experts)
    assert rel_err(out, want) < OUT_TOL


CLUSTERS = {"cluster2": dict(cluster2=True), "mcast_x": dict(mcast_tokens=True),
            "cluster4": dict(cluster2=True, mcast_tokens=True),
            "cluster2_one_box": dict(cluster2=True, fc1_one_box=True),
            "cluster2_thread_release": dict(cluster2=True, release_per_warp=False)}


@pytest.mark.parametrize("tokens,empty", [(700, 1), (2500, 3), (5, 0)])
@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_cluster_bitwise_equal_default(cache, cluster, tokens, empty):
    """The cluster kernels - ``cluster2`` (CTA pairs over token-tile pairs, weights multicast
    when both tiles are one expert's), ``mcast_tokens`` (pairs over block pairs, the token
    halves multicast) and both (4-CTA clusters): h and the output bit for bit the default's,
    with skewed routing (pairs straddling experts, odd tile counts, a pair with one empty
    tile, FC2 chunks of an odd pair count) over the composite view and a 3-tensor multi view,
    and the plan's tile bound (tiles of -1 at the end). Near the end of the file: a wrong
    barrier count would hang."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    # H = 9 x 128: FC2's 9 block pairs leave mcast_tokens' last pair of CTAs one pair short
    hidden, inter, num_experts, top_k = 1152, 384, 16, 4
    experts = random_fp8_experts(num_experts, hidden, inter, seed=81)
    x = random_tokens(tokens, hidden, seed=82)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=83, empty_experts=empty)
    out, h, plan = _forward(cache, x, ids, tw, experts, 128)
    cfg = fp8_config(128, **CLUSTERS[cluster])
    for parts in (1, 3):
        out_c, h_c, _ = _forward(cache, x, ids, tw, experts, 128, parts=parts, plan=plan,
                                 config=cfg)
        assert torch.equal(h, h_c), parts
        assert torch.equal(out, out_c), parts


@pytest.mark.parametrize("bn,tokens", [(16, 37), (128, 700)])
def test_bulk_weights_bitwise_equal_linear(cache, bn, tokens):
    """The bulk-copy variant (``Fp8Config.bulk_weights``) on preshuffled experts
    (``fp8_preshuffle``) fills shared memory with the same bytes as the linear path: h and the
    output bit for bit, over a multi-B view too. (Last in the file: a wrong transaction count
    would hang here, after every other test has reported.)"""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config
    from tensorrt_llm_dwdp.kernels.sm90.fp8_preshuffle import preshuffle_fp8

    hidden, inter, num_experts, top_k = SMALL
    experts = random_fp8_experts(num_experts, hidden, inter, seed=41)
    shuffled = dict(experts, w3_w1_weight=preshuffle_fp8(experts["w3_w1_weight"], fc1=True),
                    w2_weight=preshuffle_fp8(experts["w2_weight"], fc1=False))
    x = random_tokens(tokens, hidden, seed=42)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=43, empty_experts=1)
    out, h, _ = _forward(cache, x, ids, tw, experts, bn)
    cfg = fp8_config(bn, bulk_weights=True, tma=False)
    for parts in (1, 3):
        out_b, h_b, _ = _forward(cache, x, ids, tw, shuffled, bn, parts=parts, config=cfg)
        assert torch.equal(h, h_b)
        assert torch.equal(out, out_b)
