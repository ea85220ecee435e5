"""TCP rendezvous group: each worker is its own process (e.g. one single-GPU server each).

Rank 0 of the group hosts a ``torch.distributed.TCPStore`` at ``TRTLLM_DWDP_MASTER_ADDR`` /
``TRTLLM_DWDP_MASTER_PORT``; every rank (``TRTLLM_DWDP_RANK`` in [0, dwdp_size)) connects to it.
An allgather is: set my key of this generation, wait for all keys with a timeout, read them.
The processes sharing one address/port are one group; run one store per group when
``num_groups > 1`` (``group_id`` only labels it in messages).
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
from datetime import timedelta
from typing import Any, Mapping

from tensorrt_llm_dwdp.dwdp.agreement import config_problems, summarize
from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.errors import DwdpMismatchError, DwdpPeerError

logger = logging.getLogger(__name__)

ENV_RANK = "TRTLLM_DWDP_RANK"
ENV_ADDR = "TRTLLM_DWDP_MASTER_ADDR"
ENV_PORT = "TRTLLM_DWDP_MASTER_PORT"
ENV_GROUP = "TRTLLM_DWDP_GROUP"


def tcp_env_present(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return ENV_RANK in env


class TcpGroupComm(GroupComm):
    """A DWDP group met through rank 0's TCPStore; rank 0 must outlive the others' ``close``."""

    def __init__(self, config: DwdpConfig, rank: int, master_addr: str, master_port: int,
                 group_id: int = 0) -> None:
        if not 0 <= rank < config.dwdp_size:
            raise ValueError(
                f"{ENV_RANK}={rank} outside [0, dwdp_size={config.dwdp_size}) of dwdp_config"
            )
        if not 0 <= group_id < config.num_groups:
            raise ValueError(f"{ENV_GROUP}={group_id} outside [0, num_groups={config.num_groups})")
        self.rank, self.size, self.group_id = rank, config.dwdp_size, group_id
        self._where = f"{master_addr}:{master_port}"
        self._generation = 0
        self._store = None
        timeout = self._timeout = config.peer_timeout_s
        from torch.distributed import TCPStore

        try:
            self._store = TCPStore(
                master_addr, int(master_port), world_size=self.size, is_master=rank == 0,
                timeout=timedelta(seconds=timeout), wait_for_workers=False,
            )
        except Exception as exc:
            role = "host" if rank == 0 else "reach"
            raise DwdpPeerError(
                f"DWDP rank {rank} could not {role} the rendezvous store at {self._where} within "
                f"{timeout:g} s ({ENV_ADDR}/{ENV_PORT}; rank 0 hosts it): {exc}"
            ) from exc
        hello = {"config": config.to_dict(), "host": socket.gethostname(), "pid": os.getpid()}
        try:
            everyone = self.allgather(hello, timeout, "DWDP start-up (TCP hello)")
            self._store.set(f"dwdp/hello-read/{rank}", b"1")
            problems = config_problems([h["config"] for h in everyone])
            if problems:
                self._wait_hello_read(timeout)
                raise DwdpMismatchError(summarize(problems, "DWDP ranks disagree on dwdp_config"))
        except BaseException:
            # Nobody gets this object to close: drop the store now (on rank 0 its server and
            # port), not whenever the traceback holding it is collected.
            self._store = None
            raise
        self.hosts = [h["host"] for h in everyone]

    def _wait_hello_read(self, timeout_s: float) -> None:
        """Rank 0 hosts the store: before a failed start-up drops it, let every peer finish
        reading the hellos, so each reports the same mismatch rather than a lost store."""
        if self.rank != 0:
            return
        try:
            self._store.wait([f"dwdp/hello-read/{p}" for p in range(1, self.size)],
                             timedelta(seconds=timeout_s))
        except Exception:  # a peer died after the hello: the mismatch is still the error
            logger.warning("not every DWDP rank confirmed the start-up hello before rank 0 failed")

    @classmethod
    def from_env(cls, config: DwdpConfig, environ: Mapping[str, str] | None = None
                 ) -> "TcpGroupComm":
        """Read ``TRTLLM_DWDP_RANK`` / ``_MASTER_ADDR`` / ``_MASTER_PORT`` (/ ``_GROUP``)."""
        env = os.environ if environ is None else environ
        missing = [k for k in (ENV_RANK, ENV_ADDR, ENV_PORT) if k not in env]
        if missing:
            raise ValueError(f"TCP rendezvous needs environment variable(s) {', '.join(missing)}")
        values = {}
        for key in (ENV_RANK, ENV_PORT, ENV_GROUP):
            raw = env.get(key, "0")
            try:
                values[key] = int(raw)
            except ValueError:
                raise ValueError(f"{key} must be an integer, got {raw!r}") from None
        return cls(config, values[ENV_RANK], env[ENV_ADDR], values[ENV_PORT], values[ENV_GROUP])

    def allgather(self, obj: Any, timeout_s: float, what: str) -> list[Any]:
        if self._store is None:
            raise DwdpPeerError(f"{what}: the TCP group communicator is closed")
        self._generation += 1
        keys = [f"dwdp/{self._generation}/{p}" for p in range(self.size)]
        try:
            self._store.set(keys[self.rank], pickle.dumps(obj))
            self._store.wait(keys, timedelta(seconds=timeout_s))
            return [pickle.loads(self._store.get(k)) for k in keys]
        except Exception as exc:
            raise DwdpPeerError(self._failure(what, keys, timeout_s, exc)) from exc

    def _failure(self, what: str, keys: list[str], timeout_s: float, exc: Exception) -> str:
        try:
            missing = [p for p, k in enumerate(keys) if not self._store.check([k])]
        except Exception:
            return (f"{what} (DWDP group {self.group_id}): lost the rendezvous store at "
                    f"{self._where} (hosted by rank 0; did it exit?): {exc}")
        return (f"{what} (DWDP group {self.group_id}): no answer from rank(s) {missing} within "
                f"{timeout_s:g} s (peer_timeout_s); they died, hang, or never started")

    def close(self) -> None:
        """Barrier, then rank 0 waits until every rank has left before its store goes away."""
        store = getattr(self, "_store", None)
        if store is None:
            return
        try:
            self.barrier(self._timeout, "DWDP close")
            left = f"dwdp/left/{self._generation}"
            if self.rank != 0:
                store.set(f"{left}/{self.rank}", b"1")
            else:
                store.wait([f"{left}/{p}" for p in range(1, self.size)],
                           timedelta(seconds=self._timeout))
        except DwdpPeerError:
            raise
        except Exception as exc:
            raise DwdpPeerError(
                f"DWDP close (group {self.group_id}): peers did not all leave within "
                f"{self._timeout:g} s: {exc}"
            ) from exc
        finally:
            self._store = None

    def abandon(self) -> None:
        self._store = None

    def describe(self) -> str:
        return f"tcp group {self.group_id} rank {self.rank}/{self.size} via {self._where}"
