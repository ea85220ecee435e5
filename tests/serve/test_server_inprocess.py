"""The HTTP layer end to end in one process: real aiohttp servers and client, an engine double.

Covers what does not depend on the model: streaming vs non-streaming agreement, error bodies,
EOS / stop strings, client disconnects aborting only their request, engine failure, metrics,
and the disaggregated path (router -> context server -> KV over HTTP -> generation server).
"""
import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.serve.disagg_config import parse_disagg_config
from tensorrt_llm_dwdp.serve.kv_pool import KvExportPool
from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig
from tensorrt_llm_dwdp.serve.router import DisaggRouter
from _engine_double import EOS, EngineDouble, expected

TOK = ByteTokenizer(512)
TIMEOUT = aiohttp.ClientTimeout(total=30)


async def _start(app, port):
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def _worker(engine, max_seq_len=256):
    """A worker with a 1 MiB KV export pool (made at its first context-only request, closed
    with the app)."""
    port = free_port()
    pool = KvExportPool("cpu", 1 << 20)
    server = OpenAIServer(engine, TOK, ServerConfig(model_name="/models/tiny", max_seq_len=max_seq_len,
                                                    vocab_size=512, public_url=f"http://127.0.0.1:{port}"),
                          kv_pool=pool)
    app = server.make_app()

    async def close_pool(app):
        pool.close()
    app.on_cleanup.append(close_pool)
    return server, await _start(app, port), f"http://127.0.0.1:{port}"


