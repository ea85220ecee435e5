"""Which token rows an expert-parallel rank sends to which peer (pure tensor arithmetic).

Experts are split evenly and contiguously: rank s owns global experts
``[s * E/S, (s+1) * E/S)``. A token is sent ONCE to every rank that owns at least one of its
top-k experts (as DeepEP and TensorRT-LLM's all-to-all do), together with one "pair" record
per (token, slot) routed there: the row of that token inside the block sent to the rank, the
expert's local id on the receiver, and the router weight. Rows are grouped by destination
rank in ascending order, tokens ascending inside a group; pairs are grouped by destination,
(token, slot) ascending inside a group, so the plan is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DispatchPlan:
    """What one rank sends; every tensor lives on the device of ``topk_ids``.

    ``row_token [R]`` int64: source token of each sent row (grouped by destination).
    ``row_counts [S]`` int64: rows sent to each rank. ``pair_row [P]`` int64: row of each pair
    inside its destination's block; ``pair_local_expert [P]`` int64: expert id on the receiver;
    ``pair_slot [P]`` int64: flat (token * k + slot) index of the pair in ``topk_ids``;
    ``pair_counts [S]`` int64: pairs sent to each rank.
    """

    row_token: torch.Tensor
    row_counts: torch.Tensor
    pair_row: torch.Tensor
    pair_local_expert: torch.Tensor
    pair_slot: torch.Tensor
    pair_counts: torch.Tensor


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """E/S, after checking the experts split evenly over the ranks."""
    if world_size < 1 or num_experts < 1 or num_experts % world_size:
        raise ValueError(
            f"expert parallelism needs num_experts ({num_experts}) divisible by the number of "
            f"ranks ({world_size})"
        )
    return num_experts // world_size


def plan_dispatch(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> DispatchPlan:
    """Plan the dispatch of ``topk_ids [T, k]`` (int32/int64 global expert ids in [0, E))."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    epr = experts_per_rank(num_experts, world_size)
    ids = topk_ids.long()
    t, k = ids.shape
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(
            f"topk_ids hold expert ids in [{int(ids.min())}, {int(ids.max())}], outside "
            f"[0, {num_experts})"
        )
    dev = ids.device
    dest = ids // epr                                         # [T, k]
    flat_dest = dest.reshape(-1)
    flat_tok = torch.arange(t, device=dev).repeat_interleave(k)
    wants = torch.zeros(t, world_size, dtype=torch.bool, device=dev)
    wants[flat_tok, flat_dest] = True                         # token t goes to rank s
    # Rows grouped by destination: column-major walk over ``wants``.
    row_token = wants.t().nonzero(as_tuple=True)[1]
    row_counts = wants.sum(dim=0)
    # Row of token t inside the block sent to rank s.
    row_in_block = wants.long().cumsum(dim=0) - 1             # [T, S]
    # Pairs grouped by destination, stable in (token, slot) order.
    order = torch.sort(flat_dest, stable=True).indices
    pair_dest = flat_dest[order]
    pair_row = row_in_block[flat_tok[order], pair_dest]
    pair_local = ids.reshape(-1)[order] - pair_dest * epr
    pair_counts = torch.bincount(flat_dest, minlength=world_size)
    return DispatchPlan(
        row_token=row_token,
        row_counts=row_counts,
        pair_row=pair_row,
        pair_local_expert=pair_local,
        pair_slot=order,
        pair_counts=pair_counts,
    )
