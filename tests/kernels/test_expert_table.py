"""CPU checks of the sm90 backend's host side: the multi-B expert table and input errors."""
import pytest
import torch

from tensorrt_llm_dwdp.kernels.sm90.expert_table import build_expert_table
from tensorrt_llm_dwdp.kernels.testing import random_nvfp4_experts, split_sizes
from tensorrt_llm_dwdp.moe.backends.cutedsl import CuteDslMoeBackend, choose_tile_m


def _view(weights, sizes):
    return weights.split(sizes) if len(sizes) > 1 else weights


@pytest.mark.parametrize("sizes", [[10], [3, 7], [1, 2, 3, 4], [0, 6, 0, 4]])
def test_table_maps_every_expert_to_its_tensor_and_address(sizes):
    weights = random_nvfp4_experts(10, 64, 32, seed=0, device="cpu")
    view = _view(weights, sizes)
    t = view.tensors
    table = build_expert_table(t["w3_w1_weight"], t["w3_w1_weight_scale"], t["fc31_alpha"],
                               view.expert_offsets)
    assert table.num_tensors == len(sizes) and (table.rows, table.k) == (64, 64)
    per_expert = 64 * 32
    for e in range(10):
        tensor, local = int(table.tensor_of_expert[e]), int(table.local_of_expert[e])
        assert (tensor, local) == view.locate(e)
        # The kernel's address arithmetic lands on the same bytes as the global tensor.
        addr = int(table.table[0, tensor]) + local * per_expert
        assert addr == weights.tensors["w3_w1_weight"][0][e].data_ptr()
        assert int(table.table[2, tensor]) + 4 * local == weights.tensors["fc31_alpha"][0][e:].data_ptr()


def test_table_rejects_bad_tensors():
    weights = random_nvfp4_experts(4, 64, 32, seed=0, device="cpu")
    t = weights.tensors
    w, sf, a = t["w3_w1_weight"][0], t["w3_w1_weight_scale"][0], t["fc31_alpha"][0]
    with pytest.raises(ValueError, match="tensor 0"):
        build_expert_table([w], [sf.view(torch.uint8)], [a], [0])
    with pytest.raises(ValueError, match="starts at expert 1"):
        build_expert_table([w], [sf], [a], [1])
    with pytest.raises(ValueError, match="contiguous"):
        build_expert_table([w.transpose(1, 2).contiguous().transpose(1, 2)], [sf], [a], [0])
    with pytest.raises(ValueError, match="S >= 1"):
        build_expert_table([], [], [], [])


def test_choose_tile_m_switches_on_rows_per_expert():
    assert choose_tile_m(64 * 128, 128) == 64
    assert choose_tile_m(96 * 128, 128) == 64
    assert choose_tile_m(97 * 128, 128) == 128


def test_choose_tile_m_256_is_opt_in():
    assert choose_tile_m(256 * 128, 128) == 128
    assert choose_tile_m(256 * 128, 128, max_tile_m=256) == 256
    assert choose_tile_m(255 * 128, 128, max_tile_m=256) == 128
    assert choose_tile_m(64 * 128, 128, max_tile_m=256) == 64
    with pytest.raises(ValueError, match="max_tile_m"):
        CuteDslMoeBackend(max_tile_m=512)
    with pytest.raises(ValueError, match="warp-specialized"):
        CuteDslMoeBackend(warp_specialized=True, max_tile_m=256)


def test_kernel_rejects_256_row_tiles_with_wide_sub_tiles():
    pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_grouped_gemm import W4A16GroupedGemm

    with pytest.raises(ValueError, match="n_sub=64"):
        W4A16GroupedGemm(epilogue="swiglu", n_weight=256, k=64, tile_m=256, n_sub=128)
    kernel = W4A16GroupedGemm(epilogue="swiglu", n_weight=256, k=64, tile_m=256, n_sub=64)
    assert (kernel.threads, kernel.row_split) == (512, 4)


def test_backend_rejects_what_it_cannot_run():
    backend = CuteDslMoeBackend()
    weights = random_nvfp4_experts(8, 64, 32, seed=0, device="cpu")
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    ids[:, 1] = 1
    tw = torch.ones(3, 2)
    with pytest.raises(ValueError, match="CUDA"):
        backend.run_experts(x, ids, tw, weights)
    bf16 = type(weights).single({"w3_w1_weight": torch.zeros(8, 64, 64, dtype=torch.bfloat16),
                                 "w2_weight": torch.zeros(8, 64, 32, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="NVFP4"):
        backend.run_experts(x, ids, tw, bf16)
    assert split_sizes(10, 4) == [2, 2, 2, 4]
