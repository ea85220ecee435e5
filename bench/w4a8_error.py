"""Bench (CPU or GPU, torch only): the error of W4A8 against the exact W4A16 path.

For Gaussian ("random") and model-like weights (Student-t rows with log-normal row scales,
quantized to NVFP4 with ModelOpt's recipe) and activations (Gaussian rows; model-like: log-normal
token norms and 1% outlier channels x30), at the FC1 / FC2 reduction sizes of DeepSeek-V3 and
Qwen3-235B, reports ``quant.w4a8.gemm_errors`` (relative Frobenius error of the W4A8 reference
against bf16 activations x exact NVFP4 weights: weights only, activations only, both), how many
e2m1 x e4m3 products the e4m3 cast rounds, and the NVFP4 error itself against the unquantized
weights for scale. Prints one JSON document; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse

import torch

from tensorrt_llm_dwdp.quant.nvfp4 import quantize_nvfp4
from tensorrt_llm_dwdp.quant.w4a8 import STATED_ERROR, gemm_errors, weight_rounding_stats

try:
    from bench.json_out import emit
except ImportError:  # run as a script from the repo root
    from json_out import emit

SHAPES = {"deepseek_v3_fc1": 7168, "deepseek_v3_fc2": 2048, "qwen3_235b_fc1": 4096,
          "qwen3_235b_fc2": 1536}


def weights(kind: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(n, k, generator=g)
    t = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02
    return t * torch.exp(0.5 * torch.randn(n, 1, generator=g))


def activations(kind: str, t: int, k: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(t, k, generator=g)
    if kind == "model":
        x = x * torch.exp(0.5 * torch.randn(t, 1, generator=g))
        x[:, torch.randperm(k, generator=g)[:k // 100]] *= 30.0
    return x.to(torch.bfloat16)


def measure(kind: str, k: int, rows: int, tokens: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = weights(kind, rows, k, g)
    q = quantize_nvfp4(w)
    x = activations(kind, tokens, k, g)
    nvfp4_err = float((q.dequantize() - w).norm() / w.norm())
    return {"kind": kind, "k": k, "rows": rows, "tokens": tokens, "seed": seed,
            **gemm_errors(x, q.packed, q.scale, q.global_scale),
            "nvfp4_weight_error": nvfp4_err, **weight_rounding_stats(q.scale)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    records = [dict(shape=name, **measure(kind, k, args.rows, args.tokens, seed))
               for kind in ("random", "model") for name, k in SHAPES.items()
               for seed in range(args.seeds)]
    worst = {key: max(r[key] for r in records) for key in STATED_ERROR}
    result = {"bench": "w4a8_error", "stated": STATED_ERROR, "worst": worst,
              "within_stated": all(worst[key] <= STATED_ERROR[key] for key in STATED_ERROR),
              "results": records}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
