"""Prefetch buffers (prebuilt views, aligned packing) and stats snapshots."""
import dataclasses

import pytest
import torch

from tensorrt_llm_dwdp.dwdp.layout import ExpertLayout
from tensorrt_llm_dwdp.dwdp.prefetch_buffer import ALIGN, NUM_BUFFERS, PrefetchBuffers
from tensorrt_llm_dwdp.dwdp.stats import StatsRecorder


def test_views_pack_layers_of_different_shapes():
    lay = ExpertLayout(num_experts=7, dwdp_size=3, num_experts_per_worker=3, num_prefetch_experts=2, rank=1)
    own = [
        {"a": torch.zeros(3, 5, dtype=torch.uint8), "b": torch.zeros(3, 2, dtype=torch.float32)},
        {"a": torch.zeros(3, 9, dtype=torch.uint8)},
    ]
    buf = PrefetchBuffers(lay, own, torch.device("cpu"))
    assert buf.storage_bytes == ALIGN + ALIGN  # layer 0: 10 B + 16 B, each start aligned
    assert buf.total_bytes == NUM_BUFFERS * 2 * buf.storage_bytes
    for pos, tensors in enumerate(own):
        for b in range(NUM_BUFFERS):
            view = buf.view(pos, b)
            assert set(view) == set(tensors)
            for name, parts in view.items():
                assert parts[1] is tensors[name]
                for peer in (0, 2):
                    x = parts[peer]
                    assert x.shape == (2,) + tensors[name].shape[1:] and x.dtype == tensors[name].dtype
                    addr, n = buf.dst(pos, b, peer, name)
                    base = buf.dst(0, b, peer, "a")[0]
                    assert addr == x.data_ptr() and n == x.nbytes and (addr - base) % ALIGN == 0
    assert buf.view(0, 0)["a"][0].data_ptr() != buf.view(0, 1)["a"][0].data_ptr()
    # Layers share storage: layer 1's 'a' starts where layer 0's did.
    assert buf.dst(1, 0, 2, "a")[0] == buf.dst(0, 0, 2, "a")[0]
    buf.fill_(0x5A)
    assert torch.all(buf.view(0, 1)["b"][2].view(torch.uint8) == 0x5A)


def test_stats_snapshot():
    rec = StatsRecorder([4, 9])
    rec.copied(0, 1000)
    rec.copy_time(0, 1e-6)
    rec.waited(1, 0.5)
    rec.stall_time(1, 0.25)
    snap = rec.snapshot()
    assert snap.prefetches == 1 and snap.bytes_copied == 1000 and snap.waits == 1
    assert snap.stall_time_s == pytest.approx(0.75)
    assert snap.layers[0].layer_idx == 4 and snap.layers[0].copy_gbps == pytest.approx(1.0)
    assert snap.layers[1].copy_gbps == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.waits = 3
    rec.copied(1, 5)
    assert snap.bytes_copied == 1000  # a snapshot does not move
