"""The KV export pool on the CPU: the block allocator (first fit, coalescing, fragmentation,
exhaustion, frees from finalizers), the shm pool's memory and file, its sizing from the KV
budget, and an engine exporting straight into it."""
import gc
import os
import threading
from types import SimpleNamespace

import pytest
import torch

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
from tensorrt_llm_dwdp.serve.kv_pool import (ALIGN, SHM_DIR, SHM_PREFIX, BlockAllocator, KvExportPool,
                                             PoolUnavailable, pool_bytes_for)


def _pool_files():
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


def test_allocator_first_fit_coalesces_and_reports_fragmentation():
    a = BlockAllocator(8 * ALIGN)
    blocks = [a.allocate(ALIGN) for _ in range(8)]
    assert blocks == [i * ALIGN for i in range(8)]
    assert a.allocate(1) is None  # exhausted
    for off in blocks[::2]:       # free every other block: 4 holes of one block each
        a.free(off)
    s = a.stats()
    assert (s["used"], s["entries"], s["largest_free"], s["free_ranges"]) == (4 * ALIGN, 4, ALIGN, 4)
    assert a.allocate(2 * ALIGN) is None  # 4 blocks free, but no 2 adjacent ones
    a.free(blocks[1])                     # joins holes 0 and 2 into [0, 3 blocks)
    assert a.stats()["largest_free"] == 3 * ALIGN and a.stats()["free_ranges"] == 3
    assert a.allocate(3 * ALIGN) == 0     # first fit takes the coalesced range
    for off in (blocks[3], blocks[5], blocks[7], 0):
        a.free(off)
    s = a.stats()
    assert (s["used"], s["free_ranges"], s["largest_free"]) == (0, 1, 8 * ALIGN)
    with pytest.raises(KeyError, match="freed twice"):
        a.free(0)
    with pytest.raises(ValueError):
        BlockAllocator(ALIGN + 1)


def test_allocator_rounds_sizes_and_frees_queued_from_any_thread():
    a = BlockAllocator(4 * ALIGN)
    assert a.allocate(0) == 0 and a.allocate(ALIGN + 1) == ALIGN  # 1 block, then 2 blocks
    assert a.stats()["used"] == 3 * ALIGN
    t = threading.Thread(target=a.free_later, args=(ALIGN,))      # as a finalizer would
    t.start()
    t.join()
    assert a.stats()["used"] == ALIGN and a.allocate(3 * ALIGN) == ALIGN


def test_shm_pool_blocks_are_views_of_one_file_freed_on_release_and_collection():
    pool = KvExportPool("cpu", 4 * ALIGN)
    assert not pool.ready and pool.try_allocate(1) is None  # memory made on first use
    assert pool.ensure() and pool.kind == "shm"
    (name,) = _pool_files()
    assert os.path.getsize(os.path.join(SHM_DIR, name)) == 4 * ALIGN
    b1, b2 = pool.try_allocate(ALIGN), pool.try_allocate(2 * ALIGN)
    b1.tensor.fill_(1)
    b2.tensor.fill_(2)
    with open(os.path.join(SHM_DIR, name), "rb") as f:  # what a peer reads
        data = f.read()
    assert data[:ALIGN] == b"\1" * ALIGN and data[ALIGN:3 * ALIGN] == b"\2" * (2 * ALIGN)
    d = pool.describe(b2)
    assert (d["offset"], d["bytes"], d["path"], d["id"]) == (ALIGN, 4 * ALIGN, os.path.join(SHM_DIR, name), "shm:cpu")
    assert pool.try_allocate(2 * ALIGN) is None
    b1.release()
    b1.release()  # idempotent
    del b2        # an export nobody released: freed when collected
    gc.collect()
    assert pool.stats()["kv_pool_used_bytes"] == 0 and pool.try_allocate(4 * ALIGN) is not None
    other = KvExportPool("cpu", 4 * ALIGN)
    other.ensure()
    assert other.describe(other.try_allocate(1))["incarnation"] != d["incarnation"]
    other.close()
    pool.close()
    pool.close()
    assert not _pool_files() and pool.try_allocate(1) is None


def test_allocate_waits_for_room_then_gives_up():
    pool = KvExportPool("cpu", 2 * ALIGN, wait_s=5.0)
    pool.open()
    held = pool.try_allocate(2 * ALIGN)
    threading.Timer(0.05, held.release).start()
    half = pool.allocate(ALIGN)
    assert half is not None                               # waited for the release
    assert pool.allocate(2 * ALIGN, wait_s=0.02) is None  # half still held: gives up
    assert pool.allocate(3 * ALIGN) is None and pool.counts["too_large"] == 1  # never fits: no wait
    assert pool.counts["full"] == 1
    pool.close()


