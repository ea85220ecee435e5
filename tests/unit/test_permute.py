"""PermutationPlan on the device: equal to a pure-Python oracle on every real row, -1 past them,
a host-side tile bound that always holds, no host read, and bad ids reported without a sync."""
import itertools
import random

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tensorrt_llm_dwdp.moe.permute import RoutingErrors, build_permutation, tile_bound


def oracle(ids: list[list[int]], num_experts: int, tile_m: int) -> dict:
    """The plan by its definition, one slot at a time (the layout the kernels were written
    against before the plan moved to the device)."""
    k = len(ids[0]) if ids else 0
    flat = [e for row in ids for e in row]
    members = [[s for s, e in enumerate(flat) if e == x] for x in range(num_experts)]
    offsets = [0]
    for m in members:
        offsets.append(offsets[-1] + -(-len(m) // tile_m) * tile_m)
    expert_rows = offsets[-1]
    has_empty = any(e == -1 for e in flat)
    rows = expert_rows + (tile_m if has_empty else 0)
    gather, slot, inverse = [-1] * rows, [-1] * rows, [expert_rows] * len(flat)
    for x, m in enumerate(members):
        for r, s in enumerate(m):
            gather[offsets[x] + r], slot[offsets[x] + r] = s // k, s
            inverse[s] = offsets[x] + r
    tiles = [x for x in range(num_experts) for _ in range((offsets[x + 1] - offsets[x]) // tile_m)]
    return {"counts": [len(m) for m in members], "expert_offsets": offsets,
            "gather_index": gather, "slot_index": slot,
            "inverse": [inverse[t * k:(t + 1) * k] for t in range(len(ids))],
            "tile_expert": tiles + ([0] if has_empty else [])}


def check_against_oracle(ids: torch.Tensor, num_experts: int, tile_m: int):
    plan = build_permutation(ids, num_experts, tile_m)
    want = oracle(ids.tolist(), num_experts, tile_m)
    tokens, k = ids.shape
    for name in ("counts", "expert_offsets", "gather_index", "slot_index", "inverse",
                 "tile_expert", "tile_count", "error"):
        assert getattr(plan, name).dtype == (torch.int64 if name == "error" else torch.int32)
    assert plan.counts.tolist() == want["counts"]
    assert plan.expert_offsets.tolist() == want["expert_offsets"]
    assert plan.inverse.tolist() == want["inverse"]
    real_tiles = len(want["tile_expert"])
    real_rows = real_tiles * tile_m
    assert plan.tile_count.tolist() == [real_tiles]
    assert plan.num_tiles == tile_bound(tokens, k, num_experts, tile_m) >= real_tiles
    assert plan.num_rows == plan.num_tiles * tile_m
    assert plan.tile_expert.tolist() == want["tile_expert"] + [-1] * (plan.num_tiles - real_tiles)
    for name in ("gather_index", "slot_index"):
        got = getattr(plan, name)
        assert got.shape == (plan.num_rows,)
        assert got[:real_rows].tolist() == want[name], name
        assert got[real_rows:].eq(-1).all(), name
    assert plan.error.tolist() == [0]
    return plan


def _routing(tokens, k, experts, seed, skew=0.0, empty=0.0):
    """top-k distinct experts per token; ``skew`` > 0 favours low expert ids; ``empty``: the
    share of slots turned into -1."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=gen)
    if skew:
        scores = scores * torch.arange(experts, 0, -1).float() ** skew
    ids = torch.topk(scores, k, dim=-1).indices.int()
    if empty:
        ids[torch.rand(tokens, k, generator=gen) < empty] = -1
    return ids


@pytest.mark.parametrize("tokens,k,experts,tile_m", [
    (1, 1, 1, 128), (1, 8, 256, 128), (37, 4, 16, 8), (300, 6, 32, 128), (64, 2, 128, 1),
    (96, 6, 64, 16), (16, 2, 8, 64)])
@pytest.mark.parametrize("skew,empty", [(0.0, 0.0), (4.0, 0.0), (0.0, 0.3), (6.0, 0.5)])
def test_equals_oracle(tokens, k, experts, tile_m, skew, empty):
    if k > experts:
        pytest.skip("top-k needs k distinct experts")
    check_against_oracle(_routing(tokens, k, experts, tokens + k + experts, skew, empty),
                         experts, tile_m)


def test_hand_built_plan():
    ids = torch.tensor([[2, 0], [0, 3], [2, 0]], dtype=torch.int32)
    plan = build_permutation(ids, num_experts=5, tile_m=2)
    assert plan.counts.tolist() == [3, 0, 2, 1, 0]
    assert plan.expert_offsets.tolist() == [0, 4, 4, 6, 8, 8]
    # bound: (6 + min(5, 6) * 1) // 2 + 1 = 6 tiles; 4 real
    assert plan.num_tiles == 6 and plan.tile_count.tolist() == [4]
    assert plan.gather_index.tolist() == [0, 1, 2, -1, 0, 2, 1, -1] + [-1] * 4
    assert plan.slot_index.tolist() == [1, 2, 5, -1, 0, 4, 3, -1] + [-1] * 4
    assert plan.inverse.tolist() == [[4, 0], [1, 6], [5, 2]]
    assert plan.tile_expert.tolist() == [0, 0, 2, 3, -1, -1]


def test_single_expert_and_zero_token_experts():
    plan = check_against_oracle(torch.full((200, 1), 5, dtype=torch.int32), 8, 128)
    assert plan.tile_expert.tolist()[:2] == [5, 5] and plan.tile_count.tolist() == [2]
    check_against_oracle(torch.zeros(33, 1, dtype=torch.int32), 1, 16)


@pytest.mark.parametrize("count,tiles", [(127, 1), (128, 1), (129, 2)])
def test_tile_boundaries(count, tiles):
    ids = torch.cat([torch.zeros(count, 1), torch.ones(3, 1)]).int()
    plan = check_against_oracle(ids, 2, 128)
    assert plan.tile_count.tolist() == [tiles + 1]


def test_no_tokens():
    plan = build_permutation(torch.zeros(0, 4, dtype=torch.int32), 8)
    assert plan.num_tiles == 0 and plan.gather_index.numel() == 0 and plan.tile_expert.numel() == 0
    assert plan.inverse.shape == (0, 4) and plan.counts.eq(0).all()
    assert plan.tile_count.tolist() == [0] and plan.error.tolist() == [0]


@pytest.mark.parametrize("tile_m", [1, 4, 128])
def test_empty_slots_point_at_a_zero_tile(tile_m):
    ids = torch.tensor([[3, -1, 0], [-1, -1, 3], [0, 3, -1], [-1, 2, -1]], dtype=torch.int32)
    plan = check_against_oracle(ids, 4, tile_m)
    expert_rows = int(plan.expert_offsets[-1])
    assert plan.tile_count.item() * tile_m == expert_rows + tile_m
    assert plan.tile_expert[plan.tile_count.item() - 1].item() == 0


def test_only_empty_slots():
    plan = check_against_oracle(torch.full((2, 2), -1, dtype=torch.int32), 4, 8)
    assert plan.tile_count.tolist() == [1] and (plan.inverse == 0).all()


def test_bound_holds_for_worst_routings():
    """Every expert with one row past a tile boundary is the worst case of the bound; it is
    met exactly when the experts' rows are spread that way."""
    rng = random.Random(3)
    for tile_m, experts, k in itertools.product((1, 2, 16, 128), (1, 3, 8, 64), (1, 2, 6)):
        tokens = rng.randint(1, 40)
        n = tokens * k
        bound = tile_bound(tokens, k, experts, tile_m)
        # worst spread: each used expert gets q tiles + 1 row as far as slots allow
        used = min(experts, n)
        worst = sum(-(-c // tile_m) for c in _spread(n, used, tile_m))
        assert worst + 1 <= bound
        for _ in range(5):
            ids = torch.tensor([[rng.randint(-1, experts - 1) for _ in range(k)]
                                for _ in range(tokens)])
            assert build_permutation(ids, experts, tile_m).tile_count.item() <= bound


def _spread(n: int, experts: int, tile_m: int) -> list[int]:
    counts = [1] * experts
    left = n - experts
    i = 0
    while left > 0:
        add = min(left, tile_m)
        counts[i % experts] += add
        left -= add
        i += 1
    return counts


def test_bound_is_tight():
    # 16 tokens x top-8 over 256 experts, tile 16: 128 distinct experts of one row each
    ids = torch.arange(128, dtype=torch.int32).view(16, 8)
    ids[0, 0] = -1
    plan = build_permutation(ids, 256, 16)
    assert plan.tile_count.item() == 128 == plan.num_tiles - 1


def test_bad_ids_are_flagged_on_the_device_and_read_by_check():
    ids = torch.tensor([[0, 8], [1, 2]])
    plan = build_permutation(ids, 8, 4)  # no raise: reading the flag would sync
    assert plan.error.tolist() == [8]
    with pytest.raises(ValueError, match=r"expert id 8 out of range \[0, 8\)"):
        plan.check()
    # the bad slot is planned as an empty one: nothing points out of bounds
    as_empty = build_permutation(torch.tensor([[0, -1], [1, 2]]), 8, 4)
    for name in ("counts", "expert_offsets", "gather_index", "slot_index", "inverse",
                 "tile_expert", "tile_count"):
        assert torch.equal(getattr(plan, name), getattr(as_empty, name)), name
    with pytest.raises(ValueError, match="expert id -2"):
        build_permutation(torch.tensor([[-2, 2]]), 8, sync_check=True)
    build_permutation(torch.tensor([[-1, 2]]), 8, sync_check=True).check()


def test_routing_errors_fold_many_plans_into_one_read():
    errors = RoutingErrors()
    errors.check()  # nothing added yet
    errors.add(build_permutation(torch.tensor([[0, 1]]), 4))
    errors.add(build_permutation(torch.tensor([[0, 5]]), 4))
    errors.add(build_permutation(torch.tensor([[-3, 1]]), 4))
    with pytest.raises(ValueError, match="expert id 5 out of range"):
        errors.check()
    errors.check()  # cleared by the read
    debug = RoutingErrors(sync_check=True)
    with pytest.raises(ValueError, match="expert id 4"):
        debug.add(build_permutation(torch.tensor([[4]]), 4))


def test_argument_errors():
    with pytest.raises(ValueError, match="integer"):
        build_permutation(torch.tensor([[0.0, 1.0]]), 8)
    with pytest.raises(ValueError, match="top_k"):
        build_permutation(torch.zeros(3, 0, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="tile_m"):
        build_permutation(torch.zeros(3, 1, dtype=torch.int32), 8, tile_m=0)
    with pytest.raises(ValueError, match="num_experts"):
        build_permutation(torch.zeros(3, 1, dtype=torch.int32), 0)


class _HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads (each one a host sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "item", "__int__", "__bool__", "__float__",
                                             "__index__", "nonzero"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ids", [
    torch.randint(0, 16, (37, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(1)),
    torch.tensor([[3, -1], [-1, 9]]), torch.zeros(0, 2, dtype=torch.int32)])
def test_no_host_read(ids):
    with _HostReads() as mode:
        build_permutation(ids, 16, tile_m=8)
    assert mode.reads == []


@pytest.mark.parametrize("tokens,k,experts,tile_m", [(37, 4, 16, 8), (16, 8, 256, 16), (0, 2, 4, 1)])
def test_builds_on_meta_tensors(tokens, k, experts, tile_m):
    """A meta tensor has no values: any read of one (a sync on CUDA) would raise here."""
    ids = torch.empty(tokens, k, dtype=torch.int32, device="meta")
    plan = build_permutation(ids, experts, tile_m)
    bound = tile_bound(tokens, k, experts, tile_m)
    assert plan.tile_expert.shape == (bound,) and plan.gather_index.shape == (bound * tile_m,)
    assert plan.tile_count.shape == (1,) and plan.error.shape == (1,)


@pytest.mark.gpu
def test_cuda_equals_cpu_without_a_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    errors = RoutingErrors()
    cases = [(_routing(500, 8, 64, 9), 64, 128), (_routing(16, 8, 256, 2, empty=0.2), 256, 16),
             (_routing(64, 2, 8, 3, skew=6.0), 8, 1), (torch.tensor([[0, 70]]), 64, 16)]
    for ids, experts, tile_m in cases:
        cpu = build_permutation(ids, experts, tile_m)
        gpu_ids = ids.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu = build_permutation(gpu_ids, experts, tile_m)
            errors.add(gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for name in ("counts", "expert_offsets", "gather_index", "slot_index", "inverse",
                     "tile_expert", "tile_count", "error"):
            assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name
    with pytest.raises(ValueError, match="expert id 70"):
        errors.check()
