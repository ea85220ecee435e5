"""Host tiers on GPUs (one GPU is enough: the ranks share it over CUDA IPC).

- the host store pinned with cudaHostRegister feeds the copy engine H2D (per-copy
  cudaMemcpyAsync and the batched cudaMemcpyBatchAsync), byte for byte; managed memory
  (host_offload: uvm) holds the store's bytes and a kernel reads them in place;
- the multi-rank cases of tests/multirank/test_tiers_multirank.py with CUDA IPC (the multi
  view, pinned: the composite view's failover is tested on CPU): a rank
  SIGKILLed during prefetch and during compute (the survivors' retried step is exact), a
  restarted rank rejoining, a corrupt store detected;
- the main job on the GPU: the issue's failover command, and offload (prefetch at 25% in the
  composite view on DeepSeek-V3-Lite shapes, UVM read-through at 75% of each rank's own experts
  in the multi view) bitwise equal to one rank holding all experts.
"""
import json
import os
import secrets
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "multirank"))

from test_tiers_multirank import corrupt_case, failover_case, group_factory, rejoin_case  # noqa: E402,F401

pytestmark = pytest.mark.gpu


def test_host_store_h2d_copies_and_managed_read_through():
    import cuda.bindings  # noqa: F401  (on a GPU machine a missing cuda-python fails)
    from tensorrt_llm_dwdp.dwdp.control import unlink_group
    from tensorrt_llm_dwdp.dwdp.copy_engine import CudaCopyEngine
    from tensorrt_llm_dwdp.dwdp.copy_plan import interleaved_plan, per_peer_plan
    from tensorrt_llm_dwdp.dwdp.host_store import HostStore, StoreLayout
    from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder
    from tensorrt_llm_dwdp.dwdp.uvm import ManagedExperts

    device = torch.device("cuda", 0)
    key = "gputest" + secrets.token_hex(4)
    eb = {"w": 3 << 20, "s": 12345}  # a 3 MiB and an odd-sized tensor per expert
    e = 8
    store = HostStore.create(key, StoreLayout.of(e, [eb]))
    managed = None
    try:
        g = torch.Generator().manual_seed(0)
        want = {n: torch.randint(0, 256, (e, b), dtype=torch.uint8, generator=g) for n, b in eb.items()}
        store.write(0, 0, want)
        store.register_cuda()
        stats = StatsRecorder([0])
        for batched in (False, True):
            dst = {n: torch.full((e, b), 0xA5, dtype=torch.uint8, device=device) for n, b in eb.items()}
            copies = [[(dst[n].data_ptr() + 2 * b, store.address(0, n, 2), 5 * b)] for n, b in eb.items()]
            plan = interleaved_plan(copies, 1 << 20) if batched else per_peer_plan(copies)
            engine = CudaCopyEngine(device, stats, batched)
            engine.submit(0, plan, 0)
            engine.wait(0, 0)
            torch.cuda.synchronize(device)
            for n in eb:
                got = dst[n].cpu()
                assert torch.equal(got[2:7], want[n][2:7]), (batched, n)
                assert bool((got[:2] == 0xA5).all()) and bool((got[7:] == 0xA5).all()), (batched, n)
            engine.close()
        own = [{n: torch.empty((e, b), dtype=torch.uint8, device=device) for n, b in eb.items()}]
        managed = ManagedExperts(device, store, own, host_experts=3, first=4)
        for n in eb:
            t = managed.tensors[0][n]
            assert t.is_cuda and tuple(t.shape) == (3, eb[n])
            assert torch.equal(t.cpu(), want[n][4:7])
            assert int(t.to(torch.int64).sum()) == int(want[n][4:7].to(torch.int64).sum())
        # UVM with migration: the GPU becomes the preferred location and the pages go there
        from cuda.bindings import runtime as rt

        managed.prefer_device()
        assert managed.placement == "device"
        for n in eb:
            t = managed.tensors[0][n]
            for attr in (rt.cudaMemRangeAttribute.cudaMemRangeAttributePreferredLocation,
                         rt.cudaMemRangeAttribute.cudaMemRangeAttributeLastPrefetchLocation):
                err, where = rt.cudaMemRangeGetAttribute(4, attr, t.data_ptr(), t.nbytes)
                assert err == rt.cudaError_t.cudaSuccess and where == device.index, (n, attr, where)
            assert torch.equal(t.cpu(), want[n][4:7])  # the same bytes, now in device memory
    finally:
        if managed is not None:
            managed.close()
        store.close()
        unlink_group(key)


@pytest.mark.parametrize("kill_at", ["prefetch", "compute"])
def test_failover_cuda_ipc(group_factory, kill_at):  # noqa: F811
    failover_case(group_factory, kill_at, "--device", "cuda", "--view", "multi")


def test_rejoin_cuda_ipc(group_factory):  # noqa: F811
    rejoin_case(group_factory, "--device", "cuda", "--view", "multi")


def test_corrupt_store_cuda_ipc(group_factory):  # noqa: F811
    corrupt_case(group_factory, "--device", "cuda", "--view", "multi")


def _run(tmp_path, *extra):
    cmd = [sys.executable, "-m", "tensorrt_llm_dwdp", "run", "--device", "cuda", "--max-tokens", "4",
           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-5000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout, text[-5000:]
    return proc, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_main_job_failover_cuda(tmp_path):
    proc, summary = _run(tmp_path, "--ranks", "3", "--experts-per-worker", "6",
                         "--prefetch-experts", "5", "--host-backup", "--fail-rank", "1",
                         "--fail-at-step", "2")
    assert summary["killed"] == [1]
    for r in (0, 2):
        assert f"DWDP rank {r}: failover: peer 1 is down" in proc.stdout


# The composite case needs experts larger than the tiny preset's: with 2 MiB pages a tiny
# model's whole [E, ...] tensor fits the own allocation's pages (every expert an edge, copied
# once at the exchange: no prefetch to test). DeepSeek-V3-Lite shapes, one MoE layer:
# 32 own experts of 4.9 MB, 8 of them (25%) from the host store.
LITE = ("--preset", "deepseek-v3-lite", "--num-layers", "2", "--dense-layers", "1",
        "--vocab-size", "1024")


@pytest.mark.parametrize("mode, host_experts, view, model", [
    ("prefetch", 8, "composite", LITE), ("uvm", 6, "multi", ())])
def test_main_job_offload_cuda(tmp_path, mode, host_experts, view, model):
    _, summary = _run(tmp_path, "--ranks", "2", "--host-experts-per-worker", str(host_experts),
                      "--host-offload", mode, "--expert-view", view, *model)
    assert summary["dwdp_config"]["host_offload"] == mode
    assert summary["dwdp_config"]["expert_view"] == view
    for r in summary["ranks"]:
        assert r["host_prefetch_bytes"] > 0  # the peer's host experts are prefetched in both modes
