"""torch-grouped backend (torch._grouped_mm, CPU here): agrees with the torch reference within
bf16 tolerance (NVFP4 and bf16, biases), is bitwise independent of chunking and of where the
expert bytes live (a DWDP composite view vs one rank holding all experts), its bf16 decode is
exact, and it refuses multi-tensor views with a message saying what to set."""
import pytest
import torch

from _thread_group import _in_threads
from test_moe_torch_ref import make_experts, make_routing
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.moe.backends import get_backend
from tensorrt_llm_dwdp.moe.backends.torch_grouped import TorchGroupedMoeBackend, dequantize_bf16
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4

H, I = 64, 32

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="needs torch._grouped_mm")


@pytest.mark.parametrize("quant,bias", [("nvfp4", False), ("bf16", False), ("bf16", True),
                                        ("nvfp4", True)])
def test_matches_reference_within_bf16(quant, bias):
    weights = make_experts(12, quant, bias=bias)
    x, ids, w = make_routing(40, 12, 3)
    got = TorchGroupedMoeBackend().run_experts(x, ids, w, weights)
    want = TorchMoeBackend().run_experts(x, ids, w, weights)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 2e-2, err


def test_empty_slots_add_nothing():
    weights = make_experts(8, "nvfp4")
    x, ids, w = make_routing(20, 8, 3)
    ids[::3, 1] = -1
    ids[4] = -1  # a token with no expert at all
    got = TorchGroupedMoeBackend().run_experts(x, ids, w, weights)
    want = TorchMoeBackend().run_experts(x, ids, w, weights)
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err < 2e-2, err


@pytest.mark.parametrize("quant", ["bf16", "nvfp4"])
def test_bad_ids_are_deferred_to_check_routing(quant):
    """No layer reads the id range back; ``check_routing`` (the engine's step end) raises the
    bad id, and the layer itself stayed in bounds (the id counted as an empty slot)."""
    weights = make_experts(8, quant)
    x, ids, w = make_routing(6, 8, 2)
    backend = TorchGroupedMoeBackend()
    good = backend.run_experts(x, ids, w, weights)
    backend.check_routing()
    bad = ids.clone()
    bad[2, 1] = 11
    out = backend.run_experts(x, bad, w, weights)
    empty = ids.clone()
    empty[2, 1] = -1
    assert torch.equal(out, backend.run_experts(x, empty, w, weights))
    assert not torch.equal(out, good)
    with pytest.raises(ValueError, match="expert id 11 out of range"):
        backend.check_routing()
    backend.check_routing()  # read once
    with pytest.raises(ValueError, match="expert id 11"):
        TorchMoeBackend().run_experts(x, bad, w, weights)  # the host-driven oracle: at once
    with pytest.raises(ValueError, match="expert id 11"):
        TorchGroupedMoeBackend(sync_check=True).run_experts(x, bad, w, weights)


def test_bf16_layer_reads_nothing_back():
    """With bf16 experts a layer makes no tensor -> Python read (each a host sync on CUDA, and
    a failure under CUDA graph capture): offsets reach ``_grouped_mm`` as a tensor."""
    from test_permute import _HostReads

    weights = make_experts(8, "bf16", bias=True)
    x, ids, w = make_routing(9, 8, 3)
    ids[1, 0] = -1
    with _HostReads() as mode:
        TorchGroupedMoeBackend().run_experts(x, ids, w, weights)
    assert mode.reads == []


def test_chunking_and_placement_are_bitwise_invisible():
    weights = make_experts(12, "nvfp4")
    x, ids, w = make_routing(33, 12, 4)
    ids[:5] = 3  # an expert with many rows, and some experts without any
    want = TorchGroupedMoeBackend(chunk_experts=1).run_experts(x, ids, w, weights)
    for chunk in (2, 5, 12, 100):
        assert torch.equal(TorchGroupedMoeBackend(chunk).run_experts(x, ids, w, weights), want)
    # the same bytes at another address, inside a bigger buffer
    moved = {n: torch.cat([t[0].new_zeros((1,) + t[0].shape[1:]), t[0]])[1:]
             for n, t in weights.tensors.items()}
    assert torch.equal(TorchGroupedMoeBackend(3).run_experts(x, ids, w,
                                                            ExpertWeights.single(moved)), want)


