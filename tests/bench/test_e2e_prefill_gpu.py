"""bench/e2e_prefill.py on 2 GPUs at the tiny scale: NCCL all-to-all, CUDA IPC prefetch,
the torch reference backend on the GPU and the per-layer timeline (CUDA events on both streams) all run, and DWDP's
logits are bitwise the replicated ones."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.multigpu
@pytest.mark.multirank
def test_e2e_prefill_tiny_two_gpus(tmp_path):
    out = tmp_path / "e2e"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "e2e_prefill.py"), "--ranks", "2",
           "--out", str(out), "--preset", "tiny-deepseek-v3", "--device", "cuda",
           "--num-moe-layers", "4", "--tokens", "64,256", "--seq-len", "64", "--vocab-size", "512",
           "--moe-backend", "torch", "--timeline-tokens", "256", "--time-budget-s", "600"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((out / "results.json").read_text())
    assert r["agreement"]["dwdp_equals_replicated"] is True
    assert r["agreement"]["ep_rel_err"] < 3e-2
    assert not r["skipped"]
    tl = r["timeline"]
    assert tl is not None and len(tl["copy"]) == 4 and len(tl["compute"]) == 8
    assert all(c["end"] >= c["start"] >= 0 for c in tl["copy"] + tl["compute"])
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
