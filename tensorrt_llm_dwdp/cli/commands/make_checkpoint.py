"""``make-checkpoint``: write a synthetic HF-layout checkpoint from a named real config."""
from __future__ import annotations

import argparse
import json
import sys

NAME = "make-checkpoint"
HELP = ("write a synthetic checkpoint (real shapes, random weights; bf16 or NVFP4 experts, or "
        "FP8 block 128 throughout)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tensorrt_llm_dwdp.model.presets import preset_names

    p.add_argument("--preset", required=True, choices=preset_names(), help="named model config")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--quant", choices=("bf16", "nvfp4", "fp8"), default="bf16",
                   help="bf16 or nvfp4: the routed experts' format (the rest bf16); fp8: every "
                   "projection linear and routed expert in e4m3 with 128x128 weight_scale_inv "
                   "blocks, as DeepSeek-V3/R1 and Qwen3-*-FP8 ship (H and I multiples of 128: "
                   "the tiny-*-fp8 presets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (>= 259)")
    p.add_argument("--shard-size-gb", type=float, default=4.0, help="max shard size in GB")
    p.add_argument("--device", default="cpu", help="where weights are drawn and quantized "
                   "(cuda: minutes faster for FP8 at DeepSeek-V3 shapes; the draws differ from "
                   "the CPU's for the same seed) (default: cpu)")


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    hf = get_preset(args.preset, num_layers=args.num_layers, vocab_size=args.vocab_size)
    try:
        summary = write_synthetic_checkpoint(
            args.out, hf, quant=args.quant, seed=args.seed,
            shard_bytes=int(args.shard_size_gb * 1e9), device=args.device)
    except ValueError as exc:
        print(f"error: --preset {args.preset} --quant {args.quant}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({
        "path": summary.path, "preset": args.preset, "num_layers": hf["num_hidden_layers"],
        "quant": args.quant, "shards": len(summary.shards), "tensors": summary.num_tensors,
        "gigabytes": round(summary.total_bytes / 1e9, 4),
    }))
    return 0
