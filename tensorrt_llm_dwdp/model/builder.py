"""Construct a decoder for a ``ModelConfig`` with the right class and MoE layers."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.model.config import DEEPSEEK_V3, ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM
from tensorrt_llm_dwdp.model.fp8_linear import convert_linears_
from tensorrt_llm_dwdp.model.hf_names import FP8


def build_model(config: ModelConfig, moe_factory: Callable[[int], nn.Module],
                dtype: torch.dtype = torch.bfloat16) -> CausalLM:
    """The decoder of ``config.architecture``; ``moe_factory(layer_idx)`` makes routed experts.
    With ``config.linear_quant == "fp8"`` its projection linears are ``Fp8Linear``."""
    if config.architecture == DEEPSEEK_V3:
        from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM(config, moe_factory, dtype)
    else:
        from tensorrt_llm_dwdp.model.qwen3_moe import Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(config, moe_factory, dtype)
    if config.linear_quant == FP8:
        convert_linears_(model, config.linear_quant_skip)
    return model


def dense_param_specs(config: ModelConfig, dtype: torch.dtype = torch.bfloat16
                      ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """HF names, shapes and dtypes of every tensor except the MoE layers' routers and routed
    experts (the model built on the meta device, so nothing is allocated). FP8 linears list
    their e4m3 ``weight`` and float32 ``weight_scale_inv``."""
    with torch.device("meta"):
        model = build_model(config, lambda i: nn.Module(), dtype)
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def dense_param_shapes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of :func:`dense_param_specs`."""
    return {name: shape for name, (shape, _) in dense_param_specs(config, dtype).items()}
