"""Host tiers on GPUs: H2D prefetch bandwidth, failover time, offload vs UVM.

DeepSeek-V3 NVFP4 experts (H 7168, I 2048: 24.8 MB each), synthetic weights generated on the
device (``bench/e2e_model.fill_experts``), MoE layers run through ``ConfigurableMoE`` with the
manager's views (a stack of routed-expert layers; no attention). Every subcommand prints one
JSON object (``--out`` also writes it); sizes shrink to what /dev/shm and the GPU can hold, and
the JSON records what was used.

  h2d        one rank (dwdp_size 1) prefetches H of its own experts per layer from the host
             store through the copy engine (no compute), beside, in the same run, raw
             cudaMemcpyAsync of the same copies from the same store (pinned by
             cudaHostRegister), from cudaMallocHost memory, and one copy of a layer's bytes.
             Goal: prefetch >= 0.9 of raw.
  failover   three ranks with a host backup (one GPU shared over CUDA IPC, or one GPU each)
             step MoE layers on a fixed input; rank 1 goes idle at its step K and SIGKILLs
             itself once the survivors timed a few steps with it idle. Per survivor: failover
             time from the kill to the end of its first served step after it, the manager's
             own failover time, median step time with rank 1 busy, idle (its ranges over IPC)
             and dead (its ranges from the host store over PCIe, same GPU sharing as idle),
             and whether every step's output equals the first step's, bitwise.
  offload    one rank, MoE layers at 1K..32K tokens per step: all experts resident; H per
             layer prefetched from the host store (``host_offload: prefetch``); H read in place
             from managed memory pinned to the host (``uvm``: read-through over PCIe); the same
             managed memory with the GPU as preferred location and its pages prefetched there
             (``uvm_migrated``: what UVM users would pick when the experts fit). Median step ms
             each, each mode's ratio to prefetch and to resident, and outputs compared with the
             resident run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.e2e_model import bench_config, expert_nbytes, expert_shapes, fill_experts  # noqa: E402
from bench.json_out import emit  # noqa: E402

SEED = 1234


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device(args, rank: int = 0) -> torch.device:
    """The GPU of this rank (``--device cuda``), or the CPU for a dry run (``--device cpu``)."""
    if args.device == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def pick_backend(name: str, device: torch.device) -> str:
    """``auto``: cutedsl when the CUTLASS DSL and an sm_90 GPU are there, else torch."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "torch"
    from tensorrt_llm_dwdp.moe.backends import _cutedsl_missing

    return "torch" if _cutedsl_missing() else "cutedsl"


def fit(preset: str, experts: int, layers: int, store_copies: int, min_layers: int = 2
        ) -> tuple[int, int, str]:
    """Shrink (experts, layers) until ``store_copies`` host stores fit in 40% of /dev/shm's free
    space and 25% of MemAvailable; a note saying what changed."""
    from tensorrt_llm_dwdp.dwdp.host_store import host_memory

    cfg = bench_config(preset, 2, 1024)
    eb = expert_nbytes(cfg)
    free = host_memory()
    budget = min(0.4 * free["shm_free"],
                 0.25 * free["mem_available"] if free["mem_available"] > 0 else float("inf"))
    e, n = experts, layers
    while store_copies * e * n * eb > budget and (n > min_layers or e > 16):
        if n > min_layers:
            n -= 1
        else:
            e //= 2
    note = "" if (e, n) == (experts, layers) else (
        f"shrunk from E={experts} L={layers} to fit /dev/shm ({free['shm_free'] / 2**30:.1f} GiB "
        f"free) and MemAvailable ({free['mem_available'] / 2**30:.1f} GiB)")
    return e, n, note


