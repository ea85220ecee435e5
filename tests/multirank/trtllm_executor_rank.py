"""One rank of the fake TensorRT-LLM executor with our DWDP manager, switched on the way a user
switches it on (``TRTLLM_DWDP_ADAPTER=1`` and the start-up ``.pth``, whose folder the test
passes in ``TRTLLM_DWDP_TEST_SITE``; ``site.addsitedir`` reads it as interpreter start-up reads
site-packages).

World ranks below ``dwdp_size`` form the DWDP group and run upstream's sequence (contract.py):
keyword construction, model construction reading the manager's layout, ``setup``, warm-up
forwards before any ``prefetch_first_layers()``, then the executor loop over steps that skip
MoE layers, a step that raises in the middle, and ``__exit__`` at shutdown. Each DWDP rank also
runs the same requests on a model that holds all experts (no DWDP): every step's logits must be
bitwise equal, and the failing step must fail the same way. Ranks at or above ``dwdp_size``
(a 4-rank world) stand for generation ranks of a disaggregated launch: no DWDP, their own
collective among themselves. ``TRTLLM_DWDP_TEST_DEVICE=cuda`` runs the models and our manager on
the GPU (rank r on device r % device_count; two ranks may share one GPU).
"""
import os
import site
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "trtllm_fake"))
site.addsitedir(os.environ["TRTLLM_DWDP_TEST_SITE"])

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from tensorrt_llm._torch.models.modeling_toy_moe import (ToyMoeConfig, ToyMoeForCausalLM,  # noqa: E402
                                                         toy_checkpoint)
from tensorrt_llm._torch.pyexecutor import dwdp  # noqa: E402
from tensorrt_llm._torch.pyexecutor.model_engine import ScheduledBatch  # noqa: E402
from tensorrt_llm._torch.pyexecutor.py_executor_creator import create_py_executor  # noqa: E402
from tensorrt_llm.llmapi.llm_args import DwdpConfig, TorchLlmArgs  # noqa: E402

S, W, P = 2, 4, 2          # E = W + (S-1)*P = 6: overlapping (redundant) slices
CONFIG = ToyMoeConfig(num_experts=6)
DEVICE = torch.device(os.environ.get("TRTLLM_DWDP_TEST_DEVICE", "cpu"))


def _batches(rank: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = lambda n: torch.randint(0, CONFIG.vocab_size, (n,), generator=g).to(DEVICE)  # noqa: E731
    warmup = [ScheduledBatch(ids(4)), ScheduledBatch(ids(3), frozenset({1}))]
    steps = [
        ScheduledBatch(ids(7 + rank)),                       # every layer
        ScheduledBatch(ids(5), frozenset({2})),              # MoE layer 2 left out
        ScheduledBatch(ids(CONFIG.max_positions + 3)),       # raises after MoE layers 1, 2
        ScheduledBatch(ids(6)),                              # the next step must run
        ScheduledBatch(ids(4), frozenset({4, 5})),           # the last two MoE layers left out
        ScheduledBatch(ids(9)),
    ]
    return warmup, steps


def _same(ours, ref, what: str) -> None:
    if isinstance(ref, Exception):
        assert type(ours) is type(ref), (what, ours, ref)
    else:
        assert isinstance(ours, torch.Tensor), (what, ours)
        assert torch.equal(ours, ref), (what, (ours - ref).abs().max())


def main() -> None:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    if DEVICE.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    checkpoint = toy_checkpoint(CONFIG, seed=7)
    build = lambda mapping: ToyMoeForCausalLM(CONFIG, mapping).to(DEVICE)  # noqa: E731
    warmup, steps = _batches(rank)

    reference = create_py_executor(TorchLlmArgs(), build, checkpoint)
    expected = reference._executor_loop(steps)

    if rank >= S:
        others = world.Split(color=1, key=rank)
        total = others.allreduce(rank)
        assert total == sum(range(S, world.Get_size())), total
        others.Free()
        print(f"rank {rank} ok", flush=True)
        return

    world.Split(color=0, key=rank).Free()
    llm_args = TorchLlmArgs(dwdp_config=DwdpConfig(dwdp_size=S, num_groups=1,
                                                   num_experts_per_worker=W,
                                                   num_prefetch_experts=P))
    executor = create_py_executor(llm_args, build, checkpoint, warmup)
    manager = executor.dwdp_manager
    assert type(manager).__name__ == "TrtllmDwdpManager", type(manager)
    assert dwdp.get_global_dwdp_manager() is manager
    assert (manager.start_expert_id, manager.dwdp_rank) == (P * rank, rank)
    assert manager.steps.counts.cold_binds == 1, manager.steps.counts   # warm-up, no prefetch
    results = executor._executor_loop(steps)
    for i, (ours, ref) in enumerate(zip(results, expected)):
        _same(ours, ref, f"step {i}")
    assert isinstance(results[2], ValueError)
    # warm-up: one cold step, then layer 1 skipped; the loop: 6 steps, layer 2 skipped once,
    # the failing step and the one without the last two layers abandoned by the next step
    counts = manager.steps.counts
    assert (counts.steps, counts.cold_binds, counts.skipped, counts.aborted) == (7, 1, 2, 2), counts
    bridge_manager = manager.manager
    assert bridge_manager.device.type == DEVICE.type
    executor.shutdown()
    assert dwdp.get_global_dwdp_manager() is None and manager.manager is None
    assert bridge_manager._closed
    manager.cleanup()                                           # idempotent, as upstream's
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    main()
