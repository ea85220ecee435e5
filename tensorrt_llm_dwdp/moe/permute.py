"""Permutation plan: the token -> expert reordering the grouped GEMM kernels consume.

Rows are grouped by expert, each group padded to a multiple of ``tile_m`` so every M tile of
the grouped GEMM belongs to exactly one expert; experts without tokens take no tiles. Inside a
group rows keep (token, slot) order, so the plan and every result built on it are
deterministic. Built with a stable argsort, bincount and cumsum: no Python loop over tokens,
same code on CPU and CUDA tensors (one host sync: the id range and the padded row count).

An id of ``-1`` marks an empty slot (an expert-parallel receiver's row whose expert in that
slot lives on another rank): it takes no row and adds nothing. Its ``inverse`` points at the
first row of one extra all-padding tile after the experts' rows (expert 0's, gather and slot
-1, router weight 0), so a finalize that sums ``k`` rows per token reads an exact zero there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PermutationPlan:
    """Metadata of one routing (all int32, on the device of ``topk_ids``).

    - ``counts [E]``: tokens routed to each expert.
    - ``expert_offsets [E+1]``: first padded row of each expert; expert e owns padded rows
      ``[expert_offsets[e], expert_offsets[e+1])``, its real rows are the first ``counts[e]``.
    - ``gather_index [M_pad]``: source token of each permuted row, -1 on padding.
    - ``slot_index [M_pad]``: flat slot ``t * k + j`` of each row, -1 on padding.
    - ``inverse [T, k]``: permuted row of each (token, slot).
    - ``tile_expert [num_tiles]``: expert of each ``tile_m``-row tile.

    With empty (``-1``) slots, rows ``[expert_offsets[E], num_rows)`` are one extra padding
    tile (``tile_expert`` 0) that those slots' ``inverse`` entries point at.
    """

    num_tokens: int
    top_k: int
    num_experts: int
    tile_m: int
    counts: torch.Tensor
    expert_offsets: torch.Tensor
    gather_index: torch.Tensor
    slot_index: torch.Tensor
    inverse: torch.Tensor
    tile_expert: torch.Tensor
    num_tiles: int

    @property
    def num_rows(self) -> int:
        """Padded permuted row count ``M_pad = num_tiles * tile_m``."""
        return self.num_tiles * self.tile_m


def build_permutation(
    topk_ids: torch.Tensor, num_experts: int, tile_m: int = 128
) -> PermutationPlan:
    """Plan for ``topk_ids [T, k]`` (integer, values in ``[0, num_experts)``)."""
    if topk_ids.dim() != 2 or topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(
            f"build_permutation: topk_ids must be an integer [T, k] tensor, got "
            f"{topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"build_permutation: num_experts={num_experts} must be >= 1")
    if tile_m < 1:
        raise ValueError(f"build_permutation: tile_m={tile_m} must be >= 1")
    tokens, top_k = topk_ids.shape
    if top_k < 1:
        raise ValueError(f"build_permutation: top_k (dim 1 of topk_ids) must be >= 1, got {top_k}")
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    valid = flat >= 0
    # Counted on clamped ids so nothing indexes out of bounds before the range check, which
    # shares the plan's single host sync with the padded row count (bincount and an unsized
    # repeat_interleave would each sync again on CUDA). Empty (-1) slots count nowhere.
    clamped = flat.clamp(0, num_experts - 1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.scatter_add_(0, clamped, valid.long())
    padded = (counts + tile_m - 1) // tile_m * tile_m
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, dim=0)
    expert_rows = 0
    has_empty = False
    if flat.numel():
        lo, hi = torch.aminmax(flat)
        lo, hi, expert_rows = torch.stack((lo, hi, offsets[-1])).tolist()  # the one host sync
        if lo < -1 or hi >= num_experts:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"build_permutation: expert id {bad} out of range [0, {num_experts}) (or -1 for "
                f"an empty slot)"
            )
        has_empty = lo == -1
    num_rows = expert_rows + (tile_m if has_empty else 0)
    starts = torch.zeros(num_experts, dtype=torch.long, device=device)
    starts[1:] = torch.cumsum(counts, dim=0)[:-1]

    # Slots by expert, then by (token, slot); empty slots sort last and land on the zero tile
    # (their gather / slot entries go to a scratch element past the end, dropped below).
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.argsort(key, stable=True)
    expert_of = key[order]
    real = expert_of < num_experts
    safe = expert_of.clamp(max=num_experts - 1)
    rank = torch.arange(order.numel(), device=device) - starts[safe]
    dest = torch.where(real, offsets[safe] + rank, torch.full_like(rank, expert_rows))
    scratch = torch.where(real, dest, torch.full_like(dest, num_rows))

    gather_index = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
    slot_index = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
    gather_index[scratch] = (order // top_k).to(torch.int32)
    slot_index[scratch] = order.to(torch.int32)
    gather_index, slot_index = gather_index[:num_rows], slot_index[:num_rows]
    inverse = torch.empty(tokens * top_k, dtype=torch.int32, device=device)
    inverse[order] = dest.to(torch.int32)

    tiles_per_expert = padded // tile_m
    tile_expert = torch.repeat_interleave(
        torch.arange(num_experts, device=device), tiles_per_expert,
        output_size=expert_rows // tile_m
    ).to(torch.int32)
    if has_empty:
        tile_expert = torch.cat([tile_expert, tile_expert.new_zeros(1)])
    return PermutationPlan(
        num_tokens=tokens,
        top_k=top_k,
        num_experts=num_experts,
        tile_m=tile_m,
        counts=counts.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
        gather_index=gather_index,
        slot_index=slot_index,
        inverse=inverse.view(tokens, top_k),
        tile_expert=tile_expert,
        num_tiles=num_rows // tile_m,
    )
