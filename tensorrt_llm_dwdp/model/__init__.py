"""DeepSeek-V3 and Qwen3-MoE decoders, their configs, HF checkpoint loading, synthetic checkpoints."""
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.config import ModelConfig, RopeConfig
from tensorrt_llm_dwdp.model.presets import get_preset, preset_names
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "BatchInfo",
    "ByteTokenizer",
    "ModelConfig",
    "RopeConfig",
    "get_preset",
    "load_tokenizer",
    "preset_names",
]