def log(message: str) -> None:
    """Progress on stderr (a stage cut by its timeout still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def view_keys(args, offload: str = "prefetch") -> dict:
    """The ``expert_view`` key for a DwdpConfig: ``--expert-view`` if given, else dwdp_config's
    default (composite); UVM read-through is multi only (managed memory cannot be mapped into
    a composite range), so ``uvm`` always runs the multi view."""
    if offload == "uvm":
        return {"expert_view": "multi"}
    return {"expert_view": args.expert_view} if args.expert_view else {}


def make_backend(name: str):
    """One backend object for every layer and mode (its compiled-kernel cache is shared)."""
    from tensorrt_llm_dwdp.moe.backends import get_backend

    return get_backend(name)


def build_layers(mgr, config, num_experts: int, backend, device: torch.device,
                 first: int, count: int, host_count: int = 0):
    """One ConfigurableMoE per MoE layer of ``config`` over ``num_experts`` experts (``backend``
    a backend object, shared), its own
    experts ``[first, first + count)`` generated on the device: the first ``count -
    host_count`` in memory from ``mgr.allocate`` (or plain device memory without a manager),
    the rest copied to host memory for the store. Registered with ``mgr`` when given."""
    from tensorrt_llm_dwdp.moe.backends import to_native_layout_
    from tensorrt_llm_dwdp.moe.configurable_moe import ConfigurableMoE
    from tensorrt_llm_dwdp.moe.router import RouterConfig

    h, i = config.hidden_size, config.moe_intermediate_size
    layers = []
    for idx, layer in enumerate(config.moe_layer_indices):
        shapes = expert_shapes(config, count)
        full = {n: torch.empty(s, dtype=d, device=device) for n, (s, d) in shapes.items()}
        fill_experts(full, config, layer, first, SEED)
        weight_layout = to_native_layout_(full, backend)  # per expert: the split keeps it
        res = count - host_count
        if mgr is not None:
            own = {n: mgr.allocate((res,) + tuple(s[1:]), d) for n, (s, d) in shapes.items()}
            for n in own:
                own[n].copy_(full[n][:res])
            host = {n: full[n][res:].cpu() for n in full} if host_count else None
            mgr.register_layer(layer, own, host, weight_layout=weight_layout)
        else:
            own = full
        del full
        moe = ConfigurableMoE(num_experts, config.top_k, h, i,
                              RouterConfig(kind="softmax", renormalize=True), backend=backend,
                              dwdp=mgr, layer_idx=layer).to(device)
        g = torch.Generator(device=device).manual_seed(SEED + idx)
        with torch.no_grad():
            for p in moe.gate.parameters():
                p.copy_(torch.randn(p.shape, generator=g, device=device) * 0.02)
        moe.set_local_weights(own, weight_layout)
        layers.append(moe)
    sync(device)
    return layers


def forward(layers, mgr, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One step over every layer (each reads the same input; the outputs are summed), retried
    while the manager reports a peer lost under it. Returns (output, retries)."""
    from tensorrt_llm_dwdp.dwdp.errors import DwdpStepRetry

    retries = 0
    while True:
        if mgr is not None:
            mgr.start_step()
        with torch.inference_mode():
            out = torch.zeros_like(x, dtype=torch.float32)
            for moe in layers:
                out += moe(x).float()
        try:
            if mgr is not None:
                mgr.end_step()
            return out, retries
        except DwdpStepRetry:
            retries += 1


def tokens(num: int, hidden: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(num, hidden, generator=g, device=device) * 0.5).to(torch.bfloat16)


