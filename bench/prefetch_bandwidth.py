"""DWDP prefetch bandwidth and overlap on 2 GPUs: ``mpirun -np 2 python bench/prefetch_bandwidth.py``
(or two processes with TRTLLM_DWDP_RANK=0/1, TRTLLM_DWDP_MASTER_ADDR/PORT set: TCP rendezvous).

DeepSeek-V3 NVFP4 expert shapes per layer (E=256, S=2, W=P=128 by default):
  w3_w1_weight [W, 4096, 3584] uint8, w3_w1_weight_scale [W, 4096, 448] e4m3, fc31_alpha [W] f32,
  w2_weight [W, 7168, 1024] uint8, w2_weight_scale [W, 7168, 128] e4m3, fc2_alpha [W] f32.

Measured in one run, both ranks pulling at the same time (as in service):
  raw        one cudaMemcpyAsync of a layer's byte count from the peer's memory (baseline)
  prefetch   DwdpManager prefetching every layer, nothing else running (copy-stream events)
  overlap    the same with a bf16 matmul loop per layer on the compute stream, sized to take
             longer than the copy; stall = compute-stream time spent waiting in weights()
for --contention-opt off and on, and --expert-view multi, composite or both (composite
keys are prefixed ``composite_``). Prints one JSON object (rank 0); --out also writes it.
Goals: prefetch / raw >= 0.95; stall < 5% of copy time when compute is longer than the copy;
overlap efficiency max(compute, copy) / (layer time with both) >= 0.95. The stall alone hides
that compute runs slower while copies share the memory system: ``compute_slowdown`` (layer
time with copies / compute alone - 1) is reported beside it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

from tensorrt_llm_dwdp.comm import connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.dwdp.stats import DwdpStats
from tensorrt_llm_dwdp.moe.specs import NVFP4, expert_nbytes, expert_specs
from tensorrt_llm_dwdp.transport.cuda_ipc import CudaIpcTransport, check, cuda_bindings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench.json_out import emit  # noqa: E402

HIDDEN, INTER = 7168, 2048  # DeepSeek-V3's expert
SPECS = expert_specs(NVFP4, HIDDEN, INTER)


def expert_bytes() -> int:
    return expert_nbytes(NVFP4, HIDDEN, INTER)


def raw_peer_copy(comm, device, nbytes: int, reps: int, timeout: float) -> float:
    """GB/s of one cudaMemcpyAsync of ``nbytes`` from the peer's memory, both ranks at once."""
    rt, _ = cuda_bindings()
    transport = CudaIpcTransport(device)
    src = transport.allocate((nbytes,), torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    records = comm.allgather(transport.export(src), timeout, "bench raw handles")
    peer = 1 - comm.rank
    peer_ptr = transport.open(peer, records[peer])
    stream = torch.cuda.Stream(device)
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    times = []
    for i in range(reps + 1):
        torch.cuda.synchronize(device)
        comm.barrier(timeout, "bench raw")
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        check(rt.cudaMemcpyAsync(dst.data_ptr(), peer_ptr, nbytes, kind, stream.cuda_stream),
              "raw cudaMemcpyAsync")
        e1.record(stream)
        e1.synchronize()
        if i:  # first one warms the mapping up
            times.append(e0.elapsed_time(e1) / 1e3)
    torch.cuda.synchronize(device)
    transport.close()
    comm.barrier(timeout, "bench raw done")  # the peer has unmapped src before it is freed
    del src, dst
    return nbytes / (sum(times) / len(times)) / 1e9


def run_steps(mgr: DwdpManager, layers: list, steps: int, compute: Callable | None,
              sync: bool = True) -> None:
    """``steps`` forward steps of the per-layer protocol, ``compute`` standing in for the MoE.

    With ``sync`` the host waits for every queued copy, the next step's wrap-around included.
    """
    for _ in range(steps):
        mgr.start_step()
        for layer in layers:
            mgr.weights(layer)
            if compute is not None:
                compute()
            mgr.done(layer)
    if sync:
        mgr.synchronize()
        torch.cuda.synchronize(mgr.device)


def device_time(fn: Callable) -> float:
    """Seconds between events recorded on the current stream around ``fn()`` (which syncs)."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3


def diff(a: DwdpStats, b: DwdpStats) -> dict:
    return {"prefetches": b.prefetches - a.prefetches, "bytes": b.bytes_copied - a.bytes_copied,
            "copy_s": b.copy_time_s - a.copy_time_s, "waits": b.waits - a.waits,
            "stall_s": b.stall_time_s - a.stall_time_s}


def run_config(args, contention: bool, device, matmul, view: str = "multi") -> dict:
    config = DwdpConfig(dwdp_size=2, num_experts_per_worker=args.w, num_prefetch_experts=args.p,
                        contention_opt=contention, prefetch_slice_bytes=args.slice_bytes,
                        peer_timeout_s=args.timeout, expert_view=view)
    layers = list(range(args.layers))
    with DwdpManager(config, args.experts, connect(config), device) as mgr:
        for layer in layers:
            tensors = {}
            for name, spec in SPECS.items():
                tensors[name] = mgr.allocate(spec.shape(args.w), spec.dtype)
                tensors[name].view(torch.uint8).fill_(layer + 1)
            mgr.register_layer(layer, tensors)
        mgr.exchange()
        timeout = args.timeout
        x, w, reps = matmul

        def compute() -> None:
            nonlocal x
            for _ in range(reps):
                x = x @ w

        run_steps(mgr, layers, 1, None)  # warm-up: the first step of each phase is cold
        mgr.comm.barrier(timeout, "bench prefetch")
        s0 = mgr.stats
        t0 = time.perf_counter()
        run_steps(mgr, layers, args.steps, None)
        wall_prefetch = time.perf_counter() - t0
        prefetch = diff(s0, mgr.stats)
        copy_per_layer = prefetch["copy_s"] / prefetch["prefetches"]
        n_layers = args.steps * len(layers)
        compute()
        compute_per_layer = device_time(lambda: [compute() for _ in range(n_layers)]) / n_layers
        mgr.comm.barrier(timeout, "bench overlap")
        s1 = mgr.stats
        # Compute-stream time only: the wrap-around prefetch of the next step is not counted.
        step_layer = device_time(
            lambda: run_steps(mgr, layers, args.steps, compute, sync=False)) / n_layers
        mgr.synchronize()
        overlap = diff(s1, mgr.stats)
        mgr.comm.barrier(timeout, "bench overlap done")
        result = {
            "contention_opt": contention,
            "expert_view": view,
            "prefetch_gbps": prefetch["bytes"] / prefetch["copy_s"] / 1e9,
            "prefetch_wall_gbps": prefetch["bytes"] / wall_prefetch / 1e9,
            "copy_ms_per_layer": copy_per_layer * 1e3,
            "compute_ms_per_layer": compute_per_layer * 1e3,
            "overlap_layer_ms": step_layer * 1e3,
            "overlap_copy_ms_per_layer": overlap["copy_s"] / overlap["prefetches"] * 1e3,
            "stall_ms_per_layer": overlap["stall_s"] / overlap["waits"] * 1e3,
        }
        result["stall_over_copy"] = result["stall_ms_per_layer"] / result["copy_ms_per_layer"]
        result["overlap_efficiency"] = (max(compute_per_layer, copy_per_layer) / step_layer)
        result["compute_slowdown"] = step_layer / compute_per_layer - 1.0
        result["buffer_gib"] = mgr.buffer_bytes / 2**30
        ranks = mgr.comm.allgather(result, timeout, "bench results")
    return {"per_rank": ranks}


def summarize(results: dict, raw_gbps: list[float]) -> dict:
    """``{config}_summary`` per contention setting: the figures and goals over the ranks
    (``results[config]["per_rank"]`` from ``run_config``; ``raw_gbps`` per rank)."""
    out = {}
    for key, value in results.items():
        r0 = value["per_rank"]
        ratio = [r["prefetch_gbps"] / raw_gbps[i] for i, r in enumerate(r0)]
        out[key + "_summary"] = {
            "prefetch_gbps": [r["prefetch_gbps"] for r in r0],
            "ratio_vs_raw": ratio,
            "stall_over_copy": [r["stall_over_copy"] for r in r0],
            "overlap_efficiency": [r["overlap_efficiency"] for r in r0],
            "compute_slowdown": [r["compute_slowdown"] for r in r0],
            "goal_ratio_ge_0.95": all(x >= 0.95 for x in ratio),
            "goal_stall_lt_5pct": all(r["stall_over_copy"] < 0.05 for r in r0),
            "goal_overlap_efficiency_ge_0.95": all(r["overlap_efficiency"] >= 0.95 for r in r0),
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--w", type=int, default=128)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--slice-bytes", type=int, default=2 << 20)
    ap.add_argument("--contention-opt", choices=["off", "on", "both"], default="both")
    ap.add_argument("--expert-view", choices=["multi", "composite", "both"], default="multi",
                    help="the managers' weight view (composite: one [E, ...] range per tensor)")
    ap.add_argument("--matmul-n", type=int, default=8192)
    ap.add_argument("--compute-factor", type=float, default=1.3,
                    help="size the matmul loop to this multiple of the raw copy time")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("TRTLLM_DWDP_RANK", "0")))
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    layer_bytes = args.p * expert_bytes()

    helper = DwdpConfig(dwdp_size=2, num_experts_per_worker=args.w, num_prefetch_experts=args.p,
                        peer_timeout_s=args.timeout)
    comm = connect(helper)
    raw = raw_peer_copy(comm, device, layer_bytes, reps=5, timeout=args.timeout)
    raw_all = comm.allgather(raw, args.timeout, "bench raw results")
    comm.close()

    n = args.matmul_n
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16) / n**0.5
    w = torch.randn(n, n, device=device, dtype=torch.bfloat16) / n**0.5
    for _ in range(3):
        x = x @ w
    one = device_time(lambda: [x @ w for _ in range(20)]) / 20
    copy_s = layer_bytes / (raw * 1e9)
    reps = max(1, int(round(args.compute_factor * copy_s / one)))

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.contention_opt]
    results = {}
    views = ["multi", "composite"] if args.expert_view == "both" else [args.expert_view]
    for view in views:
        for contention in modes:
            key = ("composite_" if view == "composite" else "") + "contention_opt_" + (
                "on" if contention else "off")
            results[key] = run_config(args, contention, device, (x, w, reps), view)
            torch.cuda.empty_cache()
    if rank == 0:
        out = {
            "bench": "prefetch_bandwidth",
            "device": torch.cuda.get_device_name(device),
            "experts": args.experts, "dwdp_size": 2, "w": args.w, "p": args.p,
            "layers": args.layers, "steps": args.steps, "slice_bytes": args.slice_bytes,
            "bytes_per_expert": expert_bytes(), "bytes_per_layer": layer_bytes,
            "raw_peer_memcpy_gbps": raw_all,
            "matmul": {"n": n, "reps_per_layer": reps, "ms_each": one * 1e3},
            "results": results,
        }
        out.update(summarize(results, raw_all))
        emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
