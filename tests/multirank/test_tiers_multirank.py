"""Host tiers across real processes on CPU: a rank SIGKILLed during prefetch or compute, a
restarted rank rejoining, a corrupt host store. Plain processes meet through the TCP
rendezvous (plain mpirun would abort the job when a rank dies); see tiers_rank.py.

Each test also checks that nothing of the group is left in /dev/shm: neither the killed rank's
segments (its survivors remove them) nor the host store and control block (the last rank out).
"""
import glob
import os
import re
import subprocess
import sys
import time

import pytest

from tensorrt_llm_dwdp.dwdp.host_tiers import group_key
from tensorrt_llm_dwdp.launcher import free_port

pytestmark = pytest.mark.multirank
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


def _lines(out: str, scenario: str) -> dict:
    found = {}
    for m in re.finditer(rf"^SCENARIO {scenario} rank=(\d+) (.*)$", out, re.M):
        found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


@pytest.fixture
def group_factory(tmp_path):
    groups = []

    def make(size, *args):
        groups.append(Group(tmp_path, size, *args))
        return groups[-1]

    yield make
    for g in groups:
        g.kill_all()


@pytest.mark.parametrize("kill_at", ["prefetch", "compute"])
def test_failover_when_a_peer_is_killed(group_factory, kill_at):
    g = group_factory(3, "--scenario", "failover", "--kill-at", kill_at)
    codes = g.wait()
    out = g.output()
    assert codes[1] == -9, out[-6000:]
    assert codes[0] == codes[2] == 0, out[-6000:]
    lines = _lines(out, "failover")
    assert lines[0][0].startswith("OK failovers=1 retries=1"), lines
    assert lines[2][0].startswith("OK failovers=1"), lines
    assert "peer 1 is down" in out and "now come from the host store" in out
    assert not g.leftovers(), g.leftovers()


def test_rejoin_after_a_kill(group_factory):
    g = group_factory(3, "--scenario", "rejoin")
    assert g.wait([g.procs[1]])[0] == -9, g.output()[-6000:]
    restarted = g.start(1, "--restarted")
    codes = g.wait([g.procs[0], g.procs[2], restarted])
    out = g.output()
    assert codes == [0, 0, 0], out[-6000:]
    lines = _lines(out, "rejoin")
    events = re.fullmatch(r"OK rejoined events=\[(.*)\]", lines[1][0]).group(1).split(", ")
    assert events[0] == "'rejoined'" and set(events[1:]) <= {"'left'"}, lines  # they may close first
    for r in (0, 2):
        assert "rejoins=1" in lines[r][0] and "events=['failover', 'rejoin']" in lines[r][0], lines
    assert "experts restored from the host store" in out
    assert not g.leftovers(), g.leftovers()


def test_corrupt_host_store_detected_at_failover(group_factory):
    g = group_factory(2, "--scenario", "corrupt")
    codes = g.wait()
    out = g.output()
    assert codes == [0, -9], out[-6000:]
    line = _lines(out, "corrupt")[0][0]
    assert line.startswith("OK detected"), line
    assert "CRC32" in line and "is corrupt" in line and "cannot serve peer(s) [1]" in line, line
    assert not g.leftovers(), g.leftovers()
