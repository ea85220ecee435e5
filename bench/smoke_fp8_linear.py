#!/usr/bin/env python3
"""A quick check of torch's blockwise scaled GEMM, the path ``Fp8Linear`` takes, before long
device stages (the ``fp8-model`` suite): a DeepSeek-V3 shape (300 x 7168 by 576 x 7168, block-128
weights, per-token 1x128 activations) against ``quant.fp8.blockwise_matmul_ref`` within
``2^-8 |ref| + 2^-12 (|x| @ |w|^T)``. As diagnostics for a failure it also tries the scale
layouts torch has used (``F.scaled_mm`` v2 with K blocks padded to 4 and unpadded,
``torch._scaled_mm``); only the ``Fp8Linear`` path decides the exit code: non-zero when it is
outside the bound or raises, so the suite stops there (``stop_on_fail``). Needs a CUDA GPU."""
import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("smoke_fp8_linear: no CUDA device; the FP8 GEMM needs a GPU", file=sys.stderr)
        return 1
    from tensorrt_llm_dwdp.model.fp8_linear import fp8_linear_scaled_mm, scaled_mm_weight_scales
    from tensorrt_llm_dwdp.quant.fp8 import (blockwise_matmul_ref, dequantize_act_per_token,
                                             dequantize_weight_blocks, quantize_act_per_token,
                                             quantize_weight_blocks)

    print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
          "F.scaled_mm", hasattr(F, "scaled_mm"), flush=True)
    wq, ws = quantize_weight_blocks(torch.randn(576, 7168, device="cuda") * 0.02)
    x = torch.randn(300, 7168, device="cuda").bfloat16()
    xq, xs = quantize_act_per_token(x)
    ref = blockwise_matmul_ref(xq, xs, wq, ws)
    mag = dequantize_act_per_token(xq, xs).abs() @ dequantize_weight_blocks(wq, ws).abs().T
    bound = 2.0 ** -8 * ref.abs() + 2.0 ** -12 * mag
    scale_a = xs.t().contiguous().t()
    kb4 = -(-ws.shape[1] // 4) * 4
    trials = {"Fp8Linear path": lambda: fp8_linear_scaled_mm(x, wq, scaled_mm_weight_scales(ws))}
    if hasattr(F, "scaled_mm"):
        for name, sb in (("v2, K blocks padded to 4", F.pad(ws, (0, kb4 - ws.shape[1])).t()),
                         ("v2, unpadded", ws.t())):
            trials[name] = lambda sb=sb: F.scaled_mm(
                xq, wq.t(), scale_a, F.ScalingType.BlockWise1x128, sb,
                F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    trials["torch._scaled_mm, ws^T"] = lambda: torch._scaled_mm(xq, wq.t(), scale_a, ws.t(),
                                                                out_dtype=torch.bfloat16)
    ok = {}
    for name, fn in trials.items():
        try:
            ratio = ((fn().float() - ref).abs() / bound).max().item()
            ok[name] = ratio <= 1
            print(f"{name}: max |vendor - ref| / bound = {ratio:.3f}", flush=True)
        except Exception as exc:  # a rejected layout is a diagnostic here, not the end
            ok[name] = False
            print(f"{name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
    return 0 if ok["Fp8Linear path"] else 1


if __name__ == "__main__":
    sys.exit(main())
