"""KvCache slot addressing, export/import for KV hand-off, and bound checks."""
import pytest
import torch

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


def test_write_prefix_and_batch_views_address_the_same_positions():
    c = KvCache(1, 4, 6, (1, 2), (2, 1), torch.float32, "cpu")
    # tokens of slot 3 at positions 0..2 and of slot 1 at positions 4..5, packed
    index = torch.tensor([3 * 6 + 0, 3 * 6 + 1, 3 * 6 + 2, 1 * 6 + 4, 1 * 6 + 5])
    k = torch.arange(10, dtype=torch.float32).view(5, 1, 2)
    v = -torch.arange(10, dtype=torch.float32).view(5, 2, 1)
    c.write(0, index, k, v)
    kp, vp = c.prefix(0, 3, 3)
    assert torch.equal(kp, k[:3]) and torch.equal(vp, v[:3])
    assert torch.equal(c.k[0][1, 4:6], k[3:]) and c.k[0][0].abs().sum() == 0
    kb, vb = c.batch(0, torch.tensor([3, 1]), None, 6)  # gathered: slot 3 then slot 1
    assert kb.shape == (2, 6, 1, 2) and torch.equal(kb[0, :3], k[:3]) and torch.equal(vb[1, 4:], v[3:])
    kr, _ = c.batch(0, torch.tensor([1, 2, 3]), slice(1, 4), 6)  # consecutive slots: a view
    assert kr.data_ptr() == c.k[0][1].data_ptr() and torch.equal(kr[2, :3], k[:3])
    with pytest.raises(ValueError, match="max_len 6"):
        c.prefix(0, 3, 7)
    assert c.bytes_per_token == (2 + 2) * 4
