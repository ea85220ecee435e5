"""Named model configurations written as Hugging Face ``config.json`` dicts.

The real presets carry the values of the published checkpoints' ``config.json`` (DeepSeek-V3,
Qwen3-30B-A3B), so a synthetic checkpoint built from them has every real tensor shape; only the
layer count (and, for demos, the vocabulary) may be overridden. ``deepseek-v3-lite`` is the
DeepSeek-V3 architecture (MLA, sigmoid group routing, shared experts) at DeepSeek-V2-Lite sizes.
The ``tiny-*`` presets are small enough to run the HF oracle tests on a CPU in seconds; their
hidden and expert intermediate sizes are multiples of 64, the block of the sm90 MoE kernels, so
``run --moe-backend cutedsl`` runs them. FP8 experts need H and I multiples of 128 (whole
128x128 scale blocks), so ``tiny-deepseek-v3-fp8`` and ``tiny-qwen3-moe-fp8`` are the tiny
presets at hidden and expert intermediate size 128 (dense MLP 256), everything else equal.
"""
from __future__ import annotations

import copy
from typing import Any

_DEEPSEEK_V3: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

_DEEPSEEK_V3_LITE: dict[str, Any] = {
    **copy.deepcopy(_DEEPSEEK_V3),
    "first_k_dense_replace": 1,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "routed_scaling_factor": 1.0,
    "topk_group": 1,
    "vocab_size": 102400,
}

_QWEN3_30B_A3B: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

_TINY_DEEPSEEK_V3: dict[str, Any] = {
    **copy.deepcopy(_DEEPSEEK_V3),
    "first_k_dense_replace": 1,
    "hidden_size": 64,
    "intermediate_size": 128,
    "kv_lora_rank": 32,
    "max_position_embeddings": 65536,
    "moe_intermediate_size": 64,
    "n_group": 4,
    "n_routed_experts": 16,
    "num_attention_heads": 4,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 128,
        "type": "yarn",
    },
    "topk_group": 2,
    "v_head_dim": 16,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "vocab_size": 512,
}

_TINY_QWEN3_MOE: dict[str, Any] = {
    **copy.deepcopy(_QWEN3_30B_A3B),
    "head_dim": 16,
    "hidden_size": 64,
    "intermediate_size": 128,
    "max_position_embeddings": 65536,
    "max_window_layers": 3,
    "moe_intermediate_size": 64,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "vocab_size": 512,
}

_FP8_TINY_SIZES = {"hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 256}

PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v3-lite": _DEEPSEEK_V3_LITE,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
    "tiny-deepseek-v3": _TINY_DEEPSEEK_V3,
    "tiny-qwen3-moe": _TINY_QWEN3_MOE,
    "tiny-deepseek-v3-fp8": {**copy.deepcopy(_TINY_DEEPSEEK_V3), **_FP8_TINY_SIZES},
    "tiny-qwen3-moe-fp8": {**copy.deepcopy(_TINY_QWEN3_MOE), **_FP8_TINY_SIZES},
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(
    name: str,
    *,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a fresh copy of preset ``name`` as an HF config dict.

    ``num_layers`` replaces ``num_hidden_layers``; ``vocab_size`` shrinks or grows the vocabulary
    (demos); ``overrides`` sets any other key (tests use it for e.g. ``q_lora_rank=None``).
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {preset_names()}")
    hf = copy.deepcopy(PRESETS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        hf["num_hidden_layers"] = int(num_layers)
        if "max_window_layers" in hf:
            hf["max_window_layers"] = int(num_layers)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        hf["vocab_size"] = int(vocab_size)
    for key, value in (overrides or {}).items():
        hf[key] = copy.deepcopy(value)
    return hf
