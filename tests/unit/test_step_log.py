"""What the engine records per step (kind, tokens, wall / device time, kernels compiled inside
the step) and what the server shows of it; one MoE backend per model and the kernel warm-up
before serving (a JIT backend compiling inside a served step stalls every request behind it)."""
import asyncio

import aiohttp
import pytest
from aiohttp import web

from tensorrt_llm_dwdp.engine import executor
from tensorrt_llm_dwdp.engine.executor import Engine, EngineStats
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams
from tensorrt_llm_dwdp.launcher import free_port
from tensorrt_llm_dwdp.model.tokenizer import ByteTokenizer
from tensorrt_llm_dwdp.moe.backends import compile_stats, distinct_backends, warm_up_backends
from tensorrt_llm_dwdp.moe.backends.cutedsl import TOKEN_TILES, choose_token_tile, tokens_for_tile
from tensorrt_llm_dwdp.serve.openai_server import OpenAIServer, ServerConfig

from test_executor import PROMPTS, VOCAB, PrefixSumLM


class CompilingBackend:
    """Counts as a JIT backend: ``compile`` adds a kernel and its seconds."""

    def __init__(self):
        self.compiles, self.seconds = 0, 0.0
        self.warmed = []

    def compile_stats(self):
        return self.compiles, self.seconds

    def warm_up(self, weights, top_k):
        self.warmed.append((weights.hidden_size, weights.intermediate_size, top_k))
        return 2


class Layer:
    """Stands for a ConfigurableMoE: its backend, local weights and top-k."""

    def __init__(self, backend, weights=None, top_k=2):
        self.backend, self.local_weights, self.top_k = backend, weights, top_k


class Weights:
    def __init__(self, hidden, inter):
        self.hidden_size, self.intermediate_size = hidden, inter


class LoggedLM(PrefixSumLM):
    """PrefixSumLM with two MoE layers sharing one backend that compiles a kernel the first
    time a step has fewer than 10 tokens (a step picking a token tile not seen before)."""

    def __init__(self):
        super().__init__()
        self.backend = CompilingBackend()
        self.layers = {1: Layer(self.backend), 2: Layer(self.backend)}

    def moe_modules(self):
        return self.layers

    def forward(self, input_ids, batch, cache):
        if len(input_ids) < 10 and not self.backend.compiles:
            self.backend.compiles, self.backend.seconds = 1, 1.5
        return super().forward(input_ids, batch, cache)


def test_every_step_is_logged_with_its_tokens_time_and_compiles():
    model = LoggedLM()
    engine = Engine(model, max_seqs=4, max_seq_len=32, max_batch_tokens=12)
    engine.generate(PROMPTS, SamplingParams(max_tokens=3))
    recs = list(engine.stats.steps)
    # the 12-token budget: 3 + 9, then 2 + 7 (prompt lengths 3, 9, 2, 7); then two decodes of 4
    assert [(r.kind, r.tokens, r.sequences) for r in recs] == [
        ("prefill", 12, 2), ("prefill", 9, 2), ("decode", 4, 4), ("decode", 4, 4)]
    assert [r.index for r in recs] == [0, 1, 2, 3] and engine.stats.step_count == 4
    assert [r.compiles for r in recs] == [0, 1, 0, 0] and recs[1].compile_s == 1.5
    assert engine.stats.kernel_compiles == 1   # two layers, one shared backend: counted once
    assert all(r.wall_s > 0 and r.device_s is None for r in recs)
    assert all(a.start <= b.start for a, b in zip(recs, recs[1:]))
    assert engine.stats.prefill_seconds == pytest.approx(recs[0].wall_s + recs[1].wall_s)
    assert [r.index for r in engine.stats.steps_after(1)] == [2, 3]
    assert recs[1].to_dict()["compiles"] == 1


