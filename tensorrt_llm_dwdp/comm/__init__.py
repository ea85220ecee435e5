"""Group formation for DWDP: MPI sub-communicators or a TCP rendezvous, behind GroupComm."""
from __future__ import annotations

import os
from typing import Mapping

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.comm.local import LocalComm
from tensorrt_llm_dwdp.comm.mpi import MpiGroupComm, under_mpirun
from tensorrt_llm_dwdp.comm.tcp import ENV_ADDR, ENV_PORT, ENV_RANK, TcpGroupComm, tcp_env_present
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig

__all__ = ["GroupComm", "LocalComm", "MpiGroupComm", "TcpGroupComm", "connect"]


def connect(config: DwdpConfig, environ: Mapping[str, str] | None = None) -> GroupComm:
    """The group of this process, picked from its environment.

    ``TRTLLM_DWDP_RANK`` (with ``_MASTER_ADDR`` / ``_MASTER_PORT``) selects the TCP rendezvous;
    otherwise an mpirun/PMI launch selects MPI; ``dwdp_size == 1`` needs neither.
    """
    env = os.environ if environ is None else environ
    if tcp_env_present(env):
        return TcpGroupComm.from_env(config, env)
    if under_mpirun(env):
        return MpiGroupComm(config)
    if config.dwdp_size == 1:
        return LocalComm()
    raise RuntimeError(
        f"DWDP with dwdp_size={config.dwdp_size} needs a group: launch the ranks with mpirun "
        f"(world size dwdp_size * num_groups = {config.world_size}), or set {ENV_RANK}, "
        f"{ENV_ADDR} and {ENV_PORT} in each worker for the TCP rendezvous"
    )
