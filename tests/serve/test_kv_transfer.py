"""The KV hand-over protocol on the CPU: one-time ids, the same-node shm fast path (bytes,
ownership, the entry and its file freed after the copy) and every fallback to HTTP."""
import asyncio
import os

import aiohttp
import pytest
import torch
from aiohttp import web

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff, KvTensorSpec, layout_of, views_of
from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.serve import kv_puller, kv_transfer
from tensorrt_llm_dwdp.serve.kv_puller import KvPuller
from tensorrt_llm_dwdp.serve.kv_transfer import (SHM_DIR, SHM_PREFIX, KvFetchError, KvRoutes, KvStore,
                                                 export_share, remove_stale_shm_files)


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


def test_shm_share_holds_the_bytes_until_released():
    h = _handoff(3).pack()
    share = export_share(h, ["cuda_ipc", "shm"])  # cuda_ipc is not offered for a CPU buffer
    path = share.descriptor["path"]
    assert share.descriptor["kind"] == "shm" and os.path.basename(path) in _kv_files()
    with open(path, "rb") as f:
        assert f.read() == h.flat.numpy().tobytes()
    share.release()
    assert not os.path.exists(path)
    with pytest.raises(kv_transfer.ShareUnavailable, match="cuda_ipc"):
        export_share(h, ["cuda_ipc"])


def test_store_releases_shares_on_take_expiry_and_close():
    now = [0.0]
    store = KvStore(ttl_s=10, clock=lambda: now[0])
    ids = [store.put(_handoff(2, key=i)) for i in range(3)]
    paths = []
    for kv_id in ids:
        share = store.attach_share(kv_id, export_share(store.get(kv_id), ["shm"]))
        paths.append(share.descriptor["path"])
    # A second share of the same entry (a retried request) keeps the first one.
    extra = export_share(store.get(ids[0]), ["shm"])
    assert store.attach_share(ids[0], extra).descriptor["path"] == paths[0]
    assert not os.path.exists(extra.descriptor["path"])
    store.take(ids[0])
    assert not os.path.exists(paths[0])
    now[0] = 100.0
    store.expire()
    assert not any(os.path.exists(p) for p in paths) and len(store) == 0
    late = export_share(_handoff(1), ["shm"])
    assert store.attach_share(ids[1], late) is None and not os.path.exists(late.descriptor["path"])
    kv_id = store.put(_handoff(1))
    path = store.attach_share(kv_id, export_share(store.get(kv_id), ["shm"])).descriptor["path"]
    store.close()
    assert not os.path.exists(path) and store.nbytes == 0


def test_stale_files_of_exited_servers_are_removed():
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = os.path.join(SHM_DIR, f"{SHM_PREFIX}{dead}_feedface")
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


async def _exporter(host=None):
    store = KvStore()
    app = web.Application()
    KvRoutes(store, host=host).add_to(app)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return store, runner, f"http://127.0.0.1:{port}/v1/kv/"


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_fast_path_copies_then_frees_the_entry_and_http_is_the_fallback(caplog):
    async def main():
        store, runner, base = await _exporter()
        puller = KvPuller("cpu")
        try:
            async with aiohttp.ClientSession() as s:
                h = _handoff(6, key=1)
                kv_id = store.put(h)
                got, t = await puller.pull(s, base + kv_id)
                _same(got, h)
                assert (t.path, t.nbytes, t.fallback) == ("shm", h.nbytes, None)
                assert len(store) == 0 and not _kv_files()  # entry and file freed after the copy
                with pytest.raises(KvFetchError, match="404"):  # one-time
                    await puller.pull(s, base + kv_id)

                # The fast path breaks after the share (file gone): logged, then HTTP.
                kv_id = store.put(h)
                real = kv_puller._read_shm
                kv_puller._read_shm = lambda path, n: (os.unlink(path), real(path, n))[1]
                try:
                    got, t = await puller.pull(s, base + kv_id)
                finally:
                    kv_puller._read_shm = real
                _same(got, h)
                assert t.path == "http" and "shm copy failed: FileNotFoundError" in t.fallback
                assert len(store) == 0 and not _kv_files()
                assert any("over HTTP" in r.message for r in caplog.records)

                # HTTP only when asked.
                kv_id = store.put(h)
                got, t = await KvPuller("cpu", fast_path=False).pull(s, base + kv_id)
                _same(got, h)
                assert (t.path, t.fallback) == ("http", None)
        finally:
            puller.close()
            await runner.cleanup()
    _run(main())


def test_another_node_or_no_room_falls_back_to_http(monkeypatch):
    async def main():
        store, runner, base = await _exporter(host="other-node/boot")
        puller = KvPuller("cpu")
        try:
            async with aiohttp.ClientSession() as s:
                h = _handoff(4, key=2)
                got, t = await puller.pull(s, base + store.put(h))
                _same(got, h)
                assert t.path == "http" and "another node" in t.fallback
                monkeypatch.setattr(kv_transfer, "SHM_HEADROOM_BYTES", 1 << 62)
                store2, runner2, base2 = await _exporter()
                try:
                    got, t = await puller.pull(s, base2 + store2.put(h))
                finally:
                    await runner2.cleanup()
                _same(got, h)
                assert t.path == "http" and "bytes free" in t.fallback and not _kv_files()
        finally:
            puller.close()
            await runner.cleanup()
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
            await runner.cleanup()
    _run(main())
    with pytest.raises(ValueError, match="not a shared KV file"):
        kv_puller._read_shm("/etc/passwd", 10)
