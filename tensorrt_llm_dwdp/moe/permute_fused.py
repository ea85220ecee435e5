"""The permutation plan in one Triton kernel launch (CUDA, up to ``MAX_SLOTS`` slots).

``build_permutation``'s torch-op path costs about forty small launches: at decode sizes (a few
hundred slots) their launch overhead, and inside a CUDA graph their per-kernel gaps, cost more
than the work. This kernel makes the same plan, field for field and bit for bit, in one
program (one CTA): it loads the ids, checks their range, builds the per-expert histogram, the
padded offsets and the starts of each key in sorted order, sorts (key, slot) pairs (unique
values, so the order is the torch path's stable one), writes -1 over every row of the bound,
then scatters each slot's row and the tile experts. Steps that read what another thread wrote
are separated by CTA barriers (the writes are to global memory, the readers in the same CTA).

The ids must be int32 on a CUDA device (what the routers produce); ``build_permutation`` takes
the torch path otherwise, and on the CPU. Run with ``TRITON_INTERPRET=1`` the kernel also runs
on CPU tensors (how the tests check it where no GPU is).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_SLOTS = 4096   # T * k of one program's sort (decode and small prefill steps)
MAX_EXPERTS = 1022  # histogram bins: experts, the empty-slot bin and the padding bin
ROW_CHUNK = 1024
TILE_CHUNK = 32


# sizes are not specialized on (Triton would compile a variant per divisibility of T k, top-k,
# the tile and the bound): one compile per (BLOCK_N, BLOCK_E, warps) serves every step
@triton.jit(do_not_specialize=["n", "num_experts", "top_k", "tile_m", "num_tiles"])
def _plan_kernel(ids_ptr, counts_ptr, offsets_ptr, gather_ptr, slot_ptr, inverse_ptr,
                 tile_expert_ptr, tile_count_ptr, error_ptr, scratch_ptr,
                 n, num_experts, top_k, tile_m, num_tiles,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr,
                 TILES: tl.constexpr):
    e = num_experts
    offs = tl.arange(0, BLOCK_N)
    live = offs < n
    ids = tl.load(ids_ptr + offs, mask=live, other=-1)
    lo = tl.min(ids, axis=0)
    hi = tl.max(ids, axis=0)
    err = tl.where(lo < -1, lo, tl.where(hi >= e, hi, 0))
    tl.store(error_ptr, err.to(tl.int64))
    # keys: the expert, e for an empty (or out-of-range) slot, e + 1 for lanes past n
    valid = (ids >= 0) & (ids < e)
    key = tl.where(live, tl.where(valid, ids, e), e + 1)

    bins = tl.arange(0, BLOCK_E)
    hist = tl.histogram(key, BLOCK_E)
    counts = tl.where(bins < e, hist, 0)
    padded = (counts + tile_m - 1) // tile_m * tile_m
    ends = tl.cumsum(padded, axis=0)            # inclusive: expert x's padded rows end here
    offsets = ends - padded                     # offsets[e] = expert rows (padded[e] = 0)
    starts = tl.cumsum(hist, axis=0) - hist     # first sorted position of each key
    expert_rows = tl.sum(padded, axis=0)
    has_empty = tl.sum(tl.where(bins == e, hist, 0), axis=0) > 0
    expert_tiles = expert_rows // tile_m
    tile_count = expert_tiles + has_empty.to(tl.int32)
    tl.store(counts_ptr + bins, counts, mask=bins < e)
    tl.store(offsets_ptr + bins, offsets, mask=bins <= e)
    tl.store(tile_count_ptr, tile_count)
    # row of sorted position j with key x < e: offsets[x] + (j - starts[x])
    tl.store(scratch_ptr + bins, offsets - starts)

    # every row of the bound starts as -1 (padding and past the real rows)
    bound_rows = num_tiles * tile_m
    for r0 in range(0, bound_rows, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        tl.store(gather_ptr + rows, tl.full((ROWS,), -1, tl.int32), mask=rows < bound_rows)
        tl.store(slot_ptr + rows, tl.full((ROWS,), -1, tl.int32), mask=rows < bound_rows)
    tl.debug_barrier()

    packed = tl.sort(key * BLOCK_N + offs)      # unique values: (key, slot) order
    skey = packed // BLOCK_N
    slot = packed % BLOCK_N
    real = skey < e
    base = tl.load(scratch_ptr + skey, mask=real, other=0)
    dest = tl.where(real, base + offs, expert_rows)
    tl.store(gather_ptr + dest, slot // top_k, mask=real)
    tl.store(slot_ptr + dest, slot, mask=real)
    tl.store(inverse_ptr + slot, dest, mask=skey <= e)

    # tile t is the first expert's whose tiles end after t; the empty-slot tile is expert 0's
    tile_end = tl.where(bins < e, ends // tile_m, 2147483647)
    for t0 in range(0, num_tiles, TILES):
        t = t0 + tl.arange(0, TILES)
        owner = tl.sum((tile_end[None, :] <= t[:, None]).to(tl.int32), axis=1)
        te = tl.where(t < expert_tiles, owner, tl.where(t < tile_count, 0, -1))
        tl.store(tile_expert_ptr + t, te, mask=t < num_tiles)


def supported(topk_ids: torch.Tensor, num_experts: int) -> bool:
    """Whether the kernel plans ``topk_ids`` (int32 on a CUDA device, sizes within its
    limits, at least one slot)."""
    return (topk_ids.is_cuda and topk_ids.dtype == torch.int32
            and 0 < topk_ids.numel() <= MAX_SLOTS and num_experts <= MAX_EXPERTS)


def fused_plan_tensors(topk_ids: torch.Tensor, num_experts: int, tile_m: int,
                       num_tiles: int) -> dict[str, torch.Tensor]:
    """The plan's tensors (``PermutationPlan`` fields) from one launch; ``num_tiles`` the bound.
    ``topk_ids``: int32 ``[T, k]`` with ``T k <= MAX_SLOTS``."""
    tokens, top_k = topk_ids.shape
    n = tokens * top_k
    device = topk_ids.device
    block_n = max(16, triton.next_power_of_2(n))
    block_e = max(16, triton.next_power_of_2(num_experts + 2))
    i32 = dict(dtype=torch.int32, device=device)
    out = {
        "counts": torch.empty(num_experts, **i32),
        "expert_offsets": torch.empty(num_experts + 1, **i32),
        "gather_index": torch.empty(num_tiles * tile_m, **i32),
        "slot_index": torch.empty(num_tiles * tile_m, **i32),
        "inverse": torch.empty(tokens, top_k, **i32),
        "tile_expert": torch.empty(num_tiles, **i32),
        "tile_count": torch.empty(1, **i32),
        "error": torch.empty(1, dtype=torch.long, device=device),
    }
    scratch = torch.empty(block_e, **i32)
    _plan_kernel[(1,)](
        topk_ids.contiguous(), out["counts"], out["expert_offsets"], out["gather_index"],
        out["slot_index"], out["inverse"], out["tile_expert"], out["tile_count"], out["error"],
        scratch, n, num_experts, top_k, tile_m, num_tiles,
        BLOCK_N=block_n, BLOCK_E=block_e, ROWS=ROW_CHUNK, TILES=TILE_CHUNK,
        num_warps=8 if block_n >= 1024 else 4)
    return out
