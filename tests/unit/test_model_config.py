"""ModelConfig from HF config dicts: layer kinds, presets, and loud errors on bad input."""
import json

import pytest

from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.config import DENSE, MOE, ModelConfig
from tensorrt_llm_dwdp.model.presets import get_preset, preset_names


def test_deepseek_v3_preset_matches_real_shapes():
    c = ModelConfig.from_hf(get_preset("deepseek-v3"))
    assert (c.hidden_size, c.num_layers, c.num_experts, c.top_k) == (7168, 61, 256, 8)
    assert (c.moe_intermediate_size, c.intermediate_size, c.vocab_size) == (2048, 18432, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (8, 4, 2.5)
    assert c.layer_kinds[:3] == (DENSE,) * 3 and c.layer_kinds[3:] == (MOE,) * 58
    assert c.moe_layer_indices == tuple(range(3, 61))
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.mscale_all_dim == 1.0
    assert c.rope.interleave


def test_lite_and_qwen_presets():
    lite = ModelConfig.from_hf(get_preset("deepseek-v3-lite"))
    assert (lite.hidden_size, lite.num_layers, lite.num_experts, lite.top_k) == (2048, 27, 64, 6)
    assert lite.q_lora_rank is None and lite.n_shared_experts == 2 and lite.moe_layer_indices[0] == 1
    q = ModelConfig.from_hf(get_preset("qwen3-30b-a3b"))
    assert (q.hidden_size, q.num_layers, q.num_experts, q.top_k, q.moe_intermediate_size) == (
        2048, 48, 128, 8, 768)
    assert (q.num_attention_heads, q.num_kv_heads, q.head_dim, q.vocab_size) == (32, 4, 128, 151936)
    assert q.norm_topk_prob and q.moe_layer_indices == tuple(range(48))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_parses_with_overrides(name):
    c = ModelConfig.from_hf(get_preset(name, num_layers=4, vocab_size=300))
    assert c.num_layers == 4 and len(c.layer_kinds) == 4 and c.vocab_size == 300


def test_layer_kind_rules():
    c = ModelConfig.from_hf(get_preset("deepseek-v3", num_layers=8, overrides={"moe_layer_freq": 2}))
    assert c.moe_layer_indices == (4, 6)
    q = ModelConfig.from_hf(get_preset(
        "tiny-qwen3-moe", num_layers=6, overrides={"mlp_only_layers": [0], "decoder_sparse_step": 2}))
    assert q.moe_layer_indices == (1, 3, 5)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"]})
    hf = get_preset("tiny-deepseek-v3")
    del hf["kv_lora_rank"]
    with pytest.raises(KeyError, match="kv_lora_rank"):
        ModelConfig.from_hf(hf)
    hf = get_preset("tiny-qwen3-moe")
    del hf["num_experts"]
    with pytest.raises(KeyError, match="num_experts"):
        ModelConfig.from_hf(hf)
    with pytest.raises(ValueError, match="n_group"):
        ModelConfig.from_hf(get_preset("tiny-deepseek-v3", overrides={"n_group": 3}))
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("gpt-5")
    with pytest.raises(FileNotFoundError):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny-qwen3-moe")))
    assert ModelConfig.from_file(tmp_path).num_experts == 8


def test_batch_info():
    b = BatchInfo(slots=(2, 0), start_positions=(0, 5), lengths=(3, 1))
    assert b.num_tokens == 4 and b.offsets == (0, 3, 4)
    assert b.positions().tolist() == [0, 1, 2, 5]
    assert b.last_token_indices().tolist() == [2, 3]
    with pytest.raises(ValueError, match="distinct"):
        BatchInfo((1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="length=0"):
        BatchInfo((0,), (0,), (0,))
    with pytest.raises(ValueError, match="equally long"):
        BatchInfo((0, 1), (0,), (1, 1))


def test_rope_from_transformers_v5_rope_parameters():
    hf = get_preset("tiny-qwen3-moe")
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    c = ModelConfig.from_hf(hf)
    assert c.rope.theta == 5e5 and c.rope.rope_type == "default" and not c.rope.interleave
    ds = get_preset("tiny-deepseek-v3")
    ds["rope_parameters"] = dict(ds.pop("rope_scaling"), rope_type="yarn", rope_theta=ds.pop("rope_theta"))
    r = ModelConfig.from_hf(ds).rope
    assert (r.rope_type, r.factor, r.original_max_position_embeddings, r.theta) == ("yarn", 4.0, 128, 10000.0)
    ds["rope_parameters"]["rope_type"] = "longrope"
    with pytest.raises(ValueError, match="longrope"):
        ModelConfig.from_hf(ds)


@pytest.mark.parametrize("preset, overrides, match", [
    ("tiny-qwen3-moe", {"num_experts_per_tok": 0}, r"num_experts_per_tok=0 must be in \[1, num_experts = 8\]"),
    ("tiny-qwen3-moe", {"num_experts_per_tok": 9}, r"num_experts_per_tok=9 must be in \[1, num_experts = 8\]"),
    ("tiny-qwen3-moe", {"num_key_value_heads": -2}, "num_key_value_heads=-2 must be >= 1"),
    ("tiny-qwen3-moe", {"num_attention_heads": 0, "num_key_value_heads": 1}, "num_attention_heads=0"),
    ("tiny-qwen3-moe", {"hidden_size": 0}, "hidden_size=0"),
    ("tiny-qwen3-moe", {"vocab_size": -1}, "vocab_size=-1"),
    ("tiny-qwen3-moe", {"moe_intermediate_size": 0}, "moe_intermediate_size=0"),
    ("tiny-qwen3-moe", {"rms_norm_eps": 0.0}, "rms_norm_eps=0.0"),
    ("tiny-deepseek-v3", {"n_group": -1}, "n_group=-1"),
    ("tiny-deepseek-v3", {"kv_lora_rank": 0}, "kv_lora_rank=0"),
    ("tiny-deepseek-v3", {"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ("tiny-deepseek-v3", {"n_group": 16, "topk_group": 16}, r"n_routed_experts / n_group = 16 / 16 < 2"),
])
def test_out_of_range_values_are_rejected_naming_key_and_range(preset, overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(get_preset(preset, overrides=overrides))


def test_deepseek_top_k_beyond_the_reachable_groups_is_rejected():
    hf = get_preset("tiny-deepseek-v3")
    c = ModelConfig.from_hf(hf)
    reachable = c.topk_group * c.num_experts // c.n_group
    with pytest.raises(ValueError, match=f"num_experts_per_tok={reachable + 1} must be in "
                                         f"\\[1, topk_group \\* n_routed_experts / n_group = {reachable}\\]"):
        ModelConfig.from_hf(get_preset("tiny-deepseek-v3",
                                       overrides={"num_experts_per_tok": reachable + 1}))
