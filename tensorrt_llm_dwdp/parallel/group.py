"""Forming an expert-parallel group: the process group, the row exchange, the lockstep vote.

``ExpertParallelGroup.create`` joins a ``torch.distributed`` gloo group (the host steps: the
vote, the shared exchange's counts) through a TCP rendezvous, then picks the row exchange:

- ``nccl``: ranks on distinct GPUs (NCCL refuses two ranks of one communicator on one GPU);
- ``cuda_ipc``: ranks sharing a GPU (or any GPUs of one host): ``SharedExchange`` over CUDA IPC;
- ``gloo``: CPU ranks, ``all_to_all_single`` over gloo;
- ``shm``: CPU ranks, ``SharedExchange`` over POSIX shared memory (the CUDA IPC protocol's
  host-side twin, so CPU tests run it);
- ``auto``: ``gloo`` on CPUs; on GPUs ``nccl`` when every rank has its own GPU, else ``cuda_ipc``.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from tensorrt_llm_dwdp.parallel.config import EpConfig
from tensorrt_llm_dwdp.parallel.exchange import DistExchange, RowExchange
from tensorrt_llm_dwdp.parallel.expert_parallel import ExpertParallel
from tensorrt_llm_dwdp.parallel.spans import SpanTimer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpRendezvous:
    """Where the ranks of one EP group meet: this rank, and rank 0's TCP store address."""

    rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "EpRendezvous":
        """The TCP launch's variables (``TRTLLM_DWDP_RANK`` / ``_MASTER_ADDR`` / ``_MASTER_PORT``,
        the same a DWDP group meets with; a group is one or the other)."""
        from tensorrt_llm_dwdp.comm.tcp import ENV_ADDR, ENV_PORT, ENV_RANK

        env = os.environ if environ is None else environ
        missing = [k for k in (ENV_RANK, ENV_ADDR, ENV_PORT) if k not in env]
        if missing:
            raise RuntimeError(f"an expert-parallel rank needs {missing} (or mpirun via "
                               f"disaggregated_mpi_worker) to find its group")
        return cls(int(env[ENV_RANK]), env[ENV_ADDR], int(env[ENV_PORT]))

    @classmethod
    def from_mpi(cls, comm, host: str) -> "EpRendezvous":
        """Rank 0 of MPI communicator ``comm`` picks a free port on ``host`` (its own address)
        and tells the others."""
        from tensorrt_llm_dwdp.launcher import free_port

        rank = comm.Get_rank()
        addr, port = comm.bcast((host, free_port()) if rank == 0 else None, root=0)
        return cls(rank, addr, port)


def device_key(device: torch.device) -> tuple:
    """What makes two ranks share a GPU: the host and the GPU's UUID."""
    if device.type != "cuda":
        return (socket.gethostname(), "cpu")
    props = torch.cuda.get_device_properties(device)
    return (socket.gethostname(), str(getattr(props, "uuid", device.index)))


def resolve_transport(requested: str, device: torch.device, keys: list[tuple]) -> str:
    """The transport ``auto`` means here (``keys``: every rank's ``device_key``), or
    ``requested`` after checking it can run on ``device``."""
    cuda = device.type == "cuda"
    shared_gpu = len(set(keys)) < len(keys)
    if requested == "auto":
        if not cuda:
            return "gloo"
        return "cuda_ipc" if shared_gpu else "nccl"
    if requested in ("nccl", "cuda_ipc") and not cuda:
        raise ValueError(f"ep_config.transport={requested!r} needs CUDA ranks; this rank runs on {device}")
    if requested in ("gloo", "shm") and cuda:
        raise ValueError(f"ep_config.transport={requested!r} is for CPU ranks; this rank runs on {device}")
    if requested == "nccl" and shared_gpu:
        raise ValueError("ep_config.transport='nccl' with two ranks on one GPU: NCCL refuses "
                         "that ('Duplicate GPU detected'); use cuda_ipc (or auto)")
    return requested


def make_exchange(transport: str, device: torch.device, capacity_bytes: int,
                  group: dist.ProcessGroup | None = None) -> RowExchange:
    """The row exchange ``transport`` names, over ``group`` (the default group when None; a
    new NCCL group for ``nccl``)."""
    if transport == "nccl":
        return DistExchange(dist.new_group(backend="nccl"), device)
    if transport == "gloo":
        return DistExchange(group, device)
    from tensorrt_llm_dwdp.parallel.shared_exchange import SharedExchange

    return SharedExchange(group, device, capacity_bytes)


class ExpertParallelGroup:
    """One rank's expert-parallel group: owns the default process group it joined, the
    exchange and the ``ExpertParallel`` the MoE layers use."""

    def __init__(self, ep: ExpertParallel, transport: str, owns_process_group: bool) -> None:
        self.ep = ep
        self.transport = transport
        self._owns = owns_process_group
        self._vote = torch.zeros(1, dtype=torch.int64)

    @classmethod
    def create(cls, config: EpConfig, *, rank: int, device: torch.device, master_addr: str,
               master_port: int, num_experts: int, capacity_bytes: int,
               timer: SpanTimer | None = None) -> "ExpertParallelGroup":
        """Join the group (collective: every rank calls it). ``capacity_bytes``: the shared
        exchange's buffers (``exchange_capacity_bytes``), unless ``config.buffer_mb`` is set."""
        config.check_num_experts(num_experts)
        device = torch.device(device)
        if not 0 <= rank < config.ep_size:
            raise ValueError(f"EP rank {rank} outside [0, ep_config.ep_size={config.ep_size})")
        dist.init_process_group("gloo", init_method=f"tcp://{master_addr}:{master_port}",
                                rank=rank, world_size=config.ep_size,
                                timeout=timedelta(seconds=config.timeout_s))
        try:
            keys: list = [None] * config.ep_size
            dist.all_gather_object(keys, device_key(device))
            transport = resolve_transport(config.transport, device, keys)
            if config.buffer_mb:
                capacity_bytes = config.buffer_mb << 20
            exchange = make_exchange(transport, device, capacity_bytes)
        except BaseException:
            dist.destroy_process_group()
            raise
        logger.info("expert-parallel rank %d/%d on %s, transport %s", rank, config.ep_size,
                    device, transport)
        return cls(ExpertParallel(exchange, num_experts, timer=timer), transport, True)

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is true on any rank (a collective: every rank calls it)."""
        self._vote.fill_(int(flag))
        dist.all_reduce(self._vote, op=dist.ReduceOp.MAX)
        return bool(self._vote.item())

    def close(self) -> None:
        ep, self.ep = self.ep, None
        if ep is None:
            return
        try:
            ep.close()
        finally:
            if self._owns and dist.is_initialized():
                dist.destroy_process_group()
