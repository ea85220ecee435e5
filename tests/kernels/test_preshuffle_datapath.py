"""The kernel's data path replayed on the CPU: preshuffled global bytes -> shared memory -> the
A fragments every consumer thread builds, against the exact NVFP4 weights of the linear expert.

For one stage of a work tile (first / last block group, first / last K tile), the test runs
the kernel's own index math (``W4A16RsGemm._block_offsets`` / ``_bulk_copy`` for the bulk weight
copies, ``_sf_copy``, ``_pair_slot``, ``_consumer_offsets``, ``_consumer_step``: the functions
the kernel calls) over the shuffled expert: every producer copy (each shared byte written
exactly once), the scale-pair conversion's placement, then each consumer thread's loads and
the word decode (``emulate_preshuffled_bf16x8``, the same shifts and masks as the PTX). Its 8
weights per (block, row half, pair) must equal the exact NVFP4 values (``quant.nvfp4`` on the
linear expert) of the rows and columns WGMMA's A layout assigns to that thread.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90 import preshuffle as ps  # noqa: E402
from tensorrt_llm_dwdp.kernels.sm90.nvfp4_dequant import (  # noqa: E402
    WEIGHT_EXP2,
    emulate_preshuffled_bf16x8,
)
from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import (  # noqa: E402
    CONSUMER_WGS,
    PRODUCER_THREADS,
    W4A16RsGemm,
    rs_config,
)
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4  # noqa: E402

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _expert(rows, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (rows, k // 2), generator=gen, dtype=torch.uint8)
    # finite e4m3 scales of every binade incl. subnormals (no NaN code 0x7f / 0xff)
    sf = torch.randint(0, 0x7F, (rows, k // 16), generator=gen, dtype=torch.uint8)
    sf |= torch.randint(0, 2, sf.shape, generator=gen, dtype=torch.uint8) << 7
    return w, sf


def _row(kern, r64, gblk):
    """The expert row at row r64 of block gblk (the layout contract, written out)."""
    if kern.epilogue == "swiglu":
        return ((r64 // 8) % 2) * kern.half + 32 * gblk + (r64 // 16) * 8 + r64 % 8
    return 64 * gblk + r64


def _stage(kern, w_sh, sf_sh, blk0, blk_end, kt_idx):
    """Shared memory of one stage after the producer: (sW bytes, scale values per bf16 half of
    sSpl), via the kernel's index math; every byte / half written exactly once."""
    k = kern.k
    sw = np.full(kern.stage_w, -1, dtype=np.int32)
    total = 0
    for cb in range(kern.bpc):  # producer thread 0's bulk copies, one per CTA block
        gblk = min(blk0 + cb, blk_end - 1)  # blocks past the end copy the last one again
        dst, src, size = kern._bulk_copy(cb, kt_idx)
        src += kern._block_offsets(gblk)[0]
        # the layout contract: block gblk's K tile kt_idx is atoms [chunks kt_idx, +chunks)
        assert src == (gblk * (k // 64) + kt_idx * kern.chunks) * ps.WEIGHT_ATOM
        assert size == kern.chunks * ps.WEIGHT_ATOM and size % 16 == 0 and dst % 16 == 0
        assert (sw[dst:dst + size] == -1).all(), f"sW bytes {dst}.. written twice"
        sw[dst:dst + size] = w_sh[src:src + size]
        total += size
    assert total == kern.stage_w, "the bulk copies' bytes are not what full[s] expects"
    assert (sw >= 0).all(), "sW bytes left unwritten"
    raw = np.full(kern.stage_raw, -1, dtype=np.int32)
    for tidx in range(PRODUCER_THREADS):
        cb, dst, within = kern._sf_copy(tidx)
        gblk = min(blk0 + cb, blk_end - 1)
        src = kern._block_offsets(gblk)[1] + kt_idx * kern.chunks * ps.SCALE_ATOM + within
        assert src == (gblk * (k // 64) + kt_idx * kern.chunks) * ps.SCALE_ATOM + within
        n = kern.raw_bytes
        assert (raw[dst:dst + n] == -1).all()
        raw[dst:dst + n] = sf_sh[src:src + n]
    assert (raw >= 0).all(), "sRaw bytes left unwritten"
    halves = np.full(kern.stage_spl // 2, np.nan)
    words = kern.raw_bytes // 4
    for tidx in range(PRODUCER_THREADS):
        for u in range(words):
            wi = tidx * words + u
            off = kern._pair_slot(wi) // 2
            assert np.isnan(halves[off:off + 4]).all(), f"scale slot {off} written twice"
            halves[off:off + 4] = E4M3[raw[4 * wi: 4 * wi + 4]]  # (h0 t0, h0 t1, h1 t0, h1 t1)
    assert not np.isnan(halves).any(), "scale slots left unwritten"
    return sw.astype(np.uint8), halves


@pytest.mark.parametrize("kind,n_weight,k,bn,blk_begin,blk_end,overrides", [
    ("swiglu", 4096, 7168, 16, 0, 64, {}),          # DeepSeek-V3 FC1: K tile 64, 2 CTAs/SM
    ("swiglu", 3072, 4096, 64, 0, 48, {}),          # Qwen3-235B FC1: K tile 128
    ("scatter", 2880, 2880, 128, 12, 18, {}),       # FC2 chunk of 6 blocks: clamped 2nd group
    ("scatter", 4096, 1536, 16, 0, 8, {"blocks_per_wg": 1}),  # 128 rows per CTA
    ("swiglu", 128, 64, 16, 0, 2, {}),              # a 64-wide layer: 2 blocks, 2 clamped
    # the occupancy candidates (bench/rs_variants.py OCCUPANCY): 128 rows per CTA at bn 64 / 32
    ("swiglu", 4096, 7168, 64, 0, 64,                # DeepSeek FC1, K tile 64, 2 CTAs/SM
     {"blocks_per_wg": 1, "ctas_per_sm": 2, "k_tile": 64, "producer_regs": 40}),
    ("swiglu", 3072, 4096, 64, 0, 48,                # Qwen3 FC1, K tile 128: 8 B scale copies
     {"blocks_per_wg": 1, "ctas_per_sm": 2, "k_tile": 128, "producer_regs": 56}),
    ("scatter", 7168, 2048, 32, 12, 25,              # DeepSeek FC2, 13-block chunk: clamped
     {"blocks_per_wg": 1, "ctas_per_sm": 3, "producer_regs": 32}),
    ("scatter", 2880, 2880, 32, 0, 45,               # K = 2880 with K tile 128 asked: 64 used
     {"blocks_per_wg": 1, "k_tile": 128, "producer_regs": 56}),
])
def test_consumer_fragments_are_the_exact_weights(kind, n_weight, k, bn, blk_begin, blk_end,
                                                  overrides):
    cfg = rs_config(bn, k, **overrides)
    kern = W4A16RsGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn,
                       y_cols=64 * (blk_end - blk_begin) if kind == "scatter" else 0, config=cfg)
    gated = kind == "swiglu"
    w, sf = _expert(n_weight, k, seed=n_weight + k)
    w_sh = ps.shuffle_weight(w, gated=gated).flatten().numpy()
    sf_sh = ps.shuffle_scale(sf.view(torch.float8_e4m3fn), gated=gated).view(
        torch.uint8).flatten().numpy()
    groups = -(-(blk_end - blk_begin) // kern.bpc)
    for grp in sorted({0, groups - 1}):
        blk0 = blk_begin + grp * kern.bpc
        for kt_idx in sorted({0, kern.k_tiles - 1}):
            sw, halves = _stage(kern, w_sh, sf_sh, blk0, blk_end, kt_idx)
            words, sc0, sc1, rows, cols, lane = [], [], [], [], [], []
            for q in range(CONSUMER_WGS):
                for tq in range(128):
                    w_thr, s_thr = kern._consumer_offsets(q, tq)
                    warp, g, c = tq // 32, (tq % 32) // 4, tq % 4
                    for p in range(kern.pairs):
                        for j in range(kern.bpw):
                            wa, sa = kern._consumer_step(j, p)
                            vec = sw[w_thr + wa: w_thr + wa + 16].view(np.uint32)
                            gblk = min(blk0 + q * kern.bpw + j, blk_end - 1)
                            for h in range(2):
                                words.append(vec[2 * (p % 2) + h])
                                half = (s_thr + sa + 4 * (2 * j + h)) // 2
                                sc0.append(halves[half])
                                sc1.append(halves[half + 1])
                                rows.append(_row(kern, 16 * warp + 8 * h + g, gblk))
                                cols.append(kt_idx * kern.kt + 32 * p)
                                lane.append(c)
            got = emulate_preshuffled_bf16x8(np.array(words, dtype=np.uint32),
                                             np.array(sc0), np.array(sc1))
            rows, cols, lane = np.array(rows), np.array(cols), np.array(lane)
            # the exact NVFP4 weights of the linear expert at the WGMMA A-fragment positions
            ks = (np.array([0, 1, 8, 9, 16, 17, 24, 25])[None, :] + 2 * lane[:, None]
                  + cols[:, None])
            uniq = np.unique(rows)
            ref = dequantize_nvfp4(w[uniq], sf[uniq].view(torch.float8_e4m3fn), None,
                                   torch.float32).numpy()
            want = ref[np.searchsorted(uniq, rows)[:, None], ks]
            np.testing.assert_array_equal(got * 2.0 ** -WEIGHT_EXP2, want,
                                          err_msg=f"group {grp}, K tile {kt_idx}")
