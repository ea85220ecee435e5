"""KV hand-over bandwidth between two processes: same-node fast path vs HTTP vs a raw copy.

    python bench/kv_handover.py --device cuda:1 --export-device cuda:0 --tokens 8192 32768
    python bench/kv_handover.py --device cpu --tokens 256 --layers 2      # shm vs HTTP on CPU

Starts an exporter process (the context server's side: a ``KvStore`` over a ``KvExportPool``
behind the real ``KvRoutes`` on ``--export-device``) and pulls DeepSeek-V3-shaped hand-overs
(``--layers`` x tokens x (512 + 64) bf16, the MLA cache; 61 layers x 32K tokens = 2.3 GB)
into this process on ``--device`` with the generation server's ``KvPuller``, each way in the
same run:

  fast   POST .../share, copy out of the exporter's pool (CUDA IPC on a GPU, /dev/shm on the
         CPU; the pool mapped on the first pull and reused after), then DELETE
  http   GET of the safetensors bytes, parsed, then copied to ``--device``
  raw    cudaMemcpyAsync of the same byte count out of the same mapped pool (CUDA events; a
         peer copy when the devices differ), or a host memmove on the CPU

For the fast path it reports the median of each phase (``share``, ``open_first``: mapping the
pool on the first pull of each size, after unmapping it; ``open_cached``: the lookup on later
pulls; ``alloc`` of the destination, ``copy``, ``release``: the DELETE that also confirms the
entry was held throughout; ``other``: the rest), so a run shows where the time goes. Every
pulled byte is checked against the exporter's pattern. Times are medians over ``--repeats``
after one warm-up, one path at a time; "end to end" includes the HTTP requests and, for http,
the parse and the copy to the device. Prints one JSON object (``--out`` writes it too).

With ``--ttft MODEL`` it measures instead the time to first token of ``--tokens``-long prompts
through the disaggregated router (one context server on ``--export-device``, one generation
server on ``--device``, started with ``LocalCluster``), once per ``kv_transfer`` mode (auto:
same-node fast path; http), after one untimed request of each length, reading which path each
hand-over took (and the fast path's phases) from the generation server's /metrics; and checks a seeded sampled request gives the
same tokens twice. ``--out`` is rewritten after every prompt length, so a run cut short by a
time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from bench.json_out import emit  # noqa: E402

MLA_K, MLA_V = 512, 64  # DeepSeek-V3: kv_lora_rank latent, rope key
PHASES = ("share_s", "open_s", "alloc_s", "copy_s", "release_s")


def pattern(tokens: int, layers: int, key: int, device) -> dict[str, torch.Tensor]:
    """The hand-over's tensors: bf16 bit patterns from a generator seeded per (key, tensor)."""
    out = {}
    names = [f"layers.{i}.{kv}" for i in range(layers) for kv in "kv"]
    for idx, name in enumerate(names):
        dim = MLA_K if name.endswith(".k") else MLA_V
        g = torch.Generator(device=device).manual_seed(key * 100003 + idx)
        out[name] = torch.randint(-32768, 32767, (tokens, 1, dim), dtype=torch.int16, device=device,
                                  generator=g).view(torch.bfloat16)
    return out


def handover_bytes(tokens: int, layers: int) -> int:
    return tokens * layers * (MLA_K + MLA_V) * 2


# ---- the exporter process ----------------------------------------------------------------------

def run_exporter(device: str, port: int, pool_bytes: int) -> None:
    from aiohttp import web

    from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
    from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool
    from tensorrt_llm_dwdp.serve.kv_transfer import KvRoutes, KvStore

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pool = KvExportPool(dev, pool_bytes)
    pool.open()
    store = KvStore(max_bytes=64 << 30, pool=pool)
    base = f"http://127.0.0.1:{port}/v1/kv/"

    def pooled(handoff):
        """Into the pool, as the engine exports a finished prefill."""
        out = handoff.pack(copy=True, alloc=pool.export_alloc)
        if not pool.holds(out.block):
            raise web.HTTPInsufficientStorage(text=f"{handoff.nbytes} bytes do not fit the pool: {pool.stats()}")
        return out

    async def put(request):
        body = await request.json()
        tensors = pattern(body["tokens"], body["layers"], body["key"], dev)
        handoff = pooled(KvHandoff(tuple(range(body["tokens"])), 7, tensors))
        return web.json_response({"kv_url": base + store.put(handoff), "nbytes": handoff.nbytes,
                                  "pool": pool.kind})

    async def raw(request):
        """A plain buffer of ``nbytes`` in the pool (the raw-copy source)."""
        body = await request.json()
        handoff = pooled(KvHandoff((0,), 0, {"raw": torch.zeros(body["nbytes"], dtype=torch.uint8, device=dev)}))
        return web.json_response({"kv_url": base + store.put(handoff)})

    async def health(request):
        return web.Response(text="OK")

    async def cleanup(app):
        store.close()
        pool.close()  # unlinks a shm pool's file

    app = web.Application()
    KvRoutes(store).add_to(app)
    app.router.add_post("/bench/put", put)
    app.router.add_post("/bench/raw", raw)
    app.router.add_get("/health", health)
    app.on_cleanup.append(cleanup)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ---- the puller (this process) -----------------------------------------------------------------

