"""ExpertParallel on 2 and 4 CPU ranks, over gloo and over the shared-memory exchange (the CUDA
IPC protocol's CPU twin), against the reference backend holding all experts on one rank.

The test launches this file under mpirun; each rank holds E/S experts (each expert's weights
shifted by its id, so a misrouted row shows), routes its own tokens (unequal counts, rounds
where a rank has none: it joins with an empty batch and still serves its peers) and must get
the reference within the documented tolerance; both exchanges must agree bit for bit.
tests/gpu/test_expert_parallel_gpu.py runs the same worker on GPUs (EP_TEST_DEVICE=cuda,
EP_TEST_TRANSPORTS=cuda_ipc[,nccl], EP_TEST_BACKEND=torch|cutedsl).
"""
import os

import pytest
import torch

E, K = 16, 4
H, I = (int(v) for v in os.environ.get("EP_TEST_SIZES", "64,32").split(","))
ROUNDS = [(13, 5, 0, 7), (0, 9, 3, 0), (40, 40, 40, 40), (0, 0, 0, 2)]   # tokens per rank


def _full_weights(device):
    from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

    g = torch.Generator().manual_seed(7)
    out = {}
    for prefix, shape, alpha in (("w3_w1", (E, 2 * I, H), "fc31_alpha"), ("w2", (E, H, I), "fc2_alpha")):
        w = torch.randn(*shape, generator=g) * 0.05 + torch.arange(E).view(E, 1, 1) * 0.01
        q = quantize_nvfp4_per_leading(w.bfloat16())
        out[f"{prefix}_weight"], out[f"{prefix}_weight_scale"], out[alpha] = q.packed, q.scale, q.global_scale
    return {k: v.to(device) for k, v in out.items()}


def _inputs(rank, t, rnd, device):
    g = torch.Generator().manual_seed(100 * rnd + rank)
    x = torch.randn(t, H, generator=g).bfloat16()
    ids = torch.rand(t, E, generator=g).argsort(dim=1)[:, :K].int()
    return x.to(device), ids.to(device), torch.rand(t, K, generator=g).to(device)


def _run(transport: str, port: int, rank: int, world: int, device) -> list[torch.Tensor]:
    from tensorrt_llm_dwdp.moe.backends import get_backend, to_native_layout_
    from tensorrt_llm_dwdp.moe.weights import ExpertWeights
    from tensorrt_llm_dwdp.parallel import EpConfig, SpanTimer
    from tensorrt_llm_dwdp.parallel.group import ExpertParallelGroup

    full = _full_weights(device)
    timer = SpanTimer(device)
    group = ExpertParallelGroup.create(EpConfig(ep_size=world, transport=transport), rank=rank,
                                       device=device, master_addr="127.0.0.1",
                                       master_port=port, num_experts=E, capacity_bytes=1 << 20,
                                       timer=timer)
    ep = group.ep
    first, end = ep.local_range
    backend = get_backend(os.environ.get("EP_TEST_BACKEND", "torch"))
    layout = to_native_layout_(full, backend)  # per expert: the slice below keeps it
    mine = ExpertWeights.single({k: v[first:end].contiguous() for k, v in full.items()}, layout)
    ref_weights = ExpertWeights.single(full, layout)
    outs = []
    try:
        for rnd, counts in enumerate(ROUNDS):
            x, ids, w = _inputs(rank, counts[rank], rnd, device)
            got = ep.run_experts(x, ids, w, mine, backend)
            ref = backend.run_experts(x, ids, w, ref_weights)
            assert got.shape == ref.shape and got.dtype == torch.bfloat16
            if x.shape[0]:
                scale = ref.float().abs().max().item()
                err = (got.float() - ref.float()).abs().max().item()
                assert err <= 1e-2 * scale, f"{transport} rank {rank} round {rnd}: err {err} vs {scale}"
            assert ep.last_stats.rows_sent >= min(1, x.shape[0])
            outs.append(got.cpu())
        assert ep.calls == len(ROUNDS)
        assert group.any(rank == world - 1) is True and group.any(False) is False
        assert {"ep_counts", "ep_dispatch", "ep_combine"} <= set(timer.totals_ms())
        if transport in ("shm", "cuda_ipc"):   # one rank overflowing the 1 MiB buffers fails every rank
            x, ids, w = _inputs(rank, 8000 if rank == 0 else 1, 99, device)
            with pytest.raises(RuntimeError, match="ep_config.buffer_mb"):
                ep.run_experts(x, ids, w, mine, backend)
    finally:
        group.close()
    return outs


def _worker() -> None:
    from _ranks import rank_and_size

    rank, world = rank_and_size()
    device = torch.device(os.environ.get("EP_TEST_DEVICE", "cpu"))
    if device.type == "cuda":   # every rank on GPU rank % count: two ranks share a GPU when short
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    transports = os.environ.get("EP_TEST_TRANSPORTS", "gloo,shm").split(",")
    ports = [int(p) for p in os.environ["EP_TEST_PORTS"].split(",")]
    results = [_run(t, port, rank, world, device) for t, port in zip(transports, ports)]
    for other, name in zip(results[1:], transports[1:]):
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), f"{transports[0]} and {name} exchanges disagree"
    print(f"rank {rank} ok {','.join(transports)}", flush=True)


@pytest.mark.multirank
@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_match_single_rank_reference(run_ranks_ok, ranks):
    from tensorrt_llm_dwdp.launcher import free_port

    run_ranks_ok(__file__, ranks=ranks, timeout=180,
                 env={"EP_TEST_PORTS": f"{free_port()},{free_port()}"})


if __name__ == "__main__":
    _worker()