# ---------------------------------------------------------------------------------- h2d
def cmd_h2d(args) -> dict:
    from tensorrt_llm_dwdp.comm.local import LocalComm
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager
    from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

    device = bench_device(args)
    e, n_layers, note = fit(args.preset, args.experts, args.layers, 1)
    h = min(args.host_experts, e - 1)
    config = bench_config(args.preset, n_layers, 1024)
    dconf = DwdpConfig(dwdp_size=1, host_experts_per_worker=h, contention_opt=args.contention_opt,
                       **view_keys(args))
    mgr = DwdpManager(dconf, e, LocalComm(), device)
    result = {"what": "h2d", "device": device_name(device), "experts": e,
              "layers": n_layers, "host_experts": h, "expert_bytes": expert_nbytes(config),
              "expert_view": dconf.expert_view, "contention_opt": args.contention_opt,
              "note": note}
    try:
        build_layers(mgr, config, e, make_backend("torch"), device, 0, e, h)
        mgr.exchange()
        names = config.moe_layer_indices

        def steps(count: int) -> None:
            for _ in range(count):
                mgr.start_step()
                for layer in names:
                    mgr.weights(layer)
                    mgr.done(layer)
            mgr.synchronize()

        steps(1)  # warm-up
        before = mgr.stats
        steps(args.steps)
        after = mgr.stats
        moved = after.host_bytes_copied - before.host_bytes_copied
        seconds = after.copy_time_s - before.copy_time_s
        result["prefetch_gbps"] = moved / seconds / 1e9
        result["prefetch_bytes_per_layer"] = moved // (args.steps * n_layers)
        if device.type != "cuda":  # a dry run: no raw CUDA copies to compare with
            return result
        plans = mgr.copy_plans()  # the prefetch's own copies
        rt, _ = cuda_bindings()
        stream = torch.cuda.Stream(device)
        kind = rt.cudaMemcpyKind.cudaMemcpyDefault

        def timed(copies, reps: int) -> float:
            total_bytes, total_s = 0, 0.0
            for rep in range(reps + 1):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(stream)
                for dst, src, nb in copies:
                    check(rt.cudaMemcpyAsync(dst, src, nb, kind, stream.cuda_stream), "raw copy")
                e1.record(stream)
                e1.synchronize()
                if rep:
                    total_bytes += sum(c[2] for c in copies)
                    total_s += e0.elapsed_time(e1) / 1e3
            return total_bytes / total_s / 1e9

        same = [c for p in plans for c in p.copies()]
        result["raw_registered_gbps"] = timed(same, args.steps)
        biggest = max(c[2] for c in same)
        pinned = torch.empty(biggest, dtype=torch.uint8, pin_memory=True)
        result["raw_pinned_gbps"] = timed([(d, pinned.data_ptr(), nb) for d, _, nb in same],
                                          args.steps)
        layer_bytes = plans[0].total_bytes
        big_src = torch.empty(layer_bytes, dtype=torch.uint8, pin_memory=True)
        big_dst = torch.empty(layer_bytes, dtype=torch.uint8, device=device)
        result["raw_single_copy_gbps"] = timed([(big_dst.data_ptr(), big_src.data_ptr(),
                                                 layer_bytes)], args.steps)
        raw = max(result["raw_registered_gbps"], result["raw_pinned_gbps"])
        result["ratio_vs_raw"] = result["prefetch_gbps"] / raw
        result["goal_ratio"] = 0.9
        result["goal_met"] = result["ratio_vs_raw"] >= 0.9
        del pinned, big_src, big_dst
    finally:
        mgr.close()
    return result


