"""Ping-pong prefetch buffers and the prebuilt weight views that read them.

For each of the two buffers and each peer there is one byte storage; a layer's tensors from
that peer sit in it back to back (each start aligned to ``ALIGN`` bytes), so consecutive layers
of any shape reuse the same storage. A weight view of (layer, buffer) is, per tensor name, the
list of S tensors indexed by rank: the rank's own tensor at its index, buffer slices elsewhere.
Views are built once, so handing one out costs nothing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout

NUM_BUFFERS = 2
ALIGN = 256


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PrefetchBuffers:
    """Storage for ``2 * (S-1)`` peer slices of P experts, sized for the largest layer."""

    def __init__(self, layout: ExpertLayout, own: Sequence[Mapping[str, torch.Tensor]],
                 device: torch.device) -> None:
        self.layout = layout
        p = layout.num_prefetch_experts
        peers = layout.peers
        # offsets[pos][name] = byte offset of that tensor inside every peer storage
        self._offsets: list[dict[str, int]] = []
        self._nbytes: list[dict[str, int]] = []
        largest = 0
        for tensors in own:
            offsets, sizes, cursor = {}, {}, 0
            for name, t in tensors.items():
                per_expert = t[0].numel() * t.element_size() if t.shape[0] else 0
                offsets[name], sizes[name] = cursor, p * per_expert
                cursor += _align(p * per_expert)
            self._offsets.append(offsets)
            self._nbytes.append(sizes)
            largest = max(largest, cursor)
        self.storage_bytes = largest
        self._storage = [
            {peer: torch.empty(largest, dtype=torch.uint8, device=device) for peer in peers}
            for _ in range(NUM_BUFFERS)
        ]
        self._views: list[list[dict[str, list[torch.Tensor]]]] = []
        for pos, tensors in enumerate(own):
            per_buffer = []
            for b in range(NUM_BUFFERS):
                view = {}
                for name, t in tensors.items():
                    tensors_by_rank = []
                    for rank in range(layout.dwdp_size):
                        if rank == layout.rank:
                            tensors_by_rank.append(t)
                        else:
                            off, n = self._offsets[pos][name], self._nbytes[pos][name]
                            raw = self._storage[b][rank][off:off + n]
                            shape = (p,) + tuple(t.shape[1:])
                            tensors_by_rank.append(raw.view(t.dtype).view(shape))
                    view[name] = tensors_by_rank
                per_buffer.append(view)
            self._views.append(per_buffer)

    @property
    def total_bytes(self) -> int:
        """Bytes held by all buffers together."""
        return NUM_BUFFERS * len(self.layout.peers) * self.storage_bytes

    def view(self, pos: int, buffer: int) -> dict[str, list[torch.Tensor]]:
        """The prebuilt weight view of the layer at registration position ``pos`` (read-only)."""
        return self._views[pos][buffer]

    def dst(self, pos: int, buffer: int, peer: int, name: str) -> tuple[int, int]:
        """``(address, nbytes)`` where ``peer``'s slice of tensor ``name`` lands."""
        base = self._storage[buffer][peer].data_ptr()
        return base + self._offsets[pos][name], self._nbytes[pos][name]

    def fill_(self, byte: int) -> None:
        """Fill every buffer with ``byte`` (a sentinel that makes missed copies visible)."""
        for per_peer in self._storage:
            for storage in per_peer.values():
                storage.fill_(byte)
