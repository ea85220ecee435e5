"""The decoder skeleton both architectures share: embed -> layers -> norm -> last-token logits.

Parameter names mirror the HF checkpoints (``model.embed_tokens``, ``model.layers.{i}.
self_attn...``, ``model.norm``, ``lm_head``), so non-expert weights load by name; routed experts
live in each MoE layer's ``ConfigurableMoE`` and are loaded through its ``set_local_weights``.
"""
from __future__ import annotations

import torch
from torch import nn

from tensorrt_llm_dwdp.engine.attention import StepMetadata
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.kv_cache import KvCache
from tensorrt_llm_dwdp.model.layers import Embedding, RMSNorm, Rotary


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x, meta: StepMetadata, cache: KvCache, cos, sin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, cache, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig, layers: list[DecoderLayer], dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class CausalLM(nn.Module):
    """Batched prefill / decode over a slot-addressed KV cache.

    ``forward(input_ids LongTensor[N], batch, cache) -> FloatTensor[num_seqs, vocab]``: the
    logits of each sequence's last new token. A step may hold fresh prompts, chunks of longer
    prompts (``start_positions > 0``, attending to their cached prefix) or one decode token per
    sequence; the step's attention metadata is built once here (``engine.attention``).
    Subclasses supply the layers, the rotary module and the cache geometry.
    """

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer], rotary: Rotary,
                 cache_shapes: tuple[tuple[int, int], tuple[int, int]], dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = _Backbone(config, layers, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.rotary = rotary
        self._cache_shapes = cache_shapes
        # Decode steps attend for all sequences in one batched call (MLA in the latent space).
        # False runs each sequence through the prefill kernels instead: the per-sequence
        # reference path (what the HF oracle tests compare bit for bit, and the bench times).
        self.batched_decode = True

    def make_cache(self, max_seqs: int, max_len: int, device: torch.device | str) -> KvCache:
        k_shape, v_shape = self._cache_shapes
        return KvCache(self.config.num_layers, max_seqs, max_len, k_shape, v_shape, self.dtype, device)

    def moe_modules(self) -> dict[int, nn.Module]:
        """``{layer_idx: ConfigurableMoE}`` of the MoE layers, in layer order."""
        return {i: self.model.layers[i].mlp.experts for i in self.config.moe_layer_indices}

    def forward(self, input_ids: torch.Tensor, batch: BatchInfo, cache: KvCache) -> torch.Tensor:
        if input_ids.dim() != 1 or input_ids.shape[0] != batch.num_tokens:
            raise ValueError(
                f"input_ids must be 1-D with batch.num_tokens={batch.num_tokens} tokens, "
                f"got shape {tuple(input_ids.shape)}"
            )
        device = input_ids.device
        meta = StepMetadata.build(batch, cache.max_seqs, cache.max_len, device, self.batched_decode)
        return self.run_step(input_ids, batch.positions(device), meta, cache,
                             batch.last_token_indices(device))

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata,
                 cache: KvCache, last_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The step on device tensors only: ``input_ids`` / ``positions`` int64 ``[N]``,
        ``meta`` built for them, ``last_rows`` int64 (the rows whose logits are returned; None:
        every row, as a decode step). Reads nothing back to the host when ``meta`` is a decode
        step's, so a CUDA graph can capture it (``engine.decode_graphs``)."""
        cos, sin = self.rotary(positions, self.dtype)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, meta, cache, cos, sin)
        x = self.model.norm(x if last_rows is None else x[last_rows])
        return self.lm_head(x).float()
