"""Permutation plan: the token -> expert reordering the grouped GEMM kernels consume.

Rows are grouped by expert, each group padded to a multiple of ``tile_m`` so every M tile of
the grouped GEMM belongs to exactly one expert; experts without tokens take no tiles. Inside a
group rows keep (token, slot) order, so the plan and every result built on it are
deterministic. Built with a stable argsort, scatter-adds, cumsums and a searchsorted: no Python
loop over tokens, same code on CPU and CUDA tensors, and no host sync (so a MoE layer can run
ahead of the host and be captured in a CUDA graph).

The host cannot know the real tile count without reading the device, so every buffer is sized
by an upper bound computed from ``(T, k, E, tile_m)`` alone (``tile_bound``). On CUDA, at decode
sizes, one Triton kernel builds the same plan in one launch (``permute_fused``). The real count
is on the device (``tile_count``); tiles past it have expert ``-1`` and rows past the real
ones are ``-1`` in ``gather_index`` / ``slot_index``: a kernel launched over the bound stops at
``tile_count`` (or skips a tile whose expert is ``-1``).

An id of ``-1`` marks an empty slot (an expert-parallel receiver's row whose expert in that
slot lives on another rank): it takes no row and adds nothing. Its ``inverse`` points at the
first row of one extra all-padding tile after the experts' rows (expert 0's, gather and slot
-1, router weight 0), so a finalize that sums ``k`` rows per token reads an exact zero there.

An id outside ``[-1, E)`` is an error. Reading it would cost a host sync, so it is recorded on
the device (``error``) and the id is treated as an empty slot (nothing reads out of bounds);
``check()`` raises it. ``build_permutation(..., sync_check=True)`` checks at once (a debug
mode), ``RoutingErrors`` gathers the flags of many layers for one read at a step's end.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


def tile_bound(tokens: int, top_k: int, num_experts: int, tile_m: int) -> int:
    """Upper bound on a plan's tiles, from host-known sizes only.

    ``n = T k`` slots fill at most ``min(E, n)`` experts; each expert's rows round up to whole
    tiles, which adds at most ``tile_m - 1`` rows per expert, so at most
    ``(n + min(E, n) (tile_m - 1)) // tile_m`` expert tiles, plus one for the empty-slot tile.
    No slots: no tiles."""
    slots = tokens * top_k
    if slots == 0:
        return 0
    return (slots + min(num_experts, slots) * (tile_m - 1)) // tile_m + 1


@dataclass(frozen=True, eq=False)
class PermutationPlan:
    """Metadata of one routing (on the device of ``topk_ids``; int32 unless stated).

    - ``counts [E]``: tokens routed to each expert.
    - ``expert_offsets [E+1]``: first padded row of each expert; expert e owns padded rows
      ``[expert_offsets[e], expert_offsets[e+1])``, its real rows are the first ``counts[e]``.
    - ``gather_index [num_tiles * tile_m]``: source token of each permuted row, -1 on padding
      and past the real rows.
    - ``slot_index [num_tiles * tile_m]``: flat slot ``t * k + j`` of each row, -1 likewise.
    - ``inverse [T, k]``: permuted row of each (token, slot).
    - ``tile_expert [num_tiles]``: expert of each ``tile_m``-row tile, -1 past the real tiles.
    - ``tile_count [1]``: the real tile count (``expert_offsets[E] / tile_m``, + 1 with empty
      slots); the real tiles are the first ``tile_count``.
    - ``error`` int64 ``[1]``: 0 when every id is in ``[-1, E)``, else an offending id (never
      0, which is always valid); ``check()`` reads it.
    - ``num_tiles``: host-side upper bound on ``tile_count`` (``tile_bound``), the size of
      every per-tile and per-row buffer.

    With empty (``-1``) slots, rows ``[expert_offsets[E], expert_offsets[E] + tile_m)`` are one
    extra padding tile (``tile_expert`` 0) that those slots' ``inverse`` entries point at.
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
    tile_count: torch.Tensor
    error: torch.Tensor
    num_tiles: int

    @property
    def num_rows(self) -> int:
        """Permuted rows the buffers hold: ``num_tiles * tile_m`` (the bound, not the count)."""
        return self.num_tiles * self.tile_m

    def check(self) -> None:
        """Raise ValueError if an expert id was out of range (reads the device: a host sync)."""
        raise_routing_error(int(self.error[0]), self.num_experts)


