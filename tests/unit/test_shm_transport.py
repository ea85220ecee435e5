"""POSIX shared-memory transport: allocation, export offsets, deduplicated opens, no leftovers."""
import ctypes
import glob
import os

import pytest
import torch

from tensorrt_llm_dwdp.dwdp.errors import DwdpRegistrationError
from tensorrt_llm_dwdp.transport import HandleRecord, ShmTransport, transport_for


def _ours():
    return glob.glob(f"/dev/shm/trtllm_dwdp_{os.getpid()}_*")


def _read(addr, n):
    return ctypes.string_at(addr, n)


def test_allocate_zeroed_shapes_dtypes():
    tr = ShmTransport()
    try:
        for shape, dtype in [((3, 5), torch.uint8), ((2, 7, 3), torch.bfloat16),
                             ((4,), torch.float8_e4m3fn), ((1, 4097), torch.float32), ((0, 3), torch.uint8)]:
            t = tr.allocate(shape, dtype)
            assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
            assert torch.all(t.view(torch.uint8) == 0)
        assert len(_ours()) == 5
    finally:
        tr.close()
    assert not _ours()


def test_export_offsets_of_views_and_open_reads_same_bytes():
    owner, peer = ShmTransport(), ShmTransport()
    try:
        big = owner.allocate((4, 1000), torch.uint8)
        big.copy_(torch.arange(4000).view(4, 1000) % 251)
        rows = big[1:3]
        rec = owner.export(rows)
        assert isinstance(rec, HandleRecord) and rec.kind == "shm"
        assert rec.offset == 1000 and rec.nbytes == 2000 and rec.allocation_bytes % 4096 == 0
        addr = peer.open(0, rec)
        assert _read(addr, 2000) == bytes(rows.flatten().tolist())
        # A second tensor of the same allocation: same mapping, refcounted.
        rec2 = owner.export(big[3:])
        addr2 = peer.open(0, rec2)
        assert peer.open_allocations == 1 and addr2 == addr + 2000
        # Writes by the owner are visible through the peer's mapping (it is shared, not copied).
        big[3, 0] = 77
        assert _read(addr2, 1) == bytes([77])
        peer.release(0, rec)
        assert peer.open_allocations == 1
        peer.release(0, rec2)
        assert peer.open_allocations == 0
        # The same allocation seen from two "peers" is two mappings.
        peer.open(0, rec)
        peer.open(1, rec)
        assert peer.open_allocations == 2
    finally:
        peer.close()
        owner.close()
    assert peer.open_allocations == 0 and not _ours()


def test_after_exchange_unlinks_names_but_memory_lives():
    owner, peer = ShmTransport(), ShmTransport()
    t = owner.allocate((16,), torch.int32)
    t.copy_(torch.arange(16))
    rec = owner.export(t)
    addr = peer.open(0, rec)
    owner.after_exchange()
    assert not _ours()  # names gone from /dev/shm ...
    t[5] = 555
    assert int.from_bytes(_read(addr + 20, 4), "little") == 555  # ... memory still shared
    with pytest.raises(FileNotFoundError, match="is gone"):
        ShmTransport().open(0, rec)  # a late peer cannot map it any more
    peer.close()
    owner.close()
    assert int(t.sum()) == sum(range(16)) - 5 + 555  # owner tensors outlive close()


def test_export_rejects_foreign_memory_and_other_devices():
    tr = ShmTransport()
    try:
        with pytest.raises(DwdpRegistrationError, match="not in shared memory"):
            tr.export(torch.zeros(10))
        with pytest.raises(DwdpRegistrationError, match="CPU tensors"):
            tr.export(torch.empty(3, device="meta"))
        t = tr.allocate((8,), torch.uint8)
        rec = tr.export(t)
        bad = HandleRecord("cuda_ipc", rec.allocation, rec.handle, rec.allocation_bytes, 0, 8)
        with pytest.raises(ValueError, match="'cuda_ipc' handle"):
            tr.open(1, bad)
        wrong_size = HandleRecord("shm", rec.allocation, rec.handle, rec.allocation_bytes * 2, 0, 8)
        with pytest.raises(ValueError, match="expected"):
            ShmTransport().open(1, wrong_size)
    finally:
        tr.close()
    assert not _ours()


def test_finalizer_unlinks_when_close_is_forgotten():
    tr = ShmTransport()
    tr.allocate((4,), torch.uint8)
    assert _ours()
    del tr
    import gc

    gc.collect()
    assert not _ours()


def test_transport_for():
    assert isinstance(transport_for("cpu"), ShmTransport)
    with pytest.raises(ValueError, match="cpu or cuda"):
        transport_for("meta")
