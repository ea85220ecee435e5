"""Inputs for the kernel tests and benches: random NVFP4 experts, skewed and uniform routing.

Weights are drawn directly in NVFP4 (random e2m1 codes, e4m3 block scales from a band of
realistic exponents, per-expert alphas), so DeepSeek-V3-sized layers cost no quantization pass.
Every expert differs (its scales and alpha are its own), so a kernel that reads the wrong
expert, row or block scale misses the reference by far more than bf16 rounding.
"""
from __future__ import annotations

import torch

from tensorrt_llm_dwdp.moe.specs import NVFP4, expert_specs
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

MODELS = {
    # name: (hidden H, expert intermediate I, routed experts E, top-k)
    "deepseek_v3": (7168, 2048, 256, 8),
    "qwen3_235b_a22b": (4096, 1536, 128, 8),
    "qwen3_30b_a3b": (2048, 768, 128, 8),
}


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius, in float64): how far a kernel's output is from a
    reference or another configuration's output."""
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def random_e4m3(shape, gen: torch.Generator) -> torch.Tensor:
    """e4m3 block scales spanning 2^-4 .. 2^2 with random mantissas (no NaN/zero codes)."""
    exp_field = torch.randint(3, 10, shape, generator=gen, device=gen.device,
                              dtype=torch.uint8)  # value 2^(e-7)
    mant = torch.randint(0, 8, shape, generator=gen, device=gen.device, dtype=torch.uint8)
    return (exp_field << 3 | mant).view(torch.float8_e4m3fn)


