"""Helpers for the HF oracle tests: one random state dict loaded into both our model and
transformers' reference, then prefill + greedy decode compared step by step."""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.model.batch import BatchInfo


def random_state_dict(template: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Norm weights near 1, everything else N(0, 0.1^2), deterministic per ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in template.items():
        r = torch.randn(t.shape, generator=g, dtype=torch.float32)
        out[name] = (1 + 0.1 * r if name.endswith("norm.weight") else 0.1 * r).to(t.dtype)
    return out


def hf_model(hf_config: dict, state_dict: dict[str, torch.Tensor]):
    transformers = __import__("transformers")
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(hf_config["model_type"], **fields)
    cfg._attn_implementation = "eager"
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
            assert torch.equal(tok, ref_tok), (tok, ref_tok)
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
