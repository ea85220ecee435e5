"""Copy plans: the (dst, src, nbytes) lists one layer's prefetch executes (pure arithmetic).

Per peer, a layer's prefetch is one contiguous copy per tensor name (P experts are one byte
range in the peer's tensor and in the buffer). Two orders:

* ``per_peer_plan``: peer after peer, one copy per (peer, name); the plain cudaMemcpyAsync path.
* ``interleaved_plan`` (``contention_opt``): every copy cut into slices of at most
  ``slice_bytes`` and slices dealt round-robin across peers, so all NVLink links carry traffic
  at once instead of draining one peer at a time. Submitted as one batched copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

Copy = tuple[int, int, int]  # (dst address, src address, nbytes)


@dataclass(frozen=True)
class CopyPlan:
    """Copies of one layer into one buffer; ``dsts[i] <- srcs[i]`` for ``sizes[i]`` bytes."""

    dsts: tuple[int, ...]
    srcs: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def copies(self) -> list[Copy]:
        return list(zip(self.dsts, self.srcs, self.sizes))


def _make(copies: Sequence[Copy]) -> CopyPlan:
    kept = [c for c in copies if c[2] > 0]
    return CopyPlan(tuple(c[0] for c in kept), tuple(c[1] for c in kept), tuple(c[2] for c in kept))


def per_peer_plan(per_peer: Sequence[Sequence[Copy]]) -> CopyPlan:
    """Concatenate each peer's copies in the given peer order (empty copies dropped)."""
    return _make([c for copies in per_peer for c in copies])


def split(copy: Copy, slice_bytes: int) -> list[Copy]:
    """Cut one copy into consecutive pieces of ``slice_bytes`` (the last may be shorter)."""
    if slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes}")
    dst, src, n = copy
    return [(dst + o, src + o, min(slice_bytes, n - o)) for o in range(0, n, slice_bytes)]


def interleaved_plan(per_peer: Sequence[Sequence[Copy]], slice_bytes: int) -> CopyPlan:
    """Slices of every peer's copies dealt round-robin: slice k of peer 0, of peer 1, ...

    Each peer's slices keep their order; a peer that runs out is skipped. Slices never cross
    a copy boundary, so every slice is one contiguous range on both sides.
    """
    streams = [[s for c in copies for s in split(c, slice_bytes)] for copies in per_peer]
    out: list[Copy] = []
    for k in range(max((len(s) for s in streams), default=0)):
        out.extend(s[k] for s in streams if k < len(s))
    return _make(out)


def peer_order(rank: int, size: int) -> list[int]:
    """Peers starting after ``rank`` and wrapping (rank+1, ..., size-1, 0, ..., rank-1).

    Each rank starts on a different peer, so at any moment the group's first slices come from
    different sources rather than all ranks pulling from rank 0.
    """
    return [(rank + k) % size for k in range(1, size)]
