"""MPI group communicator: world ranks [g*S, (g+1)*S) form group g.

Every exchange is point-to-point, nonblocking and polled against a deadline (``isend`` plus
``improbe``), so a rank that never arrives or died leaves its peers with a
:class:`DwdpPeerError` naming it, not a hang. Before the sub-communicator is created (a blocking
collective) all world ranks say hello with their ``dwdp_config``; a rank whose config differs
makes every rank fail with the same message.

Under Open MPI, a rank that exits without MPI_Finalize makes ``mpirun`` kill the whole job
unless it runs with ``--enable-recovery``; with it, the survivors report the dead rank here.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Sequence

from tensorrt_llm_dwdp.dwdp.agreement import config_problems, summarize
from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError, DwdpPeerError

logger = logging.getLogger(__name__)

_HELLO_TAG = 7301
_TAG_BASE = 7400
_TAG_SPAN = 20000
_POLL_S = 0.0005


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is an install requirement
        raise ImportError("the MPI group communicator needs mpi4py: pip install mpi4py") from exc
    return MPI


def p2p_allgather(comm: Any, members: Sequence[int], obj: Any, tag: int, timeout_s: float,
                  what: str) -> list[Any]:
    """Allgather of picklable ``obj`` among ``members`` (ranks of ``comm``) with a deadline.

    Returns the objects indexed like ``members``. Raises DwdpPeerError naming the members whose
    message did not arrive (or who did not take ours) within ``timeout_s``.
    """
    me = comm.Get_rank()
    out: list[Any] = [None] * len(members)
    sends = []
    pending = {}
    for i, m in enumerate(members):
        if m == me:
            out[i] = obj
        else:
            sends.append((m, comm.isend(obj, dest=m, tag=tag)))
            pending[i] = m
    deadline = time.monotonic() + timeout_s
    while pending:
        progressed = False
        for i, m in list(pending.items()):
            msg = comm.improbe(source=m, tag=tag)
            if msg is not None:
                out[i] = msg.recv()
                del pending[i]
                progressed = True
        if pending and not progressed:
            if time.monotonic() > deadline:
                raise DwdpPeerError(
                    f"{what}: no message from rank(s) {sorted(pending.values())} within "
                    f"{timeout_s:g} s (peer_timeout_s); they died, hang, or never started"
                )
            time.sleep(_POLL_S)
    while sends:
        sends = [(m, r) for m, r in sends if not r.Test()]
        if sends:
            if time.monotonic() > deadline:
                raise DwdpPeerError(
                    f"{what}: rank(s) {sorted(m for m, _ in sends)} did not take our message "
                    f"within {timeout_s:g} s (peer_timeout_s)"
                )
            time.sleep(_POLL_S)
    return out


class MpiGroupComm(GroupComm):
    """The DWDP group of this MPI process, cut from ``COMM_WORLD`` (or ``world``)."""

    def __init__(self, config: DwdpConfig, world: Any = None) -> None:
        MPI = _mpi()
        world = MPI.COMM_WORLD if world is None else world
        self._world = world
        world_rank, world_size = world.Get_rank(), world.Get_size()
        self.world_rank = world_rank
        timeout = config.peer_timeout_s
        hello = {"config": config.to_dict(), "host": socket.gethostname(), "pid": os.getpid()}
        everyone = p2p_allgather(world, range(world_size), hello, _HELLO_TAG, timeout,
                                 "DWDP start-up (MPI world hello)")
        problems = config_problems([h["config"] for h in everyone])
        if problems:
            raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree on dwdp_config"))
        config.check_world_size(world_size)
        self.group_id, self.rank = config.group_of(world_rank)
        self.size = config.dwdp_size
        members = list(range(self.group_id * self.size, (self.group_id + 1) * self.size))
        group = world.group.Incl(members)
        try:
            self._comm = world.Create_group(group)
        finally:
            group.Free()
        self._members = list(range(self.size))
        self._generation = 0
        self.hosts = [everyone[m]["host"] for m in members]
        logger.debug("%s formed from world ranks %s", self.describe(), members)

    def allgather(self, obj: Any, timeout_s: float, what: str) -> list[Any]:
        if self._comm is None:
            raise DwdpPeerError(f"{what}: the MPI group communicator is closed")
        self._generation += 1
        tag = _TAG_BASE + self._generation % _TAG_SPAN
        return p2p_allgather(self._comm, self._members, obj, tag, timeout_s,
                             f"{what} (DWDP group {self.group_id})")

    def close(self) -> None:
        comm, self._comm = getattr(self, "_comm", None), None
        if comm is not None:
            comm.Free()

    def abandon(self) -> None:
        # MPI_Comm_free may wait on a dead peer; leave the handle to MPI_Finalize instead.
        self._comm = None

    def describe(self) -> str:
        return f"mpi group {self.group_id} rank {self.rank}/{self.size} (world {self.world_rank})"


def under_mpirun(environ: dict | None = None) -> bool:
    """True when this process was launched by mpirun / srun with a PMI(x) rank in its env."""
    env = os.environ if environ is None else environ
    return any(k in env for k in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "PMI_ID"))
