"""ThreadCopyEngine (the CPU copy thread): a reader never sees a buffer whose fills are pending."""
import ctypes
import threading

import pytest
import torch

from tensorrt_llm_dwdp.dwdp import copy_engine
from tensorrt_llm_dwdp.dwdp.copy_plan import CopyPlan
from tensorrt_llm_dwdp.dwdp.errors import DwdpError
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder


def _plan(dst: torch.Tensor, src: torch.Tensor) -> CopyPlan:
    return CopyPlan((dst.data_ptr(),), (src.data_ptr(),), (src.numel(),))


def test_wait_covers_every_pending_fill_of_a_buffer(monkeypatch):
    """abort_step can leave an unread fill of buffer b queued before the next fill of b: wait(b)
    must return only after the LAST one landed, not when the first finishes."""
    dst = torch.zeros(64, dtype=torch.uint8)
    stale = torch.full((64,), 0x11, dtype=torch.uint8)
    fresh = torch.full((64,), 0x22, dtype=torch.uint8)
    gate = threading.Event()
    real = ctypes.memmove

    def gated(d, s, n):
        if s == fresh.data_ptr():
            assert gate.wait(10), "test gate never opened"
        return real(d, s, n)

    monkeypatch.setattr(copy_engine.ctypes, "memmove", gated)
    engine = copy_engine.ThreadCopyEngine(StatsRecorder([0, 1]))
    try:
        engine.submit(0, _plan(dst, stale), 0)   # the fill nobody read (aborted step)
        engine.submit(0, _plan(dst, fresh), 1)   # the fill the next step reads
        returned = threading.Event()
        reader = threading.Thread(target=lambda: (engine.wait(0, 1), returned.set()))
        reader.start()
        assert not returned.wait(0.5), "wait(0) returned while buffer 0 still had a fill pending"
        gate.set()
        reader.join(10)
        assert returned.is_set()
        assert torch.equal(dst, fresh), f"reader saw byte {int(dst[0]):#x}, expected 0x22"
        engine.submit(1, _plan(dst, stale), 0)
        engine.synchronize()
        assert torch.equal(dst, stale)
    finally:
        gate.set()
        engine.close()


def test_wait_raises_if_copy_thread_is_gone():
    engine = copy_engine.ThreadCopyEngine(StatsRecorder([0]))
    engine.close()
    engine._pending[0] = 1  # a fill the dead thread will never finish
    with pytest.raises(DwdpError, match="copy thread stopped while a prefetch was pending"):
        engine.wait(0, 0)
    with pytest.raises(DwdpError, match="copy thread stopped"):
        engine.synchronize()
