"""Our decoders (loaded from an HF-layout checkpoint) against transformers' reference models.

One random checkpoint per case (bf16 experts, or the same experts quantized to NVFP4 with
ModelOpt's recipe; HF then gets the dequantized weights) is written as sharded safetensors,
loaded with ``load_model`` and compared with ``DeepseekV3ForCausalLM`` / ``Qwen3MoeForCausalLM``
on a batched prefill of unequal-length prompts followed by greedy decode steps through the KV
cache. Greedy tokens must be equal at every step. Logits: with per-sequence decode, attention and
dense parts are bitwise equal to HF's ``padded_sdpa`` (test_model_oracle_dense.py); the MoE layers differ in summation
order (HF adds expert outputs in bf16 one by one, our backend accumulates differently) and
Qwen3's router logits are fp32 here but bf16 in HF, so we allow |diff| <= 2e-2 * max|logit| + 2e-2.
"""
import pytest
import torch

from tensorrt_llm_dwdp.model.checkpoint import load_model
from tensorrt_llm_dwdp.model.hf_names import NVFP4, hf_quant_config
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import quantize_experts_modelopt

from _model_oracle_utils import (
    hf_model, hf_reference_state, random_hf_checkpoint, run_pair, write_checkpoint,
)

pytest.importorskip("transformers")

CASES = {
    "deepseek": ("tiny-deepseek-v3", {}),
    "deepseek-lite-shape": ("tiny-deepseek-v3", {"q_lora_rank": None, "n_group": 1, "topk_group": 1,
                                                 "n_shared_experts": 2, "routed_scaling_factor": 1.0}),
    "qwen3": ("tiny-qwen3-moe", {}),
    "qwen3-mlp-only": ("tiny-qwen3-moe", {"mlp_only_layers": [1]}),
}


def _close(ours, ref):
    tol = 2e-2 * ref.abs().max().item() + 2e-2
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max |ours - HF| = {diff:.4g} > {tol:.4g}"


@pytest.mark.parametrize("quant", ["bf16", NVFP4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_match_hf(case, quant, tmp_path):
    preset, overrides = CASES[case]
    hf = get_preset(preset, overrides=overrides)
    ckpt = random_hf_checkpoint(hf, seed=3)
    if quant == NVFP4:
        ckpt = quantize_experts_modelopt(ckpt)
    write_checkpoint(tmp_path, hf, ckpt, shard_bytes=64 << 10,
                     quant_config=hf_quant_config(NVFP4) if quant == NVFP4 else None)
    ours = load_model(tmp_path)
    ours.batched_decode = False  # attention bitwise equal to the reference: only MoE numerics differ
    ref = hf_model(hf, hf_reference_state(hf, ckpt))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (6, 17, 2)]
    steps = run_pair(ours, ref, prompts, decode_steps=3, slots=[1, 3, 0])
    assert len(steps) == 4
    for ours_logits, ref_logits in steps:
        _close(ours_logits, ref_logits)
