"""Composite vs multi expert views in one run: ``mpirun -np 2 python bench/expert_views.py``.

Two DWDP ranks (two GPUs, or two processes sharing one GPU, or CPU ranks with ``--device cpu``
and small shapes). Model: ``--layers`` MoE layers of DeepSeek-V3's NVFP4 experts by default
(E=256, H=7168, I=2048; S=2, W=P=128). Every rank builds each layer's full weights from a seed,
keeps its W experts in DWDP memory, and sends ``--tokens`` tokens with fixed random top-k
routing through every layer (the same input to each layer: the layers are independent here).

Phases, every rank in lockstep, per backend (``--backends``):
  reference   one rank holding all E experts: the backend over the full tensors, no DWDP
  multi       a DwdpManager with expert_view multi, the backend over ``weights(i)``
  composite   expert_view composite, the backend over ``composite_weights(i)``
multi and composite run twice, interleaved (multi, composite, multi, composite), so drift shows
as a difference between repeats. torch-grouped needs one tensor per parameter: no multi phase.
Per phase: median step time (a whole step: L layers, their waits; device events on GPUs), the
manager's per-layer stall and copy time, prefetch GB/s (bytes over copy-stream time).
Checks: every layer's output in every phase bitwise equal to the reference (same backend);
torch-grouped's max relative difference to the first backend's reference.
Prints one JSON document on rank 0 (``--out`` writes it): ``composite_over_multi`` is the
ratio of median step times (< 1: composite faster), ``bitwise_equal`` per phase.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import torch

from tensorrt_llm_dwdp.comm import connect
from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
from tensorrt_llm_dwdp.moe.backends import get_backend, native_layout
from tensorrt_llm_dwdp.moe.layouts import LINEAR, PRESHUFFLED, shuffle_experts_, unshuffle_experts_
from tensorrt_llm_dwdp.moe.specs import expert_specs
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench.json_out import emit  # noqa: E402


def full_layer(layer: int, args, device: torch.device) -> dict[str, torch.Tensor]:
    """All E experts of one layer, the same on every rank (seeded by the layer)."""
    gen = torch.Generator(device=device).manual_seed(1000 + layer)
    out = {}
    for name, spec in expert_specs(args.quant, args.hidden, args.inter).items():
        shape = spec.shape(args.experts)
        if spec.dtype == torch.uint8:  # packed e2m1 pairs: every byte is a valid pair
            t = torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)
        elif spec.dtype == torch.float8_e4m3fn:  # block scales in [0.5, 2)
            t = torch.randint(0x30, 0x40, shape, generator=gen, device=device,
                              dtype=torch.uint8).view(torch.float8_e4m3fn)
        elif name.endswith("alpha"):
            t = torch.rand(shape, generator=gen, device=device) * 0.01 + 0.005
        else:  # bf16 weights
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(spec.dtype)
        out[name] = t
    return out


def routing(args, rank: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(7 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen, device=device).to(torch.bfloat16)
    scores = torch.rand(args.tokens, args.experts, generator=gen, device=device)
    top, ids = scores.topk(args.top_k, dim=-1)
    return x, ids.to(torch.int32), torch.softmax(top, dim=-1)


def timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, device time on GPUs."""
    if device.type == "cuda":
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        e0.record()
        result = fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3, result
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def same(outs: list, ref: list) -> bool:
    return all(torch.equal(a, b) for a, b in zip(outs, ref))


@contextlib.contextmanager
def group(args):
    """A short-lived group for barriers and results (one open at a time: the TCP rendezvous
    binds one port, and every DWDP phase opens its own)."""
    comm = connect(DwdpConfig(dwdp_size=2, num_experts_per_worker=args.w,
                              num_prefetch_experts=args.p, peer_timeout_s=args.timeout))
    try:
        yield comm
    finally:
        comm.close()


