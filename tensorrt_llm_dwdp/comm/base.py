"""GroupComm: the few collective operations DWDP needs, each bounded by a timeout.

A group is the ``dwdp_size`` ranks that share experts. The manager only ever allgathers small
picklable records (handles, agreement data, status) and barriers; every call takes a timeout so
a peer that died or never started turns into a :class:`DwdpPeerError` naming the missing ranks
instead of a hang.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class GroupComm(ABC):
    """Allgather / barrier over one DWDP group. Owned by whoever closes it (the manager)."""

    #: rank inside the group, in [0, size)
    rank: int
    #: dwdp_size
    size: int
    #: which group of the world this is (world ranks [group_id*size, (group_id+1)*size))
    group_id: int

    @abstractmethod
    def allgather(self, obj: Any, timeout_s: float, what: str) -> list[Any]:
        """Every rank's ``obj``, indexed by group rank; ``what`` names the step in errors."""

    def barrier(self, timeout_s: float, what: str) -> None:
        """Return once every rank of the group has reached this call."""
        self.allgather(None, timeout_s, what)

    @abstractmethod
    def close(self) -> None:
        """Release the communicator (idempotent); may talk to peers."""

    def abandon(self) -> None:
        """Drop the communicator without talking to peers (after a peer died or timed out)."""
        self.close()

    def describe(self) -> str:
        """Short text for logs and errors, e.g. ``mpi group 0 rank 1/2``."""
        return f"{type(self).__name__} group {self.group_id} rank {self.rank}/{self.size}"

    def __enter__(self) -> "GroupComm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
