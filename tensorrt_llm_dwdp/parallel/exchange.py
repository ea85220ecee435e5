"""Row all-to-all for expert parallelism: rows grouped by destination go to their ranks.

``RowExchange.all_to_all(tensors, send_counts, recv_counts=None)`` sends, for every tensor of
a message (token rows, their local expert ids, their router weights), rows
``[sum(send_counts[:s]), sum(send_counts[:s+1]))`` to rank s, and returns what every rank sent
this one, source-major, with the rows received from each rank. ``recv_counts`` known in
advance (the combine, which returns exactly what the dispatch brought) skips the counts step.
Every rank of the group calls it the same number of times, in the same order, even with no rows.

Two implementations:
- ``DistExchange``: ``torch.distributed.all_to_all_single`` (NCCL between distinct GPUs, gloo
  on the CPU). The counts go through one small all-to-all and a host read, because NCCL's
  all-to-all takes its split sizes on the host.
- ``SharedExchange`` (``parallel/shared_exchange.py``): buffers the peers map (CUDA IPC, or
  POSIX shared memory on CPU ranks), for ranks sharing one GPU, where NCCL refuses to run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist

Span = Callable[[str], AbstractContextManager]


def no_span(name: str) -> AbstractContextManager:
    return nullcontext()


def row_bytes(t: torch.Tensor) -> int:
    """Bytes of one row (dim 0 dropped) of ``t``."""
    n = t.element_size()
    for d in t.shape[1:]:
        n *= d
    return n


def as_row_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t [R, ...]`` as a contiguous ``uint8 [R, row_bytes]`` (bit-exact, any dtype)."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], row_bytes(t))


def from_row_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``as_row_bytes`` for rows shaped and typed like ``like``'s."""
    return raw.view(like.dtype).reshape(raw.shape[0], *like.shape[1:])


class RowExchange(ABC):
    """The all-to-all of one expert-parallel group (see the module docstring)."""

    rank: int
    size: int
    kind: str = ""

    @abstractmethod
    def all_to_all(self, tensors: Sequence[torch.Tensor], send_counts: Sequence[int],
                   recv_counts: Sequence[int] | None = None, *, name: str = "ep_dispatch",
                   span: Span = no_span) -> tuple[list[torch.Tensor], list[int]]:
        """``(received tensors, rows received from each rank)``; the counts step runs in
        ``span("ep_counts")``, the data in ``span(name)``."""

    def check(self, tensors: Sequence[torch.Tensor], send_counts: Sequence[int]) -> None:
        if len(send_counts) != self.size:
            raise ValueError(f"{len(send_counts)} send counts for a group of {self.size} ranks")
        rows = sum(send_counts)
        for t in tensors:
            if t.shape[0] != rows:
                raise ValueError(f"a tensor of {t.shape[0]} rows, counts say {rows}")

    @property
    def buffer_bytes(self) -> int:
        """Device (or shared) memory the exchange holds between calls."""
        return 0

    def close(self) -> None:
        """Release what the exchange holds (idempotent)."""


class DistExchange(RowExchange):
    """All-to-all through a ``torch.distributed`` process group (NCCL or gloo)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device) -> None:
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.kind = "nccl" if self.device.type == "cuda" else "gloo"

    def all_to_all(self, tensors, send_counts, recv_counts=None, *, name="ep_dispatch",
                   span=no_span):
        self.check(tensors, send_counts)
        send_counts = [int(c) for c in send_counts]
        if recv_counts is None:
            with span("ep_counts"):
                send = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
                recv = torch.empty_like(send)
                dist.all_to_all_single(recv, send, group=self.group)
                recv_counts = recv.tolist()
        recv_counts = [int(c) for c in recv_counts]
        out = []
        with span(name):
            for t in tensors:
                raw = as_row_bytes(t)
                got = raw.new_empty((sum(recv_counts), raw.shape[1]))
                dist.all_to_all_single(got, raw, recv_counts, send_counts, group=self.group)
                out.append(from_row_bytes(got, t))
        return out, recv_counts
