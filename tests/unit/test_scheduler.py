import pytest

from tensorrt_llm_dwdp.engine.scheduler import (
    ContextLengthExceeded, SamplingParams, Scheduler, Sequence, SequenceStatus,
)


def seq(rid, n, max_tokens=4, context_only=False):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), context_only)


def test_prefill_packs_up_to_token_budget_in_fifo_order():
    s = Scheduler(max_seqs=8, max_batch_tokens=10, max_seq_len=64)
    for rid, n in (("a", 4), ("b", 5), ("c", 3)):
        s.add(seq(rid, n))
    step = s.schedule()
    assert step.is_prefill and [q.request_id for q in step.sequences] == ["a", "b"]
    assert step.num_tokens == 9
    assert len({q.slot for q in step.sequences}) == 2


def _run(s, step):
    """Apply a prefill step's bookkeeping (what the engine does after the forward)."""
    for q, n in zip(step.sequences, step.num_new):
        q.num_cached += n
    return [(q.request_id, n, e) for q, n, e in zip(step.sequences, step.num_new, step.emits)]


def test_long_prompt_is_chunked_over_steps_and_not_starving_the_next():
    s = Scheduler(max_seqs=4, max_batch_tokens=4, max_seq_len=64)
    s.add(seq("big", 9))
    s.add(seq("small", 2))
    assert _run(s, s.schedule()) == [("big", 4, False)]
    assert _run(s, s.schedule()) == [("big", 4, False)]
    # the last chunk emits the first token; what the budget leaves takes the next prompt whole
    assert _run(s, s.schedule()) == [("big", 1, True), ("small", 2, True)]
    step = s.schedule()
    assert not step.is_prefill and [q.request_id for q in step.sequences] == ["big", "small"]


def test_a_prompt_that_fits_one_step_waits_rather_than_splits():
    s = Scheduler(max_seqs=4, max_batch_tokens=10, max_seq_len=64)
    for rid, n in (("a", 7), ("b", 5), ("c", 25)):
        s.add(seq(rid, n))
    assert _run(s, s.schedule()) == [("a", 7, True)]  # b (5 <= 10) waits for a step of its own
    # b whole, then the 25-token prompt takes the rest of the budget as its first chunk
    assert _run(s, s.schedule()) == [("b", 5, True), ("c", 5, False)]
    assert _run(s, s.schedule()) == [("c", 10, False)]
    assert _run(s, s.schedule()) == [("c", 10, True)]
    assert s.schedule().is_prefill is False


def test_chunks_need_a_slot_and_hold_it_between_steps():
    s = Scheduler(max_seqs=1, max_batch_tokens=3, max_seq_len=64)
    s.add(seq("a", 5))
    s.add(seq("b", 2))
    first = s.schedule()
    assert _run(s, first) == [("a", 3, False)] and not s.has_free_slot()
    assert _run(s, s.schedule()) == [("a", 2, True)]  # b: no slot while a runs
    assert not s.schedule().is_prefill


def test_decode_only_after_prefill_and_slots_recycled():
    s = Scheduler(max_seqs=1, max_batch_tokens=100, max_seq_len=64)
    a, b = seq("a", 3), seq("b", 3)
    s.add(a)
    s.add(b)
    step = s.schedule()
    assert step.sequences == (a,) and a.slot == 0
    a.num_cached = 3
    step = s.schedule()  # b waits: no free slot, so a decodes
    assert not step.is_prefill and step.sequences == (a,)
    s.finish(a, "length")
    assert a.status is SequenceStatus.FINISHED and a.slot == -1
    step = s.schedule()
    assert step.is_prefill and step.sequences == (b,) and b.slot == 0


def test_abort_waiting_and_running():
    s = Scheduler(max_seqs=2, max_batch_tokens=100, max_seq_len=64)
    s.add(seq("a", 3))
    s.add(seq("b", 3))
    s.schedule()
    s.add(seq("c", 3))
    assert s.abort("c").finish_reason == "abort"
    assert s.abort("a").finish_reason == "abort"
    assert s.abort("zzz") is None
    assert [q.request_id for q in s.running] == ["b"]
    assert s.has_free_slot()


def test_rejects_bad_requests_with_names():
    s = Scheduler(max_seqs=2, max_batch_tokens=100, max_seq_len=8)
    with pytest.raises(ValueError, match="'x'.*empty prompt"):
        s.add(Sequence("x", [], SamplingParams()))
    with pytest.raises(ContextLengthExceeded, match="max_seq_len=8"):
        s.add(seq("y", 6, max_tokens=4))
    assert not s.waiting, "a refused request must not queue"
    s.add(seq("ctx", 7, max_tokens=100, context_only=True))  # context-only needs one token only
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="max_seqs"):
        Scheduler(0, 1, 1)
