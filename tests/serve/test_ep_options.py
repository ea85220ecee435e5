"""ep_config: the expert-parallel serving mode chosen by the options YAML, beside dwdp_config."""
import pytest

from tensorrt_llm_dwdp.parallel.config import EpConfig, exchange_capacity_bytes
from tensorrt_llm_dwdp.serve.disagg_config import parse_disagg_config
from tensorrt_llm_dwdp.serve.options import OptionsError, ServeOptions, merge_options

BASE = ServeOptions(model="/ckpt")


def test_ep_config_parsed_and_off_at_size_one():
    opts = merge_options(BASE, {"ep_config": {"ep_size": 4, "transport": "shm", "buffer_mb": 64}})
    assert opts.ep_config == EpConfig(ep_size=4, transport="shm", buffer_mb=64)
    assert merge_options(BASE, {"ep_config": {"ep_size": 1}}).ep_config is None
    assert merge_options(BASE, {"ep_config": None}).ep_config is None


@pytest.mark.parametrize("section,match", [
    ({"ep_size": 0}, "ep_size must be an integer >= 1"),
    ({"ep_size": 2, "transport": "mpi"}, "transport='mpi'"),
    ({"ep_size": 2, "buffer_mb": -1}, "buffer_mb"),
    ({"ep_size": 2, "typo": 1}, r"unknown key\(s\) \['typo'\]"),
    ([2], "must be a mapping"),
])
def test_bad_ep_config_names_the_key(section, match):
    with pytest.raises(OptionsError, match=match):
        merge_options(BASE, {"ep_config": section})


def test_dwdp_and_ep_are_alternatives():
    with pytest.raises(OptionsError, match="alternatives"):
        merge_options(BASE, {"ep_config": {"ep_size": 2},
                             "dwdp_config": {"dwdp_size": 2, "num_experts_per_worker": 8,
                                             "num_prefetch_experts": 8}})


def _disagg(ctx_extra, gen_extra=None):
    return {"hostname": "localhost", "port": 8000, "model": "/ckpt",
            "context_servers": {"num_instances": 2, "urls": ["localhost:8001", "localhost:8002"],
                                **ctx_extra},
            "generation_servers": {"num_instances": 1, "urls": ["localhost:8003"], **(gen_extra or {})}}


def test_disaggregated_context_group_in_ep_mode():
    cfg = parse_disagg_config(_disagg({"ep_config": {"ep_size": 2}}))
    assert cfg.serve_options(cfg.instances[0]).ep_config.ep_size == 2
    assert cfg.serve_options(cfg.instances[2]).ep_config is None
    with pytest.raises(OptionsError, match="ep_config.ep_size=4; each context server is one EP rank"):
        parse_disagg_config(_disagg({"ep_config": {"ep_size": 4}}))
    with pytest.raises(OptionsError, match="generation_servers has ep_config"):
        parse_disagg_config(_disagg({}, {"ep_config": {"ep_size": 2}}))


def test_exchange_capacity_covers_dispatch_and_combine():
    # 2 ranks, 8192 tokens, DeepSeek-V3 rows: every token to every rank, bf16 + 8 ids + 8 weights
    assert exchange_capacity_bytes(2, 8192, 7168, 8) == 2 * 8192 * (2 * 7168 + 64) + 768
