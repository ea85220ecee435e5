"""PermutationPlan: invariants on random routings, hand-built plans, tile boundaries, errors."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from tensorrt_llm_dwdp.moe.permute import build_permutation


def _check_invariants(ids: torch.Tensor, num_experts: int, tile_m: int):
    plan = build_permutation(ids, num_experts, tile_m)
    tokens, k = ids.shape
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    assert torch.equal(plan.counts, counts.int())
    padded = (counts + tile_m - 1) // tile_m * tile_m
    assert plan.expert_offsets.tolist() == [0] + torch.cumsum(padded, 0).tolist()
    assert plan.num_rows == plan.expert_offsets[-1].item() == plan.gather_index.numel()
    for t in (plan.counts, plan.expert_offsets, plan.gather_index, plan.slot_index,
              plan.inverse, plan.tile_expert):
        assert t.dtype == torch.int32
    # Each (token, slot) maps to exactly one row, which points back at it.
    rows = plan.inverse.reshape(-1).long()
    assert rows.unique().numel() == tokens * k
    slots = torch.arange(tokens * k)
    assert torch.equal(plan.slot_index[rows].long(), slots)
    assert torch.equal(plan.gather_index[rows].long(), slots // k)
    # Rows of expert e live in its padded range, in (token, slot) order; the rest is -1.
    for e in range(num_experts):
        lo, hi = plan.expert_offsets[e].item(), plan.expert_offsets[e + 1].item()
        n = counts[e].item()
        real = plan.slot_index[lo:lo + n].long()
        assert torch.all(flat[real] == e)
        assert torch.all(real[1:] > real[:-1])
        assert plan.slot_index[lo + n:hi].eq(-1).all() and plan.gather_index[lo + n:hi].eq(-1).all()
        tiles = plan.tile_expert[lo // tile_m:hi // tile_m]
        assert tiles.numel() == (hi - lo) // tile_m and tiles.eq(e).all()
    assert plan.num_tiles == plan.tile_expert.numel() == plan.num_rows // tile_m
    return plan


@pytest.mark.parametrize("tokens,k,experts,tile_m", [(1, 1, 1, 128), (1, 8, 256, 128),
                                                     (37, 4, 16, 8), (300, 6, 32, 128),
                                                     (64, 2, 128, 1)])
def test_random_routings(tokens, k, experts, tile_m):
    gen = torch.Generator().manual_seed(tokens * k + experts)
    scores = torch.rand(tokens, experts, generator=gen)
    ids = torch.topk(scores, k, dim=-1).indices.int()
    _check_invariants(ids, experts, tile_m)


def test_hand_built_plan():
    ids = torch.tensor([[2, 0], [0, 3], [2, 0]], dtype=torch.int32)
    plan = build_permutation(ids, num_experts=5, tile_m=2)
    assert plan.counts.tolist() == [3, 0, 2, 1, 0]
    assert plan.expert_offsets.tolist() == [0, 4, 4, 6, 8, 8]
    assert plan.gather_index.tolist() == [0, 1, 2, -1, 0, 2, 1, -1]
    assert plan.slot_index.tolist() == [1, 2, 5, -1, 0, 4, 3, -1]
    assert plan.inverse.tolist() == [[4, 0], [1, 6], [5, 2]]
    assert plan.tile_expert.tolist() == [0, 0, 2, 3]
    assert plan.num_tiles == 4 and plan.num_rows == 8


def test_all_tokens_to_one_expert_and_zero_token_experts():
    ids = torch.full((200, 1), 5, dtype=torch.int32)
    plan = _check_invariants(ids, 8, 128)
    assert plan.counts.tolist() == [0] * 5 + [200, 0, 0]
    assert plan.tile_expert.tolist() == [5, 5]
    assert plan.expert_offsets.tolist() == [0] * 6 + [256] * 3


@pytest.mark.parametrize("count,tiles", [(127, 1), (128, 1), (129, 2)])
def test_tile_boundaries(count, tiles):
    ids = torch.cat([torch.zeros(count, 1), torch.ones(3, 1)]).int()
    plan = _check_invariants(ids, 2, 128)
    assert plan.tile_expert.tolist() == [0] * tiles + [1]
    assert plan.expert_offsets.tolist() == [0, 128 * tiles, 128 * (tiles + 1)]


def test_no_tokens():
    plan = build_permutation(torch.zeros(0, 4, dtype=torch.int32), 8)
    assert plan.num_tiles == 0 and plan.gather_index.numel() == 0
    assert plan.inverse.shape == (0, 4) and plan.counts.eq(0).all()


def test_errors():
    with pytest.raises(ValueError, match="expert id 8 out of range"):
        build_permutation(torch.tensor([[0, 8]]), 8)
    with pytest.raises(ValueError, match="expert id -2"):
        build_permutation(torch.tensor([[-2, 2]]), 8)
    with pytest.raises(ValueError, match="integer"):
        build_permutation(torch.tensor([[0.0, 1.0]]), 8)
    with pytest.raises(ValueError, match="top_k"):
        build_permutation(torch.zeros(3, 0, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="tile_m"):
        build_permutation(torch.zeros(3, 1, dtype=torch.int32), 8, tile_m=0)


@pytest.mark.parametrize("tile_m", [1, 4, 128])
def test_empty_slots_take_no_row_and_point_at_a_zero_tile(tile_m):
    ids = torch.tensor([[3, -1, 0], [-1, -1, 3], [0, 3, -1], [-1, 2, -1]], dtype=torch.int32)
    plan = build_permutation(ids, 4, tile_m)
    assert plan.counts.tolist() == [2, 0, 1, 3]
    expert_rows = int(plan.expert_offsets[-1])
    assert plan.num_rows == expert_rows + tile_m and plan.num_tiles * tile_m == plan.num_rows
    assert plan.tile_expert[-1].item() == 0
    assert (plan.gather_index[expert_rows:] == -1).all() and (plan.slot_index[expert_rows:] == -1).all()
    for t in range(4):
        for j in range(3):
            row = int(plan.inverse[t, j])
            if ids[t, j] < 0:
                assert row == expert_rows
            else:
                e = int(ids[t, j])
                assert plan.expert_offsets[e] <= row < plan.expert_offsets[e + 1]
                assert (int(plan.gather_index[row]), int(plan.slot_index[row])) == (t, t * 3 + j)


def test_only_empty_slots():
    plan = build_permutation(torch.full((2, 2), -1, dtype=torch.int32), 4, 8)
    assert plan.num_rows == 8 and plan.counts.sum() == 0 and (plan.inverse == 0).all()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(9)
    ids = torch.topk(torch.rand(500, 64, generator=gen), 8, dim=-1).indices.int()
    cpu = build_permutation(ids, 64, 128)
    gpu = build_permutation(ids.cuda(), 64, 128)
    for name in ("counts", "expert_offsets", "gather_index", "slot_index", "inverse",
                 "tile_expert"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(cpu, name)), name


class _HostReads(TorchFunctionMode):
    """Counts tensor -> Python reads (each one a host sync on CUDA)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("tolist", "item", "__int__", "__bool__", "__float__",
                                             "__index__"):
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_plan():
    """The range check and the padded row count share one read (the hot path of every MoE
    layer on the GPU); sizes given to repeat_interleave avoid its hidden sync."""
    ids = torch.randint(0, 16, (37, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    with _HostReads() as mode:
        plan = build_permutation(ids, 16, tile_m=8)
    assert mode.reads == ["tolist"], mode.reads
    assert plan.num_tiles * 8 == plan.num_rows == int(plan.expert_offsets[-1])
