"""bench/serve_load.py against an in-process server (engine double): counts, percentiles,
errors, streaming and not, completions and chat, the plot."""
import asyncio
import os
import sys

import pytest
from aiohttp import web

from bench import serve_load
from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve"))
from _engine_double import EngineDouble  # noqa: E402  (tests/serve's engine double)


def test_percentiles_interpolate_like_numpy():
    p = serve_load.percentiles([0.004, 0.001, 0.003, 0.002])
    assert p["p50"] == pytest.approx(2.5) and p["p90"] == pytest.approx(3.7)
    assert p["mean"] == pytest.approx(2.5) and p["max"] == pytest.approx(4.0)
    assert serve_load.percentiles([]) is None


def test_summary_rates_and_tpot():
    args = serve_load.parse_args(["--url", "http://x"])
    ok = serve_load.RequestResult(True, input_tokens=10, output_tokens=5, ttft_s=0.1, e2e_s=0.5,
                                  itl_s=[0.1] * 4)
    bad = serve_load.RequestResult(False, error="HTTP 500: boom")
    s = serve_load.summarize(args, [ok, ok, bad], 2.0, rate=float("inf"), concurrency=4)
    assert (s["completed"], s["errors"], s["error_samples"]) == (2, 1, ["HTTP 500: boom"])
    assert s["requests_per_s"] == 1.0 and s["output_tokens_per_s"] == 5.0 and s["input_tokens_per_s"] == 10.0
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["ttft_ms"]["p99"] == pytest.approx(100.0)


def test_against_a_server(tmp_path):
    async def main():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = OpenAIServer(EngineDouble(step_s=0.002), ByteTokenizer(512),
                              ServerConfig(model_name="m", max_seq_len=256, vocab_size=512, public_url=url))
        runner = web.AppRunner(server.make_app(), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            out = {}
            for name, extra in (("stream", ["--concurrency", "8"]),
                                ("rate", ["--request-rate", "200", "--no-stream"]),
                                ("chat", ["--endpoint", "chat", "--concurrency", "4", "--input-len", "3"]),
                                ("sweep", ["--sweep-concurrency", "1", "4"]),
                                ("too_long", ["--output-len", "250", "--concurrency", "4"])):
                args = serve_load.parse_args(["--url", url, "--num-prompts", "12", "--input-len", "8",
                                              "--input-len-max", "12", "--output-len", "6", "--warmup", "1",
                                              *extra])
                out[name] = await serve_load.main_async(args)
            return out
        finally:
            await runner.cleanup()

    out = asyncio.run(asyncio.wait_for(main(), 120))
    for name in ("stream", "rate", "chat"):
        (r,) = out[name]
        assert r["errors"] == 0 and r["completed"] == 12 and r["total_output_tokens"] == 72, (name, r)
        assert r["e2e_latency_ms"]["p50"] > 0
    assert 8 * 12 <= out["stream"][0]["total_input_tokens"] <= 12 * 13  # BOS + 8..12 ids
    for r in (out["stream"][0], out["chat"][0]):
        assert 0 < r["ttft_ms"]["p50"] and r["e2e_latency_ms"]["p99"] >= r["ttft_ms"]["p99"]
        assert r["itl_ms"]["p50"] > 0 and r["tpot_ms"]["p50"] > 0
    rate = out["rate"][0]
    assert rate["request_rate"] == 200.0 and rate["ttft_ms"] is None and rate["itl_ms"] is None
    assert [r["concurrency"] for r in out["sweep"]] == [1, 4]
    (bad,) = out["too_long"]
    assert bad["errors"] == 12 and "HTTP 400" in bad["error_samples"][0]
    from bench.plots import plot_latency_vs_load

    plot_latency_vs_load(out["sweep"], str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