def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(
        torch.equal(got[k].to(want[k].device).view(torch.int16), want[k].view(torch.int16)) for k in want)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def pull_once(session, puller, base: str, tokens: int, layers: int, key: int, device) -> dict:
    async with session.post(base + "/bench/put", json={"tokens": tokens, "layers": layers, "key": key}) as r:
        if r.status != 200:
            raise RuntimeError(f"exporter: {r.status} {await r.text()}")
        put = await r.json()
    start = time.perf_counter()
    handoff, transfer = await puller.pull(session, put["kv_url"])
    on_device = {k: v.to(device) for k, v in handoff.tensors.items()}
    _sync(device)
    total = time.perf_counter() - start
    return {"path": transfer.path, "fallback": transfer.fallback, "reason": transfer.reason,
            "nbytes": transfer.nbytes, "pull_s": transfer.seconds, "end_to_end_s": total,
            "phases": dict(transfer.phases), "opened": transfer.opened,
            "ok": _equal(on_device, pattern(tokens, layers, key, device))}


async def raw_copy(session, puller, base: str, nbytes: int, device, repeats: int) -> dict:
    """Copies of ``nbytes`` out of a block of the exporter's pool, mapped as the fast path maps it."""
    async with session.post(base + "/bench/raw", json={"nbytes": nbytes}) as r:
        raw = await r.json()
    times = []
    try:
        desc, src = await puller.share_and_map(session, raw["kv_url"])
        if desc["kind"] == "cuda_ipc":
            from tensorrt_llm_dwdp.transport.cuda_ipc import check, cuda_bindings

            rt, _ = cuda_bindings()
            dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
            stream = torch.cuda.Stream(device)
            for _ in range(repeats + 1):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record(stream)
                check(rt.cudaMemcpyAsync(dst.data_ptr(), src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDefault,
                                         stream.cuda_stream), "raw cudaMemcpyAsync")
                e1.record(stream)
                e1.synchronize()
                times.append(e0.elapsed_time(e1) / 1e3)
            what = "cudaMemcpyAsync out of the exporter's IPC-mapped pool"
        else:
            dst = torch.empty(nbytes, dtype=torch.uint8)
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                ctypes.memmove(dst.data_ptr(), src, nbytes)
                times.append(time.perf_counter() - t0)
            what = "host memmove out of the exporter's mapped shm pool"
    finally:
        async with session.delete(raw["kv_url"]):
            pass
    s = statistics.median(times[1:])
    return {"what": what, "seconds": s, "gb_per_s": nbytes / s / 1e9}


def _median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def fast_phases(first: dict, cached: list[dict]) -> dict:
    """Median seconds per phase of the cached pulls, and the first pull's pool mapping."""
    med = {p[:-2]: _median(r["phases"][p] for r in cached if p in r["phases"]) for p in PHASES}
    return {"share": med["share"], "open_first": first["phases"].get("open_s") if first["opened"] else None,
            "open_cached": med["open"], "alloc": med["alloc"], "copy": med["copy"], "release": med["release"],
            "other": _median(r["pull_s"] - sum(r["phases"].get(p, 0.0) for p in PHASES) for r in cached)}


