"""Decode graphs on the CPU: buckets, padding to a bucket, graph breaks, the engine switch, and
a padded graph-shaped step (what a graph replays) equal to the eager step and free of host reads.

The capture itself is CUDA-only (tests/gpu/test_cuda_graphs_gpu.py); what is checked here is
everything a graph replays: a padded decode step run eagerly on the static inputs a graph
would hold gives the eager step's logits on every real row, touches no cache slot but the
scratch slot beyond the real rows' own positions, and reads nothing back to the host.
"""
import copy

import pytest
import torch

from tensorrt_llm_dwdp.engine.decode_graphs import (MIN_CONTEXT, _Captured, batch_buckets,
                                                    bucket_for, context_bucket, is_decode,
                                                    pad_decode)
from tensorrt_llm_dwdp.engine.executor import Engine
from tensorrt_llm_dwdp.engine.graph_pieces import GraphBreaks
from tensorrt_llm_dwdp.model.batch import BatchInfo
from tensorrt_llm_dwdp.model.builder import build_model
from tensorrt_llm_dwdp.model.config import ModelConfig
from tensorrt_llm_dwdp.model.moe_block import make_moe
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.moe import specs

from _model_oracle_utils import random_state_dict
from test_permute import _HostReads


def test_batch_buckets():
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(16, [8, 3, 8]) == (3, 8)
    for sizes, match in (([0], r"\[1, max_batch_size=16\]"), ([17], "17"), ([], "empty"),
                         ([True], "True")):
        with pytest.raises(ValueError, match=match):
            batch_buckets(16, sizes)
    with pytest.raises(ValueError, match="max_seqs"):
        batch_buckets(0)


def test_bucket_and_context_choice():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    assert context_bucket(1, 4096) == MIN_CONTEXT == 256
    assert [context_bucket(n, 4096) for n in (256, 257, 600, 4096)] == [256, 512, 1024, 4096]
    assert context_bucket(700, 700) == 700  # capped at the cache length
    with pytest.raises(ValueError, match="outside"):
        context_bucket(701, 700)


def test_pad_decode_uses_the_scratch_slot_only():
    batch = BatchInfo(slots=(3, 0), start_positions=(10, 300), lengths=(1, 1))
    assert is_decode(batch) and not is_decode(BatchInfo.prefill([4]))
    p = pad_decode([7, 9], batch, bucket=4, scratch_slot=5, max_len=1000)
    assert p.bucket == 4 and p.context == 512
    assert p.input_ids == (7, 9, 0, 0) and p.positions == (10, 300, 0, 0)
    assert p.slots == (3, 0, 5, 5) and p.lengths == (11, 301, 1, 1)
    assert p.cache_index == (3010, 300, 5000, 5000)
    with pytest.raises(ValueError, match="not a decode step"):
        pad_decode([1], BatchInfo.prefill([3]), 4, 5, 1000)
    with pytest.raises(ValueError, match="bucket 1"):
        pad_decode([7, 9], batch, 1, 5, 1000)
    with pytest.raises(ValueError, match="scratch slot"):
        pad_decode([7, 9], batch, 4, 3, 1000)


def test_graph_breaks_call_through_and_skip_in_warmup():
    breaks = GraphBreaks()
    calls = []

    def call(x, y):
        calls.append(1)
        return x + y

    x = torch.ones(3)
    assert torch.equal(breaks.eager(call, x, x), 2 * x) and calls == [1]
    breaks.mode = "warmup"
    assert torch.equal(breaks.eager(call, x, x), torch.zeros(3)) and calls == [1]


def _tiny_moe_model(num_layers=3):
    """tiny-deepseek-v3: one dense layer, then MoE layers of bf16 experts on torch-grouped
    (a backend whose bf16 layers read nothing back)."""
    hf = get_preset("tiny-deepseek-v3", num_layers=num_layers)
    config = ModelConfig.from_hf(hf)
    gen = torch.Generator().manual_seed(3)

    def factory(i):
        moe = make_moe(config, i, backend="torch-grouped")
        shapes = specs.expert_shapes(specs.BF16, config.num_experts, config.hidden_size,
                                     config.moe_intermediate_size)
        moe.set_local_weights({n: (torch.randn(s, generator=gen) * 0.1).to(dt)
                               for n, (s, dt) in shapes.items()})
        return moe

    model = build_model(config, factory).eval()
    state = {k: v for k, v in model.state_dict().items() if "experts." not in k or "gate" in k}
    model.load_state_dict(random_state_dict(state, seed=4), strict=False)
    return model


def _prefilled(model, prompts, slots, max_seqs, max_len):
    cache = model.make_cache(max_seqs + 1, max_len, "cpu")
    with torch.inference_mode():
        for prompt, slot in zip(prompts, slots):
            model(torch.tensor(prompt), BatchInfo((slot,), (0,), (len(prompt),)), cache)
    return cache


def test_padded_graph_step_equals_the_eager_step_and_reads_nothing_back():
    torch.manual_seed(0)
    model = _tiny_moe_model()
    max_seqs, max_len, scratch = 4, 300, 4
    prompts = [[5, 6, 7, 8, 9], list(range(1, 40))]
    slots = (2, 0)
    cache = _prefilled(model, prompts, slots, max_seqs, max_len)
    graph_cache = copy.deepcopy(cache)
    batch = BatchInfo(slots, tuple(len(p) for p in prompts), (1, 1))
    tokens = [11, 12]
    with torch.inference_mode():
        eager = model(torch.tensor(tokens), batch, cache)
        padded = pad_decode(tokens, batch, bucket=4, scratch_slot=scratch, max_len=max_len)
        assert padded.context == 256
        entry = _Captured(padded.bucket, padded.context, torch.device("cpu"))
        entry.load(padded)
        t = entry.tensors
        with _HostReads() as mode:
            graphed = model.run_step(t["input_ids"], t["positions"], entry.meta, graph_cache)
    assert mode.reads == [], mode.reads
    assert graphed.shape[0] == 4
    rel = ((graphed[:2] - eager).abs().max() / eager.abs().max()).item()
    assert rel < 1e-2, rel
    assert torch.equal(graphed[:2].argmax(-1), eager.argmax(-1))
    for layer in range(cache.num_layers):
        for a, b in ((cache.k[layer], graph_cache.k[layer]), (cache.v[layer], graph_cache.v[layer])):
            assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])  # slots nobody owns
            assert torch.equal(a[:scratch, :, ...].ne(0).sum((2, 3)).ne(0),
                               b[:scratch].ne(0).sum((2, 3)).ne(0))  # same positions written
            assert b[scratch, 1:].eq(0).all() and b[scratch, 0].ne(0).any()  # padding: row 0


def test_engine_switch_is_off_on_the_cpu_and_eager_decode_unchanged(caplog):
    model = _tiny_moe_model()
    prompts = [[5, 6, 7, 8], [9, 10]]
    with caplog.at_level("INFO"):
        engine = Engine(model, max_seqs=2, max_seq_len=32, cuda_graphs=True)
    assert engine.graphs is None and engine.cache.max_seqs == 2
    assert "CUDA graphs off: the engine runs on cpu" in caplog.text
    eager = Engine(model, max_seqs=2, max_seq_len=32)
    assert engine.generate(prompts) == eager.generate(prompts)
