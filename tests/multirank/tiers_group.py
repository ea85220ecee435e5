"""A group of tiers_rank.py processes meeting through the TCP rendezvous, for the host-tier
multi-rank tests (CPU in tests/multirank, CUDA IPC in tests/gpu): start, restart one rank,
wait with a deadline, collect output, list what is left in /dev/shm."""
import glob
import os
import re
import subprocess
import sys
import time

import pytest

from tensorrt_llm_dwdp.dwdp.host_tiers import group_key
from tensorrt_llm_dwdp.launcher import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "tiers_rank.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
TIMEOUT_S = 150


class Group:
    """``size`` rank processes of one TCP rendezvous; rank 1 can be restarted."""

    def __init__(self, tmp_path, size: int, *args: str):
        self.size, self.args = size, list(args)
        self.sync = tmp_path / "sync"
        self.sync.mkdir()
        self.job = f"test-{os.getpid()}-{time.monotonic_ns()}"
        self.port = str(free_port())
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []
        self.logs = []
        self.tmp = tmp_path
        for r in range(size):
            self.start(r)

    def start(self, rank: int, *extra: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1", "TRTLLM_DWDP_RANK": str(rank),
               "TRTLLM_DWDP_MASTER_ADDR": "127.0.0.1", "TRTLLM_DWDP_MASTER_PORT": self.port,
               "TRTLLM_DWDP_JOB_KEY": self.job}
        log = open(self.tmp / f"rank{rank}-{len(self.procs)}.log", "w+")
        proc = subprocess.Popen([sys.executable, SCRIPT, "--sync", str(self.sync), "--size",
                                 str(self.size), *self.args, *extra], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.pids.append(proc.pid)
        self.logs.append(log)
        return proc

    def wait(self, procs=None, timeout=TIMEOUT_S) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in procs or self.procs:
            try:
                codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"ranks hung:\n{self.output()[-6000:]}")
        return codes

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self) -> str:
        out = []
        for log in self.logs:
            log.seek(0)
            out.append(log.read())
        return "\n".join(out)

    def leftovers(self) -> list[str]:
        files = glob.glob(f"/dev/shm/trtllm_dwdp_g{group_key(0, {'TRTLLM_DWDP_JOB_KEY': self.job})}_*")
        for pid in self.pids:
            files += glob.glob(f"/dev/shm/trtllm_dwdp_{pid}_*")
        return files



def scenario_lines(out: str, scenario: str) -> dict:
    """rank -> the rest of each ``SCENARIO <scenario> rank=<r> ...`` line."""
    found = {}
    for m in re.finditer(rf"^SCENARIO {scenario} rank=(\d+) (.*)$", out, re.M):
        found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found
