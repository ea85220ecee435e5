"""model/memory.py reads what the process holds (RSS on the CPU), within its stated resolution."""
import torch

from tensorrt_llm_dwdp.model.memory import RESOLUTION_BYTES, RSS, dense_model_bytes, in_use


def test_rss_sees_an_allocation_and_its_release():
    before = in_use("cpu")
    assert before.source == RSS
    t = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MiB, every page written
    held = in_use("cpu") - before
    assert abs(held - (64 << 20)) <= RESOLUTION_BYTES[RSS], held
    del t
    assert in_use("cpu") - before <= RESOLUTION_BYTES[RSS]


def test_dense_model_bytes_is_what_its_tensors_hold():
    from tensorrt_llm_dwdp.model.builder import build_model
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.model.moe_block import make_moe
    from tensorrt_llm_dwdp.model.presets import get_preset

    config = ModelConfig.from_hf(get_preset("tiny-deepseek-v3", vocab_size=262144))  # ~64 MiB
    with torch.device("meta"):
        model = build_model(config, lambda i: make_moe(config, i, "torch"))
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert tensors >= 4 * RESOLUTION_BYTES[RSS]
    assert abs(dense_model_bytes(config, "cpu") - tensors) <= RESOLUTION_BYTES[RSS]
