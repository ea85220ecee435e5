"""Construct a decoder for a ``ModelConfig`` with the right class and MoE layers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.model.config import DEEPSEEK_V3, ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM


def build_model(config: ModelConfig, moe_factory: Callable[[int], nn.Module],
                dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    """The decoder of ``config.architecture``; ``moe_factory(layer_idx)`` makes routed experts."""
    if config.architecture == DEEPSEEK_V3:
        from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM(config, moe_factory, dtype)
    from tensorrt_llm_dwdp.model.qwen3_moe import Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(config, moe_factory, dtype)


def dense_param_shapes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of every tensor except the MoE layers' routers and routed experts
    (the model built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(config, lambda i: nn.Module(), dtype)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}
