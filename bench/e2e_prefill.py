#!/usr/bin/env python3
"""End-to-end prefill benchmark: DWDP vs replicated data parallel vs attention-DP + EP MoE.

One run measures the three layouts side by side on the same model and the same requests:

- ``dwdp``: each rank holds W = E/S experts per layer and prefetches the rest from its peers
  (DwdpManager, CUDA IPC on GPUs, POSIX shm on CPUs) while earlier layers compute;
- ``replicated``: each rank holds all E experts (speed upper bound, memory worst case);
- ``ep``: each rank holds E/S experts; tokens go to the owner rank and back with
  ``all_to_all_single`` (what TensorRT-LLM, SGLang and vLLM do for DeepSeek today).

It sweeps tokens per rank per step and the load balance between ranks (``equal``; ``4x``: rank
0 prefills 4x what the others do) and writes, under ``--out``: ``results.json``,
``summary.md``, ``throughput.png`` and (GPU) ``timeline.png``.

    mpirun --allow-run-as-root -np 2 python bench/e2e_prefill.py --out $OUT/e2e
    python bench/e2e_prefill.py --ranks 2 --out /tmp/e2e --preset tiny-deepseek-v3 --device cpu ...
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.e2e_model import MODES, bench_config, build_bench_model  # noqa: E402
from tensorrt_llm_dwdp.moe.backends import BACKEND_MODULES, warm_up_model  # noqa: E402
from tensorrt_llm_dwdp.parallel.config import TRANSPORTS  # noqa: E402
from bench.e2e_report import aggregate_point, goals, summary_markdown  # noqa: E402
from bench.peaks import peak_for  # noqa: E402
from bench.e2e_run import IMBALANCES, Point, StepRunner, make_batch, record_timeline, run_point  # noqa: E402

logger = logging.getLogger("e2e_prefill")
SMOKE_TOL = 2e-2  # max |diff| / max |ref| of a backend against the torch reference at start-up
AUTO_GPU_ORDER = ("cutedsl",)  # tried on a GPU; torch is the fallback (torch-grouped takes no multi-B DWDP view)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder (created)")
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--num-moe-layers", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tokens", default="1024,4096,8192,16384,32768",
                   help="tokens per rank per step (heavy rank under 4x)")
    p.add_argument("--imbalance", default="equal,4x", help=f"any of {list(IMBALANCES)}")
    p.add_argument("--seq-len", "--prompt-length", dest="seq_len", type=int, default=2048,
                   help="prompt length in tokens, e.g. 8192 for 8K-token prompts; a step packs several")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--moe-backend", default="auto", choices=["auto", *sorted(BACKEND_MODULES)],
                   help="a registered MoE backend; auto: the first of "
                        f"{list(AUTO_GPU_ORDER)} that runs and agrees with the torch reference on "
                        "a GPU, torch on CPUs")
    p.add_argument("--ep-transport", default="auto", choices=list(TRANSPORTS),
                   help="EP all-to-all (parallel/group.py): auto = nccl on distinct GPUs, "
                        "cuda_ipc for ranks sharing a GPU, gloo on CPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget-s", type=float, default=300.0,
                   help="sweep time for all modes together; later (larger) points are skipped past it")
    p.add_argument("--timeline-tokens", type=int, default=8192,
                   help="tokens per rank of the DWDP step whose per-layer timeline is recorded")
    p.add_argument("--ranks", type=int, default=2, help="ranks to start when not launched by mpirun")
    p.add_argument("--launcher", default="auto", choices=["auto", "mpirun", "tcp"])
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.tokens = sorted(int(t) for t in args.tokens.split(",") if t)
    args.imbalance = [i for i in args.imbalance.split(",") if i]
    for m in args.modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; choose from {list(MODES)}")
    for i in args.imbalance:
        if i not in IMBALANCES:
            p.error(f"--imbalance: unknown {i!r}; choose from {list(IMBALANCES)}")
    if not args.tokens or min(args.tokens) < 1 or args.iters < 1 or args.seq_len < 1:
        p.error("--tokens, --iters and --seq-len must be positive")
    return args


# ----------------------------------------------------------------------------- ranks
def rank_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from mpirun or our own launcher; None if neither."""
    env = os.environ
    if "OMPI_COMM_WORLD_RANK" in env:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env["OMPI_COMM_WORLD_RANK"])))
    if "PMI_RANK" in env:
        return int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(env["PMI_RANK"])
    if "TRTLLM_DWDP_RANK" in env and "E2E_WORLD_SIZE" in env:
        r = int(env["TRTLLM_DWDP_RANK"])
        return r, int(env["E2E_WORLD_SIZE"]), r
    return None


def relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start ``--ranks`` copies of this script (mpirun if present, else the TCP rendezvous)."""
    from tensorrt_llm_dwdp.launcher import free_port, launch

    if args.ranks < 2:
        raise SystemExit("--ranks must be >= 2: DWDP and EP need at least two ranks")
    res = launch(args.ranks, [sys.executable, os.path.abspath(__file__), *argv], launcher=args.launcher,
                 env={"E2E_DIST_PORT": str(free_port()), "E2E_WORLD_SIZE": str(args.ranks)})
    return 0 if res.ok else 1


def init_dist(rank: int, world: int, device: torch.device) -> None:
    port = os.environ.get("E2E_DIST_PORT")
    if port is None:
        from mpi4py import MPI

        from tensorrt_llm_dwdp.launcher import free_port

        port = MPI.COMM_WORLD.bcast(str(free_port()) if rank == 0 else None, root=0)
    # gloo for the host-side gathers on every device: NCCL refuses two ranks on one GPU, and
    # the EP mode makes its own NCCL group when the ranks have distinct GPUs.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- backend
def choose_backend(name: str, device: torch.device, config: Any) -> tuple[str, Any, str]:
    """(name, backend, note). Whatever runs is first checked on a small problem at the model's
    H and I against the torch reference backend; ``auto`` tries ``AUTO_GPU_ORDER`` on a GPU (the
    registered ones) and records why each earlier one was passed over in the note."""
    from tensorrt_llm_dwdp.moe.backends import get_backend

    reference = get_backend("torch")
    if name != "auto":
        backend = reference if name == "torch" else get_backend(name)
        err = 0.0 if name == "torch" else _smoke(backend, reference, device, config)
        if err > SMOKE_TOL:
            raise SystemExit(f"MoE backend {name!r} disagrees with the torch reference (rel err {err:.3g})")
        return name, backend, f"{name} vs torch reference rel err {err:.2e}"
    notes = []
    candidates = [n for n in AUTO_GPU_ORDER if n in BACKEND_MODULES] if device.type == "cuda" else []
    for cand in candidates:
        try:
            backend = get_backend(cand)
            err = _smoke(backend, reference, device, config)
        except Exception as exc:  # any failure to import/compile/run: try the next one
            notes.append(f"{cand} unavailable: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if err <= SMOKE_TOL:
            return cand, backend, "; ".join(notes + [f"{cand} vs torch reference rel err {err:.2e}"])
        notes.append(f"{cand} disagrees with the torch reference here (rel err {err:.3g})")
    return "torch", reference, "; ".join(notes + ["torch reference"])


def _smoke(backend: Any, ref: Any, device: torch.device, config: Any) -> float:
    """max |backend - ref| / max |ref| on 64 tokens over 8 synthetic experts of the model's shape."""
    from bench.e2e_model import expert_shapes, fill_experts
    from tensorrt_llm_dwdp.moe.backends import to_native_layout_
    from tensorrt_llm_dwdp.moe.weights import ExpertWeights

    n, t, k = 8, 64, min(4, config.top_k)
    w = {name: torch.empty(s, dtype=d, device=device) for name, (s, d) in expert_shapes(config, n).items()}
    fill_experts(w, config, layer=0, first_expert=0, seed=12345)
    weights = ExpertWeights.single(w, to_native_layout_(w, backend))  # ref reads it too
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, config.hidden_size, generator=g).bfloat16().to(device)
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(t)]).int().to(device)
    tw = torch.rand(t, k, generator=g).to(device)
    got = backend.run_experts(x, ids, tw, weights).float()
    want = ref.run_experts(x, ids, tw, weights).float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------- modes
