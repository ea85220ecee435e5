"""Flags + LLM-API YAML: used keys, known-but-ignored keys, unknown keys, dwdp_config."""
import argparse
import logging

import pytest

from tensorrt_llm_dwdp.cli.commands import serve as serve_cmd
from tensorrt_llm_dwdp.serve.options import OptionsError, ServeOptions, merge_options, options_from_cli


def _args(tmp_path, *extra, yaml_text=None):
    p = argparse.ArgumentParser()
    serve_cmd.add_arguments(p)
    argv = ["/ckpt", *extra]
    if yaml_text is not None:
        f = tmp_path / "extra.yaml"
        f.write_text(yaml_text)
        argv += ["--extra_llm_api_options", str(f)]
    return p.parse_args(argv)


def test_flags_then_yaml_wins(tmp_path):
    o = options_from_cli(_args(tmp_path, "--max_batch_size", "4", "--port", "9001", "--tp_size", "1",
                               yaml_text="max_batch_size: 8\nmax_seq_len: 512\n"))
    assert (o.max_batch_size, o.max_seq_len, o.port, o.model) == (8, 512, 9001, "/ckpt")
    assert o.dwdp_config is None and o.log_level == "info"


def test_known_ignored_keys_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        o = options_from_cli(_args(tmp_path, yaml_text=(
            "disable_overlap_scheduler: true\ncache_transceiver_config: {backend: UCX}\n"
            "kv_cache_config: {free_gpu_memory_fraction: 0.8}\n")))
    assert o.ignored_keys == ("cache_transceiver_config", "disable_overlap_scheduler", "kv_cache_config")
    assert "no effect here" in caplog.text


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(OptionsError, match=r"unknown key\(s\) \['max_batch_sise'\]"):
        options_from_cli(_args(tmp_path, yaml_text="max_batch_sise: 8\n"))


@pytest.mark.parametrize("flags,yaml_text,match", [
    (["--tp_size", "2"], None, "--tp_size=2 is not supported"),
    (["--ep_size", "4"], None, "--ep_size=4"),
    ([], "tensor_parallel_size: 2\n", "tensor_parallel_size=2"),
    ([], "moe_expert_parallel_size: 8\n", "moe_expert_parallel_size=8"),
    (["--backend", "tensorrt"], None, "backend='tensorrt'"),
    (["--max_seq_len", "0"], None, "--max_seq_len must be a positive integer"),
    ([], "moe_config: {backend: CUTLASS}\n", "moe_config.backend='CUTLASS'"),
    ([], "dwdp_config: {dwdp_size: 2, num_experts_per_worker: 4}\n", "num_prefetch_experts is required"),
    ([], "dwdp_config: {dwdp_size: 2, experts_per_worker: 4}\n", "unknown key"),
    ([], "- a\n- b\n", "expected a mapping"),
])
def test_bad_values_are_clear(tmp_path, flags, yaml_text, match):
    with pytest.raises(OptionsError, match=match):
        options_from_cli(_args(tmp_path, *flags, yaml_text=yaml_text))


def test_dwdp_section_and_moe_backend(tmp_path):
    o = options_from_cli(_args(tmp_path, yaml_text=(
        "moe_config: {backend: CUTEDSL}\n"
        "dwdp_config: {enabled: true, dwdp_size: 2, num_experts_per_worker: 6, num_prefetch_experts: 2}\n")))
    assert o.moe_backend == "cutedsl"
    assert o.dwdp_config.dwdp_size == 2 and o.dwdp_config.implied_num_experts == 8
    off = merge_options(ServeOptions(model="m"), {"dwdp_config": {
        "enabled": False, "dwdp_size": 2, "num_experts_per_worker": 6, "num_prefetch_experts": 2}})
    assert off.dwdp_config is None
    assert merge_options(ServeOptions(model="m"), {"dwdp_config": {"dwdp_size": 1}}).dwdp_config is None


def test_kv_transfer_mode():
    assert ServeOptions(model="m").kv_transfer == "auto"
    assert merge_options(ServeOptions(model="m"), {"kv_transfer": "http"}).kv_transfer == "http"
    with pytest.raises(OptionsError, match="kv_transfer='ipc'"):
        merge_options(ServeOptions(model="m"), {"kv_transfer": "ipc"})


def test_kv_transfer_pool_bytes():
    assert ServeOptions(model="m").kv_transfer_pool_bytes is None
    for value in (0, 1 << 30, None):
        assert merge_options(ServeOptions(model="m"), {"kv_transfer_pool_bytes": value}).kv_transfer_pool_bytes == value
    for bad in (-1, "1G", True, 1.5):
        with pytest.raises(OptionsError, match="kv_transfer_pool_bytes must be a byte count >= 0"):
            merge_options(ServeOptions(model="m"), {"kv_transfer_pool_bytes": bad})


def test_cuda_graph_switch(tmp_path, caplog):
    """On by default; the serve flag or TensorRT-LLM's ``cuda_graph_config: null`` turn it off;
    a mapping picks the batch sizes (listed, or powers of two up to ``max_batch_size``)."""
    on = options_from_cli(_args(tmp_path))
    assert on.cuda_graphs and on.cuda_graph_batch_sizes is None
    assert not options_from_cli(_args(tmp_path, "--no_cuda_graphs")).cuda_graphs
    assert not options_from_cli(_args(tmp_path, yaml_text="cuda_graph_config: null\n")).cuda_graphs
    listed = options_from_cli(_args(tmp_path, yaml_text=(
        "cuda_graph_config: {batch_sizes: [8, 1, 4, 8], enable_padding: true}\n")))
    assert listed.cuda_graphs and listed.cuda_graph_batch_sizes == (1, 4, 8)
    assert "cuda_graph_config" not in listed.ignored_keys
    top = merge_options(ServeOptions(model="m", max_batch_size=16),
                        {"cuda_graph_config": {"max_batch_size": 12}})
    assert top.cuda_graph_batch_sizes == (1, 2, 4, 8, 12)
    with caplog.at_level(logging.WARNING):
        merge_options(ServeOptions(model="m"), {"cuda_graph_config": {"enable_padding": False,
                                                                      "capture_num": 3}})
    assert "capture_num" in caplog.text and "enable_padding" in caplog.text
    for bad, match in (({"batch_sizes": [0]}, "positive integer"),
                       ({"batch_sizes": []}, "non-empty list"),
                       ({"batch_sizes": [32]}, r"batch sizes \[32\] exceed max_batch_size=16"),
                       (True, "a mapping or null")):
        with pytest.raises(OptionsError, match=match):
            merge_options(ServeOptions(model="m"), {"cuda_graph_config": bad})
