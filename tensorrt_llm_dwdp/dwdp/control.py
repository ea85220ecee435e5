"""GroupControl: a DWDP group's control block on its node, the channel that outlives any rank.

A small POSIX shm segment ``/dev/shm/trtllm_dwdp_g<key>_ctl`` of int64 words:

```
header   magic, version, S, layers, E, store bytes, layout fingerprint, reserved,
         creator pid, start time, pid namespace, 5 reserved
slot r   pid, start time, pid namespace, incarnation, state, heartbeat ns, 2 reserved,
         seen[S]      (the incarnation of each peer whose memory rank r has mapped)
         declared[S]  (the incarnation of each peer rank r declared down, 0 if none)
crc      [layers x S]  CRC32 of each (layer, writer part) of the host store, | 1 << 32 once set
```

Each word has one writer (slot r: rank r; crc (l, r): rank r), so no locks: aligned 8-byte
stores are atomic. A declaration names the incarnation it is about, so a restarted rank is never
taken for the one its peers gave up on. Handle records of each (rank, incarnation) sit in
files ``..._rec<r>_<inc>`` beside it (written to a temp name, then renamed), so a rank that
restarts reads its survivors' records and they read its own, without the group's comm (whose
store may have died with rank 0). The group's files are unlinked by the last rank to close, by
the launcher after a crash (``unlink_group``), or, when every process of a group died without
either, by the next group created on the node (``collect_stale_groups``).
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
import pickle
from typing import Any, Callable

import numpy as np

from tensorrt_llm_dwdp.dwdp.errors import DwdpError, DwdpMismatchError
from tensorrt_llm_dwdp.dwdp.liveness import ALIVE, ProcIdentity, can_check_process, process_state

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
GROUP_PREFIX = "trtllm_dwdp_g"
MAGIC = 0x44574450_54494552  # "DWDPTIER"
VERSION = 2
MAX_RANKS = 64

STARTING, SERVING, CLOSED = 1, 2, 3
STATE_NAMES = {0: "empty", STARTING: "starting", SERVING: "serving", CLOSED: "closed"}

_HEADER = 16
_CREATOR = 8  # pid, start time, pid namespace of the process that created the block
_PID, _START, _NS, _INC, _STATE, _BEAT = range(6)
_SLOT_FIXED = 8
_CRC_SET = 1 << 32


def group_path(key: str, suffix: str) -> str:
    return os.path.join(SHM_DIR, f"{GROUP_PREFIX}{key}_{suffix}")


def unlink_glob(pattern: str) -> list[str]:
    """Remove the files matching ``pattern`` (a glob); the paths removed."""
    removed = []
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def unlink_group(key: str) -> list[str]:
    """Remove every file of group ``key`` from /dev/shm; the paths removed."""
    return unlink_glob(os.path.join(SHM_DIR, f"{GROUP_PREFIX}{key}_*"))


def collect_stale_groups() -> list[str]:
    """Unlink the files of every group on this node whose processes are all gone (killed
    without anyone cleaning up); the keys collected."""
    collected = []
    suffix = "_ctl"
    for path in glob.glob(os.path.join(SHM_DIR, f"{GROUP_PREFIX}*{suffix}")):
        key = os.path.basename(path)[len(GROUP_PREFIX):-len(suffix)]
        control = GroupControl.probe(key)
        if control is None:
            continue
        try:
            stale = control.abandoned()
        finally:
            control.close()
        if stale:
            unlink_group(key)
            collected.append(key)
    if collected:
        logger.info("removed the files of %d abandoned DWDP group(s): %s", len(collected), collected)
    return collected


def create_mapped(path: str, nbytes: int,
                  fill: Callable[[mmap.mmap], None] | None = None) -> mmap.mmap:
    """A new file of ``nbytes`` zero bytes at ``path``, mapped read-write. It is written under a
    temporary name, sized and given to ``fill`` (a header peers check), then renamed, so nobody
    opens it half made."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
        if fill is not None:
            fill(mm)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return mm


