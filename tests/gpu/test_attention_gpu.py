"""The engine's attention on a GPU: every CUDA kernel candidate against fp32 math at DeepSeek-V3's
MLA shapes (128 heads, qk 192, v 128) and at a GQA shape, the one ``select_kernels`` picks,
memory linear in the prompt, and the tiny decoders' chunked prefill and batched decode on CUDA
against their one-shot / per-sequence runs. Kernel names and errors are printed (``-s``/``-rA``)
for the device log."""
import pytest
import torch

from tensorrt_llm_dwdp.engine.attention import (
    CUDA_CANDIDATES, CausalAttention, StepMetadata, check_kernels, reference_attention, select_kernels,
)
from tensorrt_llm_dwdp.model.batch import BatchInfo

pytestmark = pytest.mark.gpu
TOL = 2e-2
SHAPES = {"mla": (128, 128, 192, 128), "gqa": (32, 4, 128, 128)}
# The private aten ops each candidate calls: a build without one skips that candidate; a build
# with it whose kernel raises or disagrees fails.
CANDIDATE_OPS = {"cudnn": ("_scaled_dot_product_cudnn_attention", "_cudnn_attention_forward"),
                 "sdpa": ("_scaled_dot_product_efficient_attention",)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", [c.name for c in CUDA_CANDIDATES])
def test_cuda_candidate_against_fp32_math(name, shape):
    cand = next(c for c in CUDA_CANDIDATES if c.name == name)
    missing = [op for op in CANDIDATE_OPS[name] if not hasattr(torch.ops.aten, op)]
    if missing or (name == "cudnn" and not torch.backends.cudnn.is_available()):
        pytest.skip(f"{name}: this torch build lacks {missing or 'cuDNN'}")  # absent, not broken
    err = check_kernels(cand, torch.device("cuda"), *SHAPES[shape], torch.bfloat16)  # raises: fails
    print(f"ATTN {name} {shape}: max error {err:.3g}")
    assert err <= TOL


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_selected_kernels_work_and_are_fused(shape):
    kernels = select_kernels(torch.device("cuda", torch.cuda.current_device()), *SHAPES[shape], torch.bfloat16)
    print(f"ATTN selected for {shape}: {kernels.label}")
    assert kernels.name in {c.name for c in CUDA_CANDIDATES}


def test_8k_prompt_mla_attention_memory_is_linear():
    """One 8K-token prompt at 128 heads: the eager path needed a 32 GiB score matrix; the fused
    kernels need a few times the q/k/v/out bytes."""
    n, h, dk, dv = 8192, 128, 192, 128
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(n, h, dk, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(n, h, dk, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(n, h, dv, device=dev, dtype=torch.bfloat16, generator=g)
    meta = StepMetadata.build(BatchInfo((0,), (0,), (n,)), 1, n, dev)
    attn = CausalAttention(dk ** -0.5)
    attn(q, k, v, meta, None)  # select and warm the kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attn(q, k, v, meta, None)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io = (q.numel() + k.numel() + 2 * v.numel()) * 2
    print(f"ATTN 8K-token MLA prefill: {extra / 2**30:.2f} GiB beyond its inputs (q/k/v/out {io / 2**30:.2f} GiB)")
    assert extra < 4 * io
    rows = slice(n - 64, n)  # the last queries see the whole prompt
    ref, _ = reference_attention(q[rows], k, v, n - 64, dk ** -0.5)
    assert (out[rows].float() - ref).abs().max() <= TOL


def _tiny(name):
    from tensorrt_llm_dwdp.model.config import ModelConfig
    from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.qwen3_moe import Qwen3MoeForCausalLM

    preset, overrides, cls = {
        "deepseek": ("tiny-deepseek-v3", {"first_k_dense_replace": 2}, DeepseekV3ForCausalLM),
        "qwen3": ("tiny-qwen3-moe", {"mlp_only_layers": [0, 1]}, Qwen3MoeForCausalLM),
    }[name]
    hf = get_preset(preset, num_layers=2, overrides=overrides)
    with torch.device("cuda"):
        model = cls(ModelConfig.from_hf(hf), moe_factory=None).eval()
    g = torch.Generator(device="cuda").manual_seed(5)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            r = torch.randn(p.shape, device="cuda", generator=g)
            p.copy_(1 + 0.1 * r if pname.endswith("norm.weight") else 0.1 * r)
    return model


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", ["deepseek", "qwen3"])
def test_chunked_prefill_on_cuda_matches_one_shot(name):
    model = _tiny(name)
    n = 3000
    prompt = torch.randint(0, 512, (n,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.inference_mode():
        one = model.make_cache(1, n + 8, "cuda")
        ref = model(prompt, BatchInfo((0,), (0,), (n,)), one)
        many = model.make_cache(1, n + 8, "cuda")
        for start in range(0, n, 1024):
            got = model(prompt[start:start + 1024], BatchInfo((0,), (start,), (min(1024, n - start),)), many)
        toks = []
        for cache, logits in ((one, ref), (many, got)):
            seq = [int(logits[0].argmax())]
            for i in range(3):
                seq.append(int(model(torch.tensor(seq[-1:], device="cuda"), BatchInfo((0,), (n + i,), (1,)),
                                     cache)[0].argmax()))
            toks.append(seq)
    rel = _rel(got, ref)
    # greedy tokens are compared (printed) rather than asserted: a random tiny model has near
    # ties that bf16 rounding may flip; tests/unit checks token equality on the CPU
    print(f"ATTN {name} chunked (1024) vs one-shot 3000-token prefill on CUDA: rel {rel:.3g}, "
          f"greedy tokens equal: {toks[0] == toks[1]}")
    assert rel <= 0.03


@pytest.mark.parametrize("name", ["deepseek", "qwen3"])
def test_batched_decode_on_cuda_matches_per_sequence(name):
    model = _tiny(name)
    g = torch.Generator(device="cuda").manual_seed(2)
    lens = (5, 300, 77, 1024)
    ids = torch.randint(0, 512, (sum(lens),), device="cuda", generator=g)
    slots = (3, 0, 2, 1)
    with torch.inference_mode():
        a, b = model.make_cache(4, 1100, "cuda"), model.make_cache(4, 1100, "cuda")
        logits = model(ids, BatchInfo(slots, (0,) * 4, lens), a)
        model(ids, BatchInfo(slots, (0,) * 4, lens), b)
        for step in range(3):
            tok = logits.argmax(-1)
            batch = BatchInfo(slots, tuple(n + step for n in lens), (1,) * 4)
            logits = model(tok, batch, a)
            model.batched_decode = False
            ref = model(tok, batch, b)
            model.batched_decode = True
            rel = _rel(logits, ref)
            same = int((logits.argmax(-1) == ref.argmax(-1)).sum())
            assert rel <= 0.03, (step, rel)
    print(f"ATTN {name} batched vs per-sequence decode on CUDA: last rel {rel:.3g}, "
          f"argmax equal for {same}/4 sequences")
