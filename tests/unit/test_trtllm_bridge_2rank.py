"""TrtllmDwdpBridge on 2 CPU ranks driving our real DwdpManager with composite views, called
the way TensorRT-LLM's current DWDP is: ``add_layer(layer_idx=i)`` from each MoE layer,
``setup(model)`` after loading (weights move into shared memory, backends patched to all E
experts), then per step ``prefetch_first_layers()`` and per layer ``wait_and_bind(backend, i)``
/ ``record_compute_and_prefetch_next(i)``. A second model goes through ``attach_layer_hooks``
(modules without upstream call sites). Every expert's
bytes carry (layer, expert), so a misplaced copy shows, and the backends' parameters and
``quant_scales`` must show all E experts after every bind. Odd layer count, redundant layout.
The fake TensorRT-LLM executor over the same manager is tests/multirank/test_trtllm_fake_executor.py.
"""
from collections import namedtuple

import pytest
import torch
from torch import nn

E, S, W, P, H, I = 8, 2, 5, 3, 32, 16
LAYERS = (3, 4, 5)
NAMES = {  # TensorRT-LLM attribute -> (per-expert shape, dtype)
    "w3_w1_weight": ((2 * I, H // 2), torch.uint8),
    "w3_w1_weight_scale": ((2 * I, H // 16), torch.uint8),
    "fc31_alpha": ((), torch.float32),
    "w2_weight": ((H, I // 2), torch.uint8),
    "w2_weight_scale": ((H, I // 16), torch.uint8),
    "fc2_alpha": ((), torch.float32),
}
QuantScales = namedtuple("QuantScales", "fc1_act_global fc1_weight_block fc1_global "
                                        "fc2_act_global fc2_weight_block fc2_global")


def _pattern(layer, expert, name, shape, dtype):
    base = (layer * 31 + expert * 7 + len(name)) % 251
    if dtype == torch.float32:
        return torch.full(shape, float(base), dtype=dtype)
    return ((torch.arange(max(1, torch.Size(shape).numel())) + base) % 256).to(dtype).view(shape)


class CuteDslLikeBackend(nn.Module):
    """Holds its W experts under TensorRT-LLM's attribute names, in ordinary memory (as
    upstream's loader leaves them), and a ``quant_scales`` record over them."""

    def __init__(self, layer, first):
        super().__init__()
        self.num_experts = E
        self.ep_size, self.expert_size_per_partition = 1, W
        for name, (shape, dtype) in NAMES.items():
            t = torch.stack([_pattern(layer, first + j, name, shape, dtype) for j in range(W)])
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        one = torch.ones(())
        self.quant_scales = QuantScales(one, self.w3_w1_weight_scale.data, self.fc31_alpha.data,
                                        one, self.w2_weight_scale.data, self.fc2_alpha.data)


class ConfigurableMoELike(nn.Module):
    def __init__(self, layer, first):
        super().__init__()
        self.layer_idx = layer
        self.backend = CuteDslLikeBackend(layer, first)
        self.enable_dwdp = False
        self.dwdp_manager = None

    def forward(self, x):
        return x


def _check_bound(backend, layer):
    """After a bind the backend's parameters are [E, ...] with every expert's pattern."""
    for name, (shape, dtype) in NAMES.items():
        full = getattr(backend, name)
        assert isinstance(full, nn.Parameter) and full.shape[0] == E, (name, full.shape)
        for e in range(E):
            assert torch.equal(full[e], _pattern(layer, e, name, shape, dtype)), (layer, e, name)
    q = backend.quant_scales
    assert q.fc1_weight_block is backend.w3_w1_weight_scale and q.fc2_global is backend.fc2_alpha
    assert q.fc1_weight_block.shape[0] == E


def _worker():
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
    from tensorrt_llm_dwdp.trtllm import TrtllmDwdpBridge, attach_layer_hooks

    from _ranks import rank_and_size

    rank, _ = rank_and_size()
    config = DwdpConfig(dwdp_size=S, num_experts_per_worker=W, num_prefetch_experts=P,
                        peer_timeout_s=60.0)

    def factory(cfg, num_experts, comm):
        assert comm is None
        assert cfg.expert_view == "composite" and num_experts == E
        return DwdpManager.from_environment(cfg, num_experts, "cpu")

    # 1) upstream's path: the executor builds the manager, MoE layers add themselves
    bridge = TrtllmDwdpBridge(config, rank=rank, manager_factory=factory)
    model = nn.Sequential(*[ConfigurableMoELike(layer, rank * P) for layer in LAYERS])
    for mod in model:                                   # ConfigurableMoE._register_dwdp
        mod.dwdp_manager, mod.enable_dwdp = bridge, True
        bridge.add_layer(layer_idx=mod.layer_idx)
    bridge.setup(model)                                 # py_executor_creator, after loading
    for mod in model:
        assert mod.backend.expert_size_per_partition == E and mod.slot_end == E
        assert mod.backend.ep_size == 1 and mod.backend.initial_local_expert_ids == list(range(E))
        # the loaded slice now lives in memory the composite view maps twice
        bridge.manager._transport.locate(mod.backend.w3_w1_weight.data)
    for _step in range(3):
        bridge.prefetch_first_layers()                  # PyExecutor, each step
        for mod in model:
            bridge.wait_and_bind(mod.backend, mod.layer_idx)   # ConfigurableMoE.forward_impl
            _check_bound(mod.backend, mod.layer_idx)
            bridge.record_compute_and_prefetch_next(mod.layer_idx)
    bridge.cleanup()

    # 2) modules without upstream's call sites: per-layer hooks
    bridge2 = TrtllmDwdpBridge(config, rank=rank, manager_factory=factory)
    model2 = nn.Sequential(*[ConfigurableMoELike(layer, rank * P) for layer in LAYERS])
    for mod in model2:
        bridge2.add_layer(layer_idx=mod.layer_idx)
    bridge2.setup(model2)
    for mod in model2:
        attach_layer_hooks(mod, mod.layer_idx, bridge2)
    for _step in range(2):
        bridge2.prefetch_first_layers()
        for mod in model2:
            mod(torch.zeros(1))
            _check_bound(mod.backend, mod.layer_idx)
    bridge2.wait_and_bind(model2[1].backend, LAYERS[1])   # a step that leaves layer 3 out
    _check_bound(model2[1].backend, LAYERS[1])
    assert bridge2.steps.counts.skipped == 1
    bridge2.cleanup()
    bridge2.cleanup()
    print(f"rank {rank} ok", flush=True)


@pytest.mark.multirank
def test_bridge_drives_our_manager_on_two_ranks(run_ranks_ok):
    run_ranks_ok(__file__)


if __name__ == "__main__":
    _worker()
