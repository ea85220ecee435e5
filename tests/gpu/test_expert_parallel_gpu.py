"""Expert parallelism on GPUs: the CuTeDSL backend with empty (-1) slots, and the multi-rank EP
worker of tests/multirank on one GPU shared by two ranks (CUDA IPC exchange: NCCL refuses two
ranks on one device) and, with two GPUs, over NCCL and CUDA IPC, which must agree bit for bit.
The ranks run under mpirun where installed, else over the TCP rendezvous; on a GPU machine a
missing or broken CUTLASS DSL or cuda-python fails these tests (they skip only without CUDA)."""
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(ROOT, "tests", "multirank", "test_expert_parallel_ranks.py")


@pytest.mark.gpu
@pytest.mark.kernels
def test_cutedsl_empty_slots_match_the_reference():
    from tensorrt_llm_dwdp.kernels.testing import (preshuffled_experts, random_nvfp4_experts,
                                                   random_tokens, skewed_routing)
    from tensorrt_llm_dwdp.moe.backends import get_backend

    backend = get_backend("cutedsl")
    weights = preshuffled_experts(random_nvfp4_experts(16, 2048, 768, seed=3))
    x = random_tokens(300, 2048, seed=4)
    ids, w = skewed_routing(300, 16, 4, seed=5)
    empty = torch.rand(300, 4, generator=torch.Generator().manual_seed(6)).cuda() < 0.5
    empty[7] = True
    ids = torch.where(empty, torch.full_like(ids, -1), ids)
    got = backend.run_experts(x, ids, w, weights).float()
    ref = get_backend("torch").run_experts(x, ids, w, weights).float()
    assert (got[7] == 0).all()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


def _launch(ranks: int, worker: str, env: dict) -> str:
    """Run a tests/multirank worker on ``ranks`` ranks and check each printed ``rank r ok``."""
    from _ranks import run_ranks

    ok, out = run_ranks([sys.executable, worker], ranks, timeout=600, env=env)
    assert ok, out[-6000:]
    for r in range(ranks):
        assert f"rank {r} ok" in out, out[-6000:]
    return out


def _needs_cuda_python() -> None:
    import cuda.bindings  # noqa: F401  (CUDA IPC; pip install cuda-python: fail, never skip)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "cutedsl"])
def test_two_ranks_on_gpus_match_the_reference(backend):
    from tensorrt_llm_dwdp.launcher import free_port

    _needs_cuda_python()
    if backend == "cutedsl":
        from tensorrt_llm_dwdp.moe.backends import get_backend

        get_backend("cutedsl")  # a missing or broken CUTLASS DSL fails here, named
    transports = "cuda_ipc,nccl" if torch.cuda.device_count() >= 2 else "cuda_ipc"
    sizes = "2048,768" if backend == "cutedsl" else "64,32"
    out = _launch(2, WORKER, {"EP_TEST_TRANSPORTS": transports, "EP_TEST_BACKEND": backend,
                              "EP_TEST_SIZES": sizes, "EP_TEST_DEVICE": "cuda",
                              "EP_TEST_PORTS": ",".join(str(free_port())
                                                        for _ in transports.split(","))})
    for r in range(2):
        assert f"rank {r} ok {transports}" in out, out[-6000:]


@pytest.mark.gpu
def test_ep_serving_mode_on_gpus_matches_replicated(tmp_path):
    """tests/multirank/test_ep_serving.py's worker on CUDA: two ranks sharing one GPU (CUDA IPC
    exchange) or, with two GPUs, one each (NCCL)."""
    from tensorrt_llm_dwdp.launcher import free_port
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    _needs_cuda_python()
    write_synthetic_checkpoint(tmp_path, get_preset("tiny-deepseek-v3", num_layers=3), quant="nvfp4", seed=4)
    worker = os.path.join(ROOT, "tests", "multirank", "test_ep_serving.py")
    transport = "nccl" if torch.cuda.device_count() >= 2 else "cuda_ipc"
    _launch(2, worker, {"EP_CKPT": str(tmp_path), "EP_TRANSPORT": transport,
                        "EP_PORT": str(free_port()), "EP_DEVICE": "cuda"})
