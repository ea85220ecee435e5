"""The TensorRT-LLM adapter's pure parts on plain torch modules with TensorRT-LLM's names."""
from collections import namedtuple

import pytest
import torch
from torch import nn

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.trtllm import (TrtllmDwdpBridge, expert_tensors, find_moe_modules,
                                      from_trtllm, is_moe_module, rebind_quant_scales,
                                      to_trtllm_dict)

# The field names of TensorRT-LLM's FusedMoEQuantScalesNVFP4 record that the adapter reads.
QuantScales = namedtuple("QuantScales", "fc1_weight_block fc1_global fc2_weight_block fc2_global")


class CuteDslLikeBackend(nn.Module):
    """Carries the attributes TensorRT-LLM's NVFP4 CuteDslFusedMoE holds after load_weights."""

    def __init__(self, n: int, hidden: int = 32, inter: int = 16, layer_idx=None, tag: int = 0):
        super().__init__()
        self.num_experts = 8
        self.layer_idx = layer_idx
        g = torch.Generator().manual_seed(tag)
        u8 = lambda *s: nn.Parameter(torch.randint(0, 255, s, generator=g, dtype=torch.uint8), requires_grad=False)
        self.w3_w1_weight = u8(n, 2 * inter, hidden // 2)
        self.w2_weight = u8(n, hidden, inter // 2)
        self.w3_w1_weight_scale = nn.Parameter(torch.rand(n, 2 * inter, hidden // 16, generator=g).to(torch.float8_e4m3fn), requires_grad=False)
        self.w2_weight_scale = nn.Parameter(torch.rand(n, hidden, inter // 16, generator=g).to(torch.float8_e4m3fn), requires_grad=False)
        self.fc31_alpha = nn.Parameter(torch.rand(n, generator=g), requires_grad=False)
        self.fc2_alpha = nn.Parameter(torch.rand(n, generator=g), requires_grad=False)
        self.w3_w1_bias = None
        self.quant_scales = QuantScales(
            self.w3_w1_weight_scale.data.view(n, -1), self.fc31_alpha.data,
            self.w2_weight_scale.data.view(n, -1), self.fc2_alpha.data)


class ConfigurableMoELike(nn.Module):
    def __init__(self, layer_idx: int, n: int = 4):
        super().__init__()
        self.layer_idx = layer_idx
        self.backend = CuteDslLikeBackend(n, layer_idx=None, tag=layer_idx)


class Layer(nn.Module):
    def __init__(self, moe: nn.Module | None):
        super().__init__()
        self.attn = nn.Linear(4, 4)
        self.mlp = moe if moe is not None else nn.Linear(4, 4)


def _model():
    return nn.Sequential(Layer(None), Layer(ConfigurableMoELike(1)), Layer(ConfigurableMoELike(2)))


def test_find_moe_modules_counts_wrapper_once_in_order():
    found = find_moe_modules(_model())
    assert [(i, name) for i, name, _ in found] == [(1, "1.mlp"), (2, "2.mlp")]
    assert not is_moe_module(nn.Linear(2, 2))


def test_unindexed_backends_are_numbered_in_order_and_duplicates_named():
    model = nn.Sequential(CuteDslLikeBackend(2), CuteDslLikeBackend(2))
    assert [i for i, _, _ in find_moe_modules(model)] == [0, 1]
    clash = nn.Sequential(ConfigurableMoELike(3), ConfigurableMoELike(3))
    with pytest.raises(ValueError, match="share layer_idx 3"):
        find_moe_modules(clash)


def test_expert_tensors_map_names_and_share_storage():
    moe = ConfigurableMoELike(1)
    t = expert_tensors(moe)
    assert set(t) == {"w3_w1_weight", "w2_weight", "w3_w1_weight_scale", "w2_weight_scale",
                      "fc31_alpha", "fc2_alpha"}
    for name, tensor in t.items():
        assert tensor.data_ptr() == getattr(moe.backend, name).data_ptr()   # no copy: DWDP maps these


def test_expert_tensor_with_wrong_expert_dim_is_named():
    b = CuteDslLikeBackend(4)
    b.w2_weight_scale = nn.Parameter(torch.ones(3, 2), requires_grad=False)
    with pytest.raises(ValueError, match=r"w2_weight_scale has shape \(3, 2\).*first dim"):
        expert_tensors(b)


def test_per_expert_parameters_are_found_by_upstreams_name_rule():
    b = CuteDslLikeBackend(4)
    b.fc2_dequant = nn.Parameter(torch.ones(4), requires_grad=False)          # per expert
    b.fc31_scaling_factor = nn.Parameter(torch.ones(4, 2), requires_grad=False)
    b.fc31_input_scale = nn.Parameter(torch.ones(1), requires_grad=False)     # global
    b.fc2_alpha = nn.Parameter(torch.ones(3), requires_grad=False)            # not [n, ...]
    b.router_bias = nn.Parameter(torch.ones(4), requires_grad=False)          # no marker
    names = set(expert_tensors(b))
    assert {"fc2_dequant", "fc31_scaling_factor", "fc31_alpha"} <= names
    assert not names & {"fc31_input_scale", "fc2_alpha", "router_bias"}


def test_quant_scales_record_is_rebound_to_the_live_parameters():
    b = CuteDslLikeBackend(4)
    rebind_quant_scales(b)
    q = b.quant_scales
    assert q.fc1_weight_block is b.w3_w1_weight_scale and q.fc1_global is b.fc31_alpha
    assert q.fc2_weight_block is b.w2_weight_scale and q.fc2_global is b.fc2_alpha
    b.w3_w1_weight_scale.data = torch.zeros(8, 1, dtype=torch.float8_e4m3fn)  # a later bind
    assert b.quant_scales.fc1_weight_block.shape == (8, 1)
    plain = nn.Linear(2, 2)
    rebind_quant_scales(plain)  # no record: left alone
    assert "quant_scales" not in plain.__dict__


def test_bridge_protocol_errors_before_setup():
    cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=4, num_prefetch_experts=4)
    bridge = TrtllmDwdpBridge(cfg, rank=1, manager_factory=lambda c, n, m: pytest.fail("built"))
    assert bridge.config.expert_view == "composite" and bridge.is_enabled()
    assert (bridge.start_expert_id, bridge.end_expert_id) == (4, 8)
    bridge.add_layer(layer_idx=3)
    with pytest.raises(RuntimeError, match="setup\(\) has not been called"):
        bridge.prefetch_first_layers()
    with pytest.raises(RuntimeError, match=r"layers \[3\] were added but"):
        bridge.setup(_model())
    with pytest.raises(ValueError, match="dwdp_size > 1"):
        TrtllmDwdpBridge(DwdpConfig(), rank=0, manager_factory=None)


def test_config_round_trip_and_spellings():
    ours = DwdpConfig(dwdp_size=2, num_experts_per_worker=128, num_prefetch_experts=128,
                      contention_opt=True)
    d = to_trtllm_dict(ours)
    assert d == {"dwdp_size": 2, "num_groups": 1, "num_experts_per_worker": 128,
                 "num_prefetch_experts": 128, "contention_opt": True}
    assert from_trtllm(d) == ours
    assert from_trtllm(d, peer_timeout_s=5.0).peer_timeout_s == 5.0
    old = {"enabled": True, "dwdp_size": 2, "num_group": 1, "experts_per_worker": 36,
           "num_prefetch_experts": 36}
    assert from_trtllm(old).num_experts_per_worker == 36
    assert not from_trtllm({**old, "enabled": False}).enabled
    assert not from_trtllm(None).enabled

    class UpstreamLike:  # attribute access, as on TensorRT-LLM's pydantic DwdpConfig
        dwdp_size, num_groups, num_experts_per_worker, num_prefetch_experts = 4, 1, 100, 52
        contention_opt = False
    assert from_trtllm(UpstreamLike()).implied_num_experts == 256


@pytest.mark.parametrize("bad, match", [
    ({"dwdp_size": 2, "num_experts_per_worker": 4, "num_prefetch_experts": 4, "bogus": 1}, "bogus"),
    ({"dwdp_size": 2, "num_group": 1, "num_groups": 1}, "both"),
    ({"enabled": "yes"}, "enabled"),
    ({"dwdp_size": 2, "num_experts_per_worker": 4}, "num_prefetch_experts"),
])
def test_bad_upstream_config_is_named(bad, match):
    with pytest.raises(DwdpConfigError, match=match):
        from_trtllm(bad)
