"""The disaggregated YAML: roles, urls, inheritance, and the DWDP group of the context servers."""
import pytest

from tensorrt_llm_dwdp.serve.disagg_config import parse_disagg_config
from tensorrt_llm_dwdp.serve.options import OptionsError

DWDP = {"dwdp_size": 2, "num_experts_per_worker": 8, "num_prefetch_experts": 8}


def _cfg(**over):
    base = {
        "hostname": "localhost", "port": 8000, "model": "/ckpt", "backend": "pytorch",
        "context_servers": {"num_instances": 2, "urls": ["localhost:8001", "localhost:8002"],
                            "max_batch_size": 4, "dwdp_config": DWDP,
                            "cache_transceiver_config": {"backend": "UCX"}},
        "generation_servers": {"num_instances": 1, "urls": ["localhost:8003"], "router": {"type": "load_balancing"}},
    }
    base.update(over)
    return base


def test_roles_order_and_options():
    cfg = parse_disagg_config(_cfg(max_seq_len=512))
    assert [(i.role, i.index, i.port) for i in cfg.instances] == [
        ("context", 0, 8001), ("context", 1, 8002), ("generation", 0, 8003)]
    ctx = cfg.serve_options(cfg.instances[1])
    assert (ctx.model, ctx.host, ctx.port, ctx.max_batch_size, ctx.max_seq_len) == ("/ckpt", "localhost", 8002, 4, 512)
    assert ctx.dwdp_config.dwdp_size == 2
    gen = cfg.serve_options(cfg.instances[2])
    assert gen.dwdp_config is None and gen.max_seq_len == 512
    assert cfg.generation.router_type == "load_balancing" and cfg.context.router_type == "round_robin"


@pytest.mark.parametrize("over,match", [
    ({"context_servers": {"num_instances": 3, "urls": ["a:1", "a:2"]}}, "num_instances=3 but 2 urls"),
    ({"context_servers": {"num_instances": 1, "urls": ["a"]}}, r"expected 'host:port'"),
    ({"context_servers": {"num_instances": 1, "urls": ["a:99999"]}}, r"\[1, 65535\]"),
    ({"context_servers": {"num_instances": 1}}, "urls must list"),
    ({"generation_servers": {"num_instances": 1, "urls": ["localhost:8001"]}}, "listed twice"),
    ({"port": 8001}, "router's localhost:8001 is also"),
    ({"context_servers": {"num_instances": 1, "urls": ["a:1"], "max_batch_size": 2}, "max_batch_size": 4},
     "different values"),
    ({"context_servers": {"num_instances": 1, "urls": ["a:1"], "dwdp_config": DWDP}},
     r"dwdp_size \* num_groups = 2"),
    ({"generation_servers": {"num_instances": 1, "urls": ["a:9"], "dwdp_config": DWDP}}, "generation_servers has dwdp_config"),
    ({"generation_servers": {"num_instances": 1, "urls": ["a:9"], "router": {"type": "kv_cache_aware"}}}, "router.type"),
    ({"generation_servers": {"num_instances": 1, "urls": ["a:9"], "max_batch_sise": 1}}, "unknown key"),
    ({"disagg_cluster": {"cluster_uri": "etcd://x"}}, "not supported"),
    ({"max_retries": -1}, "max_retries"),
])
def test_bad_configs_are_clear(over, match):
    with pytest.raises(OptionsError, match=match):
        parse_disagg_config(_cfg(**over))


def test_model_is_required():
    data = _cfg()
    del data["model"]
    with pytest.raises(OptionsError, match="no 'model'"):
        parse_disagg_config(data)
