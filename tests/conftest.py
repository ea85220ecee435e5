"""Shared pytest setup: GPU tests skip with a reason on machines without CUDA."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    have_gpu = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if have_gpu else 0
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    skip_multi = pytest.mark.skip(reason="needs 2+ CUDA GPUs; run on nvidia-h200-x2")
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(skip_multi)


def pytest_configure(config):
    """One torch thread per process: the CI machine has 2 cores and the multi-rank tests run
    several processes at once, where extra threads only contend (10x slower, measured)."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def gpu_hang_watchdog(request):
    """GPU kernel tests (marked ``gpu`` and ``kernels``: kernels launched in this process) run
    under ``_watchdog.hang_watchdog``: one that runs past ``DWDP_GPU_TEST_WATCHDOG_S`` (240 s,
    compiles included) - a kernel that never finishes, which no exception can interrupt -
    prints every thread's stack to the terminal past pytest's capture and ends the process, so
    a device call's log names the test and its stage stops instead of waiting out its limit.
    (Tests that run ranks or servers in subprocesses bound those with their own timeouts.)"""
    keywords = request.node.keywords
    if "gpu" not in keywords or "kernels" not in keywords or not torch.cuda.is_available():
        yield
        return
    import os

    from _watchdog import hang_watchdog

    with hang_watchdog(float(os.environ.get("DWDP_GPU_TEST_WATCHDOG_S", 240)), request.config):
        yield


@pytest.fixture
def run_ranks_ok():
    """Run a test file as its own worker on ``ranks`` ranks (mpirun where installed, else the TCP
    rendezvous: see tests/_ranks.py) and check every rank printed ``rank r ok``."""
    import sys

    from _ranks import run_ranks

    def run(script: str, ranks: int = 2, timeout: float = 180, env: dict | None = None):
        ok, out = run_ranks([sys.executable, script], ranks, timeout, env)
        assert ok, out[-6000:]
        for r in range(ranks):
            assert f"rank {r} ok" in out, out[-6000:]
        return out

    return run
