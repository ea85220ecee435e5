"""``make-checkpoint``: write a synthetic HF-layout checkpoint from a named real config."""
from __future__ import annotations

import argparse
import json

NAME = "make-checkpoint"
HELP = "write a synthetic checkpoint (real shapes, random weights, bf16 or NVFP4 experts)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tensorrt_llm_dwdp.model.presets import preset_names

    p.add_argument("--preset", required=True, choices=preset_names(), help="named model config")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--quant", choices=("bf16", "nvfp4"), default="bf16", help="routed expert format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary (>= 259)")
    p.add_argument("--shard-size-gb", type=float, default=4.0, help="max shard size in GB")


def main(args: argparse.Namespace) -> int:
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    hf = get_preset(args.preset, num_layers=args.num_layers, vocab_size=args.vocab_size)
    summary = write_synthetic_checkpoint(
        args.out, hf, quant=args.quant, seed=args.seed, shard_bytes=int(args.shard_size_gb * 1e9)
    )
    print(json.dumps({
        "path": summary.path, "preset": args.preset, "num_layers": hf["num_hidden_layers"],
        "quant": args.quant, "shards": len(summary.shards), "tensors": summary.num_tensors,
        "gigabytes": round(summary.total_bytes / 1e9, 4),
    }))
    return 0
