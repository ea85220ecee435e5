"""Engine logic on a small real model that follows the CausalLM contract (cache-backed)."""
import pytest
import torch

from tensorrt_llm_dwdp.engine.executor import Engine, Request, StepFailed
from tensorrt_llm_dwdp.model.kv_cache import KvCache
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

VOCAB = 23


class PrefixSumLM(torch.nn.Module):
    """Next-token logits from the sum of all embeddings so far (cached per position).

    The cache makes decode depend on prefill's stored state, so a wrong slot, position or
    hand-off shows up as different tokens.
    """

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(VOCAB, 8, generator=g, dtype=torch.float64)
        self.out = torch.randn(8, VOCAB, generator=g, dtype=torch.float64)

    def make_cache(self, max_seqs, max_len, device):
        return KvCache(1, max_seqs, max_len, (1, 8), (1, 1), torch.float64, device)

    def forward(self, input_ids, batch, cache):
        e = self.emb[input_ids]
        rows = []
        for i, (slot, start, n) in enumerate(zip(batch.slots, batch.start_positions, batch.lengths)):
            lo = batch.offsets[i]
            k, _ = cache.append(0, slot, start, e[lo:lo + n, None, :], torch.zeros(n, 1, 1, dtype=e.dtype))
            rows.append(k[:, 0, :].sum(0))
        return torch.stack(rows) @ self.out

    def reference(self, prompt, steps):
        ids = list(prompt)
        out = []
        for _ in range(steps):
            nxt = int((self.emb[ids].sum(0) @ self.out).argmax())
            out.append(nxt)
            ids.append(nxt)
        return out


PROMPTS = [[1, 2, 3], [4] * 9, [5, 6], [7, 8, 9, 10, 11, 12, 13]]


def test_batched_generation_matches_uncached_recompute():
    model = PrefixSumLM()
    engine = Engine(model, max_seqs=4, max_seq_len=32, max_batch_tokens=12)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6))
    assert outs == [model.reference(p, 6) for p in PROMPTS]
    assert engine.stats.prefill_tokens == sum(map(len, PROMPTS))
    assert engine.stats.prefill_steps == 2  # 12-token budget splits the four prompts
    assert engine.stats.decode_tokens == 4 * 5


def test_slots_are_reused_when_more_requests_than_slots():
    model = PrefixSumLM()
    engine = Engine(model, max_seqs=2, max_seq_len=32, max_batch_tokens=64)
    assert engine.generate(PROMPTS, SamplingParams(max_tokens=3)) == [model.reference(p, 3) for p in PROMPTS]


def test_stop_token_and_eos_end_a_request():
    model = PrefixSumLM()
    ref = model.reference(PROMPTS[0], 6)
    engine = Engine(model, max_seqs=2, max_seq_len=32, eos_token_id=ref[2])
    assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6)) == [ref[:3]]
    assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True)) == [ref]
    engine = Engine(model, max_seqs=2, max_seq_len=32)
    events = []
    engine.add_request(Request("r", PROMPTS[0], SamplingParams(max_tokens=6, stop_token_ids=(ref[1],))))
    while engine.has_work():
        events += engine.step()
    assert [e.token_id for e in events] == ref[:2] and events[-1].finish_reason == "stop"


def test_context_only_handoff_continues_bitwise_on_another_engine():
    model = PrefixSumLM()
    ctx = Engine(model, max_seqs=2, max_seq_len=32)
    ctx.add_request(Request("a", PROMPTS[3], SamplingParams(max_tokens=5), context_only=True))
    (ev,) = ctx.step()
    assert ev.finished and ev.finish_reason == "context_done" and not ctx.has_work()
    blob = ctx.export_kv("a").to_bytes()
    with pytest.raises(KeyError, match="already taken"):
        ctx.export_kv("a")
    from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff

    gen = Engine(model, max_seqs=3, max_seq_len=32)
    gen.add_request(Request("a", PROMPTS[3], SamplingParams(max_tokens=5), kv_import=KvHandoff.from_bytes(blob)))
    tokens = []
    while gen.has_work():
        tokens += [e.token_id for e in gen.step()]
    assert [ev.token_id] + tokens == model.reference(PROMPTS[3], 5)


def test_abort_and_bad_requests():
    model = PrefixSumLM()
    engine = Engine(model, max_seqs=2, max_seq_len=16)
    engine.add_request(Request("x", [1, 2], SamplingParams(max_tokens=4)))
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(Request("x", [1], SamplingParams()))
    assert engine.abort("x") and not engine.has_work()
    with pytest.raises(ValueError, match="max_seq_len=16"):
        engine.add_request(Request("y", [1] * 15, SamplingParams(max_tokens=4)))


def test_record_logits_keeps_one_row_per_step():
    model = PrefixSumLM()
    engine = Engine(model, max_seqs=2, max_seq_len=32, record_logits=True)
    engine.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=3)))
    while engine.has_work():
        engine.step()
    assert len(engine.logits["a"]) == 3 and engine.logits["a"][0].shape == (VOCAB,)


