"""TensorRT-LLM's measured MoE layer latencies on H200 at our bench shapes, from the database
aiconfigurator-core ships (NVIDIA's measurements on their H200 SXM, not ours).

Reads ``aiconfigurator_core/systems/data/h200_sxm/moe/trtllm/<version>/moe_perf.parquet`` (EP 1,
TP 1; columns framework, version, kernel_source, moe_dtype, num_tokens, hidden_size,
inter_size, topk, num_experts, moe_tp_size, moe_ep_size, distribution, latency in ms) and
writes, per (model, dtype, distribution, num_tokens), the point of the newest version that has
it. The device bench (``moe_kernels_fp8.py``) reads the JSON this writes, since the device
machine need not have aiconfigurator-core. Usage: python bench/trtllm_moe_db.py [--out PATH].
"""
from __future__ import annotations

import argparse
import glob
import json
import os

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                           "trtllm_h200_moe.json")
MODELS = {  # name: (hidden, inter, experts, top-k), kernels.testing.MODELS
    "deepseek_v3": (7168, 2048, 256, 8),
    "qwen3_235b_a22b": (4096, 1536, 128, 8),
}
DTYPES = ("fp8", "fp8_block", "bfloat16")


def _version_key(path: str) -> tuple:
    version = path.split(os.sep)[-2]
    return tuple(int(p) if p.isdigit() else p for p in version.replace("rc", ".").split("."))


def extract() -> dict:
    """``{"source", "points": [{model, moe_dtype, distribution, num_tokens, latency_ms,
    version, kernel_source}]}``; FileNotFoundError when aiconfigurator-core is absent."""
    import aiconfigurator_core
    import pandas as pd

    root = os.path.dirname(aiconfigurator_core.__file__)
    files = sorted(glob.glob(os.path.join(root, "systems", "data", "h200_sxm", "moe", "trtllm",
                                          "*", "moe_perf.parquet")), key=_version_key)
    if not files:
        raise FileNotFoundError(f"no trtllm moe_perf.parquet under {root}")
    best: dict[tuple, dict] = {}
    for path in files:  # oldest first: a newer version's point replaces an older one's
        df = pd.read_parquet(path)
        for model, (hidden, inter, experts, topk) in MODELS.items():
            sel = df[(df.hidden_size == hidden) & (df.inter_size == inter)
                     & (df.num_experts == experts) & (df.topk == topk) & (df.moe_tp_size == 1)
                     & (df.moe_ep_size == 1) & df.moe_dtype.isin(DTYPES)]
            for row in sel.itertuples():
                key = (model, row.moe_dtype, row.distribution, int(row.num_tokens))
                best[key] = {"model": model, "moe_dtype": row.moe_dtype,
                             "distribution": row.distribution, "num_tokens": int(row.num_tokens),
                             "latency_ms": float(row.latency), "version": row.version,
                             "kernel_source": row.kernel_source}
    from importlib.metadata import version

    return {"source": f"aiconfigurator-core {version('aiconfigurator-core')}",
            "note": "TensorRT-LLM's measurement on their H200 SXM (whole MoE layer, EP 1)",
            "points": [best[k] for k in sorted(best)]}


def lookup(db: dict | None, model: str, dtype: str, distribution: str, tokens: int):
    """The database's latency (ms) at exactly ``tokens`` for (model, dtype, distribution), or
    None when it has no such point."""
    if not db:
        return None
    for p in db["points"]:
        if (p["model"], p["moe_dtype"], p["distribution"], p["num_tokens"]) == (
                model, dtype, distribution, tokens):
            return p["latency_ms"]
    return None


def load(path: str = DEFAULT_OUT) -> dict | None:
    """The extracted JSON, or None if it was never written."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    db = extract()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(db, f, indent=1)
        f.write("\n")
    print(f"{len(db['points'])} points -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
