"""The DWDP group as a sub-communicator of a larger MPI world, as TensorRT-LLM forms it.

TensorRT-LLM's ``DwdpManager`` cuts its group out of ``COMM_WORLD`` with
``Create_group(COMM_WORLD.group.Incl(ranks))``, a collective over the group's members only: in a
disaggregated MPI launch the world also holds generation ranks that never build a DWDP manager.
World ranks ``[g*S, (g+1)*S)`` form group ``g`` for ``g < num_groups``; the world may be larger.
Our ``comm.mpi.MpiGroupComm`` instead greets every world rank and wants the world to be exactly
``dwdp_size * num_groups``, which such a world cannot satisfy (its extra ranks never answer).

:class:`SubGroupComm` talks to the group's members only: the config agreement, the
``Create_group`` and every later exchange; like ``MpiGroupComm`` each exchange is point-to-point
with a deadline, so a member that never comes is named instead of hanging the rest.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

from tensorrt_llm_dwdp.comm.mpi import MpiGroupComm, p2p_allgather
from tensorrt_llm_dwdp.dwdp.agreement import config_problems, summarize
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError

logger = logging.getLogger(__name__)

_HELLO_TAG = 7311


def group_members(config: DwdpConfig, world_rank: int, world_size: int) -> list[int]:
    """World ranks of ``world_rank``'s group, checked as upstream checks them.

    Raises DwdpConfigError when the world is smaller than ``dwdp_size * num_groups`` or when
    ``world_rank`` lies past the last group (a non-DWDP rank must not build a manager).
    """
    size, groups = config.dwdp_size, config.num_groups
    if world_size < size * groups:
        raise DwdpConfigError(
            f"MPI world size is only {world_size}; dwdp_config declares dwdp_size * num_groups = "
            f"{size} * {groups} = {size * groups} DWDP ranks")
    group_id = world_rank // size
    if group_id >= groups:
        raise DwdpConfigError(
            f"world rank {world_rank} is in no DWDP group: group_id={group_id} but num_groups is "
            f"{groups} (DWDP ranks are world ranks [0, {size * groups})); only those ranks run "
            "with dwdp_config")
    return list(range(group_id * size, (group_id + 1) * size))


class SubGroupComm(MpiGroupComm):
    """This process's DWDP group, cut from ``world`` (default ``COMM_WORLD``) by its members.

    Only the start-up differs from ``MpiGroupComm`` (members only, a larger world allowed);
    the exchanges, ``close`` and ``abandon`` are its."""

    def __init__(self, config: DwdpConfig, world: Any = None) -> None:
        if world is None:
            from mpi4py import MPI

            world = MPI.COMM_WORLD
        self.world_rank, world_size = world.Get_rank(), world.Get_size()
        members = group_members(config, self.world_rank, world_size)
        self.size = config.dwdp_size
        self.group_id = self.world_rank // self.size
        self.rank = self.world_rank - members[0]
        hello = {"config": config.to_dict(), "host": socket.gethostname(), "pid": os.getpid()}
        greeted = p2p_allgather(world, members, hello, _HELLO_TAG, config.peer_timeout_s,
                                f"DWDP group {self.group_id} start-up (world ranks {members})")
        problems = config_problems([h["config"] for h in greeted])
        if problems:
            raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree on dwdp_config"))
        group = world.group.Incl(members)
        try:
            self._comm = world.Create_group(group)
        finally:
            group.Free()
        self.hosts = [h["host"] for h in greeted]
        self._members = list(range(self.size))
        self._generation = 0
        logger.debug("%s formed from world ranks %s of %d", self.describe(), members, world_size)

    def describe(self) -> str:
        return (f"mpi sub-group {self.group_id} rank {self.rank}/{self.size} "
                f"(world {self.world_rank})")