class FailingMoELM(PrefixSumLM):
    """Calls the DWDP per-layer protocol for two MoE layers; can raise between them."""

    def __init__(self, dwdp):
        super().__init__()
        self.dwdp = dwdp
        self.fail = False

    def forward(self, input_ids, batch, cache):
        for layer in (0, 1):
            self.dwdp.weights(layer)
            if self.fail and layer == 1:
                raise RuntimeError("injected MoE failure")
            self.dwdp.done(layer)
        return super().forward(input_ids, batch, cache)


def test_failed_step_drops_its_requests_and_leaves_engine_usable():
    from tensorrt_llm_dwdp.comm.local import LocalComm
    from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
    from tensorrt_llm_dwdp.dwdp.manager import DwdpManager

    config = DwdpConfig(dwdp_size=1, num_experts_per_worker=2, num_prefetch_experts=0)
    with DwdpManager(config, 2, LocalComm()) as mgr:
        for layer in (0, 1):
            mgr.register_layer(layer, {"w2_weight": mgr.allocate((2, 4), torch.uint8)})
        mgr.exchange()
        model = FailingMoELM(mgr)
        engine = Engine(model, dwdp=mgr, max_seqs=2, max_seq_len=32)
        engine.add_request(Request("bad", PROMPTS[0], SamplingParams(max_tokens=3)))
        model.fail = True
        with pytest.raises(StepFailed, match="injected") as info:
            engine.step()
        assert info.value.request_ids == ("bad",) and not info.value.out_of_memory
        assert "['bad']" in "".join(getattr(info.value.__cause__, "__notes__", []))
        assert not engine.has_work()  # the failed prefill is not left running without KV
        model.fail = False
        assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=3)) == [
            model.reference(PROMPTS[1], 3)]


def test_bad_kv_import_leaves_no_running_sequence_nor_taken_slot():
    from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff

    model = PrefixSumLM()
    ctx = Engine(model, max_seqs=1, max_seq_len=32)
    ctx.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=4), context_only=True))
    ctx.step()
    good = ctx.export_kv("a")
    short = {k: v[:-1] for k, v in good.tensors.items()}  # one position short of the prompt
    bad = KvHandoff(good.prompt_ids, good.first_token, {"layers.0.k": short["layers.0.k"]})
    gen = Engine(model, max_seqs=1, max_seq_len=32)
    with pytest.raises(KeyError, match="missing"):
        gen.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=4), kv_import=bad))
    assert not gen.has_work(), "a rejected import stayed running (its next decode would crash)"
    # the single slot is free again: a good import of the same id is admitted and decodes
    gen.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=4), kv_import=good))
    tokens = [good.first_token]
    while gen.has_work():
        tokens += [e.token_id for e in gen.step()]
    assert tokens == model.reference(PROMPTS[0], 4)


def test_imports_beyond_free_slots_wait_for_one_then_decode_exactly():
    """A generation engine at capacity queues an imported context (it used to raise 'no free
    KV slot', losing a one-time hand-over); an aborted queued import is dropped."""
    model = PrefixSumLM()
    ctx = Engine(model, max_seqs=3, max_seq_len=32)
    prompts = {"a": PROMPTS[0], "b": PROMPTS[2], "c": PROMPTS[3]}
    for rid, prompt in prompts.items():
        ctx.add_request(Request(rid, prompt, SamplingParams(max_tokens=4), context_only=True))
    ctx.step()
    handoffs = {rid: ctx.export_kv(rid) for rid in prompts}
    gen = Engine(model, max_seqs=1, max_seq_len=32)
    for rid, prompt in prompts.items():
        gen.add_request(Request(rid, prompt, SamplingParams(max_tokens=4), kv_import=handoffs[rid]))
    assert gen.abort("c")  # still queued: removed without ever taking a slot
    tokens = {rid: [handoffs[rid].first_token] for rid in ("a", "b")}
    while gen.has_work():
        for ev in gen.step():
            tokens[ev.request_id].append(ev.token_id)
    assert tokens == {rid: model.reference(prompts[rid], 4) for rid in ("a", "b")}
    assert gen.stats.decode_steps == 6  # one slot: a's 3 decode steps, then b's 3


def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens():
    """max_batch_tokens 4: the 9- and 7-token prompts take several steps each (a chunk writes
    its part of the cache and emits nothing); every request gets what one-shot prefill gives."""
    model = PrefixSumLM()
    engine = Engine(model, max_seqs=4, max_seq_len=32, max_batch_tokens=4, record_logits=True)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=5))
    assert outs == [model.reference(p, 5) for p in PROMPTS]
    assert engine.stats.prefill_tokens == sum(map(len, PROMPTS))
    assert engine.stats.prefill_steps == 6  # tokens per step: 3+1 | 4 | 4 | 2+2 | 4 | 1
    assert all(len(v) == 5 for v in engine.logits.values())  # a logits row per token, not per chunk


