"""Sampling through the engine: a seed gives the same tokens alone, in any batch, and split
across a context and a generation engine; greedy requests beside sampled ones are unchanged."""
from tensorrt_llm_dwdp.engine.executor import Engine, Request
from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams
from test_executor import PROMPTS, PrefixSumLM

HOT = SamplingParams(max_tokens=8, temperature=1.5, seed=5, ignore_eos=True)


def _run(engine, requests):
    for r in requests:
        engine.add_request(r)
    out = {r.request_id: [] for r in requests}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return out


def test_seed_reproduces_alone_and_in_any_batch():
    model = PrefixSumLM()
    alone = _run(Engine(model, max_seqs=4, max_seq_len=32), [Request("s", PROMPTS[1], HOT)])["s"]
    assert alone != model.reference(PROMPTS[1], 8)  # the temperature really sampled
    others = [Request("g0", PROMPTS[0], SamplingParams(max_tokens=3)),
              Request("x", PROMPTS[2], SamplingParams(max_tokens=6, temperature=0.7, seed=1)),
              Request("g1", PROMPTS[3], SamplingParams(max_tokens=8))]
    for pos in range(4):  # joins prefill with different neighbours, decodes beside others
        reqs = others[:pos] + [Request("s", PROMPTS[1], HOT)] + others[pos:]
        out = _run(Engine(model, max_seqs=4, max_seq_len=32, max_batch_tokens=16), reqs)
        assert out["s"] == alone, pos
        assert out["g0"] == model.reference(PROMPTS[0], 3)  # greedy neighbours unchanged
        assert out["g1"] == model.reference(PROMPTS[3], 8)
    other_seed = SamplingParams(max_tokens=8, temperature=1.5, seed=8, ignore_eos=True)
    assert _run(Engine(model, max_seqs=1, max_seq_len=32), [Request("s", PROMPTS[1], other_seed)])["s"] != alone


def test_disaggregated_sampling_equals_aggregated():
    model = PrefixSumLM()
    params = SamplingParams(max_tokens=6, temperature=1.2, top_k=10, top_p=0.9, seed=123)
    agg = _run(Engine(model, max_seqs=2, max_seq_len=32), [Request("a", PROMPTS[3], params)])["a"]
    ctx = Engine(model, max_seqs=2, max_seq_len=32)
    first = _run(ctx, [Request("a", PROMPTS[3], params, context_only=True)])["a"]
    blob = ctx.export_kv("a").to_bytes()
    gen = Engine(model, max_seqs=2, max_seq_len=32)
    rest = _run(gen, [Request("a", PROMPTS[3], params, kv_import=KvHandoff.from_bytes(blob))])["a"]
    assert first + rest == agg
