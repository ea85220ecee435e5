"""An FP8 block-128 checkpoint in our decoders against transformers' reference models.

transformers 5 reads this format (``integrations/finegrained_fp8.py``); on a machine without a
GPU its quantizer dequantizes every FP8 linear to bf16 (``weight * weight_scale_inv`` per 128x128
block, ``Fp8Dequantize``) and runs the bf16 model, and loading through it needs ``accelerate``,
which this project does not depend on. The oracle here is that CPU path done by hand: every
e4m3 weight of the checkpoint dequantized to bf16 and loaded into ``DeepseekV3ForCausalLM`` /
``Qwen3MoeForCausalLM``. Our W8A16 configuration (``Fp8Linear.gemm = "dequantized"``, the
torch-grouped experts) is that same math and must agree to bf16 precision: names, shapes, the
up/gate order of the experts, the kv_b rows MLA splits and the block grid are all checked
there. Our FP8 path quantizes activations per token per 128 before every GEMM (e4m3: at most
2^-4 relative per element, averaging out over each dot product): a few percent of the logits.
"""
import pytest
import torch

from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.checkpoint import load_model
from tensorrt_llm_dwdp.model.fp8_linear import Fp8Linear
from tensorrt_llm_dwdp.model.hf_names import fp8_quant_config
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.quant.fp8 import dequantize_weight_blocks, quantize_weight_blocks

from _model_oracle_utils import (
    hf_model, hf_reference_state, random_hf_checkpoint, write_checkpoint,
)

pytest.importorskip("transformers")


def _fp8_checkpoint(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every projection linear (attention, dense MLP, shared and routed experts) to e4m3 +
    ``weight_scale_inv`` with the checkpoints' recipe; the rest as it is."""
    out = {}
    for key, t in ckpt.items():
        linear = t.dim() == 2 and key.endswith(".weight") and not any(
            part in key for part in ("embed_tokens", "lm_head", "norm", ".mlp.gate.weight"))
        if linear:
            q, s = quantize_weight_blocks(t)
            out[key], out[key[: -len("weight")] + "weight_scale_inv"] = q, s
        else:
            out[key] = t
    return out


def _dequantized(ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CPU path: each FP8 weight times its block scales, in bf16."""
    out = {}
    for key, t in ckpt.items():
        if key.endswith(".weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = ckpt[key[: -len("weight")] + "weight_scale_inv"]
            t = dequantize_weight_blocks(t, scale).to(torch.bfloat16)
        out[key] = t
    return out


def _teacher_forced(ours, ref, prompts, decode_steps):
    """Prefill, then ``decode_steps`` steps that feed both models HF's greedy tokens (greedy
    choices may differ where activation quantization moves near-tied logits). Per step:
    (our logits, HF's)."""
    lens = [int(p.numel()) for p in prompts]
    slots = tuple(range(len(prompts)))
    cache = ours.make_cache(len(prompts), max(lens) + decode_steps + 1, "cpu")
    steps = []
    with torch.no_grad():
        logits = ours(torch.cat(prompts), BatchInfo(slots, (0,) * len(lens), tuple(lens)), cache)
        outs = [ref(p[None], use_cache=True) for p in prompts]
        ref_logits = torch.stack([o.logits[0, -1].float() for o in outs])
        pasts = [o.past_key_values for o in outs]
        steps.append((logits.float(), ref_logits))
        for i in range(decode_steps):
            tok = ref_logits.argmax(-1)
            pos = tuple(n + i for n in lens)
            logits = ours(tok, BatchInfo(slots, pos, (1,) * len(lens)), cache)
            rows = []
            for j in range(len(prompts)):
                o = ref(tok[j].view(1, 1), past_key_values=pasts[j], use_cache=True)
                pasts[j] = o.past_key_values
                rows.append(o.logits[0, -1].float())
            ref_logits = torch.stack(rows)
            steps.append((logits.float(), ref_logits))
    return steps


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3-fp8", "tiny-qwen3-moe-fp8"])
def test_fp8_checkpoint_matches_hf_dequantized(preset, tmp_path):
    hf = get_preset(preset, num_layers=2)
    ckpt = _fp8_checkpoint(random_hf_checkpoint(hf, seed=5, scale=0.03))
    write_checkpoint(tmp_path, dict(hf, quantization_config=fp8_quant_config()), ckpt,
                     shard_bytes=256 << 10)
    ref = hf_model(hf, hf_reference_state(hf, _dequantized(ckpt)))
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (9, 21, 3)]

    # 1. The same math as HF's CPU path (W8A16: linears dequantized, experts dequantized by
    # torch-grouped): only summation order and bf16 roundings differ, as in the bf16 oracle.
    # Names, shapes, up/gate order and the block grid are checked here to that precision.
    w8a16 = load_model(tmp_path, moe_backend="torch-grouped")
    w8a16.batched_decode = False
    for m in w8a16.modules():
        if isinstance(m, Fp8Linear):
            m.gemm = "dequantized"
    for step, (a, b) in enumerate(_teacher_forced(w8a16, ref, prompts, decode_steps=2)):
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 1.5e-2, f"W8A16 step {step}: |ours - HF| / |HF| = {rel:.3g}"

    # 2. The FP8 path (activations quantized per token per 128 before every GEMM): the prefill
    # within the activation quantization error. Decode steps are left out: with random weights
    # a quantized activation can flip a near-tied expert choice, a discrete jump either side.
    ours = load_model(tmp_path)
    ours.batched_decode = False
    (a, b), = _teacher_forced(ours, ref, prompts, decode_steps=0)
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < 0.1, f"FP8 prefill: |ours - HF| / |HF| = {rel:.3g}"