async def bench(args) -> dict:
    import aiohttp

    from tensorrt_llm_dwdp.launcher import free_port
    from tensorrt_llm_dwdp.serve.kv_puller import KvPuller
    from tensorrt_llm_dwdp.serve.launch import wait_for_health_async

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    port = free_port()
    pool_bytes = args.pool_bytes or 2 * handover_bytes(max(args.tokens), args.layers) + (1 << 20)
    exporter = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--exporter", "--port", str(port),
                                 "--export-device", args.export_device or args.device,
                                 "--pool-bytes", str(pool_bytes)])
    base = f"http://127.0.0.1:{port}"
    fast, http = KvPuller(device), KvPuller(device, fast_path=False)
    sizes = []
    try:
        await wait_for_health_async([base], timeout_s=120)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            for tokens in args.tokens:
                await fast.unmap_pools()  # the first pull of each size maps the pool afresh
                runs = {"fast": [], "http": []}
                # One path at a time: an exporter still freeing an HTTP blob of GBs answers the
                # next share request late (45 ms instead of 2 ms on the CPU, 0.6 GB).
                for name, puller in (("fast", fast), ("http", http)):
                    for rep in range(args.repeats + 1):
                        runs[name].append(await pull_once(session, puller, base, tokens, args.layers, rep, device))
                nbytes = runs["fast"][0]["nbytes"]
                entry = {"tokens": tokens, "layers": args.layers, "nbytes": nbytes,
                         "raw": await raw_copy(session, fast, base, nbytes, device, args.repeats)}
                for name, rs in runs.items():
                    first, rs = rs[0], rs[1:] or rs
                    pull = statistics.median(r["pull_s"] for r in rs)
                    e2e = statistics.median(r["end_to_end_s"] for r in rs)
                    entry[name] = {"path": sorted({r["path"] for r in rs}), "fallback": rs[-1]["fallback"],
                                   "reason": rs[-1]["reason"], "verified": all(r["ok"] for r in [first, *rs]),
                                   "pull_s": pull, "end_to_end_s": e2e,
                                   "pull_gb_per_s": nbytes / pull / 1e9, "end_to_end_gb_per_s": nbytes / e2e / 1e9}
                    if name == "fast":
                        phases = fast_phases(first, rs)
                        entry[name]["phases_s"] = phases
                        entry[name]["first_pull_s"] = first["pull_s"]
                        entry[name]["opened"] = [r["opened"] for r in runs[name]]  # mapped the pool
                        if phases["copy"]:
                            entry[name]["copy_gb_per_s"] = nbytes / phases["copy"] / 1e9
                entry["fast_over_http"] = entry["http"]["end_to_end_s"] / entry["fast"]["end_to_end_s"]
                entry["fast_over_raw"] = entry["fast"]["end_to_end_gb_per_s"] / entry["raw"]["gb_per_s"]
                sizes.append(entry)
                print(json.dumps(entry), file=sys.stderr, flush=True)
    finally:
        fast.close()
        http.close()
        exporter.terminate()
        try:
            exporter.wait(30)
        except subprocess.TimeoutExpired:
            exporter.kill()
    return {"bench": "kv_handover", "device": str(device), "export_device": args.export_device or args.device,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "pool_bytes": pool_bytes, "repeats": args.repeats, "sizes": sizes,
            "ok": bool(sizes) and all(s["fast"]["verified"] and s["http"]["verified"] for s in sizes)}


async def _gen_kv_metrics(session, url: str) -> dict[str, list[float]]:
    """{path: [count, bytes, seconds]} and {"phase:<name>": [seconds]} from a generation
    server's /metrics."""
    import re

    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, list[float]] = {}
    for i, name in enumerate(("kv_transfers_total", "kv_transfer_bytes_total", "kv_transfer_seconds_total")):
        for path, value in re.findall(rf'^trtllm_dwdp_{name}{{[^}}]*path="([^"]+)"}} (\S+)$', text, re.M):
            out.setdefault(path, [0.0, 0.0, 0.0])[i] = float(value)
    for phase, value in re.findall(r'^trtllm_dwdp_kv_transfer_phase_seconds_total{[^}]*phase="([^"]+)"} (\S+)$',
                                   text, re.M):
        out[f"phase:{phase}"] = [float(value)]
    return out


