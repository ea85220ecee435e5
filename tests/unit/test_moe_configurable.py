"""ConfigurableMoE: against Hugging Face's Qwen3-MoE block, DeepSeek routing, the DWDP
protocol (weights(i) then done(i)) with a stand-in manager, and loading errors."""
import pytest
import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
from tensorrt_llm_dwdp.moe.router import RouterConfig, deepseek_v3_topk
from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4_per_leading

E, K, H, I = 8, 2, 64, 32


def _random_params(num_experts, quant, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * I, H, generator=gen) / H**0.5
    w2 = torch.randn(num_experts, H, I, generator=gen) / I**0.5
    if quant == "bf16":
        return {"w3_w1_weight": w13.bfloat16(), "w2_weight": w2.bfloat16()}
    q13, q2 = quantize_nvfp4_per_leading(w13), quantize_nvfp4_per_leading(w2)
    return {"w3_w1_weight": q13.packed, "w3_w1_weight_scale": q13.scale,
            "fc31_alpha": q13.global_scale, "w2_weight": q2.packed,
            "w2_weight_scale": q2.scale, "fc2_alpha": q2.global_scale}


def test_matches_hf_qwen3_moe_block():
    mod = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=K, norm_topk_prob=True, hidden_act="silu")
    hf = mod.Qwen3MoeSparseMoeBlock(cfg).float()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.gate.weight.copy_(torch.randn(E, H, generator=gen).bfloat16().float())
        hf.experts.gate_up_proj.copy_((torch.randn(E, 2 * I, H, generator=gen) / H**0.5).bfloat16())
        hf.experts.down_proj.copy_((torch.randn(E, H, I, generator=gen) / I**0.5).bfloat16())
        x = torch.randn(1, 30, H, generator=gen).bfloat16()
        ref = hf(x.float())[0]
    moe = ConfigurableMoE(E, K, H, I, RouterConfig("softmax", renormalize=True))
    gate_up = hf.experts.gate_up_proj.detach()
    moe.gate.weight.data.copy_(hf.gate.weight.detach())
    # HF stores [gate; up], ours [w3 = up; w1 = gate].
    moe.set_local_weights({
        "w3_w1_weight": torch.cat([gate_up[:, I:], gate_up[:, :I]], dim=1).bfloat16(),
        "w2_weight": hf.experts.down_proj.detach().bfloat16(),
    })
    got = moe(x[0])
    assert got.dtype == torch.bfloat16 and got.shape == (30, H)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())


