"""Sampler: greedy rows untouched, seeded draws independent of the batch, the filters' support,
and the sampled distribution against softmax(logits / T)."""
import math

import pytest
import torch

from tensorrt_llm_dwdp.engine.sampling import Sampler, resolve_seed, step_seed
from tensorrt_llm_dwdp.engine.scheduler import SamplingParams

V = 50
# The device-dependent tests run on CUDA too (CUDA generators are Philox, not mt19937).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _logits(n, seed=0, vocab=V, device="cpu"):
    return (torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(device)


def _p(**kw):
    return SamplingParams(**{"max_tokens": 4, **kw})


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_argmax_and_logits_stay_bitwise(device):
    logits = _logits(6, device=device).to(torch.bfloat16)
    before = logits.clone()
    params = [_p(), _p(temperature=0.7, seed=1), _p(), _p(temperature=1.3, top_k=5, seed=2),
              _p(temperature=0.0, top_k=3, seed=9), _p(temperature=0.5, top_p=0.5, seed=3)]
    tokens = Sampler(device).sample(logits, params, [0, 3, 1, 0, 2, 7])
    assert torch.equal(logits.view(torch.int16), before.view(torch.int16))
    argmax = logits.argmax(-1).tolist()
    for i in (0, 2, 4):
        assert tokens[i] == argmax[i]
    # An all-greedy step is exactly the old path.
    assert Sampler(device).sample(logits, [_p()] * 6, [0] * 6) == argmax


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_draw_is_independent_of_the_batch(device):
    """Row r's token depends only on (its logits, its params, its output index)."""
    sampler = Sampler(device)
    row = _logits(1, seed=5, device=device)
    kinds = [_p(temperature=0.8, seed=7), _p(temperature=1.1, top_k=8, seed=7),
             _p(temperature=0.9, top_p=0.6, seed=11), _p(temperature=1.0, min_p=0.05, seed=13),
             _p(temperature=0.6, top_k=20, top_p=0.9, min_p=0.01, seed=-3)]
    others = _logits(5, seed=6, device=device)
    other_params = [_p(), _p(temperature=2.0, seed=99), _p(temperature=0.3, top_k=2, seed=5),
                    _p(temperature=1.0, top_p=0.3, seed=4), _p()]
    for params in kinds:
        for t in range(6):
            alone = sampler.sample(row, [params], [t])[0]
            for pos in range(6):  # insert the row at every position of a mixed batch
                batch = torch.cat([others[:pos], row, others[pos:]])
                ps = other_params[:pos] + [params] + other_params[pos:]
                ts = [3] * pos + [t] + [5] * (5 - pos)
                assert sampler.sample(batch, ps, ts)[pos] == alone, (params, t, pos)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_and_position_change_the_draw(device):
    sampler = Sampler(device)
    logits = torch.zeros(1, 1000, device=device)  # uniform: every draw is pure noise
    draws = lambda seed: [sampler.sample(logits, [_p(temperature=1.0, seed=seed)], [t])[0] for t in range(16)]
    a, b = draws(7), draws(8)
    assert a == draws(7)
    assert a != b
    assert len(set(a)) > 8  # positions draw afresh, not one token repeated
    assert step_seed(7, 0) != step_seed(7, 1) != step_seed(8, 0)
    assert step_seed(-1, 0) == step_seed((1 << 64) - 1, 0)


def test_resolve_seed_keeps_a_given_seed_and_draws_a_fresh_one():
    assert resolve_seed(_p(temperature=1.0, seed=3)).seed == 3
    assert resolve_seed(_p()).seed is None  # greedy needs none
    seeds = {resolve_seed(_p(temperature=1.0)).seed for _ in range(8)}
    assert None not in seeds and len(seeds) == 8


def _support(logits_row, params, n=400):
    sampler = Sampler(logits_row.device)
    seen = set()
    for s in range(n):
        seen.add(sampler.sample(logits_row, [SamplingParams(**{**params, "seed": s})], [0])[0])
    return seen


@pytest.mark.parametrize("k", [1, 2, 7, V - 1, V, V + 5])
def test_top_k_support(k):
    row = _logits(1, seed=1) / 6  # flat enough that every kept token shows up
    expect = set(row[0].argsort(descending=True)[:k].tolist())
    got = _support(row, {"temperature": 1.0, "top_k": k}, n=1500 if k >= V - 1 else 400)
    assert got <= expect
    if k <= 7:
        assert got == expect


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95])
def test_top_p_support_is_the_shortest_prefix_reaching_p(top_p):
    row = torch.tensor([[4.0, 3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0]])
    probs = row[0].softmax(-1)
    cum, keep = 0.0, 0
    while cum < top_p:
        cum += float(probs[keep])
        keep += 1
    got = _support(row, {"temperature": 1.0, "top_p": top_p}, n=600)
    assert got == set(range(keep))


