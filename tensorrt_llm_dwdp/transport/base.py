"""Transport: memory this rank exports and peer memory it maps, behind one interface.

``allocate`` returns tensors peers can map; ``export`` describes where a tensor lives inside
its allocation as a picklable :class:`HandleRecord`; ``open`` maps a peer's allocation (once per
distinct allocation and peer, reference counted) and returns the address of the tensor's first
byte in this process. Copy plans are built from those addresses.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandleRecord:
    """Where one exported tensor lives, as a peer needs it.

    kind: transport name ("shm" or "cuda_ipc"); allocation: identity of the exporter's
    allocation (segment name, or base address); handle: what the peer opens (segment name bytes
    or the 64-byte cudaIpcMemHandle); allocation_bytes: size of the allocation; offset: the
    tensor's first byte inside it; nbytes: the tensor's size; device: exporter's device index
    (-1 on CPU).
    """

    kind: str
    allocation: str
    handle: bytes
    allocation_bytes: int
    offset: int
    nbytes: int
    device: int = -1


class Transport(ABC):
    """Export / map memory between the ranks of one group; one owner, closed once."""

    kind: str = ""

    def __init__(self) -> None:
        # (peer, allocation) -> [base address in this process, refcount, record]
        self._mapped: dict[tuple[int, str], list[Any]] = {}

    @abstractmethod
    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor in memory that peers can map."""

    @abstractmethod
    def export(self, tensor: torch.Tensor) -> HandleRecord:
        """Describe ``tensor`` for peers; raises DwdpRegistrationError if it cannot be shared."""

    @abstractmethod
    def _map(self, record: HandleRecord) -> int:
        """Map a peer allocation; return its base address in this process."""

    @abstractmethod
    def _unmap(self, base: int, record: HandleRecord) -> None:
        """Undo ``_map``."""

    def open(self, peer: int, record: HandleRecord) -> int:
        """Address, in this process, of the first byte of the tensor ``record`` describes."""
        if record.kind != self.kind:
            raise ValueError(
                f"rank {peer} exported a {record.kind!r} handle but this rank uses {self.kind!r}"
            )
        key = (peer, record.allocation)
        entry = self._mapped.get(key)
        if entry is None:
            entry = self._mapped[key] = [self._map(record), 0, record]
            logger.debug("mapped allocation %s of rank %d (%d bytes)", record.allocation, peer,
                         record.allocation_bytes)
        entry[1] += 1
        return entry[0] + record.offset

    def release(self, peer: int, record: HandleRecord) -> None:
        """Drop one ``open`` of ``record``; the allocation is unmapped with its last user."""
        key = (peer, record.allocation)
        entry = self._mapped[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._mapped[key]
            self._unmap(entry[0], entry[2])

    @property
    def open_allocations(self) -> int:
        """How many distinct peer allocations are mapped now."""
        return len(self._mapped)

    def close_peers(self) -> None:
        """Unmap every peer allocation, whatever its refcount."""
        errors = []
        for key, (base, _, record) in list(self._mapped.items()):
            del self._mapped[key]
            try:
                self._unmap(base, record)
            except Exception as exc:  # keep unmapping the rest
                errors.append(f"rank {key[0]} allocation {key[1]}: {exc}")
        if errors:
            raise RuntimeError("could not unmap peer memory: " + "; ".join(errors))

    def after_exchange(self) -> None:
        """Every peer has mapped our allocations (hook; shm unlinks its names here)."""

    def forget(self, record: HandleRecord) -> None:
        """The exporter of ``record`` died: drop what it left behind (hook; shm unlinks the
        segment's name, which a killed process never does)."""

    @abstractmethod
    def close(self) -> None:
        """Unmap peers and release what this rank exported (idempotent)."""