# ---------------------------------------------------------------------------------- offload
def cmd_offload(args) -> dict:
    """All modes are built first, then each token count runs every mode in turn (so a time
    budget cuts token counts, never one mode); ``--out`` is rewritten after each token count,
    so a stage timeout still leaves the points done. A step slower than 1 s is timed once."""
    from tensorrt_llm_dwdp.comm.local import LocalComm
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    device = bench_device(args)
    modes = (("resident", "prefetch", "uvm", "uvm_migrated") if device.type == "cuda"
             else ("resident", "prefetch"))
    e, n_layers, note = fit(args.preset, args.experts, args.layers, len(modes) - 1)
    h = min(args.host_experts, e - 1)
    config = bench_config(args.preset, n_layers, 1024)
    backend = pick_backend(args.backend, device)
    backend_obj = make_backend(backend)
    started = time.monotonic()
    result = {"what": "offload", "device": device_name(device), "experts": e,
              "layers": n_layers, "host_experts": h, "backend": backend, "note": note,
              "tokens": [], "modes": {m: [] for m in modes}, "skipped": []}
    built: dict[str, tuple] = {}
    try:
        for mode in modes:
            mgr = None
            try:
                if mode != "resident":
                    offload = "uvm" if mode.startswith("uvm") else mode
                    dconf = DwdpConfig(dwdp_size=1, host_experts_per_worker=h,
                                       host_offload=offload, **view_keys(args, offload))
                    mgr = DwdpManager(dconf, e, LocalComm(), device)
                    result.setdefault("expert_view", {})[mode] = dconf.expert_view
                layers = build_layers(mgr, config, e, backend_obj, device, 0, e,
                                      h if mgr is not None else 0)
                if mgr is not None:
                    mgr.exchange()
                if mode == "uvm_migrated":  # preferred location = the GPU, pages prefetched
                    mgr.managed_experts.prefer_device()
                built[mode] = (mgr, layers)
                log(f"offload: built {mode} ({time.monotonic() - started:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - one mode failing is reported, others run
                result["modes"][mode].append({"error": f"{type(exc).__name__}: {exc}"})
                if mgr is not None:
                    mgr.close()
        result["build_s"] = time.monotonic() - started
        for t in args.tokens:
            if time.monotonic() - started > args.budget_s:
                result["skipped"].append({"tokens": t, "why": f"time budget {args.budget_s:g} s"})
                continue
            result["tokens"].append(t)
            x = tokens(t, config.hidden_size, device, SEED + t)
            reference = None
            for mode, (mgr, layers) in built.items():
                try:
                    w0 = time.perf_counter()
                    out, _ = forward(layers, mgr, x)  # warm-up (compiles kernels)
                    sync(device)
                    iters = args.iters if time.perf_counter() - w0 < 1.0 else 1
                    times = []
                    for _ in range(iters):
                        t0 = time.perf_counter()
                        out, _ = forward(layers, mgr, x)
                        sync(device)
                        times.append(time.perf_counter() - t0)
                    row = {"tokens": t, "step_ms": 1e3 * statistics.median(times),
                           "min_ms": 1e3 * min(times)}
                    got = out.cpu()
                    if mode == "resident":
                        reference = got
                    elif reference is not None:
                        row["bitwise_equal_resident"] = bool(torch.equal(got, reference))
                        row["max_rel_diff_resident"] = float(
                            (got - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
                except Exception as exc:  # noqa: BLE001
                    row = {"tokens": t, "error": f"{type(exc).__name__}: {exc}"}
                result["modes"][mode].append(row)
                log(f"offload: {t} tokens {mode}: {row.get('step_ms', row.get('error'))} "
                    f"({time.monotonic() - started:.1f} s)")
            del x
            if args.out:
                emit(result, args.out, quiet=True)
        for mode, (mgr, _) in built.items():
            if mgr is not None:
                result.setdefault("host_bytes_copied", {})[mode] = mgr.stats.host_bytes_copied
    finally:
        for mgr, _ in built.values():
            if mgr is not None:
                mgr.close()
        built.clear()
        sync(device)
    by_t = {m: {r["tokens"]: r["step_ms"] for r in rows if "step_ms" in r}
            for m, rows in result["modes"].items()}
    result["uvm_over_prefetch"] = {t: by_t["uvm"][t] / by_t["prefetch"][t]
                                   for t in by_t.get("prefetch", {}) if t in by_t.get("uvm", {})}
    result["uvm_over_resident"] = {t: by_t["uvm"][t] / by_t["resident"][t]
                                   for t in by_t.get("uvm", {}) if t in by_t.get("resident", {})}
    result["prefetch_over_resident"] = {t: by_t["prefetch"][t] / by_t["resident"][t]
                                        for t in by_t.get("prefetch", {})
                                        if t in by_t.get("resident", {})}
    result["uvm_migrated_over_prefetch"] = {t: by_t["uvm_migrated"][t] / by_t["prefetch"][t]
                                            for t in by_t.get("prefetch", {})
                                            if t in by_t.get("uvm_migrated", {})}
    result["uvm_migrated_over_resident"] = {t: by_t["uvm_migrated"][t] / by_t["resident"][t]
                                            for t in by_t.get("uvm_migrated", {})
                                            if t in by_t.get("resident", {})}
    result["faster"] = {t: min((m for m in ("prefetch", "uvm", "uvm_migrated") if t in by_t.get(m, {})),
                               key=lambda m: by_t[m][t])
                        for t in by_t.get("prefetch", {})}
    return result


# ---------------------------------------------------------------------------------- failover
def cmd_failover(args) -> dict:
    """Driver: three rank processes over the TCP rendezvous; merges their reports.

    Phases of a survivor's steps: ``busy`` (all three ranks compute), ``idle`` (rank 1 alive
    but idle: the survivors read its experts over IPC / NVLink with two ranks on the GPU),
    ``pcie`` (after the failover: the same two ranks, rank 1's experts from host memory). The
    idle and pcie phases share the GPU the same way, so their step times compare the tiers.
    """
    from tensorrt_llm_dwdp.launcher import launch

    e, n_layers, note = fit(args.preset, args.experts, args.layers, 1)
    e -= e % 3
    os.makedirs(args.work, exist_ok=True)
    for name in os.listdir(args.work):  # flags and reports of an earlier run
        os.unlink(os.path.join(args.work, name))
    argv = [sys.executable, os.path.abspath(__file__), "failover-rank", "--work", args.work,
            "--experts", str(e), "--layers", str(n_layers), "--tokens", str(args.tokens[0]),
            "--kill-at", str(args.kill_at), "--after", str(args.after), "--preset", args.preset,
            "--backend", args.backend, "--timeout", str(args.timeout), "--device", args.device,
            *(["--expert-view", args.expert_view] if args.expert_view else [])]
    res = launch(3, argv, launcher="tcp", timeout_s=args.timeout + 20, survivors=True,
                 expect_killed=(1,))
    result = {"what": "failover", "experts": e, "layers": n_layers, "tokens": args.tokens[0],
              "expert_view": args.expert_view or "default",
              "idle_at_step": args.kill_at, "note": note, "returncodes": list(res.returncodes),
              "launch_ok": res.ok, "shm_cleaned": list(res.cleaned)}
    kill = _read_ns(args.work, "kill_ns")
    for r in (0, 2):
        path = os.path.join(args.work, f"rank{r}.json")
        if not os.path.exists(path):
            result[f"rank{r}"] = {"error": "no report"}
            continue
        rep = json.load(open(path))
        steps = rep.pop("steps")
        for phase in ("busy", "idle", "pcie"):
            ms = [s["ms"] for s in steps if s["phase"] == phase and s["n"] > 1]
            rep[f"step_ms_{phase}"] = statistics.median(ms) if ms else None
        if kill is not None:
            after_kill = [s for s in steps if s["end_ns"] > kill]
            if after_kill:
                first = after_kill[0]
                rep["failover_ms_kill_to_first_served_step"] = (first["end_ns"] - kill) / 1e6
                rep["first_served_step_retried"] = first["retries"] > 0
        if rep.get("step_ms_idle") and rep.get("step_ms_pcie"):
            rep["pcie_over_ipc_step"] = rep["step_ms_pcie"] / rep["step_ms_idle"]
        rep["steps_total"] = len(steps)
        result[f"rank{r}"] = rep
    return result


def _read_ns(work: str, name: str) -> int | None:
    path = os.path.join(work, name)
    return int(open(path).read()) if os.path.exists(path) else None


def _raise_flag(work: str, name: str) -> None:
    path = os.path.join(work, name)
    with open(path + ".tmp", "w") as f:
        f.write(str(time.monotonic_ns()))
    os.replace(path + ".tmp", path)


def cmd_failover_rank(args) -> dict:
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    rank = int(os.environ["TRTLLM_DWDP_RANK"])
    device = bench_device(args, rank)
    e, n_layers = args.experts, args.layers
    w = e // 3
    config = bench_config(args.preset, n_layers, 1024)
    backend = pick_backend(args.backend, device)
    dconf = DwdpConfig(dwdp_size=3, num_experts_per_worker=w, num_prefetch_experts=w,
                       host_backup=True, peer_timeout_s=args.timeout, heartbeat_interval_s=0.2,
                       peer_dead_after_s=30.0, **view_keys(args))
    report = {"rank": rank, "device": str(device), "backend": backend,
              "expert_view": dconf.expert_view, "steps": []}
    with DwdpManager.from_environment(dconf, e, device) as mgr:
        layers = build_layers(mgr, config, e, make_backend(backend), device, w * rank, w)
        mgr.exchange()
        x = tokens(args.tokens[0], config.hidden_size, device, SEED)
        first = None
        bitwise = True
        n, idle_steps, failover_n = 0, 0, None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            n += 1
            if rank == 1 and n == args.kill_at:  # go idle, then die when told
                _raise_flag(args.work, "idle_ns")
                while _read_ns(args.work, "die") is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                _raise_flag(args.work, "kill_ns")
                os.kill(os.getpid(), signal.SIGKILL)
            idle = _read_ns(args.work, "idle_ns")
            t0 = time.monotonic_ns()
            out, retries = forward(layers, mgr, x)
            sync(device)
            t1 = time.monotonic_ns()
            phase = ("pcie" if mgr.stats.failovers else
                     "idle" if idle is not None and idle < t0 else "busy")
            if first is None:
                first = out.cpu()
            elif not torch.equal(out.cpu(), first):
                bitwise = False
            report["steps"].append({"n": n, "ms": (t1 - t0) / 1e6, "end_ns": t1,
                                    "retries": retries, "phase": phase})
            if phase == "idle":
                idle_steps += 1
                if idle_steps == args.after:
                    _raise_flag(args.work, f"timed_idle{rank}")
            # rank 1 dies once both survivors timed --after steps with it idle (a survivor that
            # started late would otherwise have no idle phase to compare with)
            if rank == 0 and _read_ns(args.work, "die") is None and all(
                    _read_ns(args.work, f"timed_idle{r}") is not None for r in (0, 2)):
                _raise_flag(args.work, "die")
            if failover_n is None and mgr.stats.failovers:
                failover_n = n
            if failover_n is not None and n >= failover_n + args.after:
                break
        st = mgr.stats
        report.update({"bitwise_equal_every_step": bitwise, "failovers": st.failovers,
                       "manager_failover_ms": 1e3 * st.failover_time_s,
                       "step_retries": st.step_retries,
                       "host_bytes_copied": st.host_bytes_copied,
                       "events": [ev.message for ev in mgr.tier_events]})
    with open(os.path.join(args.work, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    return {"rank": rank, "steps": len(report["steps"])}


# ---------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["h2d", "offload", "failover", "failover-rank"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the same code (shm store, no raw CUDA copies, no uvm)")
    ap.add_argument("--preset", default="deepseek-v3", help="model preset giving H, I and top-k")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--host-experts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--tokens", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--backend", default="auto", help="auto (cutedsl if available), torch, cutedsl")
    ap.add_argument("--contention-opt", action="store_true")
    ap.add_argument("--expert-view", default=None, choices=["multi", "composite"],
                    help="weight view (default: dwdp_config's, composite); offload's uvm mode "
                    "always runs multi")
    ap.add_argument("--kill-at", type=int, default=6,
                    help="failover: the step at which rank 1 goes idle (it dies --after steps later)")
    ap.add_argument("--after", type=int, default=4,
                    help="failover: steps timed with rank 1 idle, then after the failover")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--budget-s", type=float, default=60.0, help="offload: stop adding points after")
    ap.add_argument("--work", default="/tmp/tiers_failover")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    fn = {"h2d": cmd_h2d, "offload": cmd_offload, "failover": cmd_failover,
          "failover-rank": cmd_failover_rank}[args.what]
    emit(fn(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
