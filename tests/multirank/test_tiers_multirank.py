"""Host tiers across real processes on CPU: a rank SIGKILLed during prefetch or compute, a
restarted rank rejoining, a corrupt host store. Plain processes meet through the TCP
rendezvous (plain mpirun would abort the job when a rank dies); see tiers_rank.py.

Each test also checks that nothing of the group is left in /dev/shm: neither the killed rank's
segments (its survivors remove them) nor the host store and control block (the last rank out).
"""
import re

import pytest

from tiers_group import Group, scenario_lines as _lines

pytestmark = pytest.mark.multirank


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
    failover_case(group_factory, kill_at)


def test_rejoin_after_a_kill(group_factory):
    rejoin_case(group_factory)


def test_corrupt_host_store_detected_at_failover(group_factory):
    corrupt_case(group_factory)


# The cases take extra tiers_rank.py arguments: tests/gpu/test_tiers_gpu.py runs them with
# --device cuda.
def failover_case(group_factory, kill_at, *extra):
    g = group_factory(3, "--scenario", "failover", "--kill-at", kill_at, *extra)
    codes = g.wait()
    out = g.output()
    assert codes[1] == -9, out[-6000:]
    assert codes[0] == codes[2] == 0, out[-6000:]
    lines = _lines(out, "failover")
    assert lines[0][0].startswith("OK failovers=1 retries=1"), lines
    assert lines[2][0].startswith("OK failovers=1"), lines
    for r in (0, 2):  # after the failover rank 1's experts came over the host link
        assert int(re.search(r"host_bytes=(\d+)", lines[r][0]).group(1)) > 0, lines
    assert "peer 1 is down" in out and "now come from the host store" in out
    assert not g.leftovers(), g.leftovers()


def rejoin_case(group_factory, *extra):
    g = group_factory(3, "--scenario", "rejoin", *extra)
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


def corrupt_case(group_factory, *extra):
    g = group_factory(2, "--scenario", "corrupt", *extra)
    codes = g.wait()
    out = g.output()
    assert codes == [0, -9], out[-6000:]
    line = _lines(out, "corrupt")[0][0]
    assert line.startswith("OK detected"), line
    assert "CRC32" in line and "is corrupt" in line and "cannot serve peer(s) [1]" in line, line
    assert not g.leftovers(), g.leftovers()
