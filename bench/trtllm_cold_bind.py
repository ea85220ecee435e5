"""What a bind with no prefetch queued costs: ``mpirun -np 2 python bench/trtllm_cold_bind.py``.

TensorRT-LLM runs warm-up forwards before its executor loop first calls
``prefetch_first_layers()``, and a forward that raised leaves its step unfinished. The adapter
(``tensorrt_llm_dwdp/trtllm/protocol.py``) then starts the step at the bind itself: the layer's
peer experts are copied while the bind waits (a synchronous fetch). This measures, on CPU ranks
sharing memory (the transport CPU CI runs), the host time of

  cold   ``wait_and_bind(first layer)`` right after a step was abandoned: abort, start the
         step, wait for the copy of the layer's (S-1)*P experts
  warm   the same bind after ``prefetch_first_layers()`` and the copies landed (the case the
         executor loop gives): binding only

``--repeats`` pairs, interleaved (cold, warm, cold, ...). Rank 0 prints one JSON object
(``--out`` writes it): medians and spreads in milliseconds, the bytes a cold bind copies and
the copy rate they imply. On a GPU the wait is a stream wait, so the host sees no such cost;
this bench is for the CPU path only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.json_out import emit  # noqa: E402
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig  # noqa: E402
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager  # noqa: E402
from tensorrt_llm_dwdp.trtllm import TrtllmDwdpBridge  # noqa: E402


class Experts(nn.Module):
    """A backend holding W experts under TensorRT-LLM's names (bf16 stand-ins)."""

    def __init__(self, layer_idx: int, w: int, e: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.layer_idx, self.num_experts = layer_idx, e
        self.w3_w1_weight = nn.Parameter(torch.ones(w, 2 * inter, hidden, dtype=torch.bfloat16),
                                         requires_grad=False)
        self.w2_weight = nn.Parameter(torch.ones(w, hidden, inter, dtype=torch.bfloat16),
                                      requires_grad=False)


def _stats(ms: list[float]) -> dict:
    return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    s = 2
    w = p = args.experts // s
    config = DwdpConfig(dwdp_size=s, num_experts_per_worker=w, num_prefetch_experts=p,
                        peer_timeout_s=120.0)
    bridge = TrtllmDwdpBridge(
        config, rank=rank,
        manager_factory=lambda cfg, n, comm: DwdpManager.from_environment(cfg, n, "cpu"))
    model = nn.Sequential(*[Experts(i, w, args.experts, args.hidden, args.inter)
                            for i in range(args.layers)])
    for mod in model:
        bridge.add_layer(layer_idx=mod.layer_idx)
    bridge.setup(model)
    first, second = model[0], model[1]
    cold, warm = [], []
    for _ in range(args.repeats):
        bridge.wait_and_bind(first, 0)
        bridge.record_compute_and_prefetch_next(0)
        bridge.wait_and_bind(second, 1)            # the forward "raises" here: no record
        start = time.perf_counter()
        bridge.wait_and_bind(first, 0)             # abandons the step; cold start
        cold.append((time.perf_counter() - start) * 1e3)
        bridge.record_compute_and_prefetch_next(0)
        bridge.wait_and_bind(second, 1)
        bridge.prefetch_first_layers()             # abandons; queues layers 0 and 1
        bridge.manager.synchronize()
        start = time.perf_counter()
        bridge.wait_and_bind(first, 0)
        warm.append((time.perf_counter() - start) * 1e3)
        bridge.record_compute_and_prefetch_next(0)
        bridge.prefetch_first_layers()
    counts = bridge.steps.counts
    bytes_cold = (s - 1) * p * 3 * args.hidden * args.inter * 2
    bridge.cleanup()
    if rank == 0:
        med = statistics.median(cold)
        emit({"bench": "trtllm_cold_bind", "device": "cpu", "ranks": s,
              "experts": args.experts, "hidden": args.hidden, "inter": args.inter,
              "bytes_copied_by_a_cold_bind": bytes_cold,
              "cold_bind_ms": _stats(cold), "warm_bind_ms": _stats(warm),
              "cold_copy_GBps": bytes_cold / (med * 1e-3) / 1e9,
              "cold_binds": counts.cold_binds, "aborted_steps": counts.aborted},
             args.out)


if __name__ == "__main__":
    main()
