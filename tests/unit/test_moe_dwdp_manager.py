"""ConfigurableMoE through a real DwdpManager (shm on CPU) equals one rank with all experts,
bit for bit: in-process with one rank, and on two ranks under mpirun (W != P, unequal token
counts per rank, several steps so both prefetch buffers and the wrap-around are used).

The two-rank test launches this file under mpirun; each rank prints ``rank <r> ok``.
"""
import sys

import pytest
import torch

E, K, H, I = 8, 2, 64, 32
LAYERS = (0, 2, 3)  # odd count: buffer parity alternates across steps
STEPS = 3


def _layer_params(layer: int) -> dict:
    from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

    g = torch.Generator().manual_seed(10 + layer)
    # A per-expert offset: a misplaced expert changes every output it touches.
    w13 = torch.randn(E, 2 * I, H, generator=g) / H**0.5 + torch.arange(E).view(E, 1, 1) * 0.02
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    q13, q2 = quantize_nvfp4_per_leading(w13), quantize_nvfp4_per_leading(w2)
    return {"w3_w1_weight": q13.packed, "w3_w1_weight_scale": q13.scale,
            "fc31_alpha": q13.global_scale, "w2_weight": q2.packed,
            "w2_weight_scale": q2.scale, "fc2_alpha": q2.global_scale,
            "w2_bias": torch.randn(E, H, generator=g) * 0.05}


def _gate(layer: int) -> torch.Tensor:
    return torch.randn(E, H, generator=torch.Generator().manual_seed(100 + layer))


def _make_moe(layer: int, dwdp=None):
    from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE

    moe = ConfigurableMoE(E, K, H, I, dwdp=dwdp, layer_idx=layer)
    moe.gate.weight.data.copy_(_gate(layer))
    return moe


def _run_steps(mgr, moes, refs, rank: int) -> None:
    for step in range(STEPS):
        tokens = 1 + (7 * step + 11 * rank) % 23
        x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(step * 10 + rank))
        x = x.bfloat16()
        mgr.start_step()
        for layer in LAYERS:
            got, want = moes[layer](x), refs[layer](x)
            assert torch.equal(got, want), f"rank {rank} step {step} layer {layer}"
            x = (x.float() + got.float()).bfloat16()


def _register(mgr) -> dict:
    """Fill manager-allocated local slices from the full sets; one DWDP MoE per layer."""
    lo, hi = mgr.layout.owned_range()
    moes = {}
    for layer in LAYERS:
        local = {}
        for name, full in _layer_params(layer).items():
            t = mgr.allocate(full[lo:hi].shape, full.dtype)
            t.copy_(full[lo:hi])
            local[name] = t
        mgr.register_layer(layer, local)
        moes[layer] = _make_moe(layer, dwdp=mgr)
        moes[layer].set_local_weights(local)
    return moes


def _references() -> dict:
    refs = {}
    for layer in LAYERS:
        refs[layer] = _make_moe(layer)
        refs[layer].set_local_weights(_layer_params(layer))
    return refs


def test_one_rank_manager_matches_no_dwdp():
    from tensorrt_llm_dwdp.comm.local import LocalComm
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    with DwdpManager(DwdpConfig(), E, LocalComm(), "cpu") as mgr:
        moes = _register(mgr)
        mgr.exchange()
        _run_steps(mgr, moes, _references(), rank=0)


def _worker() -> None:
    from tensorrt_llm_dwdp.comm import connect
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    config = DwdpConfig(dwdp_size=2, num_experts_per_worker=5, num_prefetch_experts=3)
    with DwdpManager(config, E, connect(config), "cpu") as mgr:
        moes = _register(mgr)
        mgr.exchange()
        _run_steps(mgr, moes, _references(), rank=mgr.rank)
        print(f"rank {mgr.rank} ok", flush=True)


@pytest.mark.multirank
def test_two_ranks_match_single_rank_bitwise(run_ranks_ok):
    run_ranks_ok(__file__)


if __name__ == "__main__":
    _worker()
    sys.exit(0)