def random_nvfp4_experts(num_experts: int, hidden: int, inter: int, seed: int,
                         device="cuda") -> ExpertWeights:
    """A single-tensor ExpertWeights of random NVFP4 experts (output values of order 1)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    spec = {n: s.shape(num_experts) for n, s in expert_specs(NVFP4, hidden, inter).items()}

    def packed(name):
        return torch.randint(0, 256, spec[name], generator=gen, device=device, dtype=torch.uint8)

    w13 = packed("w3_w1_weight")
    w2 = packed("w2_weight")
    # Dequantized weights have rms ~7; alpha ~ 1 / (7 sqrt(K)) keeps activations of order 1.
    a13 = (0.5 + torch.rand(num_experts, generator=gen, device=device)) / (7 * hidden ** 0.5)
    a2 = (0.5 + torch.rand(num_experts, generator=gen, device=device)) / (7 * inter ** 0.5)
    return ExpertWeights.single({
        "w3_w1_weight": w13,
        "w3_w1_weight_scale": random_e4m3(spec["w3_w1_weight_scale"], gen),
        "fc31_alpha": a13.float(),
        "w2_weight": w2,
        "w2_weight_scale": random_e4m3(spec["w2_weight_scale"], gen),
        "fc2_alpha": a2.float(),
    })


def preshuffled_experts(weights: ExpertWeights) -> ExpertWeights:
    """The same experts with every NVFP4 weight / scale tensor in the preshuffled layout, tagged
    ``weight_layout="preshuffled"`` (``moe/layouts.py``; per tensor of a multi-tensor view, which
    equals shuffling the whole set and splitting it: the shuffle stays inside each expert). The
    sm90 kernels (cutedsl backend) read only this layout; the torch backends unshuffle it."""
    from tensorrt_llm_dwdp.moe.layouts import PRESHUFFLED, shuffled_copy

    if weights.weight_layout != "linear":
        raise ValueError(f"preshuffled_experts: the set is already {weights.weight_layout!r}")
    tensors = {name: tuple(shuffled_copy(name, t) for t in ts)
               for name, ts in weights.tensors.items()}
    return ExpertWeights(tensors, weights.expert_offsets, PRESHUFFLED)


def model_experts(model: str, seed: int, device="cuda") -> ExpertWeights:
    """Random experts of ``MODELS[model]``'s sizes in the layout the sm90 kernels read,
    shuffled in place (one copy of the layer, as the loader keeps it)."""
    from tensorrt_llm_dwdp.moe.layouts import PRESHUFFLED, shuffle_experts_

    hidden, inter, num_experts, _ = MODELS[model]
    linear = random_nvfp4_experts(num_experts, hidden, inter, seed=seed, device=device)
    tensors = {name: ts[0] for name, ts in linear.tensors.items()}
    return ExpertWeights.single(shuffle_experts_(tensors), PRESHUFFLED)


def skewed_routing(tokens: int, num_experts: int, top_k: int, seed: int, device="cuda",
                   empty_experts: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """topk ids drawn from a Zipf-like popularity (a few hot experts, a long tail) with the
    last ``empty_experts`` experts never chosen; distinct ids per token; softmax weights."""
    gen = torch.Generator().manual_seed(seed)
    live = num_experts - empty_experts
    popularity = 1.0 / torch.arange(1, live + 1, dtype=torch.float64) ** 1.1
    perm = torch.randperm(live, generator=gen)
    probs = popularity[perm].expand(tokens, live)
    ids = torch.multinomial(probs, top_k, replacement=False, generator=gen).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)
    return ids.to(device), weights.float().to(device)


def uniform_routing(tokens_per_expert: int, num_experts: int, top_k: int,
                    device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert gets exactly ``tokens_per_expert`` rows: T = tpe * E / k tokens."""
    tokens = tokens_per_expert * num_experts // top_k
    slot = torch.arange(tokens * top_k, device=device)
    ids = ((slot // top_k) * top_k + slot % top_k) % num_experts
    ids = ids.view(tokens, top_k).to(torch.int32)
    weights = torch.full((tokens, top_k), 1.0 / top_k, device=device)
    return ids, weights


def random_tokens(tokens: int, hidden: int, seed: int, device="cuda") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)


def split_sizes(num_experts: int, parts: int) -> list[int]:
    """Unequal slices summing to E (a DWDP view: own slice larger than prefetch buffers)."""
    if parts == 1:
        return [num_experts]
    small = num_experts // (parts + 1)
    return [small] * (parts - 1) + [num_experts - small * (parts - 1)]


def random_fp8_experts(num_experts: int, hidden: int, inter: int, seed: int,
                       device="cuda") -> dict[str, torch.Tensor]:
    """FP8 block-128 experts (``moe/specs.py`` names): e4m3 codes of a Gaussian (rms ~64) and
    one fp32 ``weight_scale_inv`` per 128 x 128 block drawn from 2^[-1, 1] / (64 sqrt(K)), so
    outputs are of order 1 and every block's scale is its own (a kernel that reads the wrong
    expert, row block or K block misses the reference by far more than fp8 rounding). Drawn
    directly in fp8 (no quantization pass), 16 experts at a time."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def weight(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(num_experts, rows, k, dtype=torch.float8_e4m3fn, device=device)
        for e0 in range(0, num_experts, 16):
            n = min(16, num_experts - e0)
            g = torch.randn(n, rows, k, generator=gen, device=device) * 64
            q[e0:e0 + n] = g.clamp(-448, 448).to(torch.float8_e4m3fn)
        exps = torch.rand(num_experts, rows // 128, k // 128, generator=gen, device=device)
        return q, (2.0 ** (2 * exps - 1)) / (64 * k ** 0.5)

    w13, s13 = weight(2 * inter, hidden)
    w2, s2 = weight(hidden, inter)
    return {"w3_w1_weight": w13, "w3_w1_weight_scale_inv": s13.float(),
            "w2_weight": w2, "w2_weight_scale_inv": s2.float()}


def fp8_moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      experts: dict[str, torch.Tensor], tokens: torch.Tensor | None = None):
    """The FP8 MoE layer the kernels are held to, from ``quant.fp8``: x quantized per token per
    128 (``quantize_act_per_token``), per expert ``blockwise_matmul_ref`` with w3_w1, SwiGLU in
    fp32 (rows ``[0, I)`` up, ``[I, 2I)`` gate) rounded to bf16 h, h requantized per token per
    128, ``blockwise_matmul_ref`` with w2, times the router weight, summed over slots in slot
    order in fp32, one rounding to bf16. ``tokens``: only these token indices (rows of the
    result in that order; every other token is independent of them). Returns fp32 ``[T', H]``
    (exactly bf16-representable) and the fp32 ``h`` per (token, slot) ``[T', k, I]``."""
    from tensorrt_llm_dwdp.quant.fp8 import blockwise_matmul_ref, quantize_act_per_token

    if tokens is not None:
        x, topk_ids, topk_weights = x[tokens], topk_ids[tokens], topk_weights[tokens]
    t, k = topk_ids.shape
    inter = experts["w3_w1_weight"].shape[1] // 2
    hidden = experts["w2_weight"].shape[1]
    xq, xs = quantize_act_per_token(x)
    y = torch.zeros(t, k, hidden, dtype=torch.float32, device=x.device)
    h_all = torch.zeros(t, k, inter, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        g = blockwise_matmul_ref(xq[tok], xs[tok], experts["w3_w1_weight"][e],
                                 experts["w3_w1_weight_scale_inv"][e])
        h = (torch.nn.functional.silu(g[:, inter:]) * g[:, :inter]).to(torch.bfloat16)
        h_all[tok, slot] = h.float()
        hq, hs = quantize_act_per_token(h)
        out = blockwise_matmul_ref(hq, hs, experts["w2_weight"][e],
                                   experts["w2_weight_scale_inv"][e])
        y[tok, slot] = out * topk_weights[tok, slot, None]
    acc = torch.zeros(t, hidden, dtype=torch.float32, device=x.device)
    for j in range(k):
        acc = acc + y[:, j]
    return acc.to(torch.bfloat16).float(), h_all
