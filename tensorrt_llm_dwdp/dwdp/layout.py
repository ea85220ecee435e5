"""ExpertLayout: which experts a DWDP rank owns and which it fetches from whom (pure arithmetic).

E experts, S ranks, W experts owned per rank, P fetched from each peer, ``W + (S-1)*P == E``.
Rank r owns ``[P*r, P*r + W)``. Its weight view is a list of S tensors indexed by rank p:
tensor r is its own slice (W experts); tensor p < r is the HEAD of p's slice
``[P*p, P*p + P)``; tensor p > r is the TAIL of p's slice ``[P*p + W - P, P*p + W)``.
Concatenated in rank order the view is exactly experts ``[0, E)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig


@dataclass(frozen=True)
class ExpertLayout:
    """The layout of one rank. Build with ``ExpertLayout(E, S, W, P, rank)`` or ``from_config``.

    Derived fields (all tuples, indexed by view tensor t = peer rank):
      tensor_sizes[t]    experts in view tensor t (W for t == rank, P otherwise)
      tensor_offsets[t]  global id of view tensor t's first expert
      source_starts[t]   index, inside peer t's own W-expert tensor, of the first expert copied
      expert_tensor[e], expert_local[e]   global expert e -> (view tensor, index inside it)
    """

    num_experts: int
    dwdp_size: int
    num_experts_per_worker: int
    num_prefetch_experts: int
    rank: int
    tensor_sizes: tuple[int, ...] = field(init=False)
    tensor_offsets: tuple[int, ...] = field(init=False)
    source_starts: tuple[int, ...] = field(init=False)
    expert_tensor: tuple[int, ...] = field(init=False, repr=False)
    expert_local: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        e, s, w, p, r = (
            self.num_experts, self.dwdp_size, self.num_experts_per_worker,
            self.num_prefetch_experts, self.rank,
        )
        for name, value, low in (("num_experts", e, 1), ("dwdp_size", s, 1),
                                 ("num_experts_per_worker", w, 1),
                                 ("num_prefetch_experts", p, 0 if s == 1 else 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ExpertLayout: {name} must be an integer >= {low}, got {value!r}")
        if s > 1 and p > w:
            raise ValueError(
                f"ExpertLayout: num_prefetch_experts ({p}) exceeds num_experts_per_worker ({w})"
            )
        if w + (s - 1) * p != e:
            raise ValueError(
                f"ExpertLayout: W + (S-1)*P = {w} + {s - 1}*{p} = {w + (s - 1) * p} != E = {e}"
            )
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < s:
            raise ValueError(f"ExpertLayout: rank {r!r} outside [0, {s})")
        sizes = tuple(w if t == r else p for t in range(s))
        starts = tuple(0 if t == r else (0 if t < r else w - p) for t in range(s))
        offsets = tuple(p * t + starts[t] for t in range(s))
        tensor_of: list[int] = []
        local_of: list[int] = []
        for t in range(s):
            tensor_of.extend([t] * sizes[t])
            local_of.extend(range(sizes[t]))
        object.__setattr__(self, "tensor_sizes", sizes)
        object.__setattr__(self, "tensor_offsets", offsets)
        object.__setattr__(self, "source_starts", starts)
        object.__setattr__(self, "expert_tensor", tuple(tensor_of))
        object.__setattr__(self, "expert_local", tuple(local_of))

    @classmethod
    def from_config(cls, config: "DwdpConfig", num_experts: int, rank: int) -> "ExpertLayout":
        """The layout of group rank ``rank`` for a model of ``num_experts`` experts."""
        return cls(
            num_experts=num_experts,
            dwdp_size=config.dwdp_size,
            num_experts_per_worker=config.experts_per_worker(num_experts),
            num_prefetch_experts=config.prefetch_experts() if config.dwdp_size > 1 else 0,
            rank=rank,
        )

    # ---------------------------------------------------------------------------- ranges
    def owned_range(self, peer: int | None = None) -> tuple[int, int]:
        """``[start, stop)`` of the experts owned by ``peer`` (default: this rank)."""
        p = self.rank if peer is None else self._check_peer(peer)
        start = self.num_prefetch_experts * p
        return start, start + self.num_experts_per_worker

    @property
    def owned(self) -> range:
        return range(*self.owned_range())

    @property
    def peers(self) -> tuple[int, ...]:
        """The other ranks of the group, ascending."""
        return tuple(t for t in range(self.dwdp_size) if t != self.rank)

    def fetch_range(self, peer: int) -> tuple[int, int]:
        """Global ``[start, stop)`` of the experts this rank copies from ``peer``."""
        t = self._check_peer(peer)
        if t == self.rank:
            raise ValueError(f"rank {self.rank} fetches nothing from itself")
        return self.tensor_offsets[t], self.tensor_offsets[t] + self.num_prefetch_experts

    def source_slice(self, peer: int) -> tuple[int, int]:
        """``[start, stop)`` inside ``peer``'s own W-expert tensor that this rank copies."""
        t = self._check_peer(peer)
        if t == self.rank:
            raise ValueError(f"rank {self.rank} fetches nothing from itself")
        return self.source_starts[t], self.source_starts[t] + self.num_prefetch_experts

    def locate(self, expert: int) -> tuple[int, int]:
        """Global expert id -> ``(view tensor index, index inside that tensor)``."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} outside [0, {self.num_experts})")
        return self.expert_tensor[expert], self.expert_local[expert]

    # ---------------------------------------------------------------------------- memory
    @property
    def resident_experts(self) -> int:
        """Experts held per MoE layer that are this rank's own (W)."""
        return self.num_experts_per_worker

    @property
    def buffered_experts(self) -> int:
        """Experts in the two ping-pong prefetch buffers together: ``2 * (S-1) * P``."""
        return 2 * (self.dwdp_size - 1) * self.num_prefetch_experts

    def expert_memory(self, num_layers: int) -> int:
        """Expert slots held by this rank for ``num_layers`` MoE layers: ``L*W + 2*(S-1)*P``."""
        return num_layers * self.num_experts_per_worker + self.buffered_experts

    # ---------------------------------------------------------------------------- kernels
    def map_tensors(
        self, device: "torch.device | str" = "cpu"
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(expert_tensor, expert_local)`` as int32 tensors of length E on ``device``."""
        import torch

        return (
            torch.tensor(self.expert_tensor, dtype=torch.int32, device=device),
            torch.tensor(self.expert_local, dtype=torch.int32, device=device),
        )

    def _check_peer(self, peer: int) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.dwdp_size:
            raise ValueError(f"peer rank {peer!r} outside [0, {self.dwdp_size})")
        return peer