def test_the_log_keeps_the_newest_steps_and_the_counters_all(monkeypatch):
    monkeypatch.setattr(executor, "STEP_LOG_LEN", 3)
    stats = EngineStats()
    for i in range(5):
        stats.record("prefill", float(i), 0.5, 0.25, 100, 1)
    stats.record("idle", 5.0, 0.1, None, 0, 0)
    assert [r.index for r in stats.steps] == [3, 4, 5]
    assert stats.prefill_steps == 5 and stats.prefill_tokens == 500 and stats.prefill_seconds == 2.5
    assert stats.prefill_device_seconds == 1.25 and stats.idle_steps == 1 and stats.step_count == 6
    with pytest.raises(ValueError, match="step kind"):
        stats.record("warmup", 0.0, 0.0, None, 0, 0)


def test_warm_up_once_per_backend_and_expert_shape():
    shared, other = CompilingBackend(), CompilingBackend()
    w = Weights(64, 32)
    layers = [Layer(shared, w), Layer(shared, w), Layer(shared, Weights(64, 48)), Layer(other, w),
              Layer(object(), w),          # a backend that compiles nothing: no warm_up
              Layer(other, None)]          # no weights: nothing to run
    assert warm_up_backends(layers) == 3 * 2
    assert shared.warmed == [(64, 32, 2), (64, 48, 2)] and other.warmed == [(64, 32, 2)]
    assert distinct_backends(layers) == [shared, other, layers[4].backend]
    shared.compiles, shared.seconds, other.compiles = 3, 4.5, 1
    assert compile_stats(distinct_backends(layers)) == (4, 4.5)


@pytest.mark.parametrize("experts", [4, 8, 16, 128, 256])
@pytest.mark.parametrize("top_k", [1, 2, 4, 8])
def test_a_token_count_picks_each_tile(experts, top_k):
    if top_k > experts:
        pytest.skip("top-k above the expert count")
    for bn in TOKEN_TILES:
        assert choose_token_tile(tokens_for_tile(bn, experts, top_k) * top_k, experts) == bn
    with pytest.raises(ValueError, match="token tile"):
        tokens_for_tile(48, experts, top_k)


def test_load_model_gives_every_moe_layer_one_backend(tmp_path):
    from tensorrt_llm_dwdp.model.checkpoint import load_model
    from tensorrt_llm_dwdp.model.presets import get_preset
    from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

    write_synthetic_checkpoint(str(tmp_path), get_preset("tiny-deepseek-v3", num_layers=3), quant="bf16")
    moes = list(load_model(str(tmp_path)).moe_modules().values())
    assert len(moes) >= 2 and len({id(m.backend) for m in moes}) == 1


def test_server_shows_the_step_log_and_its_counters():
    async def main():
        port = free_port()
        engine = Engine(LoggedLM(), max_seqs=4, max_seq_len=32, max_batch_tokens=12)
        server = OpenAIServer(engine, ByteTokenizer(512), ServerConfig(
            model_name="m", max_seq_len=32, vocab_size=VOCAB, public_url=f"http://127.0.0.1:{port}"))
        runner = web.AppRunner(server.make_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                for prompt in ([1, 2, 3], [4, 5, 6, 7, 8]):
                    async with s.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}) as r:
                        assert r.status == 200, await r.text()
                async with s.get(url + "/engine/steps") as r:
                    log = await r.json()
                async with s.get(url + "/engine/steps?after=1") as r:
                    tail = await r.json()
                async with s.get(url + "/engine/steps?after=x") as r:
                    assert r.status == 400
                async with s.get(url + "/metrics") as r:
                    metrics = await r.text()
        finally:
            await runner.cleanup()
        # each request alone: a prefill (its prompt) then a decode
        assert [(x["kind"], x["tokens"]) for x in log["steps"]] == [
            ("prefill", 3), ("decode", 1), ("prefill", 5), ("decode", 1)]
        assert log["step_count"] == 4 and [x["index"] for x in tail["steps"]] == [2, 3]
        assert log["steps"][0]["compiles"] == 1
        assert 'trtllm_dwdp_engine_kernel_compiles{role="worker"} 1.0' in metrics
        assert "trtllm_dwdp_engine_prefill_device_seconds" in metrics

    asyncio.run(asyncio.wait_for(main(), 60))
