"""Routers against Hugging Face transformers (Qwen3-MoE, DeepSeek-V3) and hand-built cases."""
import pytest
import torch

from tensorrt_llm_dwdp.moe.router import (
    RouterConfig,
    deepseek_v3_topk,
    route,
    softmax_topk,
)


def _sorted_pairs(ids, weights):
    order = torch.argsort(ids.long(), dim=-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_topk_matches_hf_qwen3(renorm):
    mod = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=64, num_experts=16, num_experts_per_tok=4,
                         norm_topk_prob=renorm)
    hf = mod.Qwen3MoeTopKRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 64, generator=gen))
        x = torch.randn(50, 64, generator=gen)
        logits, hf_w, hf_ids = hf(x)
    ids, w = softmax_topk(logits, 4, renormalize=renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (50, 4)
    a_ids, a_w = _sorted_pairs(ids, w)
    b_ids, b_w = _sorted_pairs(hf_ids, hf_w)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w, b_w, rtol=1e-6, atol=1e-7)
    # Our order: descending weight.
    assert torch.all(w[:, :-1] >= w[:, 1:])


@pytest.mark.parametrize(
    "experts,k,n_group,topk_group,norm",
    [(16, 4, 4, 2, True), (32, 8, 8, 4, False), (8, 2, 1, 1, True), (64, 6, 8, 3, True)],
)
def test_deepseek_v3_matches_hf(experts, k, n_group, topk_group, norm):
    mod = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    cfg = DeepseekV3Config(hidden_size=48, n_routed_experts=experts, num_experts_per_tok=k,
                           n_group=n_group, topk_group=topk_group,
                           routed_scaling_factor=2.5, norm_topk_prob=norm)
    hf = mod.DeepseekV3TopkRouter(cfg)
    gen = torch.Generator().manual_seed(experts + k)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(experts, 48, generator=gen) * 0.3)
        hf.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.2)
        x = torch.randn(64, 48, generator=gen)
        logits, hf_w, hf_ids = hf(x)
    ids, w = deepseek_v3_topk(logits, hf.e_score_correction_bias, k, n_group, topk_group,
                              2.5, norm)
    a_ids, a_w = _sorted_pairs(ids, w)
    b_ids, b_w = _sorted_pairs(hf_ids, hf_w)
    assert torch.equal(a_ids, b_ids)
    torch.testing.assert_close(a_w, b_w, rtol=1e-6, atol=1e-6)


def test_deepseek_bias_selects_but_does_not_weigh():
    # Expert 3 has the lowest score but a huge bias: it is chosen, weighted by its raw score.
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    ids, w = deepseek_v3_topk(logits, bias, 2, 1, 1, 1.0, norm_topk_prob=False)
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(w, torch.sigmoid(logits)[:, [3, 0]])
    ids, w = deepseek_v3_topk(logits, bias, 2, 1, 1, 3.0, norm_topk_prob=True)
    s = torch.sigmoid(logits)[0, [3, 0]]
    torch.testing.assert_close(w[0], s / s.sum() * 3.0)


def test_deepseek_group_limit_uses_top2_sum():
    # Groups of 3: group 0 holds the single best expert but its top-2 sum loses to group 1.
    logits = torch.logit(torch.tensor([[0.95, 0.05, 0.05, 0.7, 0.7, 0.05]]))
    ids, _ = deepseek_v3_topk(logits, torch.zeros(6), 2, n_group=2, topk_group=1,
                              routed_scaling_factor=1.0)
    assert sorted(ids[0].tolist()) == [3, 4]


def test_ties_break_to_lower_id_deterministically():
    logits = torch.zeros(3, 8)
    ids, w = softmax_topk(logits, 3)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))
    ids, _ = deepseek_v3_topk(logits, torch.zeros(8), 3, 4, 2, 1.0)
    assert ids.tolist() == [[0, 1, 2]] * 3  # groups 0 and 1 win the group tie


def test_route_dispatch_and_config_errors():
    logits = torch.randn(5, 8)
    a = route(RouterConfig("softmax"), logits, 2)
    b = softmax_topk(logits, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    cfg = RouterConfig("deepseek_v3", n_group=2, topk_group=1, routed_scaling_factor=2.0)
    a = route(cfg, logits, 2, torch.zeros(8))
    b = deepseek_v3_topk(logits, torch.zeros(8), 2, 2, 1, 2.0, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="correction_bias"):
        route(cfg, logits, 2)
    with pytest.raises(ValueError, match="kind"):
        RouterConfig("top1")
    with pytest.raises(ValueError, match="topk_group"):
        RouterConfig("deepseek_v3", n_group=2, topk_group=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=9), "k=9"),
        (dict(n_group=3), "divide"),
        (dict(n_group=8, topk_group=1), ">= 2 experts"),
        (dict(topk_group=5), "topk_group"),
        (dict(k=5, n_group=4, topk_group=2), "exceeds"),
        (dict(bias=torch.zeros(7)), "correction_bias shape"),
    ],
)
def test_deepseek_bad_arguments(kwargs, match):
    args = dict(k=2, n_group=4, topk_group=2, bias=torch.zeros(8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        deepseek_v3_topk(torch.randn(2, 8), args["bias"], args["k"], args["n_group"],
                         args["topk_group"], 1.0)


def test_softmax_bad_logits():
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        softmax_topk(torch.randn(8), 2)
    with pytest.raises(ValueError, match="k=0"):
        softmax_topk(torch.randn(2, 8), 0)
