"""Composite expert views on a GPU: CUDA VMM through cuda.bindings, POSIX-fd handles between
processes, the CuTeDSL and torch-grouped kernels over the composite view.

Runs on one GPU (two ranks share it: every CUDA call here works between processes of one
device) or more. In order of depth:
  1. VMM primitives: two allocations mapped into one range with one cuMemSetAccess, an
     allocation mapped twice (a write through one mapping reads back through the other), an
     allocation exported as a POSIX fd and imported through the unix-socket handoff, whole-
     allocation mappings enforced, and torch tensors over raw ranges at the right address.
  2. Two DWDP ranks (processes) with composite views on 2 MiB pages: per-expert sizes on and
     around 2 MiB, poisoned pools, several steps of an odd layer count, per-peer and batched
     (contention_opt) copies: every composite equals experts [0, E) byte for byte; a lost
     descriptor server fails both ranks.
  3. The main job on the DeepSeek-V3-Lite shapes (1 dense + 1 MoE layer: 64 experts of 4.9 MB,
     so each 2 MiB-page range has real pool pages; one MoE layer alternates between the two
     buffers step by step) with --expert-view composite: the torch-grouped backend, then the
     cutedsl kernels, each bitwise equal to one rank holding all experts (same kernels), and
     the cutedsl composite run bitwise equal to a multi-view run. torch-grouped runs first: it
     compiles nothing, while each cutedsl job JIT-compiles its kernels in every process.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RANK_SCRIPT = os.path.join(ROOT, "tests", "multirank", "dwdp_rank.py")
MIB2 = 2 << 20

pytestmark = pytest.mark.gpu


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


def test_vmm_primitives_on_one_device():
    import cuda.bindings  # noqa: F401  (on a GPU machine a missing cuda-python fails)
    from tensorrt_llm_dwdp.dwdp.vmm import GpuVmm, VmmError
    from tensorrt_llm_dwdp.transport.fd_passing import FdServer, receive_fds

    from tensorrt_llm_dwdp.model.memory import in_use

    vmm = GpuVmm("cuda")
    page = vmm.granularity
    assert page % vmm.minimum_granularity == 0 and page & (page - 1) == 0
    before = in_use("cuda").nbytes
    a, b = vmm.create(page), vmm.create(2 * page, shareable=False)
    assert in_use("cuda").nbytes - before == 3 * page  # VMM memory counts as held (the allocator misses it)
    base = vmm.reserve(3 * page)
    try:
        vmm.map(base, a, 0, page)
        vmm.map(base + page, b, 0, 2 * page)
        vmm.set_access(base, 3 * page)  # one call over two allocations
        whole = vmm.tensor(base, 3 * page)
        assert whole.data_ptr() == base and whole.device.type == "cuda"
        whole.copy_(torch.arange(3 * page, device=whole.device, dtype=torch.int64).to(torch.uint8))
        # a mapped a second time elsewhere: the same bytes, no copy
        again = vmm.resident(a)
        assert torch.equal(again, whole[:page])
        again[:4] = torch.tensor([9, 8, 7, 6], dtype=torch.uint8, device=again.device)
        torch.cuda.synchronize()
        assert whole[:4].tolist() == [9, 8, 7, 6]
        # exported as a POSIX fd, passed over the socket, imported and mapped: same bytes
        server = FdServer()
        fd = vmm.export_fd(a)
        server.add("a", fd)
        os.close(fd)
        (got,) = receive_fds(server.address, ["a"])
        server.close()
        held = in_use("cuda").nbytes
        imported = vmm.import_fd(got, page)
        addr, keep = vmm.map_peer(imported)
        assert in_use("cuda").nbytes == held  # an imported (peer's) allocation is not ours
        seen = vmm.tensor(addr, page)
        assert torch.equal(seen, whole[:page])
        del seen
        vmm.unmap_peer(addr, page, keep)
        with pytest.raises(VmmError, match="whole allocations"):
            vmm.map(base, a, 0, page // 2)
        del whole, again
        torch.cuda.synchronize()
    finally:
        vmm.unmap(base, page)
        vmm.unmap(base + page, 2 * page)
        vmm.free(base, 3 * page)
        vmm.release(a)
        vmm.release(b)
    assert in_use("cuda").nbytes == before


def _launch_ranks(args: list, ranks: int = 2, timeout: int = 240) -> tuple[bool, str]:
    """``ranks`` processes of dwdp_rank.py under mpirun, else meeting over the TCP rendezvous."""
    from _ranks import run_ranks

    return run_ranks([sys.executable, RANK_SCRIPT, "--size", str(ranks), *args], ranks, timeout)


def test_two_processes_composite_views_on_2mib_pages():
    import cuda.bindings  # noqa: F401  (on a GPU machine a missing cuda-python fails)
    ok, out = _launch_ranks(["--device", "cuda", "--view", "composite", "--tensors", "pages",
                               "--page-size", str(MIB2), "--slice-bytes", str(MIB2),
                               "--w", "5", "--p", "3", "--steps", "3", "--timeout", "60",
                               "--scenarios", "ok,contention,fdfail"])
    assert ok, out[-4000:]
    for scenario in ("ok", "contention"):
        for rank in range(2):
            assert re.search(rf"^SCENARIO {scenario} rank={rank} OK", out, re.M), out[-4000:]
    for rank in range(2):
        m = re.search(rf"^SCENARIO fdfail rank={rank} FAILED .*$", out, re.M)
        assert m and "FdPassingError" in m.group(0), out[-4000:]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic checkpoint for the module's main jobs (built by the first)."""
    return tmp_path_factory.mktemp("cache")


def _main_job(tmp_path, cache, name: str, *extra: str) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "tensorrt_llm_dwdp", "run", "--device", "cuda",
           "--preset", "deepseek-v3-lite", "--num-layers", "2", "--dense-layers", "1",
           "--vocab-size", "1024", "--max-tokens", "4", "--cache-dir", str(cache),
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity vs one rank holding all experts: PASS" in proc.stdout, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    summary["out"] = out
    return summary


def _logits(out) -> list:
    return [torch.load(os.path.join(out, f"rank{r}.pt"))["logits"] for r in range(2)]


def test_main_job_torch_grouped_composite_bitwise_vs_one_rank(tmp_path, cache):
    summary = _main_job(tmp_path, cache, "grouped", "--moe-backend", "torch-grouped",
                        "--expert-view", "composite")
    assert summary["parity"]["logits_bitwise_equal"]
    assert all(r["prefetch_bytes"] > 0 for r in summary["ranks"])  # pool pages were filled


def test_main_job_cutedsl_composite_bitwise_vs_one_rank_and_multi_view(tmp_path, cache):
    import cutlass  # noqa: F401  (on a GPU machine a missing nvidia-cutlass-dsl fails)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the cutedsl kernels need sm90+")
    composite = _main_job(tmp_path, cache, "composite", "--moe-backend", "cutedsl",
                          "--expert-view", "composite")
    assert composite["dwdp_config"]["expert_view"] == "composite"
    multi = _main_job(tmp_path, cache, "multi", "--moe-backend", "cutedsl",
                      "--expert-view", "multi")
    ranks_a, ranks_b = _logits(composite["out"]), _logits(multi["out"])
    assert len(ranks_a) == len(ranks_b) == 2
    for r, (a_steps, b_steps) in enumerate(zip(ranks_a, ranks_b)):
        assert len(a_steps) == len(b_steps) > 0, (r, len(a_steps), len(b_steps))
        for step, (a, b) in enumerate(zip(a_steps, b_steps)):
            assert len(a) == len(b) > 0, (r, step, len(a), len(b))
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (r, step)
