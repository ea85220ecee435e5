"""Servers started for real: an aggregated ``serve`` process and a disaggregated deployment
(2 context servers forming one DWDP group under mpirun, a generation server, the router) on a
tiny synthetic checkpoint, on loopback ports, driven by a real aiohttp client.

Checks: disaggregated + DWDP answers equal the aggregated ones token for token (completions,
streaming, chat, seeded sampling); the context servers' /metrics show DWDP prefetch traffic; error bodies pass
through the router; a generation server killed mid-request turns into an error for that client
(SSE error event, then 502 for new requests) with nothing hanging; every process stops on SIGTERM.
"""
import asyncio
import json
import re

import aiohttp
import pytest

from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.serve.cluster import LocalCluster, LocalServer
from tensorrt_llm_dwdp.serve.options import load_yaml_mapping

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
CONFIG = "configs/synthetic_tiny_dwdp2.yaml"
TIMEOUT = aiohttp.ClientTimeout(total=120)
PROMPTS = ["Hello there", "Question: 2+2?\nAnswer:", "x"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("e2e")
    model = str(root / "tiny")
    write_synthetic_checkpoint(model, get_preset("tiny-deepseek-v3", num_layers=2), quant="nvfp4")
    ctx = load_yaml_mapping(str(request.config.rootpath / CONFIG))
    ctx.update(device="cpu", max_seq_len=1024)
    common = {"device": "cpu", "max_seq_len": 1024}
    server = LocalServer(model, str(root / "agg"), common)
    cluster = LocalCluster(model, str(root / "disagg"), num_ctx=2, num_gen=1, ctx_options=ctx, gen_options=common)
    # Start both at once (model loading dominates on a small CPU machine), then wait for both.
    try:
        server.spawn()
        cluster.spawn(timeout_s=240)
        server.wait_ready(240)
        cluster.wait_ready(240)
        yield server, cluster
    finally:
        cluster.stop()
        server.stop()


async def _post(s, url, body):
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def _stream(s, url, body):
    out = []
    async with s.post(url, json={**body, "stream": True}) as r:
        assert r.status == 200
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_disaggregated_dwdp_matches_aggregated(deployment):
    server, cluster = deployment

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            for prompt in PROMPTS:
                body = {"prompt": prompt, "max_tokens": 10, "return_token_ids": True}
                st1, ref = await _post(s, server.url + "/v1/completions", body)
                st2, got = await _post(s, cluster.router_url + "/v1/completions", body)
                assert st1 == st2 == 200
                assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
                assert got["choices"][0]["text"] == ref["choices"][0]["text"]
                assert got["usage"] == ref["usage"]
                chunks = await _stream(s, cluster.router_url + "/v1/completions", body)
                assert sum((c["choices"][0].get("token_ids", []) for c in chunks), []) == ref["choices"][0]["token_ids"]
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
            _, ref = await _post(s, server.url + "/v1/chat/completions", chat)
            _, got = await _post(s, cluster.router_url + "/v1/chat/completions", chat)
            assert got["choices"][0]["message"] == ref["choices"][0]["message"]
            # Sampled with a seed: the context server draws the first token, the generation
            # server the rest, and together they draw what the aggregated server does.
            hot = {"prompt": "x", "max_tokens": 12, "temperature": 0.9, "top_k": 50, "seed": 11,
                   "ignore_eos": True, "return_token_ids": True}
            _, ref = await _post(s, server.url + "/v1/completions", hot)
            _, got = await _post(s, cluster.router_url + "/v1/completions", hot)
            assert got["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
            _, greedy = await _post(s, server.url + "/v1/completions", {**hot, "temperature": 0})
            assert greedy["choices"][0]["token_ids"] != ref["choices"][0]["token_ids"]
            status, err = await _post(s, cluster.router_url + "/v1/completions", {"prompt": "x", "temperature": 2.5})
            assert status == 400 and err["error"]["param"] == "temperature"
            async with s.get(cluster.router_url + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"].endswith("tiny")
            copied = 0.0
            for url in cluster.context_urls:
                async with s.get(url + "/metrics") as r:
                    text = await r.text()
                m = re.search(r'^trtllm_dwdp_dwdp_bytes_copied\{role="worker"\} (\S+)$', text, re.M)
                assert m is not None, text[-2000:]
                copied += float(m.group(1))
            assert copied > 0  # the two ranks really fetched experts from each other
            # Same node, CPU ranks: every hand-over took the shared-memory path, none fell back.
            gen_url = next(p.url for p in cluster.procs if p.name.startswith("generation"))
            async with s.get(gen_url + "/metrics") as r:
                text = await r.text()
            assert re.search(r'^trtllm_dwdp_kv_transfers_total\{role="worker",path="shm"\} [1-9]', text, re.M), text
            assert 'path="http"' not in text
            assert re.search(r'^trtllm_dwdp_kv_transfer_fallbacks_total\{role="worker",reason="pool_full"\} 0$',
                             text, re.M)
            assert not re.search(r'^trtllm_dwdp_kv_transfer_fallbacks_total\{.*\} [1-9]', text, re.M), text
            # The context server's pool was mapped once; its exports went straight into it.
            assert re.search(r'^trtllm_dwdp_kv_pool_mappings_opened\{role="worker"\} [12]\.0$', text, re.M), text
            for url in cluster.context_urls:
                async with s.get(url + "/metrics") as r:
                    ctx = await r.text()
                assert re.search(r'^trtllm_dwdp_kv_pool_used_bytes\{role="worker"\} 0\.0$', ctx, re.M), ctx
                assert re.search(r'^trtllm_dwdp_kv_pool_adopted\{role="worker"\} 0\.0$', ctx, re.M), ctx

    asyncio.run(main())


def test_generation_server_killed_mid_request(deployment):
    server, cluster = deployment

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            body = {"prompt": "a long answer please", "max_tokens": 600, "ignore_eos": True, "stream": True}
            events, error = 0, None
            async with s.post(cluster.router_url + "/v1/completions", json=body) as r:
                assert r.status == 200
                async for line in r.content:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        error = data["error"]
                        continue
                    events += 1
                    if events == 3:
                        cluster.kill("generation-0")
            assert error is not None and error["code"] == "generation_server_failed", (events, error)
            assert events < 600
            status, err = await asyncio.wait_for(
                _post(s, cluster.router_url + "/v1/completions", {"prompt": "next", "max_tokens": 4}), 60)
            assert status == 502 and err["error"]["type"] == "server_error"
            # The context servers and the aggregated server are unaffected.
            status, ok = await _post(s, server.url + "/v1/completions", {"prompt": "still fine", "max_tokens": 3})
            assert status == 200 and ok["usage"]["completion_tokens"] == 3

    asyncio.run(main())
    cluster.stop()
    server.stop()
    assert server.returncode == 0  # SIGTERM: graceful exit
    router = next(p for p in cluster.procs if p.name == "router")
    assert router.popen.returncode == 0
