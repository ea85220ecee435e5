"""Row all-to-all through memory the peers map: for ranks that share a GPU (NCCL refuses two
ranks of one communicator on one device) and, with POSIX shared memory, for CPU ranks.

Each rank owns two send buffers (ping-pong by phase: a dispatch or a combine is one phase) that
every peer maps once at start-up (CUDA IPC handles, or shm names), and, on a GPU, two
interprocess CUDA events: SENT (my buffer holds this phase's rows) and READ (I have copied this
phase's rows out of my peers' buffers). One phase, on rank r, buffer b = phase % 2:

1. GPU: the stream waits each peer's READ: its copies out of my buffer b two phases ago are done;
2. my rows (grouped by destination, one region per tensor of the message) are written into b;
   GPU: SENT is recorded;
3. host: one gloo all-gather of every rank's send counts (and bytes, checked against the
   buffer). It is the phase's only host step and orders the events: a peer's SENT of this phase
   is recorded before it arrives here, my READ of the last phase before I do;
4. from each peer q: the rows q sent me are copied from q's buffer b (GPU: after waiting q's
   SENT; one ``cudaMemcpyAsync`` per tensor; CPU: ``memmove``); GPU: READ is recorded.

Nothing waits on the host for the device: the events order the streams of the processes. A
wait may find a LATER record of the same event than the one it needs (a peer already one phase
ahead); that is a stronger wait on the same stream, and it cannot close a cycle, since a peer
can only be ahead after this rank's step 3, which comes after its own waits were enqueued.
The buffers hold ``capacity_bytes`` each; a phase that needs more fails on every rank at once
(step 3), naming the bytes and the knob (``ep_config.buffer_mb``).
"""
from __future__ import annotations

import ctypes
import logging
from typing import Sequence

import torch
import torch.distributed as dist

from tensorrt_llm_dwdp.parallel.exchange import RowExchange, as_row_bytes, no_span, row_bytes
from tensorrt_llm_dwdp.transport import transport_for

logger = logging.getLogger(__name__)

ALIGN = 256  # each tensor's region starts on a 256-byte boundary


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def region_offsets(rows: int, row_nbytes: Sequence[int]) -> tuple[list[int], int]:
    """Start of each tensor's region in a buffer holding ``rows`` rows of each, and the end."""
    offsets, end = [], 0
    for rb in row_nbytes:
        offsets.append(end)
        end = _align(end + rows * rb)
    return offsets, end


