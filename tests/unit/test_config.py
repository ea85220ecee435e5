"""DwdpConfig: loading from YAML / dict, validation messages naming key and values."""
import textwrap

import pytest

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError


def _write(tmp_path, text):
    path = tmp_path / "opts.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_section_other_keys_ignored(tmp_path):
    path = _write(tmp_path, """
        enable_attention_dp: true
        moe_config:
          backend: CUTEDSL
        dwdp_config:
          dwdp_size: 4
          num_groups: 2
          num_experts_per_worker: 100
          num_prefetch_experts: 52
          contention_opt: true
          prefetch_slice_bytes: 1048576
          peer_timeout_s: 5
        """)
    cfg = DwdpConfig.from_yaml(path)
    assert cfg == DwdpConfig(4, 2, 100, 52, True, 1 << 20, 5.0)
    assert cfg.enabled and cfg.world_size == 8
    assert cfg.implied_num_experts == 256
    cfg.check_num_experts(256)
    cfg.check_world_size(8)
    assert cfg.group_of(5) == (1, 1)
    assert isinstance(cfg.peer_timeout_s, float)


def test_defaults_and_missing_section(tmp_path):
    cfg = DwdpConfig.from_yaml(_write(tmp_path, "max_batch_size: 8\n"))
    assert cfg == DwdpConfig()
    assert not cfg.enabled
    assert cfg.prefetch_slice_bytes == 2 * 1024 * 1024 and cfg.peer_timeout_s == 60.0
    assert cfg.experts_per_worker(32) == 32
    assert cfg.expert_view == "composite"  # measured no slower than multi (README)
    empty = DwdpConfig.from_yaml(_write(tmp_path, ""))
    assert empty == DwdpConfig()


def test_from_dict_roundtrip():
    cfg = DwdpConfig(dwdp_size=2, num_experts_per_worker=4, num_prefetch_experts=4)
    assert DwdpConfig.from_dict(cfg.to_dict()) == cfg
    assert DwdpConfig.from_options({"dwdp_config": cfg.to_dict(), "x": 1}) == cfg


@pytest.mark.parametrize("section, words", [
    ({"dwdp_size": 0}, ["dwdp_size", ">= 1", "0"]),
    ({"dwdp_size": -2}, ["dwdp_size", "-2"]),
    ({"dwdp_size": 2.5}, ["dwdp_size", "integer", "2.5"]),
    ({"dwdp_size": True}, ["dwdp_size", "integer"]),
    ({"num_groups": 0}, ["num_groups", "0"]),
    ({"dwdp_size": 2, "num_prefetch_experts": 4}, ["num_experts_per_worker", "required"]),
    ({"dwdp_size": 2, "num_experts_per_worker": 4}, ["num_prefetch_experts", "required"]),
    ({"dwdp_size": 2, "num_experts_per_worker": 0, "num_prefetch_experts": 1},
     ["num_experts_per_worker", ">= 1", "0"]),
    ({"dwdp_size": 2, "num_experts_per_worker": 4, "num_prefetch_experts": -1},
     ["num_prefetch_experts", "-1"]),
    ({"dwdp_size": 2, "num_experts_per_worker": 4, "num_prefetch_experts": 5},
     ["num_prefetch_experts (5)", "num_experts_per_worker (4)"]),
    ({"prefetch_slice_bytes": 0}, ["prefetch_slice_bytes", "0"]),
    ({"peer_timeout_s": 0}, ["peer_timeout_s", "0"]),
    ({"peer_timeout_s": "soon"}, ["peer_timeout_s", "soon"]),
    ({"peer_timeout_s": float("inf")}, ["peer_timeout_s", "inf"]),
    ({"contention_opt": "yes"}, ["contention_opt", "yes"]),
    ({"dwdp_szie": 2, "zz": 1}, ["unknown key", "dwdp_szie", "zz", "known keys", "dwdp_size"]),
    ({"enabled": True}, ["unknown key", "enabled"]),
])
def test_bad_values_named(section, words):
    with pytest.raises(DwdpConfigError) as info:
        DwdpConfig.from_dict(section)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_section_not_a_mapping(tmp_path):
    with pytest.raises(DwdpConfigError, match="dwdp_config must be a mapping"):
        DwdpConfig.from_yaml(_write(tmp_path, "dwdp_config: 4\n"))
    with pytest.raises(DwdpConfigError, match="top level"):
        DwdpConfig.from_yaml(_write(tmp_path, "- a\n- b\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(DwdpConfigError, match="not valid YAML"):
        DwdpConfig.from_yaml(_write(tmp_path, "dwdp_config: {dwdp_size: [\n"))
    with pytest.raises(DwdpConfigError, match="cannot read"):
        DwdpConfig.from_yaml(tmp_path / "absent.yaml")


def test_file_error_names_path(tmp_path):
    path = _write(tmp_path, "dwdp_config:\n  dwdp_size: 0\n")
    with pytest.raises(DwdpConfigError) as info:
        DwdpConfig.from_yaml(path)
    assert str(path) in str(info.value) and "dwdp_size" in str(info.value)


def test_num_experts_mismatch_names_values():
    cfg = DwdpConfig(dwdp_size=4, num_experts_per_worker=100, num_prefetch_experts=50)
    with pytest.raises(DwdpConfigError) as info:
        cfg.check_num_experts(256)
    msg = str(info.value)
    for w in ("100", "(4 - 1) * 50", "= 250", "256"):
        assert w in msg, msg
    with pytest.raises(DwdpConfigError, match="num_experts must be a positive"):
        cfg.check_num_experts(0)


def test_world_size_mismatch():
    cfg = DwdpConfig(dwdp_size=2, num_groups=2, num_experts_per_worker=4, num_prefetch_experts=4)
    with pytest.raises(DwdpConfigError, match=r"world size 3 .* 2 \* 2 = 4"):
        cfg.check_world_size(3)
    with pytest.raises(DwdpConfigError, match="world rank 4 outside"):
        cfg.group_of(4)


def test_single_rank_with_explicit_w():
    cfg = DwdpConfig(dwdp_size=1, num_experts_per_worker=16)
    cfg.check_num_experts(16)
    with pytest.raises(DwdpConfigError, match="16"):
        cfg.check_num_experts(32)
