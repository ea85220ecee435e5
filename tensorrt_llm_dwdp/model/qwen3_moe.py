"""Qwen3-MoE: grouped-query attention with per-head q/k RMSNorm, softmax top-k routed experts."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.engine.attention import CausalAttention, DecodeAttention, StepMetadata
from tensorrt_llm_dwdp.model.config import MOE, QWEN3_MOE, ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM, DecoderLayer
from tensorrt_llm_dwdp.model.fp8_linear import linear_siblings
from tensorrt_llm_dwdp.model.kv_cache import KvCache
from tensorrt_llm_dwdp.model.layers import MLP, RMSNorm, Rotary
from tensorrt_llm_dwdp.model.moe_block import MoeBlock


class GqaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: Rotary, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_kv_heads, c.head_dim
        b = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=b, dtype=dtype)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=b, dtype=dtype)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=b, dtype=dtype)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=b, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps, dtype)
        self.attn = CausalAttention(self.head_dim ** -0.5)
        self.decode_attn = DecodeAttention(self.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: StepMetadata, cache: KvCache, cos, sin) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = linear_siblings(x, self.q_proj, self.k_proj, self.v_proj)  # FP8: x quantized once
        q = self.rotary.apply(self.q_norm(q.view(n, self.heads, self.head_dim)), cos, sin)
        k = self.rotary.apply(self.k_norm(k.view(n, self.kv_heads, self.head_dim)), cos, sin)
        v = v.view(n, self.kv_heads, self.head_dim)
        cache.write(self.layer_idx, meta.cache_index, k, v)
        if meta.decode is not None:
            d = meta.decode
            k_all, v_all = cache.batch(self.layer_idx, d.slots, d.slot_range, d.max_len)
            groups = q.view(n, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
            out = self.decode_attn(groups, k_all, v_all, d.lengths)
        else:
            out = self.attn(q, k, v, meta, lambda slot, start: cache.prefix(self.layer_idx, slot, start))
        return self.o_proj(out.reshape(n, self.heads * self.head_dim))


class Qwen3MoeForCausalLM(CausalLM):
    """Qwen3-MoE decoder; ``moe_factory(layer_idx)`` builds each MoE layer's ``ConfigurableMoE``."""

    def __init__(self, config: ModelConfig, moe_factory: Callable[[int], nn.Module],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        if config.architecture != QWEN3_MOE:
            raise ValueError(f"Qwen3MoeForCausalLM got a {config.architecture} config")
        rotary = Rotary(config.rope, config.head_dim)
        layers = []
        for i, kind in enumerate(config.layer_kinds):
            if kind == MOE:
                mlp = MoeBlock(moe_factory(i), None)
            else:
                mlp = MLP(config.hidden_size, config.intermediate_size, dtype)
            layers.append(DecoderLayer(config, GqaAttention(config, i, rotary, dtype), mlp, dtype))
        shapes = ((config.num_kv_heads, config.head_dim), (config.num_kv_heads, config.head_dim))
        super().__init__(config, layers, rotary, shapes, dtype)
