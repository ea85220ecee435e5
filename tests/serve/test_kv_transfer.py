"""The KV hand-over protocol on the CPU: one-time ids, the same-node fast path out of the
context server's shm export pool (bytes, ownership, the pool mapped once per server and again
after a restart, blocks freed after the copy) and every fallback to HTTP with its reason."""
import asyncio
import os

import aiohttp
import pytest
import torch
from aiohttp import web

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff, KvTensorSpec, layout_of, views_of
from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.serve import kv_puller
from tensorrt_llm_dwdp.serve.kv_pool import ALIGN, SHM_DIR, SHM_PREFIX, KvExportPool, remove_stale_shm_files
from tensorrt_llm_dwdp.serve.kv_puller import KvPuller
from tensorrt_llm_dwdp.serve.kv_transfer import KvFetchError, KvRoutes, KvStore


def _handoff(tokens=5, key=0):
    """Two layers with distinct dtypes; every byte depends on (tensor, position, key)."""
    g = torch.Generator().manual_seed(key)
    tensors = {"layers.0.k": torch.randn(tokens, 1, 8, generator=g).bfloat16(),
               "layers.0.v": torch.randn(tokens, 1, 3, generator=g),
               "layers.1.k": torch.randint(0, 255, (tokens, 2, 5), generator=g, dtype=torch.uint8),
               "layers.1.v": torch.randn(tokens, 1, 2, generator=g, dtype=torch.float64)}
    return KvHandoff(tuple(range(1, tokens + 1)), 42 + key, tensors)


def _same(a, b):
    assert a.prompt_ids == b.prompt_ids and a.first_token == b.first_token
    assert set(a.tensors) == set(b.tensors)
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k


def _kv_files():
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


def test_packing_keeps_every_tensor_aligned_and_round_trips():
    h = _handoff(7)
    packed = h.pack()
    assert packed.flat.numel() == h.nbytes and [s.dtype for s in packed.layout] == ["F64", "F32", "BF16", "U8"]
    for s in packed.layout:
        assert s.offset % torch.empty((), dtype=packed.tensors[s.name].dtype).element_size() == 0
    _same(packed, h)
    _same(KvHandoff.from_bytes(h.to_bytes()), h)
    _same(KvHandoff.from_flat(h.prompt_ids, h.first_token, packed.flat.clone(), packed.layout), h)
    assert KvHandoff.from_bytes(packed.to_bytes()).tensors.keys() == h.tensors.keys()
    with pytest.raises(ValueError, match="does not fit"):
        views_of(packed.flat[:-1], packed.layout)
    with pytest.raises(ValueError, match="aligned"):
        views_of(packed.flat, (KvTensorSpec("x", "F32", (1,), 2),))
    with pytest.raises(ValueError, match="malformed"):
        KvTensorSpec.from_json({"name": "x", "shape": [1]})
    assert layout_of({}) == ()


def _pooled(pool, h):
    out = h.pack(copy=True, alloc=pool.export_alloc)
    assert pool.holds(out.block)
    return out


def test_store_frees_blocks_on_delete_expiry_close_and_after_a_take():
    now = [0.0]
    pool = KvExportPool("cpu", 1 << 16)
    pool.open()
    store = KvStore(ttl_s=10, clock=lambda: now[0], pool=pool)
    used = lambda: pool.stats()["kv_pool_used_bytes"]  # noqa: E731
    ids = [store.put(_pooled(pool, _handoff(4, key=i))) for i in range(4)]
    assert used() == 4 * ALIGN and pool.stats()["kv_pool_entries"] == 4
    assert store.discard(ids[0]) and not store.discard(ids[0]) and used() == 3 * ALIGN
    taken = store.take(ids[1])             # HTTP: the caller serves it, then releases it
    assert used() == 3 * ALIGN
    taken.release()
    assert used() == 2 * ALIGN
    now[0] = 5.0
    store.get(ids[2])                      # shared at t=5: lives until 15
    now[0] = 12.0
    assert store.expire() == 1 and used() == ALIGN and store.get(ids[2]) is not None
    store.close()
    assert used() == 0 and len(store) == 0 and store.nbytes == 0
    pool.close()
    assert not _kv_files()


