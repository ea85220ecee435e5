"""Every shipped DWDP YAML loads, covers its model's experts and names its group size."""
import os

import pytest

from tensorrt_llm_dwdp.dwdp.config import DwdpConfig, DwdpConfigError
from tensorrt_llm_dwdp.serve.options import ServeOptions, load_yaml_mapping, merge_options

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")

# file -> (experts E, dwdp_size S, W, P)
EXPECTED = {
    "deepseek_v3_dwdp2.yaml": (256, 2, 128, 128),
    "deepseek_v3_dwdp4.yaml": (256, 4, 64, 64),
    "deepseek_v3_dwdp4_redundant.yaml": (256, 4, 100, 52),
    "deepseek_v3_dwdp8.yaml": (256, 8, 32, 32),
    "synthetic_tiny_dwdp2.yaml": (16, 2, 8, 8),
    "synthetic_tiny_dwdp2_redundant.yaml": (16, 2, 10, 6),
    "synthetic_tiny_dwdp2_multi.yaml": (16, 2, 8, 8),
}


def test_every_config_is_listed():
    assert sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_validates(name):
    experts, size, w, p = EXPECTED[name]
    path = os.path.join(CONFIGS, name)
    cfg = DwdpConfig.from_yaml(path)
    assert (cfg.dwdp_size, cfg.num_experts_per_worker, cfg.num_prefetch_experts) == (size, w, p)
    cfg.check_num_experts(experts)
    cfg.check_world_size(size)
    with pytest.raises(DwdpConfigError):
        cfg.check_num_experts(experts + 1)
    with pytest.raises(DwdpConfigError):
        cfg.check_world_size(size + 1)
    # The server accepts the whole file (unknown keys would be an error there).
    opts = merge_options(ServeOptions(model="m"), load_yaml_mapping(path), source=name)
    assert opts.dwdp_config == cfg
