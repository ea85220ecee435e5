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
