"""build_worker's error path: the start-up error reaches the caller and the manager is closed."""
from types import SimpleNamespace

import pytest

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig
from tensorrt_llm_dwdp.serve import worker as worker_mod
from tensorrt_llm_dwdp.serve.options import ServeOptions


class FakeManager:
    def __init__(self, close_error=None):
        self.reasons = []
        self.close_error = close_error

    def exchange(self):
        raise RuntimeError("rank 1 mapped nothing")

    def close(self, reason=""):
        self.reasons.append(reason)
        if self.close_error is not None:
            raise self.close_error


@pytest.mark.parametrize("close_error", [None, TimeoutError("peer 1 never reached DWDP close")])
def test_failed_exchange_closes_manager_with_reason_and_keeps_the_error(monkeypatch, close_error):
    mgr = FakeManager(close_error)
    monkeypatch.setattr("tensorrt_llm_dwdp.model.ModelConfig.from_file",
                        lambda path: SimpleNamespace(max_position_embeddings=1 << 20))
    monkeypatch.setattr("tensorrt_llm_dwdp.model.load_tokenizer", lambda path: object())
    monkeypatch.setattr(worker_mod, "_make_manager", lambda *a: mgr)
    monkeypatch.setattr(worker_mod, "_load_model", lambda *a: object())
    options = ServeOptions(model="unused", device="cpu",
                           dwdp_config=DwdpConfig(dwdp_size=2, num_experts_per_worker=2,
                                                  num_prefetch_experts=2))
    with pytest.raises(RuntimeError, match="rank 1 mapped nothing"):
        worker_mod.build_worker(options)
    assert mgr.reasons == ["RuntimeError: rank 1 mapped nothing"]


def test_max_seq_len_past_the_models_positions_fails_at_start(monkeypatch):
    from tensorrt_llm_dwdp.serve.options import OptionsError

    monkeypatch.setattr("tensorrt_llm_dwdp.model.ModelConfig.from_file",
                        lambda path: SimpleNamespace(max_position_embeddings=512))
    with pytest.raises(OptionsError, match="max_seq_len=4096 exceeds the model's max_position_embeddings=512"):
        worker_mod.build_worker(ServeOptions(model="unused", device="cpu", max_seq_len=4096))


class _TinyKvModel:
    """Just enough of a CausalLM for the engine to size its KV cache: 2 layers x (8 + 4) bf16."""

    def make_cache(self, max_seqs, max_len, device):
        import torch

        from tensorrt_llm_dwdp.model.kv_cache import KvCache

        return KvCache(2, max_seqs, max_len, (1, 8), (1, 4), torch.bfloat16, device)


def _build_with_pool(monkeypatch, pool_bytes):
    monkeypatch.setattr("tensorrt_llm_dwdp.model.ModelConfig.from_file",
                        lambda path: SimpleNamespace(max_position_embeddings=1 << 20))
    monkeypatch.setattr("tensorrt_llm_dwdp.model.load_tokenizer", lambda path: SimpleNamespace(eos_token_id=None))
    monkeypatch.setattr("tensorrt_llm_dwdp.model.memory.dense_model_bytes", lambda *a: 0)
    monkeypatch.setattr(worker_mod, "_load_model", lambda *a: _TinyKvModel())
    return worker_mod.build_worker(ServeOptions(model="unused", device="cpu", max_batch_size=8, max_seq_len=64,
                                                kv_transfer_pool_bytes=pool_bytes))


def test_kv_export_pool_sized_from_the_budget_or_the_option(monkeypatch):
    import os

    from tensorrt_llm_dwdp.serve.kv_pool import SHM_DIR, SHM_PREFIX
    from tensorrt_llm_dwdp.serve.options import OptionsError

    def files():
        return [n for n in os.listdir(SHM_DIR) if n.startswith(f"{SHM_PREFIX}{os.getpid()}_")]

    one = 64 * 48  # one 64-token sequence at 48 bytes/token
    w = _build_with_pool(monkeypatch, None)  # default: a quarter of the cache, made at first use
    assert w.kv_pool.capacity == 8 * one // 4 and not w.kv_pool.ready and not files()
    assert w.engine.kv_export_alloc == w.kv_pool.export_alloc
    w.close()
    w = _build_with_pool(monkeypatch, 2 * one)  # explicit: made at start-up
    assert w.kv_pool.ready and w.kv_pool.capacity == 2 * one and len(files()) == 1
    w.close()
    assert not files()
    w = _build_with_pool(monkeypatch, 0)
    assert w.kv_pool is None and w.engine.kv_export_alloc is None
    with pytest.raises(OptionsError, match=f"kv_transfer_pool_bytes=100 cannot hold .* at least {one}"):
        _build_with_pool(monkeypatch, 100)
    assert not files()


def test_port_in_use_fails_before_the_model_loads(monkeypatch):
    """A worker whose port another process holds (a launcher's P+1.. may sit on an outgoing
    connection's port) fails at once naming the port, before build_worker: it used to log
    'listening', load, fail to bind inside aiohttp, and then report only its DWDP close."""
    import socket

    from tensorrt_llm_dwdp.serve.launch import bind_listener

    def never(*a, **k):
        raise AssertionError("build_worker ran although the port was taken")

    monkeypatch.setattr(worker_mod, "build_worker", never)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_listener("127.0.0.1", port)
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*pick another --port"):
            worker_mod.run_worker_server(ServeOptions(model="m", host="127.0.0.1", port=port))


def test_serving_error_is_raised_over_a_failing_close(monkeypatch, caplog):
    """An error while serving is what the caller sees; a close that fails after it (DWDP peers
    that time out) is logged, and the socket is released."""
    import socket

    from tensorrt_llm_dwdp.launcher import free_port

    closed = []

    class Worker:
        model_config = SimpleNamespace(vocab_size=8)
        engine = SimpleNamespace(device=SimpleNamespace(type="cpu"))
        tokenizer = kv_pool = None
        expert_memory_bytes = 0

        def close(self):
            closed.append(True)
            raise TimeoutError("no message from rank(s) [1] within 60 s")

    def serve(app, host, port, *, sock=None):
        raise RuntimeError("the event loop failed")

    monkeypatch.setattr(worker_mod, "build_worker", lambda *a, **k: Worker())
    monkeypatch.setattr("tensorrt_llm_dwdp.serve.launch.serve_app", serve)
    monkeypatch.setattr("tensorrt_llm_dwdp.serve.openai_server.OpenAIServer",
                        lambda *a, **k: SimpleNamespace(make_app=lambda: None))
    port = free_port()
    with pytest.raises(RuntimeError, match="the event loop failed"):
        worker_mod.run_worker_server(ServeOptions(model="m", host="127.0.0.1", port=port))
    assert closed and "closing the worker after a serving error" in caplog.text
    with socket.socket() as again:  # released
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