async def _until(condition, timeout_s: float = 30.0, poll_s: float = 0.02) -> None:
    """Wait for ``condition()``; the generous limit only keeps a broken server from hanging the
    suite (a loaded 2-core machine may take seconds where an idle one takes milliseconds)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not true within {timeout_s} s"
        await asyncio.sleep(poll_s)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _post(session, url, body):
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def _stream(session, url, body):
    chunks = []
    async with session.post(url, json=body) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            line = line.decode().strip()
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def _text_of(prompt_text, max_tokens):
    ids = expected(TOK.encode(prompt_text), max_tokens)
    return TOK.decode([t for t in ids if t != EOS]), ids


def test_completion_stream_and_full_agree():
    async def main():
        server, runner, url = await _worker(EngineDouble())
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                body = {"model": "tiny", "prompt": "Hello", "max_tokens": 9, "return_token_ids": True}
                status, full = await _post(s, url + "/v1/completions", body)
                assert status == 200
                text, ids = _text_of("Hello", 9)
                choice = full["choices"][0]
                assert choice["text"] == text and choice["token_ids"] == ids
                assert choice["finish_reason"] == "length"
                assert full["usage"] == {"prompt_tokens": 6, "completion_tokens": 9, "total_tokens": 15}
                chunks = await _stream(s, url + "/v1/completions",
                                       {**body, "stream": True, "stream_options": {"include_usage": True}})
                assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == text
                assert sum((c["choices"][0]["token_ids"] for c in chunks[:-1]), []) == ids
                assert chunks[-2]["choices"][0]["finish_reason"] == "length"
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
                async with s.get(url + "/metrics") as resp:
                    metrics = await resp.text()
                assert 'endpoint="/v1/completions",status="200"} 2' in metrics
                assert 'trtllm_dwdp_generation_tokens_total{role="worker"} 18' in metrics
                assert "trtllm_dwdp_prefill_latency_seconds_count" in metrics
                async with s.get(url + "/v1/models") as resp:
                    assert (await resp.json())["data"][0]["id"] == "/models/tiny"
                async with s.get(url + "/health") as resp:
                    assert resp.status == 200
        finally:
            await runner.cleanup()
    run(main())


def test_chat_eos_and_stop_strings():
    async def main():
        server, runner, url = await _worker(EngineDouble())
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                # A prompt whose last byte is a multiple of 5 ("P" = 80) ends with EOS at 80 % 7 + 2 = 5.
                prompt = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "x"}]) + "P")
                status, full = await _post(s, url + "/v1/completions", {"prompt": prompt, "max_tokens": 20})
                assert full["choices"][0]["finish_reason"] == "stop"
                assert full["usage"]["completion_tokens"] == 6  # EOS counted, not shown
                assert full["choices"][0]["text"] == TOK.decode(expected(prompt, 20)[:-1])
                chunks = await _stream(s, url + "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
                assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
                assert chunks[0]["object"] == "chat.completion.chunk"
                full_text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                status, chat = await _post(s, url + "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
                assert chat["choices"][0]["message"]["content"] == full_text and len(full_text) == 5
                stop = full_text[2:4]
                status, cut = await _post(s, url + "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stop": stop})
                assert cut["choices"][0]["message"]["content"] == full_text[:full_text.index(stop)]
                assert cut["choices"][0]["finish_reason"] == "stop"
        finally:
            await runner.cleanup()
    run(main())


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "temperature": 3.0}, 400, "temperature"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
    ({"prompt": "x" * 300}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 255}, 400, "max_tokens"),
    ({"prompt": [1, 999]}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(body, status, param):
    async def main():
        server, runner, url = await _worker(EngineDouble())
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                got, err = await _post(s, url + "/v1/completions", body)
                assert got == status and err["error"]["param"] == param
                assert set(err["error"]) == {"message", "type", "param", "code"}
                async with s.post(url + "/v1/completions", data=b"{broken") as resp:
                    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
        finally:
            await runner.cleanup()
    run(main())


def test_client_disconnect_aborts_only_its_request():
    async def main():
        engine = EngineDouble(step_s=0.02)
        server, runner, url = await _worker(engine)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                other = asyncio.create_task(_post(s, url + "/v1/completions", {"prompt": "keep", "max_tokens": 40}))
                resp = await s.post(url + "/v1/completions", json={"prompt": "drop", "max_tokens": 200, "stream": True})
                await resp.content.readline()
                resp.close()  # the client goes away mid-stream
                async with aiohttp.ClientSession(timeout=TIMEOUT) as s2:  # a non-streaming client too
                    task = asyncio.create_task(s2.post(url + "/v1/completions", json={"prompt": "gone", "max_tokens": 200}))
                    # cancel once the engine holds it (keep, drop, gone), however slow the machine
                    await _until(lambda: len(engine.added) == 3)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                status, kept = await other
                assert status == 200 and kept["usage"]["completion_tokens"] == 40
                await _until(lambda: len(engine.aborted) == 2 and not engine.running)
                async with s.get(url + "/metrics") as r:
                    assert 'trtllm_dwdp_aborted_requests_total{role="worker"} 2' in await r.text()
        finally:
            await runner.cleanup()
    run(main())


def test_engine_failure_is_reported_not_hung():
    async def main():
        server, runner, url = await _worker(EngineDouble(fail_after=2))
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                status, err = await _post(s, url + "/v1/completions", {"prompt": "x", "max_tokens": 10})
                assert status == 500 and "device fell off the bus" in err["error"]["message"]
                async with s.get(url + "/health") as resp:
                    assert resp.status == 503
                status, err = await _post(s, url + "/v1/completions", {"prompt": "x"})
                assert status == 503
        finally:
            await runner.cleanup()
    run(main())


def test_disaggregated_router_matches_aggregated():
    async def main():
        agg_engine, ctx_engine, gen_engine = EngineDouble(), EngineDouble(), EngineDouble()
        _, agg_runner, agg_url = await _worker(agg_engine)
        ctx_server, ctx_runner, ctx_url = await _worker(ctx_engine)
        gen_server, gen_runner, gen_url = await _worker(gen_engine)
        router_port = free_port()
        cfg = parse_disagg_config({
            "hostname": "127.0.0.1", "port": router_port, "model": "/models/tiny",
            "context_servers": {"num_instances": 1, "urls": [ctx_url[7:]]},
            "generation_servers": {"num_instances": 1, "urls": [gen_url[7:]]}})
        router = DisaggRouter(cfg, request_timeout_s=20, server_start_timeout_s=10)
        router_runner = await _start(router.make_app(), router_port)
        rurl = f"http://127.0.0.1:{router_port}"
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                for prompt, n in (("Tell me", 12), ("P", 20), ("one", 1)):
                    body = {"prompt": prompt, "max_tokens": n}
                    _, agg = await _post(s, agg_url + "/v1/completions", body)
                    status, dis = await _post(s, rurl + "/v1/completions", body)
                    assert status == 200
                    assert dis["choices"][0]["text"] == agg["choices"][0]["text"]
                    assert dis["choices"][0]["finish_reason"] == agg["choices"][0]["finish_reason"]
                    assert dis["usage"] == agg["usage"]
                    assert "disaggregated_params" not in dis["choices"][0]
                    chunks = await _stream(s, rurl + "/v1/completions", {**body, "stream": True})
                    assert "".join(c["choices"][0]["text"] for c in chunks) == agg["choices"][0]["text"]
                status, chat = await _post(s, rurl + "/v1/chat/completions",
                                           {"messages": [{"role": "user", "content": "q"}], "max_tokens": 6})
                assert status == 200 and len(chat["choices"][0]["message"]["content"]) == 6
                assert len(gen_engine.imported) == 5  # 2 prompts x (full, stream) + chat; "one"/1 ends at ctx
                assert len(ctx_engine.aborted) == 2   # its unneeded exports were dropped
                assert len(gen_server.kv_store) == 0
                # Same node: every hand-over took the shared-memory path, none fell back.
                assert gen_server.metrics.kv_transfers["shm"][0] == 5
                assert not any(gen_server.metrics.kv_fallbacks.values())
                assert gen_server.kv_puller.opened == 1  # the context server's pool, mapped once
                assert ctx_server.kv_store.pool.counts["adopted"] == 5  # the double exports outside it
                assert ctx_server.kv_store.pool.stats()["kv_pool_used_bytes"] == 0
                status, err = await _post(s, rurl + "/v1/completions", {"prompt": "x", "temperature": 2.5})
                assert status == 400 and err["error"]["param"] == "temperature"
                # The KV id is one-time: a second pull is a 404.
                _, ctx_only = await _post(s, ctx_url + "/v1/completions", {
                    "prompt": "abc", "max_tokens": 5, "disaggregated_params": {"request_type": "context_only"}})
                kv_url = ctx_only["choices"][0]["disaggregated_params"]["kv_url"]
                async with s.get(kv_url) as r1, s.get(kv_url) as r2:
                    assert r1.status == 200 and r2.status == 404
                # Generation server cannot reach the KV: a clear 502, nothing stuck.
                status, err = await _post(s, gen_url + "/v1/completions", {
                    "prompt": "abc", "max_tokens": 5, "disaggregated_params": {
                        **ctx_only["choices"][0]["disaggregated_params"], "request_type": "generation_only"}})
                assert status == 502 and err["error"]["code"] == "kv_transfer_failed"
                async with s.post(gen_url + "/v1/completions", json={
                        "prompt": "abc", "max_tokens": 5, "stream": True, "disaggregated_params": {
                            **ctx_only["choices"][0]["disaggregated_params"], "request_type": "generation_only"}}) as r:
                    assert r.status == 502  # streaming too: the error comes before any event
                assert not gen_engine.running
        finally:
            for r in (router_runner, agg_runner, ctx_runner, gen_runner):
                await r.cleanup()
    run(main())


def test_router_retries_a_dead_context_server():
    async def main():
        _, ctx_a_runner, ctx_a = await _worker(EngineDouble())
        _, ctx_b_runner, ctx_b = await _worker(EngineDouble())
        _, gen_runner, gen = await _worker(EngineDouble())
        port = free_port()
        cfg = parse_disagg_config({
            "hostname": "127.0.0.1", "port": port, "model": "/models/tiny", "max_retries": 1,
            "context_servers": {"num_instances": 2, "urls": [ctx_a[7:], ctx_b[7:]]},
            "generation_servers": {"num_instances": 1, "urls": [gen[7:]]}})
        router_runner = await _start(DisaggRouter(cfg, request_timeout_s=20, server_start_timeout_s=10).make_app(), port)
        try:
            await ctx_a_runner.cleanup()  # one context server dies after the router started
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                for _ in range(3):  # round robin lands on the dead one at least once
                    status, body = await _post(s, f"http://127.0.0.1:{port}/v1/completions",
                                               {"prompt": "hj", "max_tokens": 4})
                    assert status == 200 and body["usage"]["completion_tokens"] == 4
                await ctx_b_runner.cleanup()  # now none is left: a clear 502
                status, err = await _post(s, f"http://127.0.0.1:{port}/v1/completions", {"prompt": "hi"})
                assert status == 502 and err["error"]["code"] == "context_server_unavailable"
        finally:
            for r in (router_runner, gen_runner):
                await r.cleanup()
    run(main())


def test_generation_only_first_token_must_be_in_vocab_and_match_the_kv():
    """The engine decodes from the KV blob's first token: one the client did not get, or one
    outside the vocabulary (which would crash the engine thread), is refused with a 400."""
    async def main():
        ctx_engine, gen_engine = EngineDouble(), EngineDouble()
        ctx_server, ctx_runner, ctx_url = await _worker(ctx_engine)
        _, gen_runner, gen_url = await _worker(gen_engine)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                async def ctx_params():
                    _, ans = await _post(s, ctx_url + "/v1/completions", {
                        "prompt": "abc", "max_tokens": 5,
                        "disaggregated_params": {"request_type": "context_only"}})
                    return ans["choices"][0]["disaggregated_params"]

                params = await ctx_params()
                first = params["first_gen_tokens"][0]
                for wrong, match in (([511 if first != 511 else 510], "holds first token"),
                                     ([512], "outside the vocabulary")):
                    status, err = await _post(s, gen_url + "/v1/completions", {
                        "prompt": "abc", "max_tokens": 5, "disaggregated_params": {
                            **params, "first_gen_tokens": wrong, "request_type": "generation_only"}})
                    assert status == 400 and match in err["error"]["message"], (status, err)
                    params = await ctx_params()
                status, ok = await _post(s, gen_url + "/v1/completions", {
                    "prompt": "abc", "max_tokens": 5, "disaggregated_params": {
                        **params, "request_type": "generation_only"}})
                assert status == 200 and ok["choices"][0]["finish_reason"] is not None
                assert not gen_engine.running
                async with s.get(gen_url + "/health") as r:
                    assert r.status == 200
        finally:
            for r in (ctx_runner, gen_runner):
                await r.cleanup()
    run(main())


def test_router_reruns_a_request_whose_kv_hand_over_died_and_probes_servers_back():
    """A context server that answers but whose hand-over cannot be fetched (it died right
    after): the generation server answers 502 kv_transfer_failed before any byte reached the
    client, so the router runs the request again on another context server, marks the first one
    down (its /health fails) and takes it back once /health answers."""
    async def main():
        health = {"status": 503}
        dead_port = free_port()

        async def ctx_answer(request):
            body = await request.json()
            return web.json_response({
                "id": "c", "object": "text_completion", "created": 0, "model": body.get("model"),
                "choices": [{"index": 0, "text": "a", "finish_reason": None, "disaggregated_params": {
                    "request_type": "context_only", "first_gen_tokens": [97],
                    "prompt_token_ids": TOK.encode(body["prompt"]),
                    "kv_url": f"http://127.0.0.1:{dead_port}/v1/kv/gone", "ctx_request_id": "c"}}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})

        async def ctx_health(request):
            return web.Response(status=health["status"])

        fake = web.Application()
        fake.router.add_post("/v1/completions", ctx_answer)
        fake.router.add_get("/health", ctx_health)
        fake_port = free_port()
        health["status"] = 200  # healthy while the router starts
        fake_runner = await _start(fake, fake_port)
        _, ctx_b_runner, ctx_b = await _worker(EngineDouble())
        _, gen_runner, gen = await _worker(EngineDouble())
        port = free_port()
        cfg = parse_disagg_config({
            "hostname": "127.0.0.1", "port": port, "model": "/models/tiny", "max_retries": 1,
            "context_servers": {"num_instances": 2, "urls": [f"127.0.0.1:{fake_port}", ctx_b[7:]]},
            "generation_servers": {"num_instances": 1, "urls": [gen[7:]]}})
        router = DisaggRouter(cfg, request_timeout_s=20, server_start_timeout_s=10, probe_s=0.05)
        router_runner = await _start(router.make_app(), port)
        try:
            health["status"] = 503  # "dead" from now on
            async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
                for _ in range(2):  # round robin: the first request lands on the fake one
                    chunks = await _stream(s, f"http://127.0.0.1:{port}/v1/completions",
                                           {"prompt": "hj", "max_tokens": 4, "stream": True})
                    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 4
                assert router.retries == 1
                fake_inst = cfg.context.instances[0]
                assert fake_inst in router.ctx.down
                assert router.ctx.pick() != fake_inst and router.ctx.pick() != fake_inst
                health["status"] = 200
                await _until(lambda: fake_inst not in router.ctx.down)  # probed back
                async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                    text = await r.text()
                assert 'trtllm_dwdp_retried_requests{role="router"} 1' in text
                assert 'trtllm_dwdp_context_servers_down{role="router"} 0' in text
        finally:
            for r in (router_runner, fake_runner, ctx_b_runner, gen_runner):
                await r.cleanup()
    run(main())
