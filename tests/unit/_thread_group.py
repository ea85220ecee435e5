"""Ranks as threads of one process: an allgather with the MPI/TCP timeout contract (tests)."""
import threading

from tensorrt_llm_dwdp.comm.base import GroupComm
from tensorrt_llm_dwdp.dwdp.errors import DwdpPeerError

_MISSING = object()


class ThreadGroup:
    """Allgather between threads of one process, with the same timeout contract as MPI/TCP."""

    def __init__(self, size: int):
        self.size = size
        self.cond = threading.Condition()
        self.rounds: dict = {}


class ThreadComm(GroupComm):
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.size, self.group_id = group, rank, group.size, 0
        self.gen = 0
        self.closed = False
        self.timed_out: list[str] = []  # what each allgather that ran out of time was for

    def allgather(self, obj, timeout_s, what):
        self.gen += 1
        g = self.group
        with g.cond:
            slots = g.rounds.setdefault(self.gen, [_MISSING] * g.size)
            slots[self.rank] = obj
            g.cond.notify_all()
            if not g.cond.wait_for(lambda: _MISSING not in slots, timeout_s):
                missing = [r for r, v in enumerate(slots) if v is _MISSING]
                self.timed_out.append(what)
                raise DwdpPeerError(f"{what}: no message from rank(s) {missing} within {timeout_s:g} s")
            return list(slots)

    def close(self):
        self.closed = True


def _in_threads(size, fn, timeout=60):
    """Run fn(rank, comm) in one thread per rank; return results (exceptions as values)."""
    group = ThreadGroup(size)
    out = [None] * size

    def body(r):
        try:
            out[r] = fn(r, ThreadComm(group, r))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out[r] = exc

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a rank thread hung"
    return out
