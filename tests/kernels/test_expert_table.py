"""CPU checks of the sm90 backend's host side: the multi-B expert table and input errors."""
import pytest
import torch

from tensorrt_llm_dwdp.kernels.sm90.expert_table import build_expert_table
from tensorrt_llm_dwdp.kernels.testing import preshuffled_experts, random_nvfp4_experts, split_sizes
from tensorrt_llm_dwdp.moe.backends.cutedsl import (
    CuteDslMoeBackend,
    check_expert_shapes,
    choose_token_tile,
)


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


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of ``t`` starting ``offset`` bytes past a 16-byte aligned address."""
    raw = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 16 + offset
    out = raw[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def test_table_rejects_misaligned_bases_before_launch():
    """The kernel moves weights with cp.async.bulk (16-byte aligned sources) and scales with
    8 B cp.async: a weight base off a 16-byte boundary, or a scale base off an 8-byte one, is
    a ValueError naming the tensor; 16 / 8-byte aligned bases pass."""
    weights = random_nvfp4_experts(4, 64, 32, seed=0, device="cpu")
    t = weights.tensors
    w, sf, a = t["w3_w1_weight"][0], t["w3_w1_weight_scale"][0], t["fc31_alpha"][0]
    build_expert_table([_at_offset(w, 0), w], [_at_offset(sf, 8), sf], [a, a], [0, 4])
    for off in (1, 8):
        with pytest.raises(ValueError, match="weight tensor 1 .* 16-byte boundary"):
            build_expert_table([w, _at_offset(w, off)], [sf, sf], [a, a], [0, 4])
    with pytest.raises(ValueError, match="scale tensor 0 .* 8-byte boundary"):
        build_expert_table([w], [_at_offset(sf, 4)], [a], [0])


def test_choose_token_tile_follows_rows_per_expert():
    assert choose_token_tile(1, 128) == 16
    assert choose_token_tile(16 * 128, 128) == 16
    assert choose_token_tile(16 * 128 + 1, 128) == 32
    assert choose_token_tile(64 * 256, 256) == 64
    assert choose_token_tile(65 * 256, 256) == 128
    assert choose_token_tile(1024 * 256, 256) == 128


def test_fc2_chunks_bound_the_scratch_to_twice_the_output():
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import chunk_blocks

    for hidden, top_k in ((7168, 8), (4096, 8), (2048, 8), (2880, 4), (5120, 6), (64, 4)):
        cb = chunk_blocks(hidden, top_k)
        assert cb >= 1
        if hidden >= 64 * top_k:  # T k (64 cb) fp32 <= 2 T H bf16
            assert top_k * 64 * cb * 4 <= 2 * hidden * 2, (hidden, top_k, cb)
    assert chunk_blocks(7168, 8) == 12 and chunk_blocks(4096, 8) == 8
    assert chunk_blocks(64, 4) == 1


def test_fc2_bf16_scratch_chunks_are_twice_as_wide_and_within_the_layer():
    """FP8 FC2's bf16 scratch (``Fp8Config.y_bf16``): the same byte bound at 2 bytes a value,
    so half the chunks (DeepSeek-V3: 28 blocks, 4 chunks, against 14 in fp32), never wider
    than the layer's blocks (top-1 would otherwise ask for twice the hidden size)."""
    from tensorrt_llm_dwdp.kernels.sm90.fc2_finalize import chunk_blocks

    assert chunk_blocks(7168, 8, 2) == 14 and chunk_blocks(7168, 8, 2, y_bytes=2) == 28
    for hidden, top_k in ((7168, 8), (4096, 8), (2048, 8), (4096, 1), (1024, 1), (128, 2)):
        cb = chunk_blocks(hidden, top_k, 2, y_bytes=2)
        assert cb >= 1 and cb <= hidden // 64, (hidden, top_k, cb)
        if hidden >= 32 * top_k:  # T k (64 cb) bf16 <= 2 T H bf16
            assert top_k * 64 * cb * 2 <= 2 * hidden * 2, (hidden, top_k, cb)
    assert chunk_blocks(4096, 1, 2, y_bytes=2) == 64  # one chunk: the whole layer


def test_sizes_not_multiple_of_64_fail_before_launch():
    with pytest.raises(ValueError, match="intermediate size 32 is not a positive multiple of 64"):
        check_expert_shapes(64, 32)
    with pytest.raises(ValueError, match="hidden size 2000"):
        check_expert_shapes(2000, 2048)
    check_expert_shapes(2880, 2880)


def test_kernel_rejects_bad_configurations():
    pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import W4A16RsGemm, rs_config

    with pytest.raises(ValueError, match="multiple of 64"):
        W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7200, bn=16)
    with pytest.raises(ValueError, match="token tile"):
        W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=256)
    with pytest.raises(ValueError, match="y_cols"):
        W4A16RsGemm(epilogue="scatter", n_weight=4096, k=2048, bn=16)
    kernel = W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=16)
    assert (kernel.kt, kernel.k_tiles, kernel.stages, kernel.bpc, kernel.persistent) == (
        64, 112, 8, 4, True)
    # one bulk copy of 2 KiB per block and stage, 8 B of raw scales per producer thread
    assert (kernel.block_w, kernel.stage_w, kernel.raw_bytes) == (2048, 8192, 8)
    assert kernel.cfg.register_pool * 2 * 384 <= 65536  # two CTAs per SM
    wide = W4A16RsGemm(epilogue="scatter", n_weight=7168, k=2048, bn=128, y_cols=768)
    assert (wide.kt, wide.bpw, wide.cta_rows, wide.persistent) == (64, 2, 256, True)
    mid = W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=64)
    assert (mid.kt, mid.stages, mid.block_w, mid.raw_bytes) == (128, 5, 4096, 16)
    assert W4A16RsGemm(epilogue="swiglu", n_weight=5760, k=2880, bn=64).kt == 64  # K % 128
    with pytest.raises(ValueError, match="does not fit"):
        W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=16, config=rs_config(32, 7168))
    with pytest.raises(ValueError, match="1 or 2 blocks per warpgroup"):
        W4A16RsGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=16,
                    config=rs_config(16, 7168, blocks_per_wg=4))
    with pytest.raises(TypeError):  # one weight layout, one weight copy: no fields to pick them
        rs_config(16, 7168, weights="linear")


def test_backend_rejects_what_it_cannot_run():
    backend = CuteDslMoeBackend()
    weights = random_nvfp4_experts(8, 64, 32, seed=0, device="cpu")
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    ids[:, 1] = 1
    tw = torch.ones(3, 2)
    with pytest.raises(ValueError, match="reads preshuffled expert weights, got 'linear'"):
        backend.run_experts(x, ids, tw, weights)
    with pytest.raises(ValueError, match="CUDA"):
        backend.run_experts(x, ids, tw, preshuffled_experts(
            random_nvfp4_experts(8, 64, 64, seed=0, device="cpu")))
    bf16 = type(weights).single({"w3_w1_weight": torch.zeros(8, 64, 64, dtype=torch.bfloat16),
                                 "w2_weight": torch.zeros(8, 64, 32, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="NVFP4"):
        backend.run_experts(x, ids, tw, bf16)
    assert split_sizes(10, 4) == [2, 2, 2, 4]
