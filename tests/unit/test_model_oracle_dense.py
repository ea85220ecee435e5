"""Attention, MLA, rotary (YaRN) and dense MLP against transformers, with no MoE layers.

Every op mirrors HF's eager path in the same dtype, so these match bitwise; the MoE oracle
tests (test_model_oracle.py) cover the routed experts.
"""
import pytest
import torch

from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.qwen3_moe import Qwen3MoeForCausalLM

from _model_oracle_utils import hf_model, random_state_dict, run_pair

pytest.importorskip("transformers")

CASES = {
    "deepseek-q-lora": ("tiny-deepseek-v3", {"first_k_dense_replace": 3}, DeepseekV3ForCausalLM),
    "deepseek-q-proj": ("tiny-deepseek-v3", {"first_k_dense_replace": 3, "q_lora_rank": None},
                        DeepseekV3ForCausalLM),
    "qwen3": ("tiny-qwen3-moe", {"mlp_only_layers": [0, 1, 2]}, Qwen3MoeForCausalLM),
}


def _no_moe(layer_idx):
    raise AssertionError(f"layer {layer_idx} should be dense")


@pytest.mark.parametrize("case", sorted(CASES))
def test_dense_prefill_and_decode_bitwise(case):
    preset, overrides, cls = CASES[case]
    hf = get_preset(preset, overrides=overrides)
    ours = cls(ModelConfig.from_hf(hf), moe_factory=_no_moe).eval()
    sd = random_state_dict(ours.state_dict(), seed=1)
    ours.load_state_dict(sd)
    ref = hf_model(hf, sd)
    g = torch.Generator().manual_seed(2)
    # unequal lengths; prompt 1 runs past the YaRN original context of the tiny preset (128)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (7, 140, 1)]
    for ours_logits, ref_logits in run_pair(ours, ref, prompts, decode_steps=3, slots=[2, 0, 1]):
        assert torch.equal(ours_logits, ref_logits)
