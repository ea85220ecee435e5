"""DeepSeek-V3 and Qwen3-MoE decoders, their configs, HF checkpoint loading, synthetic checkpoints.

Entry points: ``load_model(path, device=..., dwdp=...)`` -> ``CausalLM``;
``CausalLM.forward(input_ids, BatchInfo, KvCache) -> logits [num_seqs, vocab]``;
``write_synthetic_checkpoint`` / ``get_preset``; ``load_tokenizer``.
"""
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.builder import build_model
from tensorrt_llm_dwdp.model.checkpoint import load_model, read_config
from tensorrt_llm_dwdp.model.config import ModelConfig, RopeConfig
from tensorrt_llm_dwdp.model.decoder import CausalLM
from tensorrt_llm_dwdp.model.kv_cache import KvCache
from tensorrt_llm_dwdp.model.presets import get_preset, preset_names
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BatchInfo",
    "ByteTokenizer",
    "CausalLM",
    "KvCache",
    "ModelConfig",
    "RopeConfig",
    "build_model",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "preset_names",
    "read_config",
    "write_synthetic_checkpoint",
]