def test_context_only_request_chunked_exports_the_whole_prompt():
    model = PrefixSumLM()
    ctx = Engine(model, max_seqs=1, max_seq_len=32, max_batch_tokens=3)
    ctx.add_request(Request("a", PROMPTS[3], SamplingParams(max_tokens=4), context_only=True))
    events = []
    while ctx.has_work():
        events += ctx.step()
    assert [e.finish_reason for e in events] == ["context_done"]
    from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff

    gen = Engine(model, max_seqs=1, max_seq_len=32)
    gen.add_request(Request("a", PROMPTS[3], SamplingParams(max_tokens=4),
                            kv_import=KvHandoff.from_bytes(ctx.export_kv("a").to_bytes())))
    tokens = [events[0].token_id]
    while gen.has_work():
        tokens += [e.token_id for e in gen.step()]
    assert tokens == model.reference(PROMPTS[3], 4)


class OomOnce(PrefixSumLM):
    """Raises CUDA's out-of-memory error (as a too-large allocation would) on the next forward
    after ``fail_next`` is set."""

    def __init__(self):
        super().__init__()
        self.fail_next = False

    def forward(self, input_ids, batch, cache):
        if self.fail_next:
            self.fail_next = False
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
        return super().forward(input_ids, batch, cache)


def test_out_of_memory_fails_only_that_steps_requests():
    model = OomOnce()
    engine = Engine(model, max_seqs=4, max_seq_len=32, max_batch_tokens=64)
    engine.add_request(Request("early", PROMPTS[0], SamplingParams(max_tokens=4)))
    engine.step()  # early's prefill
    engine.add_request(Request("a", PROMPTS[1], SamplingParams(max_tokens=3)))
    engine.add_request(Request("b", PROMPTS[2], SamplingParams(max_tokens=3)))
    model.fail_next = True
    with pytest.raises(StepFailed, match="out of memory") as info:
        engine.step()  # the prefill of a and b
    assert info.value.request_ids == ("a", "b") and info.value.out_of_memory
    events = []
    while engine.has_work():
        events += engine.step()
    # early, which was not in the failed step, finishes exactly; its slot neighbours are free
    assert [e.token_id for e in events if e.request_id == "early"] == model.reference(PROMPTS[0], 4)[1:]
    assert engine.scheduler.has_free_slot() and len(engine.scheduler._free_slots) == 4
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=3)) == [model.reference(PROMPTS[1], 3)]


def test_a_failure_that_breaks_the_dwdp_manager_is_raised_as_it_is():
    class BrokenManager:
        def start_step(self):
            pass

        def abort_step(self):
            raise RuntimeError("peer 1 is gone")

    model = OomOnce()
    engine = Engine(model, dwdp=BrokenManager(), max_seqs=2, max_seq_len=32)
    engine.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=3)))
    model.fail_next = True
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.step()
    assert not engine.has_work()


def test_kv_budget_is_known_at_start_and_refusals_take_no_slot():
    from tensorrt_llm_dwdp.engine.scheduler import ContextLengthExceeded

    engine = Engine(PrefixSumLM(), max_seqs=3, max_seq_len=16)
    b = engine.kv_budget
    assert (b.slots, b.max_seq_len, b.bytes_per_token) == (3, 16, (8 + 1) * 8)
    assert b.nbytes == engine.cache.nbytes and "prompt + max_tokens <= 16" in b.describe()
    with pytest.raises(ContextLengthExceeded, match="max_seq_len=16"):
        engine.add_request(Request("long", [1] * 10, SamplingParams(max_tokens=7)))
    assert not engine.has_work() and len(engine.scheduler._free_slots) == 3


class _FlaggingBackend:
    """A MoE backend whose device flag says a layer saw an out-of-range expert id."""

    def __init__(self):
        self.checks = 0
        self.bad = False

    def check_routing(self):
        self.checks += 1
        if self.bad:
            self.bad = False
            raise ValueError("expert id 300 out of range [0, 256) (or -1 for an empty slot)")


class _MoeModule:
    def __init__(self, backend):
        self.backend = backend


class RoutedPrefixSumLM(PrefixSumLM):
    def __init__(self):
        super().__init__()
        self.backend = _FlaggingBackend()

    def moe_modules(self):
        return {0: _MoeModule(self.backend)}


def test_bad_expert_ids_fail_the_step_at_its_end():
    """The MoE layers flag bad ids on the device; the engine reads the flag once per step, after
    sampling (where it syncs anyway), and ends that step's requests with the error."""
    model = RoutedPrefixSumLM()
    engine = Engine(model, max_seqs=2, max_seq_len=32)
    engine.add_request(Request("a", PROMPTS[0], SamplingParams(max_tokens=4)))
    engine.step()
    assert model.backend.checks == 1
    model.backend.bad = True
    with pytest.raises(StepFailed, match="expert id 300 out of range") as info:
        engine.step()
    assert info.value.request_ids == ("a",) and not engine.has_work()
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=2)) == [model.reference(PROMPTS[1], 2)]
