"""Synthetic checkpoints: real shapes from the presets, bounded shards, determinism, scale."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from tensorrt_llm_dwdp.model.builder import dense_param_shapes
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.hf_names import NVFP4
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import expert_tensors, write_synthetic_checkpoint
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4


def test_deepseek_v3_shapes_are_real():
    cfg = ModelConfig.from_hf(get_preset("deepseek-v3", num_layers=4))
    shapes = dense_param_shapes(cfg)
    assert shapes["model.embed_tokens.weight"] == (129280, 7168)
    assert shapes["model.layers.0.self_attn.q_a_proj.weight"] == (1536, 7168)
    assert shapes["model.layers.0.self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (576, 7168)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (128 * 256, 512)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (7168, 128 * 128)
    assert shapes["model.layers.2.mlp.gate_proj.weight"] == (18432, 7168)
    assert shapes["model.layers.3.mlp.shared_experts.down_proj.weight"] == (7168, 2048)
    assert "model.layers.3.mlp.gate_proj.weight" not in shapes
    g = torch.Generator().manual_seed(0)
    got = {k: (tuple(t.shape), t.dtype) for k, t in expert_tensors(3, 255, 7168, 2048, NVFP4, g)}
    p = "model.layers.3.mlp.experts.255."
    assert got[p + "gate_proj.weight"] == ((2048, 3584), torch.uint8)
    assert got[p + "gate_proj.weight_scale"] == ((2048, 448), torch.float8_e4m3fn)
    assert got[p + "down_proj.weight"] == ((7168, 1024), torch.uint8)
    assert got[p + "down_proj.weight_scale_2"] == ((), torch.float32)
    assert got[p + "up_proj.input_scale"] == ((), torch.float32)


def test_nvfp4_synthetic_scale():
    g = torch.Generator().manual_seed(1)
    t = dict(expert_tensors(0, 0, 512, 256, NVFP4, g))
    p = "model.layers.0.mlp.experts.0.up_proj."
    w = dequantize_nvfp4(t[p + "weight"], t[p + "weight_scale"], t[p + "weight_scale_2"])
    assert 0.017 < w.std().item() < 0.023 and abs(w.mean().item()) < 1e-3


def _digest(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("quant", ["bf16", NVFP4])
def test_shards_bounded_and_deterministic(tmp_path, quant):
    hf = get_preset("tiny-qwen3-moe", num_layers=2, vocab_size=300)
    limit = 40 << 10
    a = write_synthetic_checkpoint(tmp_path / "a", hf, quant=quant, seed=3, shard_bytes=limit)
    b = write_synthetic_checkpoint(tmp_path / "b", hf, quant=quant, seed=3, shard_bytes=limit)
    write_synthetic_checkpoint(tmp_path / "c", hf, quant=quant, seed=4, shard_bytes=limit)
    assert len(a.shards) > 2 and a.shards == b.shards
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(a.shards)
    for shard in a.shards:  # tensor bytes per shard stay within the limit (no tensor exceeds it)
        with safe_open(tmp_path / "a" / shard, "pt") as h:
            size = sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys())
        assert size <= limit, (shard, size)
    da, db, dc = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert da.keys() == db.keys() == dc.keys() and len(da) == a.num_tensors
    assert all(torch.equal(da[k].reshape(-1).view(torch.uint8), db[k].reshape(-1).view(torch.uint8)) for k in da)
    assert not torch.equal(da["model.layers.1.self_attn.q_proj.weight"], dc["model.layers.1.self_attn.q_proj.weight"])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["vocab_size"] == 300 and cfg["eos_token_id"] == 257
    assert os.path.isfile(tmp_path / "a" / "hf_quant_config.json") == (quant == NVFP4)


def test_vocab_too_small_for_byte_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="259"):
        write_synthetic_checkpoint(tmp_path, get_preset("tiny-qwen3-moe", vocab_size=100))
