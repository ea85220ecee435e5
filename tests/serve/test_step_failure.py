"""A real engine (tiny DeepSeek-V3 decoder, CPU) behind the HTTP server: a step that runs out of
memory fails its own request only (500, ``out_of_memory``) while ``/health`` stays 200 and the
next request is served exactly; a request the KV cache can never hold is refused with 400
``context_length_exceeded`` before it takes a slot."""
import asyncio

import aiohttp
import pytest
import torch
from aiohttp import web

from tensorrt_llm_dwdp.engine.executor import Engine
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams
from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.deepseek_v3 import DeepseekV3ForCausalLM
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig

TOK = ByteTokenizer(512)
MAX_SEQ_LEN = 64


class OutOfMemoryOnce(torch.nn.Module):
    """The model, except that the forward after ``arm()`` raises CUDA's out-of-memory error
    (what a too-large allocation in attention or the MoE raises on a GPU)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.armed = False

    def arm(self):
        self.armed = True

    def make_cache(self, *args):
        return self.model.make_cache(*args)

    def forward(self, input_ids, batch, cache):
        if self.armed:
            self.armed = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
        return self.model(input_ids, batch, cache)


def _tiny_model():
    hf = get_preset("tiny-deepseek-v3", num_layers=2, overrides={"first_k_dense_replace": 2})
    model = DeepseekV3ForCausalLM(ModelConfig.from_hf(hf), moe_factory=None).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
    return model


async def _serve(engine):
    port = free_port()
    server = OpenAIServer(engine, TOK, ServerConfig(model_name="tiny", max_seq_len=MAX_SEQ_LEN, vocab_size=512,
                                                    public_url=f"http://127.0.0.1:{port}"))
    runner = web.AppRunner(server.make_app(), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def _post(s, url, body):
    async with s.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json()


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def test_out_of_memory_fails_one_request_and_the_server_goes_on(model):
    flaky = OutOfMemoryOnce(model)
    engine = Engine(flaky, max_seqs=2, max_seq_len=MAX_SEQ_LEN, max_batch_tokens=16)
    prompt = TOK.encode("a prompt longer than one step of sixteen tokens")
    assert len(prompt) > 16  # so the failing step is a chunk of a prompt being prefilled
    body = {"prompt": prompt, "max_tokens": 6, "return_token_ids": True}
    want = Engine(model, max_seqs=1, max_seq_len=MAX_SEQ_LEN).generate(
        [prompt], SamplingParams(max_tokens=6))[0]

    async def main():
        runner, url = await _serve(engine)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                flaky.arm()
                status, err = await _post(s, url, body)
                assert status == 500, err
                assert err["error"]["code"] == "out_of_memory" and "out of memory" in err["error"]["message"]
                async with s.get(url + "/health") as resp:
                    assert resp.status == 200
                status, ok = await _post(s, url, body)
                assert status == 200 and ok["choices"][0]["token_ids"] == want
                flaky.arm()
                async with s.post(url + "/v1/completions", json={**body, "stream": True}) as resp:
                    assert resp.status == 500  # failed before its first token: a plain error body
                    assert (await resp.json())["error"]["code"] == "out_of_memory"
                status, ok = await _post(s, url, body)
                assert status == 200 and ok["choices"][0]["token_ids"] == want
        finally:
            await runner.cleanup()
    asyncio.run(asyncio.wait_for(main(), 120))
    assert not engine.has_work() and len(engine.scheduler._free_slots) == 2


def test_a_request_the_cache_cannot_hold_is_refused_before_it_takes_a_slot(model):
    engine = Engine(model, max_seqs=1, max_seq_len=MAX_SEQ_LEN)

    async def main():
        runner, url = await _serve(engine)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                status, err = await _post(s, url, {"prompt": [5] * 60, "max_tokens": 5})
                assert status == 400
                assert err["error"]["code"] == "context_length_exceeded"
                assert err["error"]["type"] == "invalid_request_error" and "64" in err["error"]["message"]
                status, _ = await _post(s, url, {"prompt": [5] * 60, "max_tokens": 4})
                assert status == 200
        finally:
            await runner.cleanup()
    asyncio.run(asyncio.wait_for(main(), 120))
    assert len(engine.scheduler._free_slots) == 1
