"""CPU checks of the FP8 grouped GEMM's index math and argument checks (no GPU, no compile).

The producer reads weight rows by ``Fp8BlockGemm.weight_row`` and the consumer scales them by
``scale_rows``; the FC1 epilogue writes h column ``32 gblk + 8 warp + g`` from accumulator rows
``16 warp + g`` (up) and ``16 warp + 8 + g`` (gate). These tests hold the three to each other
and to the checkpoint's row order, so a wrong interleave or scale block fails here first.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("cutlass", reason="needs nvidia-cutlass-dsl==4.3.5")

from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import Fp8BlockGemm, fp8_config  # noqa: E402
from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import (  # noqa: E402
    build_fp8_expert_table,
    check_fp8_shapes,
)

pytestmark = pytest.mark.kernels


@pytest.mark.parametrize("inter", [128, 384, 2048])
def test_fc1_rows_interleave_up_and_gate_and_match_scales(inter):
    kern = Fp8BlockGemm(epilogue="swiglu", n_weight=2 * inter, k=256, bn=16)
    seen = []
    for gblk in range(2 * inter // 64):
        up_blk, gate_blk = kern.scale_rows(gblk)
        for warp in range(4):
            for g in range(8):
                up = kern.weight_row(gblk, 16 * warp + g)
                gate = kern.weight_row(gblk, 16 * warp + 8 + g)
                col = 32 * gblk + 8 * warp + g  # the epilogue's h column
                assert (up, gate) == (col, inter + col)
                assert (up // 128, gate // 128) == (up_blk, gate_blk)
                seen += [up, gate]
    assert sorted(seen) == list(range(2 * inter))  # every row read once


@pytest.mark.parametrize("experts,inter", [(1, 128), (3, 384), (2, 2048)])
def test_fc1_one_box_reads_the_interleaved_rows(experts, inter):
    """``fc1_one_box``'s 4-D box (row r, up / gate u at stride I rows, group g of 8 rows, K)
    starting at box ``local * 2I / 32 + gblk`` lands block row ``r + 8 u + 16 g`` on the
    expert row ``weight_row`` names, and its coordinates stay inside the tensor's extents
    (the map's g extent counts every 8-row group, gate ones included)."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config

    kern = Fp8BlockGemm(epilogue="swiglu", n_weight=2 * inter, k=256, bn=128,
                        config=fp8_config(128, fc1_one_box=True))
    assert kern.one_box and kern.boxes == 1 and kern.box_rows == 64
    groups = experts * 2 * inter // 8  # the map's g extent
    for local in range(experts):
        for gblk in range(2 * inter // 64):
            box = local * (2 * inter // 32) + gblk  # _produce_tma's box_row
            for row in range(64):
                r, u, g = row % 8, row // 8 % 2, row // 16
                gi = 4 * box + g
                assert 0 <= gi < groups
                tensor_row = 8 * gi + r + u * inter
                assert tensor_row == local * 2 * inter + kern.weight_row(gblk, row)
                assert tensor_row < experts * 2 * inter


def test_fc2_rows_are_blocks_of_w2():
    kern = Fp8BlockGemm(epilogue="scatter", n_weight=1024, k=384, bn=32, y_cols=256)
    for gblk in range(1024 // 64):
        rows = [kern.weight_row(gblk, r) for r in range(64)]
        assert rows == list(range(64 * gblk, 64 * gblk + 64))
        assert kern.scale_rows(gblk) == (rows[0] // 128, rows[-1] // 128)


@pytest.mark.parametrize("blocks", [2, 3])
@pytest.mark.parametrize("epilogue,n_weight", [("swiglu", 2 * 640), ("scatter", 1280)])
def test_tokens_m_column_groups_take_their_rows_scales(epilogue, n_weight, blocks):
    """tokens_m: accumulator column ``n = 8 qn + 2 c + v0`` is row ``n % 64`` of block ``blk0 +
    n // 64``; the promotion scales column group ``qn`` by scale ``_scale_of(qn)`` of the
    tile's list (per block: FC2 its row block, FC1 up then gate - ``_scale_addrs``; two blocks
    share one list, the pair being one scale block). That must be the 128-row block of the
    weight row the producer loaded there, at every tile start the launcher makes (two blocks:
    even starts; the wide tile: any, its clamped last group included)."""
    kern = Fp8BlockGemm(epilogue=epilogue, n_weight=n_weight, k=256, bn=128,
                        y_cols=n_weight if epilogue == "scatter" else 0,
                        config=fp8_config(128, blocks=blocks))
    n_blocks = n_weight // 64
    if epilogue == "swiglu":  # the gate scales the kernel loads sit gate_scales bytes on
        up, gate = kern.scale_rows(0)
        assert kern.gate_scales == (gate - up) * kern.k_tiles * 4
    for blk0 in range(0, n_blocks, 2 if blocks == 2 else 1):
        gblks = [min(blk0 + b, n_blocks - 1) for b in range(blocks if blocks == 3 else 1)]
        # the scale rows the kernel's list holds, in order
        listed = []
        for gblk in gblks:
            up, gate = kern.scale_rows(gblk)
            listed += [up, gate] if epilogue == "swiglu" else [up]
        for qn in range(blocks * 64 // 8):
            gblk = min(blk0 + qn // 8, n_blocks - 1)
            for col in range(8 * qn, 8 * qn + 8):
                row = kern.weight_row(gblk, col % 64)
                assert listed[kern._scale_of(qn)] == row // 128, (blk0, qn, col)


def test_wide_tile_config_and_refusals():
    """``blocks=3``: 40 KiB stages (5 fit), producer 40 / consumers 232 registers; it needs
    tokens_m and tma, and FC1's with cluster2 needs fc1_one_box (24 boxes of 8 rows spill the
    producer)."""
    cfg = fp8_config(128, blocks=3)
    kern = Fp8BlockGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=128, config=cfg)
    assert kern.stage_a == 3 * 64 * 128 and kern.stages == 5
    assert (cfg.producer_regs, cfg.consumer_regs) == (40, 232)
    # per-block scales; the default's block pair shares one scale block (even starts)
    assert not cfg.pair_scales and fp8_config(128).pair_scales
    assert not fp8_config(16).pair_scales  # tokens as N: a scale per block already
    assert cfg.producer_regs * 128 + cfg.consumer_regs * 256 <= cfg.register_pool * 384
    for bad, match in [(dict(cluster2=True), "fc1_one_box"), (dict(tokens_m=False), "tokens_m"),
                       (dict(tma=False), "tma")]:
        with pytest.raises(ValueError, match=match):
            Fp8BlockGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=128,
                          config=fp8_config(128, blocks=3, **bad))
    Fp8BlockGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=128,
                 config=fp8_config(128, blocks=3, cluster2=True, fc1_one_box=True))
    Fp8BlockGemm(epilogue="scatter", n_weight=7168, k=2048, bn=128, y_cols=896,
                 config=fp8_config(128, blocks=3, cluster2=True))
    with pytest.raises(ValueError, match="blocks=4"):
        Fp8BlockGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=128,
                     config=fp8_config(128, blocks=4))


def test_swizzle_is_a_permutation_of_each_row():
    for row in range(64):
        offs = sorted(Fp8BlockGemm.swizzled(row, c) for c in range(8))
        assert offs == [row * 128 + 16 * c for c in range(8)]


@pytest.mark.parametrize("bn", [16, 32, 64, 128])
def test_configs_fit_shared_memory_and_registers(bn):
    kern = Fp8BlockGemm(epilogue="swiglu", n_weight=4096, k=7168, bn=bn)
    cfg = fp8_config(bn)
    assert kern.stages >= 3
    stage = kern.stage_a + kern.stage_b + kern.stage_x
    assert cfg.ctas_per_sm * kern.stages * stage <= 220 * 1024
    assert kern.a_chunks == 8 and kern.b_chunks * 16 == bn
    assert cfg.producer_regs * 128 + cfg.consumer_regs * 256 <= cfg.register_pool * 384


@pytest.mark.parametrize("kwargs,match", [
    (dict(epilogue="swiglu", n_weight=4096, k=7000, bn=16), "K=7000"),
    (dict(epilogue="swiglu", n_weight=2 * 192, k=1024, bn=16), "weight rows|I=192"),
    (dict(epilogue="scatter", n_weight=1024, k=1024, bn=16, y_cols=0), "y_cols"),
    (dict(epilogue="swiglu", n_weight=1024, k=1024, bn=48), "bn"),
    (dict(epilogue="gelu", n_weight=1024, k=1024, bn=16), "epilogue"),
])
def test_bad_shapes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fp8BlockGemm(**kwargs)


def test_check_fp8_shapes():
    check_fp8_shapes(7168, 2048)
    with pytest.raises(ValueError, match="hidden size 7100"):
        check_fp8_shapes(7100, 2048)
    with pytest.raises(ValueError, match="intermediate size 64"):
        check_fp8_shapes(1024, 64)


def _experts(n, rows, k):
    return (torch.zeros(n, rows, k, dtype=torch.float8_e4m3fn),
            torch.ones(n, rows // 128, k // 128, dtype=torch.float32))


def test_expert_table_multi_view():
    w_a, s_a = _experts(3, 256, 128)
    w_b, s_b = _experts(5, 256, 128)
    table = build_fp8_expert_table([w_a, w_b], [s_a, s_b], [0, 3])
    assert table.table.tolist() == [[w_a.data_ptr(), w_b.data_ptr()],
                                    [s_a.data_ptr(), s_b.data_ptr()]]
    assert table.tensor_of_expert.tolist() == [0] * 3 + [1] * 5
    assert table.local_of_expert.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert (table.rows, table.k) == (256, 128)


def test_expert_table_refuses_bad_tensors():
    w, s = _experts(2, 256, 128)
    with pytest.raises(ValueError, match="expected float8_e4m3fn"):
        build_fp8_expert_table([w.view(torch.uint8)], [s], [0])
    with pytest.raises(ValueError, match="expected float8_e4m3fn"):
        build_fp8_expert_table([w], [s[:, :1]], [0])
    with pytest.raises(ValueError, match="multiples of 128"):
        build_fp8_expert_table([torch.zeros(2, 200, 128, dtype=torch.float8_e4m3fn)], [s], [0])
    with pytest.raises(ValueError, match="starts at expert 1"):
        build_fp8_expert_table([w], [s], [1])
    with pytest.raises(ValueError, match="contiguous"):
        build_fp8_expert_table([w.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :128]],
                               [s], [0])


@pytest.mark.parametrize("epilogue,n_weight", [("swiglu", 768), ("scatter", 1024)])
def test_producer_row_steps(epilogue, n_weight):
    """The producer addresses a thread's chunks of block cb as its first row's expert row plus
    ``row_step`` rows per 16 block rows (``_produce``): that must be ``weight_row``."""
    kern = Fp8BlockGemm(epilogue=epilogue, n_weight=n_weight, k=256, bn=16,
                        y_cols=0 if epilogue == "swiglu" else 64)
    per_block = kern.a_chunks // 2
    for gblk in range(n_weight // 64):
        for row0 in range(16):  # tidx // 8 of the 128 producer threads
            for j in range(per_block):
                assert kern.weight_row(gblk, row0 + 16 * j) == \
                    kern.weight_row(gblk, row0) + j * kern.row_step


@pytest.mark.parametrize("epilogue,rows,k", [("swiglu", 768, 384), ("scatter", 256, 640)])
def test_preshuffle_is_the_kernels_shared_memory_image(epilogue, rows, k):
    """Byte for byte, block b's K tile t in the preshuffled expert is what the linear path's
    cp.asyncs write into shared memory (``weight_row`` rows, ``swizzled`` chunks), and
    unshuffling gives the checkpoint rows back."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_preshuffle import preshuffle_fp8, unshuffle_fp8

    kern = Fp8BlockGemm(epilogue=epilogue, n_weight=rows, k=k, bn=16,
                        y_cols=0 if epilogue == "swiglu" else 64)
    gen = torch.Generator().manual_seed(5)
    w = torch.randint(0, 256, (3, rows, k), generator=gen, dtype=torch.uint8)
    w = w.view(torch.float8_e4m3fn)
    shuffled = preshuffle_fp8(w, fc1=epilogue == "swiglu", chunk_experts=2)
    assert torch.equal(unshuffle_fp8(shuffled, fc1=epilogue == "swiglu").view(torch.uint8),
                       w.view(torch.uint8))
    lin, img = w.view(torch.uint8), shuffled.view(torch.uint8).reshape(3, -1)
    tiles = k // 128
    for e in range(3):
        for b in range(rows // 64):
            for t in range(tiles):
                base = (b * tiles + t) * 64 * 128
                for r in range(64):
                    row = kern.weight_row(b, r)
                    for c in range(8):
                        off = base + Fp8BlockGemm.swizzled(r, c)
                        assert torch.equal(img[e, off:off + 16],
                                           lin[e, row, 128 * t + 16 * c:128 * t + 16 * c + 16])


def test_default_config_by_tile_and_tensor_count():
    """bn 128 defaults to the copy engine with the tokens as M, the smaller tiles to cp.async;
    a table of more tensors than one copy-engine kernel takes keeps tokens_m on cp.async, and
    an explicit configuration is used as given."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import MAX_TMA_TENSORS
    from tensorrt_llm_dwdp.kernels.sm90.fp8_launch import _config

    def table(n_tensors):
        ws = [torch.zeros(1, 128, 128, dtype=torch.float8_e4m3fn) for _ in range(n_tensors)]
        sfs = [torch.ones(1, 1, 1) for _ in range(n_tensors)]
        return build_fp8_expert_table(ws, sfs, list(range(n_tensors)))

    few, many = table(2), table(MAX_TMA_TENSORS + 1)
    assert _config(None, 128, few, 4096) == fp8_config(128)
    assert fp8_config(128).tma and fp8_config(128).tokens_m and not fp8_config(128).cluster2
    # the token tile multicast over CTA pairs from DeepSeek-V3's hidden size on (measured)
    assert not fp8_config(128, 4096).mcast_tokens and fp8_config(128, 7168).mcast_tokens
    assert _config(None, 128, few, 7168).mcast_tokens
    for bn in (16, 32, 64):
        cfg = _config(None, bn, few, 7168)
        assert not cfg.tma and not cfg.tokens_m and cfg.cluster_size == 1
    cfg = _config(None, 128, many, 7168)
    assert not cfg.tma and cfg.tokens_m and cfg.cluster_size == 1
    explicit = fp8_config(128, cluster2=True)
    assert _config(explicit, 128, many, 7168) is explicit
    with pytest.raises(ValueError, match="cluster2 / mcast_tokens need"):
        Fp8BlockGemm(epilogue="swiglu", n_weight=256, k=128, bn=128,
                     config=fp8_config(128, tma=False, cluster2=True))
    with pytest.raises(ValueError, match="need tma, tokens_m"):
        Fp8BlockGemm(epilogue="swiglu", n_weight=256, k=128, bn=128,
                     config=fp8_config(128, tokens_m=False, mcast_tokens=True))
    assert fp8_config(128, cluster2=True, mcast_tokens=True).cluster_size == 4
    with pytest.raises(ValueError, match="fc1_one_box needs tma"):
        Fp8BlockGemm(epilogue="swiglu", n_weight=256, k=128, bn=64,
                     config=fp8_config(64, fc1_one_box=True))
    with pytest.raises(ValueError, match="tokens_m needs"):
        Fp8BlockGemm(epilogue="swiglu", n_weight=256, k=128, bn=64,
                     config=fp8_config(64, tokens_m=True))


def test_scratch_config_matches_the_fc2_scratch_dtype():
    """FC2's scratch dtype follows ``y_bf16`` (a mismatched buffer fails before launch, naming
    both); FC1 compiles one kernel whatever ``y_bf16`` says."""
    import torch

    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import fp8_config
    from tensorrt_llm_dwdp.kernels.sm90.grouped_launch import scratch_config
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import rs_config

    h = torch.empty(4, 8, dtype=torch.bfloat16)
    assert scratch_config("fp8 gemm", fp8_config(128), "swiglu", h) == fp8_config(128, y_bf16=False)
    y16, y32 = torch.empty(4, 64, dtype=torch.bfloat16), torch.empty(4, 64)
    assert scratch_config("fp8 gemm", fp8_config(16), "scatter", y16).y_bf16
    with pytest.raises(ValueError, match="fp8 gemm: FC2 scratch y is torch.float32.*writes bf16"):
        scratch_config("fp8 gemm", fp8_config(16), "scatter", y32)
    assert not scratch_config("w4a16 gemm", rs_config(16, 2048), "scatter", y32).y_bf16
    with pytest.raises(ValueError, match="w4a16 gemm: FC2 scratch y is torch.bfloat16.*fp32"):
        scratch_config("w4a16 gemm", rs_config(16, 2048), "scatter", y16)
