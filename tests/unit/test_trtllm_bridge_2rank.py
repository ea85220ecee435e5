"""TrtllmDwdpBridge on 2 CPU ranks driving our real DwdpManager (shm transport), called the
way TensorRT-LLM calls its own manager: add_layer -> collector.register_weights(backend) ->
exchange_all_handles -> initialize_prefetch_buffer -> per step prefetch_first_layers, then per
layer wait_prefetch_and_get_buffer / record_compute_and_prefetch_next. A second model goes
through ``attach`` (the after-loading path) and ``attach_layer_hooks`` (modules without
upstream call sites). Every expert's bytes carry (layer, expert) so a misplaced copy shows.
"""
import os

import pytest
import torch
from torch import nn

E, S, W, H, I = 8, 2, 4, 32, 16
LAYERS = (3, 4, 5)
NAMES = {  # TensorRT-LLM attribute -> (per-expert shape, dtype)
    "w3_w1_weight": ((2 * I, H // 2), torch.uint8),
    "w3_w1_weight_scale": ((2 * I, H // 16), torch.uint8),
    "fc31_alpha": ((), torch.float32),
    "w2_weight": ((H, I // 2), torch.uint8),
    "w2_weight_scale": ((H, I // 16), torch.uint8),
    "fc2_alpha": ((), torch.float32),
}


def _pattern(layer, expert, name, shape, dtype):
    base = (layer * 31 + expert * 7 + len(name)) % 251
    if dtype == torch.float32:
        return torch.full(shape, float(base), dtype=dtype)
    return ((torch.arange(max(1, torch.Size(shape).numel())) + base) % 256).to(dtype).view(shape)


class CuteDslLikeBackend(nn.Module):
    """Holds its W experts under TensorRT-LLM's attribute names, in memory from ``alloc``."""

    def __init__(self, layer, first, alloc):
        super().__init__()
        self.num_experts = E
        for name, (shape, dtype) in NAMES.items():
            t = alloc((W, *shape), dtype)
            for j in range(W):
                t[j] = _pattern(layer, first + j, name, shape, dtype)
            setattr(self, name, nn.Parameter(t, requires_grad=False))


class ConfigurableMoELike(nn.Module):
    def __init__(self, layer, first, alloc):
        super().__init__()
        self.layer_idx = layer
        self.backend = CuteDslLikeBackend(layer, first, alloc)
        self.seen = None

    def forward(self, x):
        return x


def _check_view(view, layer):
    for name, (shape, dtype) in NAMES.items():
        full = torch.cat(list(view[name]))
        assert full.shape[0] == E, (name, full.shape)
        for e in range(E):
            assert torch.equal(full[e], _pattern(layer, e, name, shape, dtype)), (layer, e, name)


def _worker():
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
    from tensorrt_llm_dwdp.trtllm import TrtllmDwdpBridge, attach, attach_layer_hooks

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    config = DwdpConfig(dwdp_size=S, num_experts_per_worker=W, num_prefetch_experts=W, peer_timeout_s=60.0)

    # 1) upstream's construction-time path
    mgr = DwdpManager.from_environment(config, E, "cpu")
    bridge = TrtllmDwdpBridge(config, rank=rank, manager_factory=lambda c, n: mgr)
    mods = {}
    for layer in LAYERS:
        mods[layer] = ConfigurableMoELike(layer, rank * W, mgr.allocate)
        collector = bridge.add_layer(layer)                    # ConfigurableMoE.__init__
        collector.register_weights(mods[layer].backend)        # CuteDslFusedMoE.load_weights
    bridge.exchange_all_handles()
    bridge.initialize_prefetch_buffer()
    for _step in range(3):
        bridge.prefetch_first_layers()                         # PyExecutor, each step
        for layer in LAYERS:
            view = bridge.wait_prefetch_and_get_buffer(layer)
            _check_view(view, layer)
            assert view["w3_w1_weight"][rank].data_ptr() == mods[layer].backend.w3_w1_weight.data_ptr()
            bridge.record_compute_and_prefetch_next(layer)     # ConfigurableMoE.forward_impl
    bridge.cleanup()

    # 2) after-loading path: attach() a loaded model, then per-layer hooks
    mgr2 = DwdpManager.from_environment(config, E, "cpu")
    bridge2 = TrtllmDwdpBridge(config, rank=rank, manager_factory=lambda c, n: mgr2)
    model = nn.Sequential(*[ConfigurableMoELike(layer, rank * W, mgr2.allocate) for layer in LAYERS])
    assert attach(model, bridge2) == list(LAYERS)
    assert all(m.enable_dwdp and m.dwdp_manager is bridge2 for m in model)
    bridge2.exchange_all_handles()

    def consume(mod, view):   # the buffer is refilled two layers later: check it now
        _check_view(view, mod.layer_idx)
        mod.seen = (mod.seen or 0) + 1
    for mod in model:
        attach_layer_hooks(mod, mod.layer_idx, mgr2, consume)
    for _step in range(2):
        mgr2.start_step()
        model(torch.zeros(1))
    assert [mod.seen for mod in model] == [2] * len(LAYERS)
    bridge2.cleanup()
    print(f"rank {rank} ok", flush=True)


@pytest.mark.multirank
def test_bridge_drives_our_manager_on_two_ranks(run_ranks_ok):
    run_ranks_ok(__file__)


if __name__ == "__main__":
    _worker()