def test_deepseek_router_and_backend_wiring():
    router = RouterConfig("deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5)
    moe = ConfigurableMoE(E, K, H, I, router, backend=TorchMoeBackend())
    gen = torch.Generator().manual_seed(4)
    moe.gate.weight.data.copy_(torch.randn(E, H, generator=gen))
    moe.gate.e_score_correction_bias.copy_(torch.randn(E, generator=gen))
    params = _random_params(E, "nvfp4")
    moe.set_local_weights(params)
    x = torch.randn(20, H, generator=gen).bfloat16()
    ids, w = deepseek_v3_topk(x.float() @ moe.gate.weight.t(), moe.gate.e_score_correction_bias,
                              K, 4, 2, 2.5, True)
    want = TorchMoeBackend().run_experts(x, ids, w, moe.local_weights)
    assert torch.equal(moe(x), want)
    assert "gate.e_score_correction_bias" in moe.state_dict()
    assert "gate.weight" in moe.state_dict()


class StandInManager:
    """The DwdpManager surface ConfigurableMoE uses (weights, done, resident_experts,
    view_offsets, weight_layout), over tensors sliced from a full expert set by the layout
    rule; records the calls it gets."""

    expert_view = "multi"
    weight_layout = "linear"

    def __init__(self, full: dict, layout: ExpertLayout, layer_idx: int):
        self.layout = layout
        self.resident_experts = layout.num_experts_per_worker
        self.view_offsets = layout.tensor_offsets
        self.layer_idx = layer_idx
        self.calls: list[tuple[str, int]] = []
        self.view = {
            name: [t[o:o + n].clone() for o, n in zip(layout.tensor_offsets, layout.tensor_sizes)]
            for name, t in full.items()
        }

    def local(self) -> dict:
        return {name: ts[self.layout.rank] for name, ts in self.view.items()}

    def weights(self, layer_idx: int) -> dict:
        self.calls.append(("weights", layer_idx))
        return self.view

    def done(self, layer_idx: int) -> None:
        self.calls.append(("done", layer_idx))


@pytest.mark.parametrize("quant", ["nvfp4", "bf16"])
def test_dwdp_view_bitwise_equals_single_rank(quant):
    num_experts, size, w, p = 10, 3, 4, 3  # W != P: unequal tensor sizes
    full = _random_params(num_experts, quant, seed=5)
    gen = torch.Generator().manual_seed(6)
    gate = torch.randn(num_experts, H, generator=gen)
    x = torch.randn(25, H, generator=gen).bfloat16()

    single = ConfigurableMoE(num_experts, 3, H, I)
    single.gate.weight.data.copy_(gate)
    single.set_local_weights(full)
    want = single(x)
    for rank in range(size):
        mgr = StandInManager(full, ExpertLayout(num_experts, size, w, p, rank), layer_idx=7)
        moe = ConfigurableMoE(num_experts, 3, H, I, dwdp=mgr, layer_idx=7)
        moe.gate.weight.data.copy_(gate)
        assert moe.num_local_experts == w
        moe.set_local_weights(mgr.local())
        assert torch.equal(moe(x), want), f"rank {rank}"
        assert mgr.calls == [("weights", 7), ("done", 7)]


def test_set_local_weights_checks_expert_count_and_sizes():
    moe = ConfigurableMoE(E, K, H, I)
    with pytest.raises(ValueError, match=r"\(experts, H, I\) = \(6, 64, 32\), expected \(8, 64, 32\)"):
        moe.set_local_weights(_random_params(6, "bf16"))
    mgr = StandInManager(_random_params(E, "bf16"), ExpertLayout(E, 2, 5, 3, 0), layer_idx=0)
    moe = ConfigurableMoE(E, K, H, I, dwdp=mgr)
    with pytest.raises(ValueError, match=r"expected \(5, 64, 32\)"):
        moe.set_local_weights(_random_params(E, "bf16"))
    other = ConfigurableMoE(E, K, H * 2, I)
    with pytest.raises(ValueError, match="expected \\(8, 128, 32\\)"):
        other.set_local_weights(_random_params(E, "bf16"))


def test_forward_errors():
    moe = ConfigurableMoE(E, K, H, I)
    with pytest.raises(RuntimeError, match="set_local_weights"):
        moe(torch.zeros(2, H, dtype=torch.bfloat16))
    moe.set_local_weights(_random_params(E, "bf16"))
    with pytest.raises(ValueError, match=r"hidden must be \[T, 64\]"):
        moe(torch.zeros(2, H + 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="x must be bf16"):
        moe(torch.zeros(2, H))
    with pytest.raises(ValueError, match="top_k=9"):
        ConfigurableMoE(E, 9, H, I)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        ConfigurableMoE(E, K, H, I, backend="nope")


def test_zero_tokens_still_runs_the_dwdp_protocol():
    mgr = StandInManager(_random_params(E, "nvfp4"), ExpertLayout(E, 2, 5, 3, 1), layer_idx=2)
    moe = ConfigurableMoE(E, K, H, I, RouterConfig("deepseek_v3", n_group=2, topk_group=1),
                          dwdp=mgr, layer_idx=2)
    moe.set_local_weights(mgr.local())
    out = moe(torch.zeros(0, H, dtype=torch.bfloat16))
    assert out.shape == (0, H) and out.dtype == torch.bfloat16
    assert mgr.calls == [("weights", 2), ("done", 2)]