class SharedExchange(RowExchange):
    """All-to-all through peer-mapped buffers; ``group`` is a gloo process group of the ranks
    (host steps), ``device`` this rank's device (CUDA: IPC buffers and events; CPU: shm)."""

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device,
                 capacity_bytes: int) -> None:
        self.group = group
        self.device = torch.device(device)
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.capacity = _align(int(capacity_bytes))
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda_ipc" if self.cuda else "shm"
        self.phase = 0
        self._closed = False
        self.transport = transport_for(self.device)
        try:
            self.buffers = [self.transport.allocate((self.capacity,), torch.uint8) for _ in range(2)]
            records = [self.transport.export(b) for b in self.buffers]
            events = None
            if self.cuda:
                with torch.cuda.device(self.device):
                    self.sent = torch.cuda.Event(interprocess=True)
                    self.read = torch.cuda.Event(interprocess=True)
                    events = (bytes(self.sent.ipc_handle()), bytes(self.read.ipc_handle()))
            everyone: list = [None] * self.size
            dist.all_gather_object(everyone, (records, events), group=group)
            self.peer_ptrs: dict[int, list[int]] = {}
            self.peer_sent: dict[int, torch.cuda.Event] = {}
            self.peer_read: dict[int, torch.cuda.Event] = {}
            for q, (recs, evs) in enumerate(everyone):
                if q == self.rank:
                    continue
                self.peer_ptrs[q] = [self.transport.open(q, r) for r in recs]
                if self.cuda:
                    self.peer_sent[q] = torch.cuda.Event.from_ipc_handle(self.device, evs[0])
                    self.peer_read[q] = torch.cuda.Event.from_ipc_handle(self.device, evs[1])
            dist.barrier(group=group)   # every peer mapped my buffers
            self.transport.after_exchange()
            if self.cuda:
                from tensorrt_llm_dwdp.transport.cuda_ipc import cuda_bindings

                self._rt = cuda_bindings()[0]
        except BaseException:
            self.transport.close()
            raise
        logger.info("EP exchange (%s) rank %d/%d: 2 buffers of %.1f MiB", self.kind, self.rank,
                    self.size, self.capacity / 2**20)

    @property
    def buffer_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def _copy_from_peer(self, dst: torch.Tensor, src_ptr: int, nbytes: int) -> None:
        if self.cuda:
            from tensorrt_llm_dwdp.transport.cuda_ipc import check

            stream = torch.cuda.current_stream(self.device).cuda_stream
            check(self._rt.cudaMemcpyAsync(dst.data_ptr(), src_ptr, nbytes,
                                           self._rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                           stream), "EP exchange cudaMemcpyAsync")
        else:
            ctypes.memmove(dst.data_ptr(), src_ptr, nbytes)

    def all_to_all(self, tensors, send_counts, recv_counts=None, *, name="ep_dispatch",
                   span=no_span):
        if self._closed:
            raise RuntimeError("EP exchange is closed")
        self.check(tensors, send_counts)
        send_counts = [int(c) for c in send_counts]
        b = self.phase % 2
        self.phase += 1
        rbytes = [row_bytes(t) for t in tensors]
        rows = sum(send_counts)
        offsets, need = region_offsets(rows, rbytes)
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        with span(name):
            if self.cuda:
                for ev in self.peer_read.values():
                    stream.wait_event(ev)
            if need <= self.capacity:
                buf = self.buffers[b]
                for t, off, rb in zip(tensors, offsets, rbytes):
                    if rows:
                        buf[off:off + rows * rb].view(rows, rb).copy_(as_row_bytes(t))
            if self.cuda:
                self.sent.record(stream)
        with span("ep_counts"):
            mine = torch.tensor([*send_counts, need], dtype=torch.int64)
            table = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(table, mine, group=self.group)
            table = [t.tolist() for t in table]
        over = [(q, t[-1]) for q, t in enumerate(table) if t[-1] > self.capacity]
        if over:
            raise RuntimeError(
                f"EP exchange: rank(s) {[q for q, _ in over]} need {max(n for _, n in over)} bytes "
                f"in one phase, more than the {self.capacity}-byte buffers; raise "
                f"ep_config.buffer_mb (or lower max_num_tokens)")
        got_counts = [table[q][self.rank] for q in range(self.size)]
        if recv_counts is not None and [int(c) for c in recv_counts] != got_counts:
            raise RuntimeError(f"EP exchange rank {self.rank}: expected rows {list(recv_counts)} "
                               f"from the ranks, they sent {got_counts}")
        total = sum(got_counts)
        outs = [torch.empty((total, rb), dtype=torch.uint8, device=self.device) for rb in rbytes]
        with span(name):
            at = 0
            for q in range(self.size):
                n = got_counts[q]
                if n == 0:
                    continue
                q_offsets, _ = region_offsets(sum(table[q][:-1]), rbytes)
                first = sum(table[q][:self.rank])
                if self.cuda and q != self.rank:
                    stream.wait_event(self.peer_sent[q])
                for out, off, rb in zip(outs, q_offsets, rbytes):
                    src = off + first * rb
                    if q == self.rank:
                        out[at:at + n].view(-1).copy_(self.buffers[b][src:src + n * rb])
                    else:
                        self._copy_from_peer(out[at:at + n], self.peer_ptrs[q][b] + src, n * rb)
                at += n
            if self.cuda:
                self.read.record(stream)
        result = [o.view(t.dtype).reshape(total, *t.shape[1:]) for o, t in zip(outs, tensors)]
        return result, got_counts

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.cuda:
            torch.cuda.synchronize(self.device)   # our copies out of the peers' buffers are done
        try:
            dist.barrier(group=self.group)        # ... and theirs out of ours
        finally:
            self.transport.close()
            self.buffers = []
