"""256-row tiles (and shared B rows, ``row_split`` > 1) and the fused-N WGMMA give bit for bit
the results of the default 128 x (2 x 128) schedule, on the device. Each output's K reduction runs the same k16
WGMMA steps in the same order; only the CTA shape and the padding of the plan change, so rows
are compared through the plan's inverse (token, slot) -> permuted row.
"""
from __future__ import annotations

import pytest
import torch

from tensorrt_llm_dwdp.kernels.testing import MODELS, random_tokens, skewed_routing
from tensorrt_llm_dwdp.moe.permute import build_permutation

pytestmark = [pytest.mark.gpu, pytest.mark.kernels]


def _run(backend, weights, x, ids, tw, tile_m, n_sub, fuse_n=False):
    from tensorrt_llm_dwdp.kernels.sm90.fc1_swiglu import fc1_gather_swiglu
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import (
        fc2_weighted,
        finalize,
        permuted_row_weights,
    )

    num_experts = weights.num_experts
    plan = build_permutation(ids, num_experts, tile_m=tile_m)
    w13 = backend._table(weights, "w3_w1_weight", "w3_w1_weight_scale", "fc31_alpha")
    w2 = backend._table(weights, "w2_weight", "w2_weight_scale", "fc2_alpha")
    h = torch.full((plan.num_rows, weights.intermediate_size), float("nan"),
                   dtype=torch.bfloat16, device="cuda")
    y = torch.full((plan.num_rows, w2.rows), float("nan"), dtype=torch.float32, device="cuda")
    fc1_gather_swiglu(backend.cache, x, plan.gather_index, plan.tile_expert, w13, tile_m,
                      n_sub=n_sub, out=h, fuse_n=fuse_n)
    rw = permuted_row_weights(tw, plan.slot_index)
    fc2_weighted(backend.cache, h, plan.tile_expert, rw, w2, tile_m, n_sub=n_sub, out=y,
                 fuse_n=fuse_n)
    out = finalize(backend.cache, y, plan.inverse)
    rows = plan.inverse.reshape(-1).long()
    return h[rows], y[rows], out


@pytest.mark.parametrize("model,tokens", [("qwen3_30b_a3b", 2500), ("deepseek_v3", 600)])
def test_large_tiles_are_bitwise_default(backend, experts, model, tokens):
    weights = experts(model)
    hidden, _, num_experts, top_k = MODELS[model]
    x = random_tokens(tokens, hidden, seed=31)
    # Skewed: some experts get several 256-row tiles plus a partial one, some get none.
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=32)
    h0, y0, out0 = _run(backend, weights, x, ids, tw, 128, 128)
    assert torch.isfinite(h0).all() and torch.isfinite(y0).all()
    for tile_m, n_sub, fuse in ((256, 64, False), (128, 64, False), (128, 128, True),
                                (256, 64, True)):
        h, y, out = _run(backend, weights, x, ids, tw, tile_m, n_sub, fuse)
        name = f"{tile_m}x{n_sub}{'f' if fuse else ''}"
        assert torch.isfinite(h).all(), f"{name}: FC1 left rows unwritten (NaN poison survived)"
        assert torch.equal(h, h0), f"{name}: FC1 differs from 128x128"
        assert torch.equal(y, y0), f"{name}: FC2 differs from 128x128"
        assert torch.equal(out, out0), f"{name}: output differs from 128x128"


def test_backend_max_tile_m_256_is_bitwise_default(experts):
    from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend

    weights = experts("qwen3_30b_a3b")
    hidden, _, num_experts, top_k = MODELS["qwen3_30b_a3b"]
    tokens = 300 * num_experts // top_k  # ~300 rows per expert: the 256-row regime
    x = random_tokens(tokens, hidden, seed=41)
    ids, tw = skewed_routing(tokens, num_experts, top_k, seed=42)
    default = CuteDslMoeBackend().run_experts(x, ids, tw, weights)
    large = CuteDslMoeBackend(max_tile_m=256).run_experts(x, ids, tw, weights)
    assert torch.equal(large, default)
