"""Attention, MLA, rotary (YaRN) and dense MLP against transformers, with no MoE layers.

Decode one sequence at a time (``batched_decode = False``): every step is bitwise equal to
transformers' ``padded_sdpa`` reference (its sdpa, with MLA's value head zero-padded so torch's
fused CPU flash kernel runs, as in our engine): prefill runs the same kernel on the same values.

Batched decode (the default: one call for all sequences, MLA in the latent space with kv_b_proj
absorbed) and the MLA prefill differ from plain transformers ``sdpa`` (which runs the quadratic
math kernel for MLA's unequal head dims) in rounding only. Measured over 5 seeds: max |ours -
HF| / max |HF| up to 0.017 at prefill and 0.027 at decode; HF's own eager and sdpa paths differ
by up to 0.026 on the same models. Tolerance: 0.04 * max |HF| per step, greedy tokens equal.
The MoE oracle tests (test_model_oracle.py) cover the routed experts.
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
REL_TOL = 0.04


def _no_moe(layer_idx):
    raise AssertionError(f"layer {layer_idx} should be dense")


def _pair(case, attn, batched_decode):
    preset, overrides, cls = CASES[case]
    hf = get_preset(preset, overrides=overrides)
    ours = cls(ModelConfig.from_hf(hf), moe_factory=_no_moe).eval()
    sd = random_state_dict(ours.state_dict(), seed=1)
    ours.load_state_dict(sd)
    ours.batched_decode = batched_decode
    ref = hf_model(hf, sd, attn)
    g = torch.Generator().manual_seed(2)
    # unequal lengths; prompt 1 runs past the YaRN original context of the tiny preset (128)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (7, 140, 1)]
    return run_pair(ours, ref, prompts, decode_steps=3, slots=[2, 0, 1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_sequence_decode_is_bitwise_equal_to_hf_padded_sdpa(case):
    for i, (ours_logits, ref_logits) in enumerate(_pair(case, "padded_sdpa", batched_decode=False)):
        assert torch.equal(ours_logits, ref_logits), f"step {i}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_batched_decode_matches_hf_sdpa_within_tolerance(case):
    for i, (ours_logits, ref_logits) in enumerate(_pair(case, "sdpa", batched_decode=True)):
        diff = (ours_logits - ref_logits).abs().max().item()
        tol = REL_TOL * ref_logits.abs().max().item()
        assert diff <= tol, f"step {i}: max |ours - HF| = {diff:.4g} > {tol:.4g}"
