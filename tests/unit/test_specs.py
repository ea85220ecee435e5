"""moe/specs.py: the one expert-tensor layout, checked against ExpertWeights and by size."""
import pytest
import torch

from tensorrt_llm_dwdp.moe.specs import (
    BIAS_NAMES, REQUIRED_NAMES, allocate_experts, expert_nbytes, expert_shapes, expert_specs)
from tensorrt_llm_dwdp.moe.weights import ExpertWeights


def test_deepseek_v3_nvfp4_expert_bytes():
    # 3 * H * I elements at 4 bits plus one e4m3 per 16, plus two fp32 alphas (DESIGN.md: ~24.8 MB)
    assert expert_nbytes("nvfp4", 7168, 2048) == 3 * 7168 * 2048 * 9 // 16 + 8
    assert expert_nbytes("bf16", 7168, 2048) == 3 * 7168 * 2048 * 2
    # one byte per weight plus one fp32 per 128x128 block: (2*16 + 16) * 56 blocks of 4 bytes
    assert expert_nbytes("fp8", 7168, 2048) == 3 * 7168 * 2048 + (32 * 56 + 56 * 16) * 4


def test_fp8_specs_are_the_checkpoint_block_grid():
    s = expert_specs("fp8", 7168, 2048)
    assert s["w3_w1_weight"].dtype == torch.float8_e4m3fn
    assert s["w3_w1_weight"].per_expert == (4096, 7168)
    assert s["w3_w1_weight_scale_inv"].dtype == torch.float32
    assert s["w3_w1_weight_scale_inv"].per_expert == (32, 56)
    assert s["w2_weight"].per_expert == (7168, 2048)
    assert s["w2_weight_scale_inv"].per_expert == (56, 16)
    assert set(s) == set(REQUIRED_NAMES["fp8"])


@pytest.mark.parametrize("quant, h, i", [("nvfp4", 32, 16), ("bf16", 32, 16), ("fp8", 256, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_allocated_specs_are_what_expert_weights_accepts(quant, h, i, bias):
    t = allocate_experts(quant, 3, h, i, lambda s, d: torch.zeros(s, dtype=d), bias=bias)
    names = set(REQUIRED_NAMES[quant]) | (set(BIAS_NAMES) if bias else set())
    assert set(t) == names
    w = ExpertWeights.single(t)
    assert (w.quant, w.num_experts, w.hidden_size, w.intermediate_size) == (quant, 3, h, i)
    nbytes = sum(x.numel() * x.element_size() for x in t.values())
    assert nbytes == 3 * expert_nbytes(quant, h, i, bias=bias)


def test_every_shape_has_the_expert_first():
    for name, (shape, _) in expert_shapes("nvfp4", 5, 64, 32, bias=True).items():
        assert shape[0] == 5, name
    assert expert_specs("nvfp4", 64, 32)["w2_weight_scale"].per_expert == (64, 2)


@pytest.mark.parametrize("args, match", [(("int4", 32, 16), "unknown expert quantization"),
                                         (("nvfp4", 40, 16), "multiples of 16"),
                                         (("fp8", 128, 64), "multiples of 128"),
                                         (("fp8", 192, 128), "multiples of 128"),
                                         (("bf16", 0, 16), ">= 1")])
def test_bad_sizes_fail_naming_them(args, match):
    with pytest.raises(ValueError, match=match):
        expert_specs(*args)
