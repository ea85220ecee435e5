"""KvCache slot addressing, export/import for KV hand-off, and bound checks."""
import pytest
import torch

from tensorrt_llm_dwdp.model.attention import causal_attention
from tensorrt_llm_dwdp.model.kv_cache import KvCache


def test_append_export_import_round_trip():
    c = KvCache(2, 3, 8, (2, 4), (1, 3), torch.bfloat16, "cpu")
    k = torch.arange(5 * 8, dtype=torch.float32).view(5, 2, 4).bfloat16()
    v = -torch.arange(5 * 3, dtype=torch.float32).view(5, 1, 3).bfloat16()
    k_all, v_all = c.append(1, 2, 0, k[:3], v[:3])
    k_all, v_all = c.append(1, 2, 3, k[3:], v[3:])
    assert torch.equal(k_all, k) and torch.equal(v_all, v)
    assert c.k[1][:2].abs().sum() == 0 and c.k[0].abs().sum() == 0  # other slots/layers untouched
    d = KvCache(2, 3, 8, (2, 4), (1, 3), torch.bfloat16, "cpu")
    d.import_slot(0, {n: t.clone() for n, t in c.export_slot(2, 5).items()})
    assert torch.equal(d.k[1][0, :5], k) and torch.equal(d.v[1][0, :5], v)


def test_bounds_are_checked():
    c = KvCache(1, 2, 4, (1, 2), (1, 2), torch.float32, "cpu")
    with pytest.raises(IndexError, match="slot 2"):
        c.append(0, 2, 0, torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))
    with pytest.raises(ValueError, match="max_len 4"):
        c.append(0, 0, 3, torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))
    with pytest.raises(KeyError, match="layers.0.v"):
        c.import_slot(0, {"layers.0.k": torch.zeros(1, 1, 2)})


def test_causal_attention_matches_masked_softmax_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, generator=g)
    k = torch.randn(5, 2, 8, generator=g)
    v = torch.randn(5, 2, 6, generator=g)
    out = causal_attention(q, k, v, start=2, scale=0.3)
    for i in range(3):
        for h in range(4):
            s = (k[: 3 + i, h // 2] @ q[i, h]) * 0.3
            ref = torch.softmax(s, 0) @ v[: 3 + i, h // 2]
            torch.testing.assert_close(out[i, h], ref)
