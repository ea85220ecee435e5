"""DWDP slice loading: every rank of 2- and 4-rank layouts reads ONLY its own experts, and its
tensors equal the matching slice of a full load."""
import pytest
import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.model.checkpoint import load_moe_experts, read_config
from tensorrt_llm_dwdp.model.hf_names import NVFP4
from tensorrt_llm_dwdp.model.presets import get_preset
from tensorrt_llm_dwdp.model.safetensors_io import CheckpointReader
from tensorrt_llm_dwdp.model.synthetic import write_synthetic_checkpoint

# E = 16 experts (tiny-deepseek-v3): disjoint and redundant layouts, W + (S-1) P = E
LAYOUTS = [(2, 8, 8), (2, 10, 6), (4, 4, 4), (4, 7, 3)]


def _alloc(shape, dtype):
    # a sentinel fill: any element the loader fails to write stays visibly wrong
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).fill_(0xA5)
    return t


@pytest.fixture(scope="module", params=["bf16", NVFP4])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    hf = get_preset("tiny-deepseek-v3", num_layers=3)
    write_synthetic_checkpoint(path, hf, quant=request.param, seed=7, shard_bytes=96 << 10)
    cfg, quant = read_config(path)
    with CheckpointReader(path) as r:
        full = load_moe_experts(r, cfg, quant, range(cfg.num_experts), _alloc)
    return path, cfg, quant, full


@pytest.mark.parametrize("size,w,p", LAYOUTS)
def test_each_rank_reads_only_its_experts(checkpoint, size, w, p):
    path, cfg, quant, full = checkpoint
    assert cfg.num_experts == 16 and len(cfg.moe_layer_indices) == 2
    for rank in range(size):
        start, stop = ExpertLayout(16, size, w, p, rank).owned_range()
        with CheckpointReader(path) as r:
            part = load_moe_experts(r, cfg, quant, range(start, stop), _alloc)
            expert_keys = [k for k in r.keys_read if ".mlp.experts." in k]
            bytes_read = r.bytes_read
        read = {int(k.split(".mlp.experts.")[1].split(".")[0]) for k in expert_keys}
        assert read == set(range(start, stop)), (rank, sorted(read))
        per_expert = sum(t[0].numel() * t.element_size() for t in full[cfg.moe_layer_indices[0]].values())
        assert bytes_read <= w * per_expert * len(cfg.moe_layer_indices) * 1.01
        for layer, tensors in part.items():
            assert set(tensors) == set(full[layer])
            for name, t in tensors.items():
                assert t.shape[0] == w
                assert torch.equal(t.view(torch.uint8), full[layer][name][start:stop].view(torch.uint8)), (
                    rank, layer, name)


def test_bad_ranges_are_refused(checkpoint):
    path, cfg, quant, _ = checkpoint
    with CheckpointReader(path) as r:
        for bad in (range(0, 0), range(10, 17), range(-1, 3)):
            with pytest.raises(ValueError, match="expert range"):
                load_moe_experts(r, cfg, quant, bad, _alloc)
