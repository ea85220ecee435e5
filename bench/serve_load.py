"""Load generator for an OpenAI-compatible server: throughput and TTFT / TPOT / ITL percentiles.

    python bench/serve_load.py --url http://127.0.0.1:8000 --num-prompts 64 --concurrency 32 \\
        --input-len 128 --output-len 32
    python bench/serve_load.py --url ... --request-rate 4                  # Poisson arrivals
    python bench/serve_load.py --url ... --sweep-concurrency 1 4 16 32 --plot latency.png

Works against ``serve`` and the disaggregated router alike (it only speaks the OpenAI API, with
aiohttp). Each request is a completion whose prompt is ``--input-len`` random token ids (exact
lengths, no tokenizer needed) or, with ``--endpoint chat``, a chat message of random words;
``--input-len-max`` / ``--output-len-max`` draw each request's lengths uniformly from the range.
``ignore_eos`` is set so every request produces its full output length (as trtllm-bench and
vLLM's benchmark_serving do). Streaming (default) measures per request:

  TTFT  arrival to the first streamed token            E2E   arrival to the last token
  TPOT  (E2E - TTFT) / (output tokens - 1)             ITL   every gap between streamed chunks

(``--no-stream`` measures E2E only.)
Load is a request rate (Poisson arrivals, seeded), a concurrency limit, or both. ``--warmup``
requests run first and are not counted. Prints one JSON object per run (``--out`` writes all);
an error is a non-200 answer, an error event in the stream, a broken stream, or fewer output
tokens than asked.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

WORDS = ("the of and to in is that for it as with was on be by at this from are or an "
         "which one have not but all were they we when can there been has more if will").split()


@dataclass
class RequestSpec:
    input_len: int
    output_len: int
    prompt: list[int] | str


@dataclass
class RequestResult:
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


def make_requests(args, n: int, rng: random.Random) -> list[RequestSpec]:
    specs = []
    for _ in range(n):
        ilen = rng.randint(args.input_len, args.input_len_max or args.input_len)
        olen = rng.randint(args.output_len, args.output_len_max or args.output_len)
        if args.endpoint == "chat":
            prompt: list[int] | str = " ".join(rng.choice(WORDS) for _ in range(ilen))
        else:
            prompt = [rng.randrange(args.token_id_max) for _ in range(ilen)]
        specs.append(RequestSpec(ilen, olen, prompt))
    return specs


def request_body(args, spec: RequestSpec) -> dict:
    body = {"max_tokens": spec.output_len, "ignore_eos": True, "stream": args.stream,
            "temperature": args.temperature}
    if args.model:
        body["model"] = args.model
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body


async def send(session, args, spec: RequestSpec) -> RequestResult:
    """One request; never raises (a failure is a result with ``ok=False``)."""
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    res = RequestResult(ok=False, input_tokens=spec.input_len)
    try:
        async with session.post(args.url.rstrip("/") + path, json=request_body(args, spec)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            if not args.stream:
                body = await resp.json()
                now = time.perf_counter()
                res.e2e_s = now - start  # no TTFT without streaming
                usage = body.get("usage") or {}
                res.output_tokens = usage.get("completion_tokens", 0)
                res.input_tokens = usage.get("prompt_tokens", spec.input_len)
            else:
                await _read_stream(resp, start, res)
    except (asyncio.TimeoutError, OSError, ValueError) as e:  # aiohttp's errors are OSErrors
        res.error = f"{type(e).__name__}: {e}"
        return res
    if res.error is None and res.output_tokens < spec.output_len:
        res.error = f"{res.output_tokens} output tokens, {spec.output_len} asked"
    res.ok = res.error is None
    return res


async def _read_stream(resp, start: float, res: RequestResult) -> None:
    last = None
    chunks = 0
    done = False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            res.error = f"stream error: {event['error'].get('message', '')[:200]}"
            continue
        if event.get("usage"):
            res.output_tokens = event["usage"]["completion_tokens"]
            res.input_tokens = event["usage"]["prompt_tokens"]
        if not event.get("choices"):
            continue
        now = time.perf_counter()
        if last is None:
            res.ttft_s = now - start
        else:
            res.itl_s.append(now - last)
        last = now
        chunks += 1
    res.e2e_s = (last or time.perf_counter()) - start
    if not res.output_tokens:
        res.output_tokens = chunks
    if not done and res.error is None:
        res.error = "stream ended without [DONE]"


async def run_load(args, specs: list[RequestSpec], *, rate: float, concurrency: int | None,
                   seed: int) -> tuple[list[RequestResult], float]:
    """Send ``specs`` at Poisson ``rate`` (inf: all at once) with at most ``concurrency`` open."""
    import aiohttp

    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    async def one(session, spec):
        if limit is None:
            return await send(session, args, spec)
        async with limit:
            return await send(session, args, spec)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        start = time.perf_counter()
        for spec in specs:
            tasks.append(asyncio.create_task(one(session, spec)))
            if math.isfinite(rate) and rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        x = p / 100 * (len(v) - 1)
        lo = math.floor(x)
        hi = min(lo + 1, len(v) - 1)
        return (v[lo] + (v[hi] - v[lo]) * (x - lo)) * scale

    return {"mean": sum(v) / len(v) * scale, "p50": q(50), "p90": q(90), "p99": q(99), "max": v[-1] * scale}


def summarize(args, results: list[RequestResult], duration: float, *, rate: float,
              concurrency: int | None) -> dict:
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok
            if r.ttft_s is not None and r.output_tokens > 1]
    return {
        "label": args.label, "url": args.url, "endpoint": args.endpoint, "stream": args.stream,
        "request_rate": rate if math.isfinite(rate) else "inf", "concurrency": concurrency,
        "num_prompts": len(results), "completed": len(ok), "errors": len(errors),
        "error_samples": sorted({r.error for r in errors})[:3],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration else 0.0,
        "input_tokens_per_s": in_tokens / duration if duration else 0.0,
        "output_tokens_per_s": out_tokens / duration if duration else 0.0,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": percentiles(tpot),
        "itl_ms": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_latency_ms": percentiles([r.e2e_s for r in ok]),
    }


async def main_async(args) -> list[dict]:
    rng = random.Random(args.seed)
    if args.warmup:
        warm = await run_load(args, make_requests(args, args.warmup, rng), rate=math.inf,
                              concurrency=args.warmup, seed=args.seed)
        bad = [r.error for r in warm[0] if not r.ok]
        if bad:
            print(f"serve_load: warm-up failed: {bad[0]}", file=sys.stderr)
    loads: list[tuple[float, int | None]]
    if args.sweep_concurrency:
        loads = [(args.request_rate, c) for c in args.sweep_concurrency]
    elif args.sweep_rate:
        loads = [(r, args.concurrency) for r in args.sweep_rate]
    else:
        loads = [(args.request_rate, args.concurrency)]
    runs = []
    for i, (rate, conc) in enumerate(loads):
        specs = make_requests(args, args.num_prompts, random.Random(args.seed + 1 + i))
        results, duration = await run_load(args, specs, rate=rate, concurrency=conc, seed=args.seed + i)
        summary = summarize(args, results, duration, rate=rate, concurrency=conc)
        print(json.dumps(summary), flush=True)
        runs.append(summary)
    return runs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server or router base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="model name to send (default: none, the server's)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (completions) or words (chat)")
    p.add_argument("--input-len-max", type=int, default=None, help="draw input lengths in [input-len, this]")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--output-len-max", type=int, default=None, help="draw output lengths in [output-len, this]")
    p.add_argument("--token-id-max", type=int, default=256, help="prompt token ids are drawn in [0, this)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    p.add_argument("--concurrency", type=int, default=None, help="at most this many requests open")
    p.add_argument("--sweep-concurrency", type=int, nargs="+", default=None)
    p.add_argument("--sweep-rate", type=float, nargs="+", default=None)
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--label", default="", help="free text stored with the results (e.g. 'CPU, tiny preset')")
    p.add_argument("--out", default=None, help="write {'runs': [...]} here")
    p.add_argument("--plot", default=None, help="PNG of latency against load (needs several runs)")
    args = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "token_id_max"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for lo, hi in (("input_len", "input_len_max"), ("output_len", "output_len_max")):
        if getattr(args, hi) is not None and getattr(args, hi) < getattr(args, lo):
            p.error(f"--{hi.replace('_', '-')} is below --{lo.replace('_', '-')}")
    if args.sweep_concurrency and args.sweep_rate:
        p.error("sweep either concurrency or rate, not both")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = asyncio.run(main_async(args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"runs": runs}, f, indent=2)
            f.write("\n")
    if args.plot:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.plots import plot_latency_vs_load

        plot_latency_vs_load(runs, args.plot)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