async def _exporter(host=None, pool="default", port=None):
    if pool == "default":
        pool = KvExportPool("cpu", 1 << 16, wait_s=0.05)
    store = KvStore(pool=pool)
    app = web.Application()
    KvRoutes(store, host=host).add_to(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return store, runner, f"http://127.0.0.1:{port}/v1/kv/"


async def _stop(store, runner):
    await runner.cleanup()
    store.close()
    if store.pool is not None:
        store.pool.close()


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_fast_path_maps_the_pool_once_and_then_only_copies():
    async def main():
        store, runner, base = await _exporter()
        pool = store.pool
        pool.ensure()
        puller = KvPuller("cpu")
        try:
            async with aiohttp.ClientSession() as s:
                for i in range(4):
                    h = _handoff(6 + i, key=i)
                    # Exported into the pool (as the engine does), or not (it did not fit then).
                    kv_id = store.put(_pooled(pool, h) if i != 2 else h)
                    got, t = await puller.pull(s, base + kv_id)
                    _same(got, h)
                    assert (t.path, t.nbytes, t.fallback, t.reason, t.opened) == ("shm", h.nbytes, None, None, i == 0)
                    assert set(t.phases) == {"share_s", "open_s", "alloc_s", "copy_s", "release_s"}
                    assert len(store) == 0 and pool.stats()["kv_pool_used_bytes"] == 0
                assert puller.opened == 1 and puller.mapped_pools == 1 and pool.counts["adopted"] == 1
                assert len(_kv_files()) == 1  # the pool's one file, nothing per hand-over
                with pytest.raises(KvFetchError, match="404"):  # one-time
                    await puller.pull(s, base + kv_id)
        finally:
            puller.close()
            await _stop(store, runner)
        assert puller.mapped_pools == 0 and not _kv_files()
    _run(main())


def test_a_restarted_context_server_is_mapped_again():
    async def main():
        port = free_port()
        puller = KvPuller("cpu")
        try:
            async with aiohttp.ClientSession() as s:
                incarnations = []
                for life in range(2):
                    store, runner, base = await _exporter(port=port)
                    store.pool.ensure()
                    try:
                        for i in range(2):
                            h = _handoff(3, key=10 * life + i)
                            got, t = await puller.pull(s, base + store.put(_pooled(store.pool, h)))
                            _same(got, h)
                            assert t.path == "shm" and t.opened == (i == 0)
                        incarnations.append(store.pool.incarnation)
                    finally:
                        await _stop(store, runner)  # the server goes; a new one takes its port
                assert incarnations[0] != incarnations[1]
                assert puller.opened == 2 and puller.mapped_pools == 1
                assert puller._transports["shm"].open_allocations == 1  # the old mapping was closed
        finally:
            puller.close()
        assert not _kv_files()
    _run(main())


def test_every_fallback_goes_over_http_with_its_reason(monkeypatch, caplog):
    async def pull(puller, s, base, store, h, reason):
        got, t = await puller.pull(s, base + store.put(h))
        _same(got, h)
        assert (t.path, t.reason) == ("http", reason), t.fallback
        assert len(store) == 0
        return t

    async def main():
        h = _handoff(4, key=3)
        puller = KvPuller("cpu")
        servers = []
        try:
            async with aiohttp.ClientSession() as s:
                store, runner, base = await _exporter(host="other-node/boot")
                servers.append((store, runner))
                t = await pull(puller, s, base, store, h, "other_node")
                assert "another node" in t.fallback

                store, runner, base = await _exporter(pool=None)  # kv_transfer_pool_bytes: 0
                servers.append((store, runner))
                await pull(puller, s, base, store, h, "no_pool")

                store, runner, base = await _exporter(pool=KvExportPool("cpu", 1 << 60))
                servers.append((store, runner))
                t = await pull(puller, s, base, store, h, "no_pool")  # could not be made
                assert "bytes free" in t.fallback

                store, runner, base = await _exporter()
                servers.append((store, runner))
                pool = store.pool
                pool.ensure()
                await pull(puller, s, base, store, _handoff(2000), "too_large")
                assert pool.counts["too_large"] == 1  # the pool's own gauge sees it too
                held = pool.try_allocate(pool.capacity)
                t = await pull(puller, s, base, store, h, "pool_full")  # waited, then HTTP
                assert "no room" in t.fallback and pool.counts["full"] == 1
                held.release()
                gpu_only = KvPuller("cpu")
                gpu_only.kinds = ["cuda_ipc"]
                try:
                    await pull(gpu_only, s, base, store, _pooled(pool, h), "kind")
                finally:
                    gpu_only.close()

                # The copy itself fails: HTTP, and the mapping is dropped (opened again next time).
                real = kv_puller.ctypes.memmove
                monkeypatch.setattr(kv_puller.ctypes, "memmove", lambda *a: (_ for _ in ()).throw(OSError("EIO")))
                t = await pull(puller, s, base, store, _pooled(pool, h), "copy_error")
                assert "OSError: EIO" in t.fallback and puller.mapped_pools == 0
                monkeypatch.setattr(kv_puller.ctypes, "memmove", real)
                got, t = await puller.pull(s, base + store.put(_pooled(pool, h)))
                assert t.path == "shm" and t.opened

                # The pool's file is gone before a new generation server maps it.
                os.unlink(pool.describe(pool.try_allocate(1))["path"])
                fresh = KvPuller("cpu")
                try:
                    t = await pull(fresh, s, base, store, _pooled(pool, h), "map_error")
                    assert "is gone" in t.fallback
                finally:
                    fresh.close()
                assert any("over HTTP (pool_full)" in r.message for r in caplog.records)

                # HTTP only when asked: no reason, nothing counted as a fallback.
                got, t = await KvPuller("cpu", fast_path=False).pull(s, base + store.put(h))
                _same(got, h)
                assert (t.path, t.fallback, t.reason) == ("http", None, None)
        finally:
            puller.close()
            for store, runner in servers:
                await _stop(store, runner)
        assert not _kv_files()
    _run(main())


def test_bytes_copied_from_an_entry_freed_meanwhile_are_not_used(monkeypatch):
    async def main():
        now = [0.0]
        pool = KvExportPool("cpu", 1 << 16)
        pool.open()
        store = KvStore(ttl_s=10, clock=lambda: now[0], pool=pool)
        app = web.Application()
        KvRoutes(store).add_to(app)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        puller = KvPuller("cpu")
        real = puller._copy

        def slow_copy(desc, owner):  # the entry outlives its TTL while being copied
            out = real(desc, owner)
            now[0] += 60
            return out
        monkeypatch.setattr(puller, "_copy", slow_copy)
        try:
            async with aiohttp.ClientSession() as s:
                kv_id = store.put(_pooled(pool, _handoff(3)))
                with pytest.raises(KvFetchError, match="freed before the copy ended"):
                    await puller.pull(s, f"http://127.0.0.1:{port}/v1/kv/{kv_id}")
                assert len(store) == 0 and pool.stats()["kv_pool_used_bytes"] == 0
        finally:
            puller.close()
            await runner.cleanup()
            store.close()
            pool.close()
    _run(main())


def test_bad_share_requests_and_forged_paths_are_refused():
    async def main():
        store, runner, base = await _exporter()
        try:
            async with aiohttp.ClientSession() as s:
                kv_id = store.put(_handoff(2))
                async with s.post(base + kv_id + "/share", json={"host": 1}) as r:
                    assert r.status == 400 and (await r.json())["error"]["param"] == "kinds"
                async with s.post(base + "nope/share", json={"host": "h", "kinds": []}) as r:
                    assert r.status == 404
        finally:
            await _stop(store, runner)
    _run(main())
    with pytest.raises(ValueError, match="not a shared KV file"):
        kv_puller._record("shm", {"path": "/etc/passwd", "bytes": 10})
    with pytest.raises(ValueError, match="not a shared KV file"):
        kv_puller._record("shm", {"path": f"{SHM_DIR}/../etc/{SHM_PREFIX}x", "bytes": 10})
    assert kv_puller._refusal('{"error": {"code": "kv_share_pool_full"}}') == "pool_full"
    assert kv_puller._refusal('{"error": {"code": "kv_share_nonsense"}}') == "share_error"
    assert kv_puller._refusal("<html>") == "share_error"


def test_stale_files_of_exited_servers_are_removed():
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = os.path.join(SHM_DIR, f"{SHM_PREFIX}{dead}_pool_feedface")
    mine = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}_cafe")
    for p in (stale, mine):
        open(p, "wb").close()
    try:
        assert remove_stale_shm_files() >= 1
        assert not os.path.exists(stale) and os.path.exists(mine)
    finally:
        for p in (stale, mine):
            if os.path.exists(p):
                os.unlink(p)