def run_mode(mode: str, args: argparse.Namespace, ctx: dict[str, Any], points: list[Point],
             results: dict[str, Any]) -> torch.Tensor | None:
    """Build ``mode``, sweep ``points``, return this rank's logits of the check step."""
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    rank, device, config = ctx["rank"], ctx["device"], ctx["config"]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_build = time.perf_counter()
    bm, error = None, None
    try:
        bm = build_bench_model(mode, config, device=device, backend=ctx["backend"], rank=rank,
                               world_size=ctx["world"], seed=args.seed,
                               dwdp_config=ctx["dwdp_config"], ep=ctx["ep"],
                               manager_factory=DwdpManager.from_environment)
    except Exception as exc:  # e.g. out of memory: the mode's points count as missed
        logger.exception("%s: building failed on rank %d", mode, rank)
        error = f"build failed: {type(exc).__name__}: {str(exc)[:160]}"
    errors = [e for e in gather(error) if e]
    if errors:
        if bm is not None:
            bm.close()
        results["modes"][mode] = {"error": "; ".join(errors), "points": {}}
        return None
    out: dict[str, Any] = {"points": {}}
    logits = None
    runner = None
    try:
        max_tokens = max(pt.tokens for pt in points)
        runner = StepRunner(bm, device, max_seqs=-(-max_tokens // args.seq_len), seq_len=args.seq_len)
        extra_measured, extra_predicted = ctx["ep_buffers"] if mode == "ep" else (0, 0)
        mem = {"measured": bm.loaded_bytes - ctx["dense_bytes"] + extra_measured,
               "source": bm.memory_source, "tensor_bytes": bm.tensor_bytes,
               "predicted": bm.predicted_expert_bytes + extra_predicted,
               "build_s": time.perf_counter() - t_build}
        mems = gather(mem)
        out["memory"] = {
            "source": mems[0]["source"],
            "dense_model_bytes": ctx["dense_bytes"],
            "measured_expert_bytes_per_rank": [m["measured"] for m in mems],
            "tensor_bytes_per_rank": [m["tensor_bytes"] for m in mems],
            "predicted_expert_bytes_per_rank": [m["predicted"] for m in mems],
            "build_s_per_rank": [m["build_s"] for m in mems],
        }
        # Every kernel a point can pick is compiled now, outside the budget: the first mode
        # used to pay all of it inside its points and ran out of budget before the others.
        compiled = warm_up_model(bm.model)
        if compiled:
            logger.info("%s: %d MoE kernels compiled before the sweep", mode, compiled)
        t0 = time.perf_counter()
        budget = args.time_budget_s / len(args.modes)
        elapsed, last = 0.0, None   # rank 0's clock, so every rank decides the same
        for pt in points:
            # Skip a point the budget cannot hold: its time is guessed from the last point's,
            # scaled by tokens (points run in ascending tokens).
            guess = 0.0 if last is None else last[1] * pt.tokens / last[0]
            if elapsed + guess > budget:
                results["skipped"].append(f"{mode} {pt.key} (time budget)")
                out["points"][pt.key] = {"tokens": pt.tokens, "imbalance": pt.imbalance,
                                         "skipped": "time budget"}
                continue
            try:
                rec = run_point(runner, pt, rank=rank, seq_len=args.seq_len, vocab=config.vocab_size,
                                seed=args.seed, warmup=args.warmup, iters=args.iters, barrier=dist.barrier)
            except Exception as exc:
                if mode == "ep":
                    raise   # the peer is inside a collective: no clean way on, fail loudly
                # DWDP and replicated ranks run independently: record the failure, go on.
                if bm.manager is not None:
                    bm.manager.abort_step()
                if cuda:
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                rec = {"rank": rank, "error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                logger.exception("%s %s failed on rank %d", mode, pt.key, rank)
            rec["elapsed_s"] = time.perf_counter() - t0
            recs = gather(rec)
            out["points"][pt.key] = {"tokens": pt.tokens, "imbalance": pt.imbalance,
                                     **aggregate_point(recs, shared_device=ctx["shared_device"])}
            logger.info("%s %s: %s tok/s per GPU", mode, pt.key,
                        f"{out['points'][pt.key].get('tokens_per_s_per_gpu', float('nan')):.0f}")
            last = (pt.tokens, recs[0]["elapsed_s"] - elapsed)
            elapsed = recs[0]["elapsed_s"]
        check = Point(min(pt.tokens for pt in points), "equal")
        ids, batch = make_batch(check.tokens_of(rank), args.seq_len, config.vocab_size, args.seed,
                                rank, device)
        logits = runner.step(ids, batch).float().cpu()
        if mode == "dwdp":
            tl_tokens = max([t for t in args.tokens if t <= args.timeline_tokens] or [min(args.tokens)])
            ids, batch = make_batch(tl_tokens, args.seq_len, config.vocab_size, args.seed, rank, device)
            timeline = record_timeline(runner, ids, batch)
            if timeline is not None:
                timeline["tokens"] = tl_tokens
            results["timeline"] = gather(timeline)[0]
        if cuda:
            out["memory"]["peak_allocated_bytes_per_rank"] = gather(torch.cuda.max_memory_allocated(device))
    finally:
        bm.close()
        del bm, runner
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    results["modes"][mode] = out
    return logits


def agreement(logits: dict[str, torch.Tensor]) -> dict[str, Any]:
    """DWDP vs replicated (bitwise) and EP vs replicated (relative error) on every rank."""
    mine: dict[str, Any] = {}
    ref = logits.get("replicated")
    if ref is not None and "dwdp" in logits:
        mine["dwdp_equals_replicated"] = bool(torch.equal(logits["dwdp"], ref))
    if ref is not None and "ep" in logits:
        mine["ep_rel_err"] = ((logits["ep"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    per_rank = gather(mine)
    out: dict[str, Any] = {"per_rank": per_rank}
    if per_rank and "dwdp_equals_replicated" in per_rank[0]:
        out["dwdp_equals_replicated"] = all(r["dwdp_equals_replicated"] for r in per_rank)
    if per_rank and "ep_rel_err" in per_rank[0]:
        out["ep_rel_err"] = max(r["ep_rel_err"] for r in per_rank)
    return out


def write_outputs(results: dict[str, Any], out_dir: str) -> None:
    from bench.plots import plot_throughput, plot_timeline

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(results))
    plot_throughput(results, os.path.join(out_dir, "throughput.png"))
    tl = results.get("timeline")
    if tl:
        plot_timeline(tl, os.path.join(out_dir, "timeline.png"),
                      f"one DWDP step, rank 0, {tl['tokens']} tokens: compute vs prefetch streams")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    env = rank_env()
    if env is None:
        return relaunch(args, argv)
    rank, world, local_rank = env
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(message)s")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    init_dist(rank, world, device)
    try:
        from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
        from tensorrt_llm_dwdp.model.memory import RESOLUTION_BYTES, dense_model_bytes, in_use
        from tensorrt_llm_dwdp.parallel import ExpertParallel, SpanTimer
        from tensorrt_llm_dwdp.parallel.config import exchange_capacity_bytes
        from tensorrt_llm_dwdp.parallel.group import device_key, make_exchange, resolve_transport

        config = bench_config(args.preset, args.num_moe_layers, args.vocab_size)
        e = config.num_experts
        if e % world:
            raise SystemExit(f"{e} experts do not split evenly over {world} ranks")
        name, backend, note = choose_backend(args.moe_backend, device, config)
        names = gather(name)
        if len(set(names)) != 1:
            raise SystemExit(f"ranks chose different MoE backends {names}; pass --moe-backend")
        ep, transport, ep_buffers = None, None, (0, 0)
        keys = gather(device_key(device))
        shared_device = len(set(keys)) < len(keys)
        if "ep" in args.modes:
            transport = resolve_transport(args.ep_transport, device, keys)
            capacity = exchange_capacity_bytes(world, max(args.tokens), config.hidden_size, config.top_k)
            before_ep = in_use(device)
            ep = ExpertParallel(make_exchange(transport, device, capacity), e, timer=SpanTimer(device))
            ep_buffers = (in_use(device) - before_ep, ep.exchange.buffer_bytes)
        ctx = {"rank": rank, "world": world, "device": device, "config": config, "backend": backend,
               "shared_device": shared_device,
               "ep": ep, "dense_bytes": dense_model_bytes(config, device),
               # the EP exchange's buffers (measured, expected) count as EP's, as DWDP's
               # prefetch buffers count as DWDP's
               "ep_buffers": ep_buffers,
               "dwdp_config": DwdpConfig(dwdp_size=world, num_experts_per_worker=e // world,
                                         num_prefetch_experts=e // world)}
        peak = peak_for(torch.cuda.get_device_name(device)) if use_cuda else None
        points = sorted((Point(t, i) for t in args.tokens for i in args.imbalance),
                        key=lambda p: (p.tokens, p.imbalance))
        results: dict[str, Any] = {
            "meta": {
                "preset": args.preset, "num_moe_layers": args.num_moe_layers,
                "num_layers": config.num_layers, "hidden_size": config.hidden_size,
                "moe_intermediate_size": config.moe_intermediate_size, "num_experts": e,
                "top_k": config.top_k, "world_size": world, "seq_len": args.seq_len,
                "warmup": args.warmup, "iters": args.iters, "moe_backend": name, "backend_note": note,
                "device_name": torch.cuda.get_device_name(device) if use_cuda else platform.processor() or "cpu",
                "torch": torch.__version__, "modes": args.modes, "tokens": args.tokens,
                "imbalance": args.imbalance, "dwdp_config": ctx["dwdp_config"].to_dict(),
                "ep_transport": transport, "ranks_share_device": shared_device,
                "peak": peak.to_dict() if peak else None,
                "memory_resolution_bytes": RESOLUTION_BYTES[in_use(device).source],
            },
            "modes": {}, "skipped": [], "timeline": None,
        }
        logits = {}
        for mode in args.modes:
            logger.info("mode %s: building", mode)
            logits[mode] = run_mode(mode, args, ctx, points, results)
            results["goals"] = goals(results, args.num_moe_layers)
            if rank == 0:   # what has run so far survives a later failure
                write_outputs(results, args.out)
        results["agreement"] = agreement(logits)
        if rank == 0:
            write_outputs(results, args.out)
            print(summary_markdown(results))
        if ep is not None:
            ep.close()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