def raise_routing_error(bad_id: int, num_experts: int) -> None:
    """The error of an ``error`` flag's value (0: none)."""
    if bad_id:
        raise ValueError(
            f"expert id {bad_id} out of range [0, {num_experts}) (or -1 for an empty slot): "
            "the router produced an id the MoE layer does not have")


def _check_args(topk_ids: torch.Tensor, num_experts: int, tile_m: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.is_floating_point() or topk_ids.is_complex():
        raise ValueError(
            f"build_permutation: topk_ids must be an integer [T, k] tensor, got "
            f"{topk_ids.dtype} {tuple(topk_ids.shape)}"
        )
    if num_experts < 1:
        raise ValueError(f"build_permutation: num_experts={num_experts} must be >= 1")
    if tile_m < 1:
        raise ValueError(f"build_permutation: tile_m={tile_m} must be >= 1")
    if topk_ids.shape[1] < 1:
        raise ValueError(
            f"build_permutation: top_k (dim 1 of topk_ids) must be >= 1, got {topk_ids.shape[1]}")


def build_permutation(
    topk_ids: torch.Tensor, num_experts: int, tile_m: int = 128, *, sync_check: bool = False,
    fused: bool | None = None,
) -> PermutationPlan:
    """Plan for ``topk_ids [T, k]`` (integer, values in ``[0, num_experts)`` or -1), with no
    host sync. ``sync_check``: read the id-range flag now and raise on a bad id (a sync).
    ``fused``: build it with the one-launch Triton kernel (``permute_fused``: CUDA, int32 ids,
    up to ``MAX_SLOTS`` slots); None picks it whenever it applies and Triton is installed,
    False keeps the torch ops (the same plan, bit for bit, in about forty launches)."""
    _check_args(topk_ids, num_experts, tile_m)
    tokens, top_k = topk_ids.shape
    num_tiles = tile_bound(tokens, top_k, num_experts, tile_m)
    if fused is None:
        fused = _fused_applies(topk_ids, num_experts)
    if fused:
        if not _triton_installed():
            raise ValueError("build_permutation: fused=True needs Triton (pip install triton)")
        from tensorrt_llm_dwdp.moe import permute_fused

        if not permute_fused.supported(topk_ids, num_experts):
            raise ValueError(
                f"build_permutation: the fused kernel takes int32 ids on a CUDA device, 1 to "
                f"{permute_fused.MAX_SLOTS} slots and up to {permute_fused.MAX_EXPERTS} experts; "
                f"got {topk_ids.dtype} {tuple(topk_ids.shape)} on {topk_ids.device}, "
                f"{num_experts} experts")
        tensors = permute_fused.fused_plan_tensors(topk_ids, num_experts, tile_m, num_tiles)
    else:
        tensors = _torch_plan_tensors(topk_ids, num_experts, tile_m, num_tiles)
    plan = PermutationPlan(num_tokens=tokens, top_k=top_k, num_experts=num_experts,
                           tile_m=tile_m, num_tiles=num_tiles, **tensors)
    if sync_check:
        plan.check()
    return plan


_TRITON: list[bool] = []  # whether Triton imports here (looked up once)


def _triton_installed() -> bool:
    if not _TRITON:
        _TRITON.append(importlib.util.find_spec("triton") is not None)
    return _TRITON[0]


def _fused_applies(topk_ids: torch.Tensor, num_experts: int) -> bool:
    if not topk_ids.is_cuda or not _triton_installed():
        return False
    from tensorrt_llm_dwdp.moe import permute_fused

    return permute_fused.supported(topk_ids, num_experts)


def warm_up_plans(num_experts: int, top_k: int, device: torch.device) -> None:
    """Compile now the fused kernel for every size class a step can hit (one per power of two
    of ``T k`` up to its limit), so no served step compiles one; nothing without it."""
    if device.type != "cuda" or not _triton_installed():
        return
    from tensorrt_llm_dwdp.moe.permute_fused import MAX_SLOTS

    n = 16
    while n <= MAX_SLOTS:
        ids = torch.zeros(max(1, n // top_k), top_k, dtype=torch.int32, device=device)
        if _fused_applies(ids, num_experts):
            build_permutation(ids, num_experts, tile_m=16)
        n *= 2


def _torch_plan_tensors(topk_ids: torch.Tensor, num_experts: int, tile_m: int,
                        num_tiles: int) -> dict[str, torch.Tensor]:
    """The plan's tensors from torch ops (any device)."""
    tokens, top_k = topk_ids.shape
    device = topk_ids.device
    bound_rows = num_tiles * tile_m
    e = num_experts
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    error = torch.zeros(1, dtype=torch.long, device=device)
    if n:
        lo, hi = torch.aminmax(flat)
        error[0] = torch.where(lo < -1, lo, torch.where(hi >= e, hi, torch.zeros_like(hi)))
    # Out-of-range ids count as empty slots, so every index below stays in bounds.
    valid = (flat >= 0) & (flat < e)
    key = torch.where(valid, flat, e)  # empty slots sort last
    counts = torch.zeros(e + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:e]
    padded = (counts + tile_m - 1) // tile_m * tile_m
    offsets = torch.zeros(e + 1, dtype=torch.long, device=device)
    offsets[1:] = torch.cumsum(padded, dim=0)
    expert_rows = offsets[e]
    expert_tiles = expert_rows // tile_m
    has_empty = (~valid).any()
    tile_count = expert_tiles + has_empty.long()
    starts = torch.cumsum(counts, dim=0) - counts

    # Slots by expert, then by (token, slot); empty slots land on the zero tile (their gather /
    # slot entries go to a scratch element past the end, dropped below).
    order = torch.argsort(key, stable=True)
    expert_of = key[order]
    real = expert_of < e
    safe = expert_of.clamp(max=e - 1)
    rank = torch.arange(n, device=device) - starts[safe]
    dest = torch.where(real, offsets[safe] + rank, expert_rows)
    scratch = torch.where(real, dest, bound_rows)

    gather_index = torch.full((bound_rows + 1,), -1, dtype=torch.int32, device=device)
    slot_index = torch.full((bound_rows + 1,), -1, dtype=torch.int32, device=device)
    gather_index.scatter_(0, scratch, (order // top_k).to(torch.int32))
    slot_index.scatter_(0, scratch, order.to(torch.int32))
    inverse = torch.empty(n, dtype=torch.int32, device=device)
    inverse.scatter_(0, order, dest.to(torch.int32))

    # Tile j belongs to the first expert whose tiles end after j; the empty-slot tile is
    # expert 0's; tiles past the real ones are -1.
    tile = torch.arange(num_tiles, device=device)
    owner = torch.searchsorted(offsets[1:] // tile_m, tile, right=True)
    past = torch.where(tile < tile_count, 0, -1)
    tile_expert = torch.where(tile < expert_tiles, owner, past).to(torch.int32)
    return {
        "counts": counts.to(torch.int32),
        "expert_offsets": offsets.to(torch.int32),
        "gather_index": gather_index[:bound_rows],
        "slot_index": slot_index[:bound_rows],
        "inverse": inverse.view(tokens, top_k),
        "tile_expert": tile_expert,
        "tile_count": tile_count.to(torch.int32).reshape(1),
        "error": error,
    }


SYNC_CHECKS_ENV = "TRTLLM_DWDP_SYNC_CHECKS"


def sync_checks_requested() -> bool:
    """The debug mode a backend starts in: ``TRTLLM_DWDP_SYNC_CHECKS=1`` checks every layer's
    expert ids at once (a host sync per layer) instead of at the step's end."""
    value = os.environ.get(SYNC_CHECKS_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{SYNC_CHECKS_ENV}={value!r}: use 1 (check every layer at once) or 0")
    return value == "1"


class RoutingErrors:
    """The id-range flags of many plans, folded on the device into one (the first offending id
    wins), read once where the host syncs anyway (a step's end). Folding is an in-place update
    of one buffer, so it is captured and replayed by a CUDA graph like the plan itself.
    ``sync_check``: check every plan as it is added instead (a debug mode; syncs per layer)."""

    def __init__(self, sync_check: bool = False) -> None:
        self.sync_check = sync_check
        self._flag: torch.Tensor | None = None
        self._num_experts = 0

    def add(self, plan: PermutationPlan) -> None:
        if self.sync_check:
            plan.check()
            return
        self._num_experts = plan.num_experts
        # inference mode either way: the flag may be born in a forward that ran in it
        with torch.inference_mode():
            if self._flag is None or self._flag.device != plan.error.device:
                self._flag = torch.zeros(1, dtype=torch.long, device=plan.error.device)
            self._flag.copy_(torch.where(self._flag != 0, self._flag, plan.error))

    def check(self) -> None:
        """Raise ValueError naming a bad id if any plan added since the last check had one (a
        host read); the flag is cleared either way."""
        if self._flag is None:
            return
        bad = int(self._flag[0])
        with torch.inference_mode():
            self._flag.zero_()
        raise_routing_error(bad, self._num_experts)