@pytest.mark.parametrize("device", DEVICES)
def test_min_p_support_and_combined_filters(device):
    row = torch.tensor([[2.0, 1.9, 1.0, 0.0, -0.5, -3.0]], device=device)
    probs = row[0].cpu().softmax(-1)
    for min_p in (0.1, 0.3, 0.9):
        expect = {i for i in range(6) if probs[i] >= min_p * probs[0]}
        assert _support(row, {"temperature": 1.0, "min_p": min_p}) == expect
    # top_k=4 first, then top_p on the renormalised four: 0.6 of the four keeps the first two.
    four = row[0, :4].cpu().softmax(-1)
    assert float(four[0]) < 0.6 <= float(four[0] + four[1])
    assert _support(row, {"temperature": 1.0, "top_k": 4, "top_p": 0.6}) == {0, 1}


def test_distribution_matches_softmax_over_temperature():
    row = torch.tensor([[1.0, 0.5, 0.0, -0.5, -2.0]])
    for temperature in (0.5, 1.0, 2.0):
        n = 4000
        sampler = Sampler("cpu")
        counts = torch.zeros(5)
        for s in range(n):
            counts[sampler.sample(row, [_p(temperature=temperature, seed=s)], [s % 3])[0]] += 1
        expect = (row[0] / temperature).softmax(-1)
        # Within 4.5 standard deviations per token (a false alarm is ~1e-5 per test).
        sd = (expect * (1 - expect) / n).sqrt()
        assert ((counts / n - expect).abs() <= 4.5 * sd + 1e-9).all(), (temperature, counts / n, expect)


def test_rejects_bad_params_and_unseeded_rows():
    for bad in ({"temperature": -0.1}, {"temperature": math.nan}, {"top_p": 0.0}, {"top_p": 1.5},
                {"top_k": -1}, {"min_p": 1.5}, {"min_p": -0.1}):
        with pytest.raises(ValueError):
            _p(**bad)
    with pytest.raises(ValueError, match="seed"):
        Sampler("cpu").sample(_logits(1), [_p(temperature=1.0)], [0])
    with pytest.raises(ValueError, match="rows"):
        Sampler("cpu").sample(_logits(2), [_p()], [0])


@pytest.mark.parametrize("device", DEVICES)
def test_counter_uniform_is_splitmix64_bit_for_bit(device):
    from tensorrt_llm_dwdp.engine.sampling import _MASK64, _signed, _splitmix64, counter_uniform

    seeds = [0, 1, 7, (1 << 63) + 5, (1 << 64) - 1, 0x0123456789ABCDEF]
    keys = torch.tensor([_signed(s) for s in seeds], dtype=torch.int64, device=device)
    u = counter_uniform(keys, 37).cpu()
    for i, seed in enumerate(seeds):
        for v in range(37):
            # _splitmix64(x) mixes x + gamma: the state after v + 1 steps is seed + (v + 1) gamma.
            bits = _splitmix64((seed + v * 0x9E3779B97F4A7C15) & _MASK64) >> 41
            assert float(u[i, v]) == (bits + 0.5) * 2.0 ** -23, (seed, v)
    assert (u > 0).all() and (u < 1).all()
