"""Ping-pong prefetch buffers and the prebuilt weight views that read them.

For each of the two buffers and each peer there is one byte storage; a layer's tensors from
that peer sit in it back to back (each start aligned to ``ALIGN`` bytes), so consecutive layers
of any shape reuse the same storage. A weight view of (layer, buffer) is, per tensor name, the
list of S tensors indexed by rank: the rank's own tensor at its index, buffer slices elsewhere.
With ``host_experts`` H > 0 (offload, ``tiers.py``) the own slice is two tensors, its resident
experts then its H host experts (one more storage per buffer, ``OWN_HOST``, or the tensors of
``host_tensors`` read in place), so the list has S + 1 tensors. Views are built once, so handing
one out costs nothing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.tiers import OWN_HOST

NUM_BUFFERS = 2
ALIGN = 256


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class PrefetchBuffers:
    """Storage for ``2 * (S-1)`` peer slices of P experts (plus two of the H own host experts),
    sized for the largest layer."""

    def __init__(self, layout: ExpertLayout, own: Sequence[Mapping[str, torch.Tensor]],
                 device: torch.device, host_experts: int = 0,
                 host_tensors: Sequence[Mapping[str, torch.Tensor]] | None = None) -> None:
        self.layout = layout
        counts = {peer: layout.num_prefetch_experts for peer in layout.peers}
        if host_experts and host_tensors is None:
            counts[OWN_HOST] = host_experts
        # offsets[slot][pos][name] = byte offset of that tensor inside the slot's storage
        self._offsets: dict[int, list[dict[str, int]]] = {slot: [] for slot in counts}
        self._nbytes: dict[int, list[dict[str, int]]] = {slot: [] for slot in counts}
        largest = dict.fromkeys(counts, 0)
        for tensors in own:
            for slot, n in counts.items():
                offsets, sizes, cursor = {}, {}, 0
                for name, t in tensors.items():
                    per_expert = t[0].numel() * t.element_size() if t.shape[0] else 0
                    offsets[name], sizes[name] = cursor, n * per_expert
                    cursor += _align(n * per_expert)
                self._offsets[slot].append(offsets)
                self._nbytes[slot].append(sizes)
                largest[slot] = max(largest[slot], cursor)
        self._largest = largest
        #: bytes of one peer slot's storage (each peer has one per buffer)
        self.storage_bytes = max((v for k, v in largest.items() if k != OWN_HOST), default=0)
        self._storage = [
            {slot: torch.empty(largest[slot], dtype=torch.uint8, device=device) for slot in counts}
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
                        if rank != layout.rank:
                            tensors_by_rank.append(self._slice(b, rank, pos, name, t, counts))
                            continue
                        tensors_by_rank.append(t)
                        if host_tensors is not None:
                            tensors_by_rank.append(host_tensors[pos][name])
                        elif host_experts:
                            tensors_by_rank.append(self._slice(b, OWN_HOST, pos, name, t, counts))
                    view[name] = tensors_by_rank
                per_buffer.append(view)
            self._views.append(per_buffer)

    def _slice(self, b: int, slot: int, pos: int, name: str, t: torch.Tensor,
               counts: Mapping[int, int]) -> torch.Tensor:
        off, n = self._offsets[slot][pos][name], self._nbytes[slot][pos][name]
        raw = self._storage[b][slot][off:off + n]
        return raw.view(t.dtype).view((counts[slot],) + tuple(t.shape[1:]))

    @property
    def total_bytes(self) -> int:
        """Bytes held by all buffers together."""
        return NUM_BUFFERS * sum(self._largest.values())

    def view(self, pos: int, buffer: int) -> dict[str, list[torch.Tensor]]:
        """The prebuilt weight view of the layer at registration position ``pos`` (read-only)."""
        return self._views[pos][buffer]

    def dst(self, pos: int, buffer: int, slot: int, name: str) -> tuple[int, int]:
        """``(address, nbytes)`` where slot ``slot`` (a peer, or ``OWN_HOST``) of tensor
        ``name`` lands."""
        base = self._storage[buffer][slot].data_ptr()
        return base + self._offsets[slot][pos][name], self._nbytes[slot][pos][name]

    def fill_(self, byte: int) -> None:
        """Fill every buffer with ``byte`` (a sentinel that makes missed copies visible)."""
        for per_peer in self._storage:
            for storage in per_peer.values():
                storage.fill_(byte)
