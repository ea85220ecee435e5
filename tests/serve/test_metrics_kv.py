"""Prometheus rendering and the one-time KV store."""
import pytest
import torch

from tensorrt_llm_dwdp.engine.kv_handoff import KvHandoff
from tensorrt_llm_dwdp.serve.kv_transfer import KvStore
from tensorrt_llm_dwdp.serve.metrics import Histogram, ServerMetrics


def test_histogram_is_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.render("x", "help")
    assert 'x_bucket{le="0.1"} 2' in lines and 'x_bucket{le="1.0"} 3' in lines
    assert 'x_bucket{le="+Inf"} 4' in lines and "x_count 4" in lines and "x_sum 3.65" in lines
    with pytest.raises(ValueError):
        Histogram(())


def test_server_metrics_text():
    m = ServerMetrics("context", ("pool_full", "other_node"))
    m.record_request("/v1/completions", 200)
    m.record_request("/v1/completions", 200)
    m.record_request("/v1/completions", 400)
    m.prompt_tokens, m.generation_tokens = 11, 7
    m.prefill_latency.observe(0.02)
    m.record_kv_transfer("cuda_ipc", 1000, 0.5, phases={"copy_s": 0.25, "share_s": 0.125})
    m.record_kv_transfer("cuda_ipc", 24, 0.25, phases={"copy_s": 0.5})
    m.record_kv_transfer("http", 10, 1.0, fallback="pool_full")
    text = m.render({"kv_store_bytes": 5.0}, {"prefetch_bytes": 4096, "stall_seconds": 0.25, "note": "x",
                                               "flag": True})
    assert 'trtllm_dwdp_requests_total{role="context",endpoint="/v1/completions",status="200"} 2' in text
    assert 'status="400"} 1' in text
    assert 'trtllm_dwdp_prompt_tokens_total{role="context"} 11' in text
    assert 'trtllm_dwdp_generation_tokens_total{role="context"} 7' in text
    assert 'trtllm_dwdp_prefill_latency_seconds_count{role="context"} 1' in text
    assert 'trtllm_dwdp_dwdp_prefetch_bytes{role="context"} 4096' in text
    assert 'trtllm_dwdp_dwdp_stall_seconds{role="context"} 0.25' in text
    assert 'trtllm_dwdp_kv_transfers_total{role="context",path="cuda_ipc"} 2' in text
    assert 'trtllm_dwdp_kv_transfer_bytes_total{role="context",path="cuda_ipc"} 1024' in text
    assert 'trtllm_dwdp_kv_transfer_seconds_total{role="context",path="http"} 1.0' in text
    assert 'trtllm_dwdp_kv_transfer_fallbacks_total{role="context",reason="pool_full"} 1' in text
    assert 'trtllm_dwdp_kv_transfer_fallbacks_total{role="context",reason="other_node"} 0' in text
    assert 'trtllm_dwdp_kv_transfer_phase_seconds_total{role="context",phase="copy_s"} 0.75' in text
    assert "note" not in text and "flag" not in text
    assert text.endswith("\n")


def _kv(n):
    return KvHandoff((1, 2), 3, {"k": torch.arange(n, dtype=torch.uint8)})


def test_kv_store_one_time_expiry_and_budget():
    now = [0.0]
    store = KvStore(ttl_s=10, max_bytes=10, clock=lambda: now[0])
    a = store.put(_kv(5))
    assert store.take(a).tensors["k"].tolist() == [0, 1, 2, 3, 4] and store.take(a) is None
    b = store.put(_kv(6))
    with pytest.raises(MemoryError, match="max_bytes=10"):
        store.put(_kv(5))
    now[0] = 9.0
    assert store.get(b) is not None  # a peer about to copy it: its time-to-live starts again
    now[0] = 11.0
    assert store.get(b) is not None
    now[0] = 21.5
    c = store.put(_kv(4))            # b expired, room again
    assert store.take(b) is None and store.expired == 1
    assert store.discard(c) and not store.discard(c) and store.nbytes == 0 and len(store) == 0
    with pytest.raises(ValueError):
        KvStore(ttl_s=0)