def test_bf16_decode_is_exact():
    w = make_experts(4, "nvfp4").tensors
    packed, scale = w["w3_w1_weight"][0], w["w3_w1_weight_scale"][0]
    want = dequantize_nvfp4(packed, scale, None, torch.float32)
    assert torch.equal(dequantize_bf16(packed, scale).float(), want)


def test_refuses_multi_tensor_views_and_bad_sizes():
    weights = make_experts(8, "bf16")
    x, ids, w = make_routing(10, 8, 2)
    backend = get_backend("torch-grouped")
    assert backend.accepts_multi_tensor is False
    with pytest.raises(ValueError, match="expert_view: composite"):
        backend.run_experts(x, ids, w, weights.split([3, 5]))
    odd = ExpertWeights.single({"w3_w1_weight": torch.zeros(2, 2 * 12, H, dtype=torch.bfloat16),
                                "w2_weight": torch.zeros(2, H, 12, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="multiples of 8"):
        backend.run_experts(x, ids % 2, w, odd)
    assert backend.run_experts(x[:0], ids[:0], w[:0], weights).shape == (0, H)


class _MultiManager:
    expert_view = "multi"
    layout = ExpertLayout(8, 2, 4, 4, 0)


def test_moe_layer_refuses_torch_grouped_over_a_multi_view():
    with pytest.raises(ValueError, match="run --expert-view composite"):
        ConfigurableMoE(8, 2, H, I, backend="torch-grouped", dwdp=_MultiManager())


def test_dwdp_composite_view_bitwise_equals_one_rank_holding_all():
    """Two CPU ranks (threads) with composite views feed torch-grouped the same bytes at other
    addresses: outputs equal one rank holding all experts, bit for bit."""
    full = make_experts(10, "nvfp4", seed=4)
    gen = torch.Generator().manual_seed(7)
    gate = torch.randn(10, H, generator=gen)
    x = torch.randn(37, H, generator=gen).bfloat16()
    single = ConfigurableMoE(10, 3, H, I, backend="torch-grouped")
    single.gate.weight.data.copy_(gate)
    single.set_local_weights({n: t[0] for n, t in full.tensors.items()})
    want = single(x)

    def rank_body(rank, comm):
        cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=6, num_prefetch_experts=4,
                         expert_view="composite", peer_timeout_s=20)
        with DwdpManager(cfg, 10, comm, "cpu") as mgr:
            lo, hi = mgr.layout.owned_range()
            own = {}
            for name, (t,) in full.tensors.items():
                own[name] = mgr.allocate((6,) + tuple(t.shape[1:]), t.dtype)
                own[name].copy_(t[lo:hi])
            mgr.register_layer(3, own)
            moe = ConfigurableMoE(10, 3, H, I, backend="torch-grouped", dwdp=mgr, layer_idx=3)
            moe.gate.weight.data.copy_(gate)
            moe.set_local_weights(own)
            mgr.exchange()
            mgr.poison_buffers()
            outs = []
            for _ in range(2):
                mgr.start_step()
                outs.append(moe(x))
            return outs

    for outs in _in_threads(2, rank_body):
        assert not isinstance(outs, BaseException), repr(outs)
        assert all(torch.equal(o, want) for o in outs)


def test_sync_check_debug_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRTLLM_DWDP_SYNC_CHECKS", "1")
    backend = get_backend("torch-grouped")
    weights = make_experts(8, "bf16")
    x, ids, w = make_routing(4, 8, 2)
    ids[0, 0] = 9
    with pytest.raises(ValueError, match="expert id 9"):  # at the layer, not the step's end
        backend.run_experts(x, ids, w, weights)
    monkeypatch.setenv("TRTLLM_DWDP_SYNC_CHECKS", "0")
    assert not get_backend("torch-grouped").routing_errors.sync_check
    monkeypatch.setenv("TRTLLM_DWDP_SYNC_CHECKS", "yes")
    with pytest.raises(ValueError, match="TRTLLM_DWDP_SYNC_CHECKS='yes'"):
        get_backend("torch-grouped")
