"""Which token rows an expert-parallel rank sends to which peer (tensor arithmetic, no comm).

Experts are split evenly and contiguously: rank s owns global experts ``[s * E/S, (s+1) * E/S)``.
A token is sent ONCE to every rank that owns at least one of its top-k experts (as DeepEP and
TensorRT-LLM's all-to-all do), with its k expert ids made local to the receiver (``-1`` in a
slot whose expert lives elsewhere) and its k router weights. The receiver runs its experts on
the received rows directly: a ``[R, k]`` routing with masked slots, so the grouped GEMM gathers
each received row once per local (row, expert) pair and the finalize applies the weights; no
row is duplicated per pair and no host round trip is needed beyond the row counts.

Rows are grouped by destination rank in ascending order, tokens ascending inside a group, so
the plan is deterministic. One host sync: the row counts and the id range, read together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MASKED = -1  # a slot whose expert is on another rank


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """What one rank sends; tensors on the device of ``topk_ids``, counts on the host.

    ``row_token [R]`` int64: source token of each sent row (grouped by destination).
    ``row_ids [R, k]`` int32: the row's expert ids local to its destination, ``MASKED`` where
    the slot's expert is on another rank. ``row_weights [R, k]`` fp32: the router weights
    (0 where masked). ``counts``: rows sent to each rank (host ints).
    """

    row_token: torch.Tensor
    row_ids: torch.Tensor
    row_weights: torch.Tensor
    counts: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.counts)


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """E/S, after checking the experts split evenly over the ranks."""
    if world_size < 1 or num_experts < 1 or num_experts % world_size:
        raise ValueError(
            f"expert parallelism needs num_experts ({num_experts}) divisible by the number of "
            f"ranks ({world_size})"
        )
    return num_experts // world_size


def plan_dispatch(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                  world_size: int) -> DispatchPlan:
    """Plan the dispatch of ``topk_ids [T, k]`` (integer global ids in ``[0, E)``) with their
    ``topk_weights [T, k]``."""
    if topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids and topk_weights must both be [T, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    epr = experts_per_rank(num_experts, world_size)
    ids = topk_ids.long()
    t, k = ids.shape
    dev = ids.device
    dest = (ids.clamp(0, num_experts - 1) // epr)                       # [T, k]
    wants = torch.zeros(t, world_size, dtype=torch.bool, device=dev)
    wants.scatter_(1, dest, True)                                       # token t goes to rank s
    counts = wants.sum(dim=0)
    if t:
        lo, hi = torch.aminmax(ids.reshape(-1))
        host = torch.cat([counts, torch.stack([lo, hi])]).tolist()      # the one host sync
        counts_h, (lo, hi) = host[:world_size], host[world_size:]
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids hold expert ids in [{lo}, {hi}], outside [0, {num_experts})")
    else:
        counts_h = [0] * world_size
    rows = sum(counts_h)
    # Rows grouped by destination: the first ``rows`` entries of a stable sort of the
    # destination-major (s, t) grid that puts wanted entries first.
    order = torch.argsort((~wants.t()).reshape(-1).to(torch.uint8), stable=True)[:rows]
    row_dest, row_token = order // max(t, 1), order % max(t, 1)
    local = ids[row_token] - (row_dest * epr)[:, None]                  # [R, k]
    here = dest[row_token] == row_dest[:, None]
    row_ids = torch.where(here, local, torch.full_like(local, MASKED)).to(torch.int32)
    row_weights = torch.where(here, topk_weights[row_token].float(),
                              torch.zeros((), device=dev, dtype=torch.float32))
    return DispatchPlan(row_token=row_token, row_ids=row_ids, row_weights=row_weights,
                        counts=tuple(int(c) for c in counts_h))
