"""plan_dispatch: every (token, slot) reaches its owner exactly once, each token goes once to
every rank owning one of its experts, with local ids (-1 elsewhere) and its router weights."""
import pytest
import torch

from tensorrt_llm_dwdp.parallel.dispatch import MASKED, experts_per_rank, plan_dispatch


def _check(topk_ids, num_experts, world):
    t, k = topk_ids.shape
    weights = torch.rand(t, k, generator=torch.Generator().manual_seed(t))
    plan = plan_dispatch(topk_ids, weights, num_experts, world)
    epr = num_experts // world
    assert len(plan.counts) == world and plan.num_rows == plan.row_token.numel()
    blocks = torch.split(torch.arange(plan.num_rows), list(plan.counts))
    seen = []
    for s in range(world):
        want_tokens = sorted({i for i in range(t) if any(int(e) // epr == s for e in topk_ids[i])})
        rows = blocks[s].tolist()
        assert plan.row_token[rows].tolist() == want_tokens
        for r in rows:
            tok = int(plan.row_token[r])
            for j in range(k):
                e = int(topk_ids[tok, j])
                if e // epr == s:
                    assert int(plan.row_ids[r, j]) == e - s * epr
                    assert plan.row_weights[r, j] == weights[tok, j]
                    seen.append(tok * k + j)
                else:
                    assert int(plan.row_ids[r, j]) == MASKED and plan.row_weights[r, j] == 0
    assert sorted(seen) == list(range(t * k))
    assert plan.row_ids.dtype == torch.int32 and plan.row_weights.dtype == torch.float32


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
def test_plan_covers_every_pair_once(world, tokens):
    g = torch.Generator().manual_seed(tokens * 10 + world)
    e, k = 16, 4
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.empty(0, k, dtype=torch.int64)
    _check(ids.int(), e, world)


def test_all_slots_on_one_rank_send_the_token_once():
    ids = torch.tensor([[8, 9, 10, 11], [0, 15, 1, 14]], dtype=torch.int32)
    plan = plan_dispatch(ids, torch.ones(2, 4), 16, 2)
    assert plan.counts == (1, 2)          # token 0 only to rank 1; token 1 to both
    assert plan.row_ids.tolist() == [[0, -1, 1, -1], [0, 1, 2, 3], [-1, 7, -1, 6]]
    _check(ids, 16, 2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="divisible"):
        experts_per_rank(10, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        plan_dispatch(torch.tensor([[3, 16]]), torch.ones(1, 2), 16, 2)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        plan_dispatch(torch.tensor([1, 2]), torch.ones(2), 16, 2)
