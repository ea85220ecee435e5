"""plan_dispatch: every (token, slot) reaches its owner exactly once, tokens go once per rank."""
import pytest
import torch

from tensorrt_llm_dwdp.parallel.dispatch import experts_per_rank, plan_dispatch


def _check(topk_ids, num_experts, world):
    plan = plan_dispatch(topk_ids, num_experts, world)
    epr = num_experts // world
    t, k = topk_ids.shape
    rows = torch.split(plan.row_token, plan.row_counts.tolist())
    pairs = torch.split(torch.arange(plan.pair_slot.numel()), plan.pair_counts.tolist())
    seen = []
    for s in range(world):
        want_tokens = sorted({i for i in range(t) if any(int(e) // epr == s for e in topk_ids[i])})
        assert rows[s].tolist() == want_tokens
        for p in pairs[s].tolist():
            slot = int(plan.pair_slot[p])
            tok, j = divmod(slot, k)
            expert = int(topk_ids[tok, j])
            assert expert // epr == s
            assert int(plan.pair_local_expert[p]) == expert - s * epr
            assert int(rows[s][int(plan.pair_row[p])]) == tok
            seen.append(slot)
        # stable (token, slot) order inside a destination group
        slots = plan.pair_slot[pairs[s]].tolist()
        assert slots == sorted(slots)
    assert sorted(seen) == list(range(t * k))


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
    plan = plan_dispatch(ids, 16, 2)
    assert plan.row_counts.tolist() == [1, 2]          # token 0 only to rank 1; token 1 to both
    assert plan.pair_counts.tolist() == [2, 6]
    _check(ids, 16, 2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="divisible"):
        experts_per_rank(10, 4)
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        plan_dispatch(torch.tensor([[3, 16]]), 16, 2)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        plan_dispatch(torch.tensor([1, 2]), 16, 2)
