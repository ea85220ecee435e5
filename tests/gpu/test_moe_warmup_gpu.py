"""The CuTeDSL backend's warm-up on the device: it compiles every kernel a step can pick, so no
later step compiles one, whatever its token count or expert split (the serving workers run it
before they serve; a kernel compiled inside a served step stalled it for seconds)."""
import pytest
import torch


@pytest.mark.gpu
@pytest.mark.kernels
@pytest.mark.parametrize("num_experts,top_k", [(128, 8), (16, 4)])
def test_after_warm_up_no_step_compiles(num_experts, top_k):
    from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                                   random_tokens, skewed_routing)
    from tensorrt_llm_dwdp.moe.backends import get_backend
    from tensorrt_llm_dwdp.moe.backends.cutedsl import TOKEN_TILES, choose_token_tile, tokens_for_tile

    # a fresh backend: nothing compiled yet; a missing or broken CUTLASS DSL fails here
    backend = get_backend("cutedsl")
    hidden, inter = 2048, 768
    weights = preshuffled_experts(random_nvfp4_experts(num_experts, hidden, inter, seed=3))
    compiled = backend.warm_up(weights, top_k)
    assert compiled >= 2 * len(TOKEN_TILES)        # FC1 and FC2 per token tile (+ the finalize)
    assert backend.compile_stats()[0] == compiled and backend.compile_stats()[1] > 0
    assert backend.warm_up(weights, top_k) == 0
    # every tile again, from token counts the warm-up did not use, some with empty slots (EP)
    reference = get_backend("torch")
    seen = set()
    counts = [1, 20000] + [max(2, tokens_for_tile(bn, num_experts, top_k) - 3) for bn in TOKEN_TILES]
    for tokens in counts:
        seen.add(choose_token_tile(tokens * top_k, num_experts))
        x = random_tokens(tokens, hidden, seed=tokens)
        ids, w = skewed_routing(tokens, num_experts, top_k, seed=tokens + 1)
        if tokens % 2:
            ids = torch.where(torch.arange(top_k, device=ids.device) % 3 == 1, -1, ids)
        got = backend.run_experts(x, ids, w, weights).float()
        if tokens <= 2048:
            ref = reference.run_experts(x, ids, w, weights).float()
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    assert seen == set(TOKEN_TILES)
    assert backend.compile_stats()[0] == compiled
