"""A context server of a DWDP group killed while clients stream (CPU, real processes).

Three context servers form one DWDP group with a host backup (TCP launch: each is its own
process, so the others live on), one generation server, the router. A first round of streaming
requests gives each prompt's tokens; in the second round, once the victim has requests in
flight, it is SIGKILLed. Every request of the second round must complete with the first round's
tokens (the router runs the victim's in-flight requests again on another context server; the
survivors fail over to the host store and keep serving bitwise), the router must stop sending
to the victim, and nothing of the victim may stay in /dev/shm.
"""
import asyncio
import glob
import json
import re
import time

import aiohttp
import pytest

from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint
from tensorrt_llm_dwdp.serve.cluster import LocalCluster

pytestmark = [pytest.mark.multirank, pytest.mark.slow]
TIMEOUT = aiohttp.ClientTimeout(total=240)
# Long prompts keep a context server busy long enough to be killed with requests in flight.
PROMPTS = [("The quick brown fox jumps over the lazy dog. " * (40 + 25 * i))[: 600 + 400 * i]
           for i in range(6)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers_serve")
    model = str(root / "tiny")
    write_synthetic_checkpoint(model, get_preset("tiny-deepseek-v3", num_layers=2), quant="nvfp4")
    ctx = {"device": "cpu", "max_seq_len": 4096, "max_num_tokens": 4096,
           "dwdp_config": {"dwdp_size": 3, "num_experts_per_worker": 6, "num_prefetch_experts": 5,
                           "host_backup": True, "peer_timeout_s": 30}}
    gen = {"device": "cpu", "max_seq_len": 4096}
    c = LocalCluster(model, str(root / "deploy"), num_ctx=3, num_gen=1, ctx_options=ctx,
                     gen_options=gen, launcher="tcp", router_options={"max_retries": 2})
    try:
        c.start(timeout_s=300)
        yield c
    finally:
        c.stop()


async def _stream(s, url, prompt):
    body = {"prompt": prompt, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    tokens = []
    async with s.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for line in r.content:
            line = line.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                data = json.loads(line[6:])
                assert "error" not in data, data
                tokens += data["choices"][0].get("token_ids", []) if data["choices"] else []
    return tokens


async def _metric(s, url, name):
    async with s.get(url + "/metrics") as r:
        text = await r.text()
    m = re.search(rf"^trtllm_dwdp_{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_context_server_killed_while_clients_stream(cluster):
    victim = cluster.procs_by_name("context-1")
    victim_url = cluster.context_urls[1]

    async def main():
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            want = await asyncio.gather(*[_stream(s, cluster.router_url, p) for p in PROMPTS])
            assert all(len(t) == 6 for t in want)
            tasks = [asyncio.create_task(_stream(s, cluster.router_url, p))
                     for p in PROMPTS * 4]
            deadline = time.monotonic() + 120
            while (await _metric(s, victim_url, "active_requests") or 0) < 1:
                assert time.monotonic() < deadline, "the victim never had a request in flight"
                await asyncio.sleep(0.005)
            cluster.kill("context-1")
            got = await asyncio.gather(*tasks)
            assert got == want * 4  # every request completed, with the undisturbed tokens
            assert await _metric(s, cluster.router_url, "context_servers_down") == 1
            assert await _metric(s, cluster.router_url, "retried_requests") >= 1
            # the survivors keep serving, their experts of rank 1 from the host store
            again = await asyncio.gather(*[_stream(s, cluster.router_url, p) for p in PROMPTS])
            assert again == want
            for url in (cluster.context_urls[0], cluster.context_urls[2]):
                assert await _metric(s, url, "dwdp_failovers") == 1
                assert await _metric(s, url, "dwdp_peers_down") == 1

    asyncio.run(main())
    cluster.stop()
    assert not glob.glob(f"/dev/shm/trtllm_dwdp_{victim.pid}_*")  # the survivors removed them
    for p in cluster.procs:
        if p.name in ("context-0", "context-2"):
            assert p.popen.returncode == 0, cluster.log_tail(p.name)