def test_adopt_moves_a_handoff_into_the_pool_in_one_piece():
    pool = KvExportPool("cpu", 1 << 16)
    pool.open()
    h = KvHandoff((1, 2, 3), 9, {"layers.0.k": torch.arange(24, dtype=torch.float32).view(3, 1, 8),
                                 "layers.0.v": torch.arange(6, dtype=torch.bfloat16).view(3, 1, 2)})
    for src in (h, h.pack()):  # loose tensors, and an already packed buffer
        moved = pool.adopt(src)
        assert pool.holds(moved.block) and moved.flat.data_ptr() == moved.block.tensor.data_ptr()
        for k in h.tensors:
            assert torch.equal(moved.tensors[k], h.tensors[k])
        moved.release()
    assert pool.stats()["kv_pool_used_bytes"] == 0 and pool.counts["adopted"] == 2
    pool.close()


def test_pool_size_from_the_kv_budget_and_refusals():
    budget = SimpleNamespace(bytes_per_token=1000, max_seq_len=100, nbytes=16 * 100 * 1000)
    one = -(-100 * 1000 // ALIGN) * ALIGN
    assert pool_bytes_for(None, budget) == 400_128  # a quarter of the cache, in whole blocks
    assert pool_bytes_for(None, SimpleNamespace(bytes_per_token=1000, max_seq_len=100, nbytes=200_000)) == one
    assert pool_bytes_for(one, budget) == one
    with pytest.raises(ValueError, match=rf"kv_transfer_pool_bytes=99 cannot hold .* at least {one}, or set 0"):
        pool_bytes_for(99, budget)
    pool = KvExportPool("cpu")
    with pytest.raises(PoolUnavailable, match="no size"):
        pool.open()
    assert pool.plan(budget) == 400_128 and not pool.explicit
    big = KvExportPool("cpu", 1 << 60)
    assert not big.ensure() and "bytes free" in big.error and not _pool_files()
    assert not big.ensure()  # tried once, not again


def test_engine_exports_straight_into_the_pool_and_elsewhere_when_full():
    from tensorrt_llm_dwdp.engine.executor import Engine, Request
    from tensorrt_llm_dwdp.engine.scheduler import SamplingParams
    from tensorrt_llm_dwdp.model.kv_cache import KvCache

    class SumLM(torch.nn.Module):
        def make_cache(self, max_seqs, max_len, device):
            return KvCache(2, max_seqs, max_len, (1, 8), (1, 4), torch.bfloat16, device)

        def forward(self, input_ids, batch, cache):
            x = input_ids.to(torch.bfloat16)[:, None, None]
            for i, (slot, start, n) in enumerate(zip(batch.slots, batch.start_positions, batch.lengths)):
                lo = batch.offsets[i]
                for layer in range(2):
                    cache.append(layer, slot, start, x[lo:lo + n].expand(n, 1, 8) + layer,
                                 x[lo:lo + n].expand(n, 1, 4) - layer)
            return torch.nn.functional.one_hot(torch.tensor(batch.lengths) % 7, 7).double()

    pool = KvExportPool("cpu")
    engine = Engine(SumLM(), max_seqs=3, max_seq_len=16, kv_export_alloc=pool.export_alloc)
    pool.plan(engine.kv_budget)
    assert pool.capacity == 16 * 48  # one 16-token sequence: 2 layers x (8 + 4) bf16 = 48 B/token
    pool.open()
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "b": [11, 12, 13, 14, 15, 16, 17, 18]}
    for rid, prompt in prompts.items():
        engine.add_request(Request(rid, prompt, SamplingParams(max_tokens=2), context_only=True))
    while engine.has_work():
        engine.step()
    a, b = engine.export_kv("a"), engine.export_kv("b")
    assert pool.holds(a.block) and b.block is None  # b did not fit beside a: memory of its own
    assert pool.counts["exports"] == 1 and pool.counts["exports_elsewhere"] == 1
    for rid, h in (("a", a), ("b", b)):
        want = torch.tensor(prompts[rid], dtype=torch.bfloat16)[:, None, None]
        assert torch.equal(h.tensors["layers.1.k"], (want + 1).expand(-1, 1, 8))
        assert torch.equal(h.tensors["layers.0.v"], want.expand(-1, 1, 4))
    engine.add_request(Request("c", [1, 2], SamplingParams(max_tokens=2), context_only=True))
    engine.step()
    engine.abort("c")  # the engine drops its export: the block comes back when collected
    a.release()
    gc.collect()
    assert pool.stats()["kv_pool_used_bytes"] == 0
    pool.close()
