"""Helpers for the HF oracle tests: one random state dict loaded into both our model and
transformers' reference, then prefill + greedy decode compared step by step.

The reference attention is transformers' ``sdpa`` (``attn="sdpa"``) or ``padded_sdpa``: the
same function with the value head zero-padded to the query/key head dim when they differ
(MLA), so torch's fused CPU flash kernel runs as in our engine instead of the quadratic math
kernel HF's sdpa falls back to. Mathematically the same attention; numerically the kernel ours
runs, which makes exact comparisons possible.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _register_padded_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def padded_sdpa(module, query, key, value, attention_mask, **kwargs):
        dv = value.shape[-1]
        value = F.pad(value, (0, query.shape[-1] - dv)) if dv != query.shape[-1] else value
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out[..., :dv], weights

    AttentionInterface.register("padded_sdpa", padded_sdpa)
    AttentionMaskInterface.register("padded_sdpa", sdpa_mask)

from tensorrt_llm_dwdp.model.batch import BatchInfo


def random_state_dict(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Norm weights near 1, everything else N(0, 0.1^2), deterministic per ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in template.items():
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        out[name] = (1 + 0.1 * r if name.endswith("norm.weight") else 0.1 * r).to(t.dtype)
    return out


def hf_model(hf_config: dict, state_dict: dict[str, torch.Tensor], attn: str = "padded_sdpa"):
    transformers = __import__("transformers")
    if attn == "padded_sdpa":
        _register_padded_sdpa()
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    cfg._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # HF keeps the DeepSeek correction bias in fp32; every other tensor must be provided.
    assert not missing and not unexpected, (missing, unexpected)
    return model


def run_pair(ours, ref, prompts: list[torch.Tensor], decode_steps: int, slots=None):
    """Prefill all prompts in one batch, then ``decode_steps`` greedy steps in one batch each.
    Returns per step (our logits [S, V], HF logits [S, V], our tokens, HF tokens)."""
    slots = list(range(len(prompts))) if slots is None else slots
    lens = [int(p.numel()) for p in prompts]
    cache = ours.make_cache(max(slots) + 1, max(lens) + decode_steps + 1, "cpu")
    steps = []
    with torch.no_grad():
        logits = ours(torch.cat(prompts), BatchInfo(tuple(slots), (0,) * len(lens), tuple(lens)), cache)
        outs = [ref(p[None], use_cache=True) for p in prompts]
        ref_logits = torch.stack([o.logits[0, -1].float() for o in outs])
        pasts = [o.past_key_values for o in outs]
        steps.append((logits, ref_logits))
        pos = list(lens)
        for _ in range(decode_steps):
            tok = logits.argmax(-1)
            ref_tok = ref_logits.argmax(-1)
            # Where HF's bf16 logits tie exactly between our pick and its own (argmax then takes
            # the lower index), either token is the greedy choice: both continue with HF's.
            rows_ = torch.arange(len(tok))
            tie = ref_logits[rows_, tok] == ref_logits[rows_, ref_tok]
            assert torch.equal(torch.where(tie, ref_tok, tok), ref_tok), (tok, ref_tok)
            tok = ref_tok
            logits = ours(tok, BatchInfo(tuple(slots), tuple(pos), (1,) * len(lens)), cache)
            rows = []
            for i in range(len(prompts)):
                o = ref(ref_tok[i].view(1, 1), past_key_values=pasts[i], use_cache=True)
                pasts[i] = o.past_key_values
                rows.append(o.logits[0, -1].float())
            ref_logits = torch.stack(rows)
            steps.append((logits, ref_logits))
            pos = [p + 1 for p in pos]
    return steps


def random_hf_checkpoint(hf_config: dict, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """An HF-layout state dict (one key per expert projection) with loud random values: norms
    near 1, everything else N(0, scale^2) in bf16; the DeepSeek correction bias is fp32 holding
    bf16-representable values (HF may keep it in either dtype)."""
    from tensorrt_llm_dwdp.model.builder import dense_param_shapes
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.model.hf_names import PROJS, expert_key, router_keys

    cfg = ModelConfig.from_hf(hf_config)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16)

    sd = {}
    for name, shape in dense_param_shapes(cfg).items():
        sd[name] = (1 + rnd(*shape)) if name.endswith("norm.weight") else rnd(*shape)
    h, inter, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    for layer in cfg.moe_layer_indices:
        keys = router_keys(layer, cfg.is_deepseek)
        sd[keys["weight"]] = rnd(e, h)
        if "e_score_correction_bias" in keys:
            sd[keys["e_score_correction_bias"]] = rnd(e).float()
        for x in range(e):
            for proj in PROJS:
                sd[expert_key(layer, x, proj)] = rnd(h, inter) if proj == "down_proj" else rnd(inter, h)
    return sd


def hf_reference_state(hf_config: dict, checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint keys -> transformers' fused ``experts.gate_up_proj`` [E, 2I, H]
    (gate rows first) and ``experts.down_proj`` [E, H, I]; NVFP4 experts are dequantized to
    bf16 (``e2m1 * scale * weight_scale_2``)."""
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.model.hf_names import expert_key
    from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4

    cfg = ModelConfig.from_hf(hf_config)

    def weight(layer, x, proj):
        k = expert_key(layer, x, proj)
        t = checkpoint[k]
        if t.dtype == torch.uint8:
            return dequantize_nvfp4(t, checkpoint[expert_key(layer, x, proj, "weight_scale")],
                                    checkpoint[expert_key(layer, x, proj, "weight_scale_2")],
                                    torch.bfloat16)
        return t

    out = {k: v for k, v in checkpoint.items() if ".mlp.experts." not in k}
    for layer in cfg.moe_layer_indices:
        e = range(cfg.num_experts)
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack(
            [torch.cat((weight(layer, x, "gate_proj"), weight(layer, x, "up_proj"))) for x in e])
        out[p + "down_proj"] = torch.stack([weight(layer, x, "down_proj") for x in e])
    return out


def write_checkpoint(path, hf_config: dict, checkpoint: dict[str, torch.Tensor], shard_bytes: int,
                     quant_config: dict | None = None) -> None:
    import json
    import os

    from tensorrt_llm_dwdp.model.safetensors_io import ShardedWriter

    w = ShardedWriter(path, shard_bytes)
    w.add_all(checkpoint.items())
    w.finish()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    if quant_config is not None:
        with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
            json.dump(quant_config, f)