def open_mapped(path: str, missing: str, nbytes: int | None = None,
                error: type[DwdpError] = DwdpError) -> mmap.mmap:
    """Map the existing file ``path`` read-write; ``error(missing)`` if it is not there, or if
    ``nbytes`` is given and the file has another size."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise error(missing) from None
    try:
        size = os.fstat(fd).st_size
        if nbytes is not None and size != nbytes:
            raise error(f"{path} has {size} bytes, this rank's layout needs {nbytes}: the "
                            f"ranks disagree on the experts")
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


class GroupControl:
    """The mapped control block of one group (``create`` or ``open``); ``close`` unmaps it."""

    def __init__(self, key: str, mm: mmap.mmap, words: np.ndarray) -> None:
        self.key = key
        self.path = group_path(key, "ctl")
        self._mm = mm
        self._w = words
        self.size = int(words[2])
        self.num_layers = int(words[3])
        self._slot_words = _SLOT_FIXED + 2 * self.size

    # ------------------------------------------------------------------ lifetime
    @staticmethod
    def nbytes(size: int, num_layers: int) -> int:
        words = _HEADER + size * (_SLOT_FIXED + 2 * size) + num_layers * size
        return -(-words * 8 // mmap.PAGESIZE) * mmap.PAGESIZE

    @classmethod
    def create(cls, key: str, size: int, num_layers: int, num_experts: int, store_bytes: int,
               fingerprint: int) -> "GroupControl":
        """A fresh block (an existing file of this key must be stale: see ``live_ranks``)."""
        if not 1 <= size <= MAX_RANKS:
            raise ValueError(f"host tiers support 1..{MAX_RANKS} ranks per group, got {size}")
        me = ProcIdentity.current()

        def header(mm: mmap.mmap) -> None:  # peers never see a half-written header
            words = np.frombuffer(mm, dtype=np.int64)
            words[1:7] = (VERSION, size, num_layers, num_experts, store_bytes, fingerprint)
            words[_CREATOR:_CREATOR + 3] = (me.pid, me.start_time, me.pid_ns)
            words[0] = MAGIC

        mm = create_mapped(group_path(key, "ctl"), cls.nbytes(size, num_layers), header)
        return cls(key, mm, np.frombuffer(mm, dtype=np.int64))

    @classmethod
    def open(cls, key: str) -> "GroupControl":
        path = group_path(key, "ctl")
        mm = open_mapped(path, f"the DWDP group control block {path} does not exist (the "
                               f"group's rank 0 creates it at the handle exchange)")
        words = np.frombuffer(mm, dtype=np.int64)
        if len(mm) < _HEADER * 8 or words[0] != MAGIC or words[1] != VERSION:
            del words
            mm.close()
            raise DwdpError(f"{path} is not a DWDP control block of version {VERSION}")
        return cls(key, mm, words)

    @classmethod
    def probe(cls, key: str) -> "GroupControl | None":
        """The block of ``key`` if it exists and is valid, else None."""
        try:
            return cls.open(key)
        except DwdpError:
            return None

    def close(self) -> None:
        words, self._w = self._w, None
        if words is None:
            return
        del words
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: the GC unmaps it later
            logger.debug("control block %s left mapped (views alive)", self.path)

    # ------------------------------------------------------------------ header
    @property
    def num_experts(self) -> int:
        return int(self._w[4])

    @property
    def store_bytes(self) -> int:
        return int(self._w[5])

    @property
    def fingerprint(self) -> int:
        return int(self._w[6])

    def check_fingerprint(self, fingerprint: int, what: str) -> None:
        if self.fingerprint != fingerprint:
            raise DwdpMismatchError(
                f"{what}: the running group {self.key} has another expert layout (layout "
                f"fingerprint {self.fingerprint:#x}, this rank {fingerprint:#x}): restart with "
                f"the group's config and checkpoint")

    def abandoned(self) -> bool:
        """Every process of the group is gone (its creator too, so it is not still starting):
        nobody will unlink its files. Only judged for processes this one can see."""
        w = self._w
        creator = ProcIdentity(int(w[_CREATOR]), int(w[_CREATOR + 1]), int(w[_CREATOR + 2]))
        if not can_check_process(creator) or process_state(creator) == ALIVE:
            return False
        for r in range(self.size):
            ident = self.identity(r)
            if ident.pid and (not can_check_process(ident) or process_state(ident) == ALIVE):
                return False
        return True

    # ------------------------------------------------------------------ slots
    def _slot(self, rank: int) -> int:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside [0, {self.size})")
        return _HEADER + rank * self._slot_words

    def identity(self, rank: int) -> ProcIdentity:
        s = self._slot(rank)
        return ProcIdentity(int(self._w[s + _PID]), int(self._w[s + _START]), int(self._w[s + _NS]))

    def incarnation(self, rank: int) -> int:
        return int(self._w[self._slot(rank) + _INC])

    def state(self, rank: int) -> int:
        return int(self._w[self._slot(rank) + _STATE])

    def heartbeat(self, rank: int) -> int:
        return int(self._w[self._slot(rank) + _BEAT])

    def seen(self, rank: int, peer: int) -> int:
        """The incarnation of ``peer`` that ``rank`` has mapped (0: none)."""
        return int(self._w[self._slot(rank) + _SLOT_FIXED + peer])

    def claim(self, rank: int, ident: ProcIdentity, incarnation: int, state: int) -> None:
        """Write ``rank``'s identity, then its incarnation (readers key on it), then state."""
        s = self._slot(rank)
        self._w[s + _PID], self._w[s + _START], self._w[s + _NS] = (
            ident.pid, ident.start_time, ident.pid_ns)
        self._w[s + _INC] = incarnation
        self._w[s + _STATE] = state

    def set_state(self, rank: int, state: int) -> None:
        self._w[self._slot(rank) + _STATE] = state

    def stamp(self, rank: int, now_ns: int) -> None:
        self._w[self._slot(rank) + _BEAT] = now_ns

    def declare_down(self, by: int, rank: int, incarnation: int) -> None:
        """Rank ``by`` gave up on incarnation ``incarnation`` of ``rank``."""
        self._w[self._slot(by) + _SLOT_FIXED + self.size + rank] = incarnation

    def declared_down_by(self, rank: int) -> list[int]:
        """Ranks that gave up on ``rank``'s current incarnation."""
        inc = self.incarnation(rank)
        return [r for r in range(self.size) if r != rank and inc
                and int(self._w[self._slot(r) + _SLOT_FIXED + self.size + rank]) == inc]

    def ack(self, rank: int, peer: int, incarnation: int) -> None:
        self._w[self._slot(rank) + _SLOT_FIXED + peer] = incarnation

    def live_ranks(self) -> list[int]:
        """Ranks whose recorded process is alive (checkable ones only) and not closed."""
        out = []
        for r in range(self.size):
            ident = self.identity(r)
            if self.state(r) in (STARTING, SERVING) and can_check_process(ident) \
                    and process_state(ident) == ALIVE:
                out.append(r)
        return out

    def describe(self, rank: int) -> str:
        ident = self.identity(rank)
        return (f"rank {rank}: pid {ident.pid}, incarnation {self.incarnation(rank)}, "
                f"{STATE_NAMES.get(self.state(rank), '?')}")

    # ------------------------------------------------------------------ checksums
    def set_crc(self, pos: int, writer: int, crc: int) -> None:
        self._w[self._crc_index(pos, writer)] = (crc & 0xFFFFFFFF) | _CRC_SET

    def crc(self, pos: int, writer: int) -> int | None:
        """The recorded CRC32 of (layer position, writer part), None if not written yet."""
        v = int(self._w[self._crc_index(pos, writer)])
        return v & 0xFFFFFFFF if v & _CRC_SET else None

    def _crc_index(self, pos: int, writer: int) -> int:
        if not (0 <= pos < self.num_layers and 0 <= writer < self.size):
            raise ValueError(f"checksum ({pos}, {writer}) outside [{self.num_layers}, {self.size})")
        return _HEADER + self.size * self._slot_words + pos * self.size + writer

    # ------------------------------------------------------------------ handle records
    def post_record(self, rank: int, incarnation: int, record: Any) -> None:
        path = group_path(self.key, f"rec{rank}_{incarnation}")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(record, f)
        os.replace(tmp, path)

    def read_record(self, rank: int, incarnation: int) -> Any:
        path = group_path(self.key, f"rec{rank}_{incarnation}")
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except FileNotFoundError:
            raise DwdpError(f"rank {rank} posted no handle record for incarnation {incarnation} "
                            f"({path} is missing)") from None
