"""LocalComm: the one-rank group (dwdp_size == 1), for running the manager without peers."""
from __future__ import annotations

from typing import Any

from tensorrt_llm_dwdp.comm.base import GroupComm


class LocalComm(GroupComm):
    """A group of exactly this process; allgather returns ``[obj]``."""

    def __init__(self, group_id: int = 0) -> None:
        self.rank, self.size, self.group_id = 0, 1, group_id
        self.hosts = []

    def allgather(self, obj: Any, timeout_s: float, what: str) -> list[Any]:
        return [obj]

    def close(self) -> None:
        return None
