"""Chunked prefill and batched decode on the real decoders (tiny presets, dense layers, CPU).

A prompt prefilled in chunks attends to the cached KV of the earlier chunks (causal with an
offset, merged by log-sum-exp); the result differs from the one-shot prefill by rounding only.
Measured here: max |chunked - unchunked| / max |unchunked| <= 0.02 on the last-token logits
(bf16; the chunk's two partial softmaxes are merged in fp32 and rounded once more). Tolerance
0.03 relative; greedy tokens equal.
"""
import pytest
import torch

from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.qwen3_moe import Qwen3MoeForCausalLM

from _model_oracle_utils import random_state_dict

REL_TOL = 0.03
MODELS = {
    "deepseek": ("tiny-deepseek-v3", {"first_k_dense_replace": 2}, DeepseekV3ForCausalLM),
    "qwen3": ("tiny-qwen3-moe", {"mlp_only_layers": [0, 1]}, Qwen3MoeForCausalLM),
}


def _model(name, num_layers=2):
    preset, overrides, cls = MODELS[name]
    hf = get_preset(preset, num_layers=num_layers, overrides=overrides)
    model = cls(ModelConfig.from_hf(hf), moe_factory=None).eval()
    model.load_state_dict(random_state_dict(model.state_dict(), seed=5))
    return model


def prefill(model, prompt, chunks, cache, slot=0):
    """Prefill ``prompt`` into ``slot`` in steps of the given sizes; last step's logits."""
    start = 0
    with torch.inference_mode():
        for n in chunks:
            logits = model(prompt[start:start + n], BatchInfo((slot,), (start,), (n,)), cache)
            start += n
    assert start == len(prompt)
    return logits[0]


def greedy(model, first_logits, cache, start, steps, slot=0):
    tokens = [int(first_logits.argmax())]
    with torch.inference_mode():
        for i in range(steps):
            logits = model(torch.tensor(tokens[-1:]), BatchInfo((slot,), (start + i,), (1,)), cache)
            tokens.append(int(logits[0].argmax()))
    return tokens


def _close(a, b):
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel <= REL_TOL, f"max |chunked - unchunked| / max |unchunked| = {rel:.4g}"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("chunks", [(64, 64, 64, 64, 44), (1, 150, 1, 148), (299, 1)])
def test_chunked_prefill_matches_one_shot(name, chunks):
    model = _model(name)
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(7))
    one = model.make_cache(1, 320, "cpu")
    ref = prefill(model, prompt, (300,), one)
    many = model.make_cache(1, 320, "cpu")
    got = prefill(model, prompt, chunks, many)
    _close(got, ref)
    assert greedy(model, got, many, 300, 4) == greedy(model, ref, one, 300, 4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunk_next_to_fresh_prompts_in_one_step(name):
    """A step holding a prompt's second chunk between two fresh prompts gives each sequence
    what it gets alone."""
    model = _model(name)
    g = torch.Generator().manual_seed(8)
    a, b, c = (torch.randint(0, 512, (n,), generator=g) for n in (90, 33, 17))
    cache = model.make_cache(3, 128, "cpu")
    prefill(model, a[:40], (40,), cache, slot=1)
    ids = torch.cat((b, a[40:], c))
    with torch.inference_mode():
        logits = model(ids, BatchInfo((0, 1, 2), (0, 40, 0), (33, 50, 17)), cache)
    for row, prompt in enumerate((b, a, c)):
        alone = model.make_cache(1, 128, "cpu")
        _close(logits[row], prefill(model, prompt, (len(prompt),), alone))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_decode_matches_per_sequence_decode(name):
    model = _model(name)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 512, (n,), generator=g) for n in (5, 61, 23)]
    slots = (2, 0, 1)
    cache = model.make_cache(3, 80, "cpu")
    ids = torch.cat(prompts)
    lens = tuple(len(p) for p in prompts)
    with torch.inference_mode():
        logits = model(ids, BatchInfo(slots, (0, 0, 0), lens), cache)
        per_seq = model.make_cache(3, 80, "cpu")
        model(ids, BatchInfo(slots, (0, 0, 0), lens), per_seq)
        for step in range(3):
            tok = logits.argmax(-1)
            batch = BatchInfo(slots, tuple(n + step for n in lens), (1, 1, 1))
            logits = model(tok, batch, cache)
            model.batched_decode = False
            ref = model(tok, batch, per_seq)
            model.batched_decode = True
            _close(logits, ref)
            assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_32k_token_prompt_in_8k_chunks_on_the_tiny_preset():
    """The tiny presets take 32K-token prompts; chunks of 8K give the one-shot result."""
    model = _model("deepseek", num_layers=1)
    n = 32768
    assert model.config.max_position_embeddings >= n + 16
    prompt = torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(10))
    one = model.make_cache(1, n + 8, "cpu")
    ref = prefill(model, prompt, (n,), one)
    many = model.make_cache(1, n + 8, "cpu")
    got = prefill(model, prompt, (8192,) * 4, many)
    _close(got, ref)
    assert greedy(model, got, many, n, 2) == greedy(model, ref, one, n, 2)
