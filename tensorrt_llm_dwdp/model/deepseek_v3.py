"""DeepSeek-V3: multi-head latent attention (MLA), dense first layers, MoE with shared experts.

MLA: queries through a low-rank ``q_a_proj -> q_a_layernorm -> q_b_proj`` (or a plain
``q_proj`` when ``q_lora_rank`` is null); keys/values through a shared latent
``kv_a_proj_with_mqa -> kv_a_layernorm`` whose last ``qk_rope_head_dim`` columns are one rotary
key shared by all heads; ``kv_b_proj`` up-projects the latent to per-head ``k_nope`` and ``v``.
The cache holds the latent and the rotated shared key (see ``kv_cache``). The softmax scale is
``qk_head_dim**-0.5 * yarn_mscale(factor, mscale_all_dim)**2`` under YaRN. Prefill up-projects
the latent to per-head keys/values (compute-bound: fewer FLOPs); decode stays in the latent
space with ``kv_b_proj`` absorbed into the query and the output (bandwidth-bound: one read of
the latent per sequence).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tensorrt_llm_dwdp.engine.attention import CausalAttention, DecodeAttention, StepMetadata
from tensorrt_llm_dwdp.model.config import DEEPSEEK_V3, MOE, ModelConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM, DecoderLayer
from tensorrt_llm_dwdp.model.fp8_linear import dense_weight, linear_siblings
from tensorrt_llm_dwdp.model.kv_cache import KvCache
from tensorrt_llm_dwdp.model.layers import MLP, RMSNorm, Rotary, yarn_mscale
from tensorrt_llm_dwdp.model.moe_block import MoeBlock


class MlaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: Rotary, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.heads = c.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora = c.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        bias = c.attention_bias
        self.q_lora = c.q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(c.hidden_size, self.heads * qk_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, dtype)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.heads * qk_dim, bias=False, dtype=dtype)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, self.kv_lora + self.rope_dim, bias=bias, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, c.rms_norm_eps, dtype)
        self.kv_b_proj = nn.Linear(self.kv_lora, self.heads * (self.nope + self.v_dim), bias=False, dtype=dtype)
        self.o_proj = nn.Linear(self.heads * self.v_dim, c.hidden_size, bias=bias, dtype=dtype)
        scale = qk_dim ** -0.5
        if c.rope.rope_type == "yarn" and c.rope.mscale_all_dim:
            scale *= yarn_mscale(c.rope.factor, c.rope.mscale_all_dim) ** 2
        self.scale = scale
        self.attn = CausalAttention(scale)
        self.decode_attn = DecodeAttention(scale)

    def forward(self, x: torch.Tensor, meta: StepMetadata, cache: KvCache, cos, sin) -> torch.Tensor:
        n = x.shape[0]
        # q_a (or q) and kv_a read the same x: an FP8 checkpoint quantizes it once for both
        q, kv_a = linear_siblings(x, self.q_a_proj if self.q_lora else self.q_proj,
                                  self.kv_a_proj_with_mqa)
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(n, self.heads, self.nope + self.rope_dim)
        q[..., self.nope:] = self.rotary.apply(q[..., self.nope:], cos, sin)
        latent, k_rot = kv_a.split([self.kv_lora, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # [n, 1, kv_lora]
        k_rot = self.rotary.apply(k_rot.unsqueeze(1), cos, sin)  # [n, 1, rope]
        cache.write(self.layer_idx, meta.cache_index, latent, k_rot)
        if meta.decode is not None:
            out = self._decode(q, meta, cache)
        else:
            k, v = self._expand(latent, k_rot)
            out = self.attn(q, k, v, meta, self._prefix(cache))
        return self.o_proj(out.reshape(n, self.heads * self.v_dim))

    def _expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys ``[n, H, nope + rope]`` and values ``[n, H, v]`` from the cached
        latent ``[n, 1, kv_lora]`` and the shared rotated key ``[n, 1, rope]``."""
        n = latent.shape[0]
        kv = self.kv_b_proj(latent[:, 0]).view(n, self.heads, self.nope + self.v_dim)
        k = kv.new_empty(n, self.heads, self.nope + self.rope_dim)
        k[..., : self.nope] = kv[..., : self.nope]
        k[..., self.nope:] = k_rot
        return k, kv[..., self.nope:]

    def _prefix(self, cache: KvCache):
        def prefix(slot: int, start: int):
            return self._expand(*cache.prefix(self.layer_idx, slot, start))
        return prefix

    def _decode(self, q: torch.Tensor, meta: StepMetadata, cache: KvCache) -> torch.Tensor:
        """Decode in the latent space: ``W_UK`` (kv_b_proj's key rows) is absorbed into the
        query and ``W_UV`` (its value rows) into the output, so the step reads each sequence's
        cached latent once instead of up-projecting it to every head. An FP8 ``kv_b_proj`` is
        dequantized to bf16 once after loading for this (``Fp8Linear.dequantized_weight``)."""
        d = meta.decode
        w = dense_weight(self.kv_b_proj, q.dtype).view(self.heads, self.nope + self.v_dim, self.kv_lora)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]                       # [H, nope|v, kv_lora]
        q_lat = torch.bmm(q[..., : self.nope].transpose(0, 1), w_uk)            # [H, B, kv_lora]
        latent, k_rot = cache.batch(self.layer_idx, d.slots, d.slot_range, d.max_len)  # [B, L, 1, .]
        o_lat = self.decode_attn(q_lat.transpose(0, 1).unsqueeze(1), latent, latent, d.lengths,
                                 q[..., self.nope:].unsqueeze(1), k_rot)        # [B, 1, H, kv_lora]
        return torch.bmm(o_lat[:, 0].transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class DeepseekV3ForCausalLM(CausalLM):
    """DeepSeek-V3 decoder. ``moe_factory(layer_idx)`` builds each layer's routed-expert module
    (a ``ConfigurableMoE``; see ``moe_block.make_moe``)."""

    def __init__(self, config: ModelConfig, moe_factory: Callable[[int], nn.Module],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        if config.architecture != DEEPSEEK_V3:
            raise ValueError(f"DeepseekV3ForCausalLM got a {config.architecture} config")
        rotary = Rotary(config.rope, config.qk_rope_head_dim)
        layers = []
        for i, kind in enumerate(config.layer_kinds):
            if kind == MOE:
                shared = None
                if config.n_shared_experts:
                    shared = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, dtype)
                mlp = MoeBlock(moe_factory(i), shared)
            else:
                mlp = MLP(config.hidden_size, config.intermediate_size, dtype)
            layers.append(DecoderLayer(config, MlaAttention(config, i, rotary, dtype), mlp, dtype))
        shapes = ((1, config.kv_lora_rank), (1, config.qk_rope_head_dim))
        super().__init__(config, layers, rotary, shapes, dtype)
