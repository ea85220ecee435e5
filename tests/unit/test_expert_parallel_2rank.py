"""ExpertParallelBackend on 2 CPU ranks (gloo) against the single-rank reference MoE.

The test launches this file under mpirun; each rank holds half the experts, routes its own
tokens (unequal counts, including a round where one rank has none) and must get what the
reference backend gives with all experts on one rank, up to bf16 rounding of the partial sums.
"""
import os

import pytest
import torch

E, H, I, K = 16, 64, 32, 4
TOKENS = [(13, 5), (0, 9), (40, 40)]   # (rank 0, rank 1) per round


def _full_weights():
    from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

    g = torch.Generator().manual_seed(7)
    out = {}
    for prefix, shape, alpha in (("w3_w1", (E, 2 * I, H), "fc31_alpha"), ("w2", (E, H, I), "fc2_alpha")):
        # a per-expert offset makes a misrouted pair produce a visibly different output
        w = torch.randn(*shape, generator=g) * 0.05 + torch.arange(E).view(E, 1, 1) * 0.01
        q = quantize_nvfp4_per_leading(w.bfloat16())
        out[f"{prefix}_weight"], out[f"{prefix}_weight_scale"], out[alpha] = q.packed, q.scale, q.global_scale
    return out


def _inputs(rank, t, rnd):
    g = torch.Generator().manual_seed(100 * rnd + rank)
    x = torch.randn(t, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).int() if t else \
        torch.empty(0, K, dtype=torch.int32)
    return x, ids, torch.rand(t, K, generator=g)


def _worker() -> None:
    import torch.distributed as dist

    from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
    from tensorrt_llm_dwdp.moe.weights import ExpertWeights
    from tensorrt_llm_dwdp.parallel import ExpertParallelBackend, SpanTimer

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['EP_TEST_PORT']}",
                            rank=rank, world_size=2)
    full = _full_weights()
    mine = ExpertWeights.single({k: v[rank * E // 2:(rank + 1) * E // 2].contiguous() for k, v in full.items()})
    ref_weights = ExpertWeights.single(full)
    timer = SpanTimer("cpu")
    ep = ExpertParallelBackend(TorchMoeBackend(), num_experts=E, timer=timer)
    for rnd, counts in enumerate(TOKENS):
        x, ids, w = _inputs(rank, counts[rank], rnd)
        got = ep.run_experts(x, ids, w, mine)
        ref = TorchMoeBackend().run_experts(x, ids, w, ref_weights)
        assert got.shape == ref.shape and got.dtype == torch.bfloat16
        if counts[rank]:
            scale = ref.float().abs().max().item()
            err = (got.float() - ref.float()).abs().max().item()
            assert err <= 2e-2 * scale, f"rank {rank} round {rnd}: err {err} vs scale {scale}"
        s = ep.last_stats
        assert s.pairs_sent == counts[rank] * K
    assert set(timer.totals_ms()) == {"ep_counts", "ep_dispatch", "ep_combine"}
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)


@pytest.mark.multirank
def test_two_ranks_match_single_rank_reference(run_ranks_ok):
    from tensorrt_llm_dwdp.launcher import free_port

    run_ranks_ok(__file__, timeout=120, env={"EP_TEST_PORT": str(free_port())})


if __name__ == "__main__":
    _worker()
