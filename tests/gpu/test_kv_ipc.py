"""KV hand-over over CUDA IPC between two processes (one GPU shared, or two GPUs): the fast path
is taken and every byte arrives; a handle that cannot be opened raises naming the call and
leaves nothing mapped (the server then falls back to HTTP, tested on the CPU)."""
import base64
import json

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
                             "--layers", "3", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for s in result["sizes"]:
        assert s["fast"]["path"] == ["cuda_ipc"], s
        assert s["fast"]["fallback"] is None and s["fast"]["verified"] and s["http"]["verified"]
    assert "cudaMemcpyAsync" in result["sizes"][0]["raw"]["what"]


def test_unopenable_handle_raises_and_maps_nothing():
    from tensorrt_llm_dwdp.serve.kv_puller import KvPuller

    puller = KvPuller("cuda:0")
    try:
        ipc = {"allocation": "0:0x1000", "handle": base64.b64encode(bytes(64)).decode(),
               "allocation_bytes": 4096, "offset": 0, "device": 0}
        with pytest.raises(RuntimeError, match="cudaIpcOpenMemHandle"):
            puller._copy_ipc(ipc, 1024, "http://127.0.0.1:1/v1/kv/x")
        assert puller._transport.open_allocations == 0
        with pytest.raises(ValueError, match="exceeds its allocation"):
            puller._copy_ipc({**ipc, "offset": 4000}, 1024, "http://127.0.0.1:1/v1/kv/x")
    finally:
        puller.close()
