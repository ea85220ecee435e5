"""A model's MoE layer: routed experts (``ConfigurableMoE``) plus optional shared experts."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MoeBlock(nn.Module):
    """``experts(x) + shared_experts(x)``; ``experts`` routes and runs the routed experts."""

    def __init__(self, experts: nn.Module, shared_experts: nn.Module | None) -> None:
        super().__init__()
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


def make_moe(config, layer_idx: int, backend: Any = "torch", dwdp=None, ep=None) -> nn.Module:
    """The ``ConfigurableMoE`` of MoE layer ``layer_idx`` of ``config`` (a ``ModelConfig``):
    DeepSeek-V3 group-limited sigmoid routing or Qwen3 softmax top-k; ``backend`` a registered
    name or a backend object (shared by the layers given it); ``dwdp`` / ``ep`` as in
    ``ConfigurableMoE``."""
    from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
    from tensorrt_llm_dwdp.moe.router import RouterConfig

    if config.is_deepseek:
        router = RouterConfig(
            kind="deepseek_v3",
            renormalize=config.norm_topk_prob,
            n_group=config.n_group,
            topk_group=config.topk_group,
            routed_scaling_factor=config.routed_scaling_factor,
        )
    else:
        router = RouterConfig(kind="softmax", renormalize=config.norm_topk_prob)
    return ConfigurableMoE(
        config.num_experts, config.top_k, config.hidden_size, config.moe_intermediate_size,
        router, backend=backend, dwdp=dwdp, layer_idx=layer_idx, ep=ep,
    )