def reference_phase(backend, fulls, batch, args, device, layout) -> tuple[dict, list]:
    x, ids, tw = batch
    weights = [ExpertWeights.single(f, layout) for f in fulls]

    def step():
        return [backend.run_experts(x, ids, tw, w) for w in weights]

    for _ in range(args.warmup):
        step()
    with group(args) as comm:
        comm.barrier(args.timeout, "bench reference")
    times = []
    for _ in range(args.steps):
        seconds, outs = timed(step, device)
        times.append(seconds)
    return {"step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times]}, outs


def dwdp_phase(view: str, backend, fulls, batch, args, device, layout) -> tuple[dict, list]:
    x, ids, tw = batch
    cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=args.w, num_prefetch_experts=args.p,
                     contention_opt=args.contention_opt, expert_view=view,
                     peer_timeout_s=args.timeout)
    with DwdpManager(cfg, args.experts, connect(cfg), device) as mgr:
        lo, hi = mgr.layout.owned_range()
        for layer, full in enumerate(fulls):
            own = {}
            for name, t in full.items():
                own[name] = mgr.allocate((args.w,) + tuple(t.shape[1:]), t.dtype)
                own[name].copy_(t[lo:hi])
            mgr.register_layer(layer, own, weight_layout=layout)
        build_s, _ = timed(mgr.exchange, device)

        def step():
            mgr.start_step()
            outs = []
            for layer in range(len(fulls)):
                if view == "composite":
                    w = ExpertWeights.single(mgr.composite_weights(layer), layout)
                else:
                    w = ExpertWeights.from_view(mgr.weights(layer), mgr.layout.tensor_offsets,
                                                layout)
                outs.append(backend.run_experts(x, ids, tw, w))
                mgr.done(layer)
            return outs

        for _ in range(args.warmup):
            step()
        mgr.synchronize()
        mgr.comm.barrier(args.timeout, f"bench {view}")
        s0 = mgr.stats
        times = []
        for _ in range(args.steps):
            seconds, outs = timed(step, device)
            times.append(seconds)
        mgr.synchronize()
        s1 = mgr.stats
        prefetches = s1.prefetches - s0.prefetches
        copy_s = s1.copy_time_s - s0.copy_time_s
        moved = s1.bytes_copied - s0.bytes_copied
        result = {
            "step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times],
            "exchange_s": build_s,
            "stall_ms_per_layer": 1e3 * (s1.stall_time_s - s0.stall_time_s) / max(1, s1.waits - s0.waits),
            "copy_ms_per_layer": 1e3 * copy_s / max(1, prefetches),
            "prefetch_gbps": moved / copy_s / 1e9 if copy_s else 0.0,
            "bytes_per_prefetch": moved // max(1, prefetches),
            "buffer_gib": mgr.buffer_bytes / 2**30,
        }
        mgr.comm.barrier(args.timeout, f"bench {view} done")
        return result, outs


def max_rel_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(y.float().abs().max()) or 1.0
        worst = max(worst, float((x.float() - y.float()).abs().max()) / scale)
    return worst


def run_backend(name, fulls, batch, args, device, first_reference, layout) -> dict:
    """Backend ``name`` over ``fulls`` (in ``layout``, the backend's own)."""
    backend = get_backend(name)
    out: dict = {"backend": name, "weight_layout": layout}
    out["reference"], ref = reference_phase(backend, fulls, batch, args, device, layout)
    views = ["composite"] if not backend.accepts_multi_tensor else ["multi", "composite"] * args.repeats
    for i, view in enumerate(views):
        key = f"{view}_{i // (1 if len(views) == 1 else 2)}"
        out[key], outs = dwdp_phase(view, backend, fulls, batch, args, device, layout)
        out[key]["bitwise_equal"] = same(outs, ref)
        del outs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    multi = [v["step_ms"] for k, v in out.items() if k.startswith("multi_")]
    comp = [v["step_ms"] for k, v in out.items() if k.startswith("composite_")]
    if multi:
        out["composite_over_multi"] = statistics.median(comp) / statistics.median(multi)
    out["all_bitwise_equal"] = all(v["bitwise_equal"] for k, v in out.items()
                                   if isinstance(v, dict) and "bitwise_equal" in v)
    if first_reference is not None:
        out["max_rel_diff_vs_first_backend"] = max_rel_diff(ref, first_reference)
    return out, ref


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--backends", default="cutedsl,torch-grouped")
    ap.add_argument("--quant", default="nvfp4", choices=["nvfp4", "bf16"])
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--w", type=int, default=128)
    ap.add_argument("--p", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="multi/composite pairs per backend")
    ap.add_argument("--contention-opt", action="store_true")
    ap.add_argument("--timeout", type=float, default=90.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("TRTLLM_DWDP_RANK", "0")))
    if args.device == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    fulls = [full_layer(layer, args, device) for layer in range(args.layers)]
    batch = routing(args, rank, device)
    report = {"bench": "expert_views", "device": (torch.cuda.get_device_name(device)
                                                   if device.type == "cuda" else "cpu"),
              "args": vars(args), "backends": {}}
    first_reference = None
    layout = LINEAR  # of fulls: each backend gets its own, converted in place (no second copy)
    for name in [b for b in args.backends.split(",") if b]:
        try:
            want = native_layout(name) if args.quant == "nvfp4" else LINEAR
            if want != layout:
                for full in fulls:
                    (shuffle_experts_ if want == PRESHUFFLED else unshuffle_experts_)(full)
                layout = want
            result, ref = run_backend(name, fulls, batch, args, device, first_reference, layout)
            if first_reference is None:
                first_reference = ref
        except Exception as exc:  # one backend failing must not lose the others' figures
            result = {"backend": name, "error": f"{type(exc).__name__}: {exc}"}
            print(f"rank {rank}: backend {name} failed: {result['error']}", file=sys.stderr,
                  flush=True)
        with group(args) as comm:
            report["backends"][name] = comm.allgather(result, args.timeout, f"{name} results")
    if rank == 0:
        emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