async def _ttft_requests(cluster, args, report) -> dict:
    """TTFT per prompt length; ``report(partial)`` is called after each length."""
    import random

    import aiohttp

    from bench import serve_load

    load = serve_load.parse_args(["--url", cluster.router_url, "--output-len", "2", "--timeout", "300"])
    gen_url = [p.url for p in cluster.procs if p.name.startswith("generation")][0]
    rng = random.Random(0)
    out: dict = {"lengths": {}}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        warm = serve_load.RequestSpec(64, 2, [rng.randrange(256) for _ in range(64)])
        await serve_load.send(session, load, warm)
        for tokens in args.tokens:
            # An untimed request of this length first: its attention plans and kernels are
            # built on first use, which is start-up cost, not the hand-over's.
            await serve_load.send(session, load, serve_load.RequestSpec(
                tokens, 2, [rng.randrange(256) for _ in range(tokens)]))
            runs = []
            for _ in range(args.repeats):
                before = await _gen_kv_metrics(session, gen_url)
                spec = serve_load.RequestSpec(tokens, 2, [rng.randrange(256) for _ in range(tokens)])
                res = await serve_load.send(session, load, spec)
                after = await _gen_kv_metrics(session, gen_url)
                delta = {k: [a - b for a, b in zip(v, before.get(k, [0.0] * len(v)))] for k, v in after.items()}
                kv = {p: {"bytes": v[1], "seconds": v[2]} for p, v in delta.items()
                      if not p.startswith("phase:") and v[0]}
                phases = {k[6:]: v[0] for k, v in delta.items() if k.startswith("phase:") and v[0]}
                runs.append({"ok": res.ok, "error": res.error, "ttft_s": res.ttft_s, "kv": kv,
                             "kv_phases_s": phases})
            good = [r["ttft_s"] for r in runs if r["ok"]]
            out["lengths"][str(tokens)] = {"ttft_s_median": statistics.median(good) if good else None,
                                           "runs": runs}
            print(json.dumps({"tokens": tokens, **out["lengths"][str(tokens)]}), file=sys.stderr, flush=True)
            report(out)
        body = {"prompt": "Tell me", "max_tokens": 8, "temperature": 0.8, "seed": 7, "ignore_eos": True,
                "return_token_ids": True}
        ids = []
        for _ in range(2):
            async with session.post(cluster.router_url + "/v1/completions", json=body) as r:
                ids.append((await r.json())["choices"][0].get("token_ids") if r.status == 200 else r.status)
        out["seeded_sampling_reproduces"] = ids[0] == ids[1] and isinstance(ids[0], list)
    return out


def ttft(args) -> dict:
    """TTFT through the router with each KV path (see the module docstring)."""
    import tempfile

    from tensorrt_llm_dwdp.serve.cluster import LocalCluster

    max_len = max(args.tokens) + 64
    common = {"max_seq_len": max_len, "max_batch_size": 2}
    result = {"bench": "kv_handover_ttft", "model": args.ttft, "ctx_device": args.export_device or args.device,
              "gen_device": args.device, "repeats": args.repeats, "modes": {}}

    def report(mode, partial):
        result["modes"][mode] = partial
        _summarise_ttft(result)
        emit(result, args.out, quiet=True)

    for mode in ("auto", "http"):
        with tempfile.TemporaryDirectory(prefix=f"kv-ttft-{mode}-") as work:
            cluster = LocalCluster(args.ttft, work, num_ctx=1, num_gen=1,
                                   ctx_options={**common, "device": args.export_device or args.device},
                                   gen_options={**common, "device": args.device, "kv_transfer": mode})
            try:
                cluster.start(timeout_s=args.start_timeout)
                report(mode, asyncio.run(_ttft_requests(cluster, args, lambda partial, m=mode: report(m, partial))))
            except Exception as exc:  # noqa: BLE001 - one failed mode is reported, the other still runs
                tails = {p.name: cluster.log_tail(p.name, 1500) for p in cluster.procs}
                report(mode, {**result["modes"].get(mode, {}),
                              "error": f"{type(exc).__name__}: {exc}"[:2000], "logs": tails})
            finally:
                cluster.stop()
    return _summarise_ttft(result)


def _summarise_ttft(result: dict) -> dict:
    medians = {m: {t: v["ttft_s_median"] for t, v in r.get("lengths", {}).items()} for m, r in result["modes"].items()}
    result["ttft_s_median"] = medians
    result["ok"] = all("error" not in r and all(v is not None for v in medians[m].values())
                       for m, r in result["modes"].items())
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the generation side lands the KV")
    p.add_argument("--export-device", default=None, help="the context side's device (default: --device)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pool-bytes", type=int, default=0,
                   help="the exporter's pool (default: twice the largest hand-over plus 1 MiB)")
    p.add_argument("--out", default=None)
    p.add_argument("--ttft", default=None, metavar="MODEL",
                   help="measure TTFT through the router with each KV path on this checkpoint instead")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds for the servers to start")
    p.add_argument("--exporter", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.exporter:
        run_exporter(args.export_device, args.port, args.pool_bytes)
        return 0
    if args.device == "cuda":
        args.device = "cuda:0"
    result = ttft(args) if args.ttft else asyncio.run(bench(args))
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
