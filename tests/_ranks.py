"""Launch a test worker on several ranks: under mpirun where it is installed, else as plain
processes meeting through the TCP rendezvous (the launch a machine without MPI uses), so no
multi-rank test skips for want of mpirun.

Workers read their place with :func:`rank_and_size`, which works under either launch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from tensorrt_llm_dwdp.launcher import free_port, mpirun_command

# The TCP launch has no world size of its own (the DWDP config carries it); tests pass it here.
ENV_SIZE = "TRTLLM_DWDP_TEST_WORLD_SIZE"
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


def rank_and_size() -> tuple[int, int]:
    """(rank, number of ranks) of this worker, under mpirun or :func:`run_ranks`' TCP launch."""
    env = os.environ
    if "OMPI_COMM_WORLD_RANK" in env:
        return int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
    if "TRTLLM_DWDP_RANK" in env:
        return int(env["TRTLLM_DWDP_RANK"]), int(env[ENV_SIZE])
    return 0, 1


def worker_env(extra: dict | None = None) -> dict:
    """This environment plus ``extra``, with the repository and tests/ importable first."""
    path = os.pathsep.join(p for p in (ROOT, TESTS_DIR, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **(extra or {}), "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_ranks(argv: list[str], ranks: int, timeout: float, env: dict | None = None,
              launcher: str = "auto") -> tuple[bool, str]:
    """Run ``argv`` on ``ranks`` ranks and wait; (every rank exited 0, their output together).

    ``launcher``: ``auto`` (mpirun if on PATH, else TCP), ``mpirun`` or ``tcp``. A TCP rank that
    fails stops the others (as mpirun does); so does running past ``timeout`` seconds.
    """
    if launcher == "auto":
        launcher = "mpirun" if shutil.which("mpirun") else "tcp"
    full_env = worker_env(env)
    if launcher == "mpirun":
        proc = subprocess.run(mpirun_command(ranks, argv), env=full_env, capture_output=True,
                              text=True, timeout=timeout)
        return proc.returncode == 0, proc.stdout + proc.stderr
    for key in [k for k in full_env if k.startswith(("OMPI_", "PMIX_", "PMI_"))]:
        del full_env[key]  # a test run under mpirun itself must not make its ranks look like MPI
    port = str(free_port())
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        files = [open(os.path.join(logs, f"rank{r}.log"), "w+") for r in range(ranks)]
        procs = []
        try:
            for r in range(ranks):
                rank_env = {**full_env, "TRTLLM_DWDP_RANK": str(r), ENV_SIZE: str(ranks),
                            "TRTLLM_DWDP_MASTER_ADDR": "127.0.0.1",
                            "TRTLLM_DWDP_MASTER_PORT": port}
                procs.append(subprocess.Popen(argv, env=rank_env, stdout=files[r],
                                              stderr=subprocess.STDOUT))
            ok = _wait(procs, timeout)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            out = []
            for f in files:
                f.seek(0)
                out.append(f.read())
                f.close()
    return ok, "".join(out)


def _wait(procs: list[subprocess.Popen], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            return False
        if all(c == 0 for c in codes):
            return True
        time.sleep(0.05)
    return False
