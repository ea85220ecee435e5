"""KV hand-over out of a CUDA IPC export pool between two processes (one GPU shared, or two
GPUs): the fast path is taken and every byte arrives; the pool is mapped once per exporter and
again after the exporter restarts; a handle that cannot be opened falls back naming the call
and leaves nothing mapped (the HTTP side of the fallbacks is tested on the CPU)."""
import asyncio
import base64
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


def _devices():
    n = torch.cuda.device_count()
    return ("cuda:0", "cuda:1") if n >= 2 else ("cuda:0", "cuda:0")


def test_ipc_handover_between_processes(tmp_path):
    from bench import kv_handover

    export, pull = _devices()
    out = tmp_path / "kv.json"
    assert kv_handover.main(["--device", pull, "--export-device", export, "--tokens", "1", "1000", "4096",
                             "--layers", "3", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for s in result["sizes"]:
        assert s["fast"]["path"] == ["cuda_ipc"], s
        assert s["fast"]["fallback"] is None and s["fast"]["verified"] and s["http"]["verified"]
        phases = s["fast"]["phases_s"]
        assert phases["open_first"] is not None and phases["open_cached"] < phases["open_first"], phases
        assert all(phases[p] is not None for p in ("share", "alloc", "copy", "release")), phases
    assert "IPC-mapped pool" in result["sizes"][0]["raw"]["what"]


def test_cuda_pool_exports_on_the_device_and_adopts_host_entries():
    from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
    from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool, align_up

    pool = KvExportPool("cuda:0", 1 << 20)
    pool.open()
    try:
        assert pool.kind == "cuda_ipc"
        h = KvHandoff((1, 2), 3, {"layers.0.k": torch.arange(2 * 512, dtype=torch.int16).view(torch.bfloat16)
                                  .view(2, 1, 512).cuda()})
        on_gpu = h.pack(copy=True, alloc=pool.export_alloc)
        assert pool.holds(on_gpu.block) and on_gpu.flat.is_cuda
        d = pool.describe(on_gpu.block)
        assert d["offset"] == 0 and len(base64.b64decode(d["ipc"]["handle"])) == 64
        moved = pool.adopt(KvHandoff(h.prompt_ids, h.first_token, {k: v.cpu() for k, v in h.tensors.items()}))
        assert pool.describe(moved.block)["offset"] == align_up(on_gpu.nbytes)
        assert torch.equal(moved.tensors["layers.0.k"].view(torch.int16), h.tensors["layers.0.k"].view(torch.int16))
        on_gpu.release()
        moved.release()
        assert pool.stats()["kv_pool_used_bytes"] == 0
    finally:
        pool.close()


def test_a_restarted_exporter_is_mapped_again_over_ipc():
    import aiohttp

    from bench import kv_handover
    from tensorrt_llm_dwdp.launcher import free_port
    from tensorrt_llm_dwdp.serve.kv_puller import KvPuller
    from tensorrt_llm_dwdp.serve.launch import wait_for_health_async

    export, pull = _devices()
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def exporter():
        return subprocess.Popen([sys.executable, os.path.abspath(kv_handover.__file__), "--exporter", "--port",
                                 str(port), "--export-device", export, "--pool-bytes", str(16 << 20)])

    async def main(puller):
        async with aiohttp.ClientSession() as s:
            for life in range(2):
                proc = exporter()
                try:
                    await wait_for_health_async([base], timeout_s=120)
                    for i in range(2):
                        r = await kv_handover.pull_once(s, puller, base, 512, 2, 10 * life + i, torch.device(pull))
                        assert r["path"] == "cuda_ipc" and r["ok"] and r["opened"] == (i == 0), r
                finally:
                    proc.terminate()
                    proc.wait(30)
        assert puller.opened == 2 and puller.mapped_pools == 1
        assert puller._transports["cuda_ipc"].open_allocations == 1  # the first pool was unmapped

    puller = KvPuller(pull)
    try:
        asyncio.run(asyncio.wait_for(main(puller), 300))
    finally:
        puller.close()
    assert puller._transports == {}


def test_unopenable_handle_falls_back_and_maps_nothing():
    from tensorrt_llm_dwdp.serve.kv_puller import KvPuller, _Fallback

    puller = KvPuller("cuda:0")
    try:
        pool = {"id": "cuda_ipc:cuda:0", "incarnation": "1-x", "bytes": 4096, "offset": 0,
                "ipc": {"allocation": "0:0x1000", "handle": base64.b64encode(bytes(64)).decode(),
                        "allocation_bytes": 4096, "offset": 0, "device": 0}}
        desc = {"kind": "cuda_ipc", "nbytes": 1024, "pool": pool, "metadata": {"format": "2", "prompt_ids": "AQAAAA==",
                                                                             "first_token": "2"},
                "layout": [{"name": "x", "dtype": "U8", "shape": [1024], "offset": 0}]}
        with pytest.raises(_Fallback, match="cudaIpcOpenMemHandle") as err:
            puller._copy(desc, "http://127.0.0.1:1")
        assert err.value.reason == "map_error"
        assert puller.mapped_pools == 0 and puller._transports["cuda_ipc"].open_allocations == 0
        with pytest.raises(_Fallback, match="exceeds its allocation"):
            puller._copy({**desc, "pool": {**pool, "ipc": {**pool["ipc"], "offset": 4000}}}, "http://127.0.0.1:1")
        with pytest.raises(ValueError, match="outside the export pool"):
            puller._copy({**desc, "nbytes": 8192}, "http://127.0.0.1:1")
    finally:
        puller.close()
