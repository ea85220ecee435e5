"""One rank of tests/multirank/test_checkpoint_dwdp.py (mpirun or TCP, CPU, shm transport).

Each rank loads the checkpoint with a real DwdpManager (only its own experts, allocated with
``manager.allocate`` and registered layer by layer), runs the exchange, then a batched prefill
and greedy decode steps; the same rank also loads the full checkpoint without DWDP and checks
that logits are bitwise equal at every step. ``--weight-layout preshuffled``: the DWDP load
keeps its experts preshuffled (the torch backend unshuffles them), the full model stays linear. Prints ``RESULT rank=<r> OK ...`` or
``RESULT rank=<r> FAILED ...``.
"""
from __future__ import annotations

import argparse
import resource
import sys

import torch
from _ranks import rank_and_size

from tensorrt_llm_dwdp.comm import connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.checkpoint import load_model, read_config

PROMPTS = ([5, 9, 200, 31, 7], [400, 3], [8, 8, 8, 1, 2, 3, 4, 5, 6])


def run_steps(model, steps: int, dwdp=None) -> list[torch.Tensor]:
    cache = model.make_cache(len(PROMPTS), 32, "cpu")
    lens = [len(p) for p in PROMPTS]
    batch = BatchInfo(tuple(range(len(PROMPTS))), (0,) * len(PROMPTS), tuple(lens))
    ids = torch.tensor([t for p in PROMPTS for t in p])
    out = []
    with torch.inference_mode():
        for _ in range(steps + 1):
            if dwdp is not None:
                dwdp.start_step()
            logits = model(ids, batch, cache)
            out.append(logits)
            ids = logits.argmax(-1)
            batch = BatchInfo(batch.slots, tuple(p + n for p, n in zip(batch.start_positions, batch.lengths)),
                              (1,) * len(PROMPTS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--w", type=int, required=True)
    ap.add_argument("--p", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--weight-layout", default="linear")
    args = ap.parse_args()
    rank, size = rank_and_size()
    try:
        cfg, _ = read_config(args.checkpoint)
        config = DwdpConfig.from_dict(dict(dwdp_size=size, num_experts_per_worker=args.w,
                                           num_prefetch_experts=args.p, peer_timeout_s=60.0))
        with DwdpManager(config, cfg.num_experts, connect(config), "cpu") as mgr:
            model = load_model(args.checkpoint, dwdp=mgr, weight_layout=args.weight_layout)
            assert mgr.layer_indices == cfg.moe_layer_indices, mgr.layer_indices
            assert mgr.weight_layout == args.weight_layout, mgr.weight_layout
            start, stop = mgr.layout.owned_range()
            for moe in model.moe_modules().values():
                assert moe.local_weights.num_experts == args.w
                assert moe.local_weights.weight_layout == args.weight_layout
            mgr.exchange()
            got = run_steps(model, args.steps, mgr)
            mgr.synchronize()
        want = run_steps(load_model(args.checkpoint), args.steps)
        for step, (a, b) in enumerate(zip(got, want)):
            if not torch.equal(a, b):
                raise AssertionError(f"step {step}: DWDP logits differ from the full model by "
                                     f"{(a - b).abs().max().item():.3g}")
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"RESULT rank={rank} OK experts=[{start},{stop}) steps={len(got)} peak_rss_mb={peak_mb:.0f}",
              flush=True)
        return 0
    except Exception as exc:  # reported per rank so the test names the failing one
        print(f"RESULT rank={rank} FAILED {type(exc).__name__}: {exc}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
