"""The sm90 FP8 grouped GEMM compiles for sm_90a on a CPU-only machine and its SASS is the
design's: fp8 warpgroup MMAs (QGMMA, e4m3 x e4m3 into fp32, A and B through shared-memory
descriptors), one full wait per K tile (the promotion point, 4 QGMMAs pipelined before it),
no local-memory spills, the producer's 16 B cp.asyncs (8 of weights, bn / 16 of token rows) and
one 4 B token-scale copy per stage, and setmaxnreg honoured (``Fp8Config``'s split).
"""
from __future__ import annotations

import re
import subprocess

import pytest

from test_compile_sm90 import _registers, k_loop_mix

pytestmark = pytest.mark.kernels

CONFIGS = [
    ("swiglu", 4096, 7168, 128, 0),    # DeepSeek-V3 FC1, compute-bound tile, 1 CTA per SM
    ("swiglu", 4096, 7168, 16, 0),     # DeepSeek-V3 FC1, memory-bound tile, 2 CTAs per SM
    ("swiglu", 4096, 7168, 32, 0),     # DeepSeek-V3 FC1, 2 CTAs per SM
    ("swiglu", 3072, 4096, 32, 0),     # Qwen3-235B FC1, 2 CTAs per SM
    ("scatter", 4096, 1536, 32, 512),  # Qwen3-235B FC2 chunk
    ("scatter", 4096, 1536, 128, 512),  # Qwen3-235B FC2 chunk, compute-bound tile
    ("scatter", 7168, 2048, 64, 896),  # DeepSeek-V3 FC2 chunk
]


def _compile_fp8_sass(tools, tmp_path, *argv) -> str:  # noqa: F811
    import os
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    cuobjdump, nvdisasm = tools
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP_CUBIN="1",
               CUTE_DSL_DUMP_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(here / "_compile_fp8_main.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "C7512" not in proc.stderr and "C7513" not in proc.stderr, proc.stderr[-2000:]
    cubins = list(tmp_path.glob("*.sm_90a.cubin"))
    assert len(cubins) == 1, f"expected one sm_90a cubin in {os.listdir(tmp_path)}"
    env_path = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ["PATH"])
    return subprocess.run([cuobjdump, "-sass", str(cubins[0])], env=env_path,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("kind,n_weight,k,bn,y_cols", CONFIGS)
def test_compiles_to_fp8_qgmma(tools, tmp_path, kind, n_weight, k, bn, y_cols):
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, {})


def _variants():
    from bench.moe_kernels_fp8 import VARIANTS

    for name, (tiles, vbn, overrides) in sorted(VARIANTS.items()):
        # clusters: their own test (multicast copies, cluster barriers)
        if not (overrides.get("cluster2") or overrides.get("mcast_tokens")):
            yield pytest.param(vbn or tiles[0], overrides, id=name)


@pytest.mark.parametrize("kind,n_weight,k,y_cols", [
    ("swiglu", 4096, 7168, 0),     # DeepSeek-V3 FC1
    ("scatter", 4096, 1536, 512),  # Qwen3-235B FC2 chunk
])
@pytest.mark.parametrize("bn,overrides", list(_variants()))
def test_bench_variants_compile(tools, tmp_path, kind, n_weight, k, y_cols, bn, overrides):
    """Every configuration ``bench/moe_kernels_fp8.py --variants`` times builds the design's
    SASS (no spills, 4 pipelined QGMMAs per K tile, setmaxnreg as configured)."""
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, overrides)


@pytest.mark.parametrize("kind,n_weight,k,bn,y_cols", [
    ("swiglu", 4096, 7168, 128, 0), ("scatter", 4096, 1536, 16, 512)])
def test_bulk_weights_compile(tools, tmp_path, kind, n_weight, k, bn, y_cols):
    """``bulk_weights``: one UBLKCP per CTA block and stage (issued straight, no per-lane
    loop), the 16 B cp.asyncs are the token rows' only."""
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, {"bulk_weights": True, "tma": False})


@pytest.mark.parametrize("kind,n_weight,k,bn,y_cols,num_tensors", [
    ("swiglu", 4096, 7168, 128, 0, 1),    # DeepSeek-V3 FC1, composite view
    ("swiglu", 3072, 4096, 16, 0, 3),     # Qwen3-235B FC1, three DWDP sources, 2 CTAs per SM
    ("scatter", 7168, 2048, 128, 896, 2),  # DeepSeek-V3 FC2 chunk, two sources
])
def test_tma_compile(tools, tmp_path, kind, n_weight, k, bn, y_cols, num_tensors):
    """``tma``: every operand by the copy engine from one producer thread - per stage and
    weight tensor one tensor-map copy per box (FC1 8 boxes of 8 interleaved rows per CTA
    block, FC2 one of 64), one for the token tile, one ``cp.async.bulk`` of its scales; no
    cp.async left, the consumers' QGMMA loop as in the other configurations."""
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, {"tma": True},
                num_tensors=num_tensors)


@pytest.mark.parametrize("kind,n_weight,k,num_tensors", [
    ("swiglu", 4096, 7168, 1), ("swiglu", 3072, 4096, 3), ("scatter", 7168, 2048, 2)])
def test_fc1_one_box_compile(tools, tmp_path, kind, n_weight, k, num_tensors):
    """``fc1_one_box``: FC1's 64-row block by one 4-D tensor-map copy per weight tensor and
    CTA block ((8 rows, up / gate, 4 groups, 128 K): 2 UTMALDG.4D where the 2-D boxes take 16);
    FC2's block is one box already, so its kernel is the default's."""
    y_cols = 896 if kind == "scatter" else 0
    _check_sass(tools, tmp_path, kind, n_weight, k, 128, y_cols, {"fc1_one_box": True},
                num_tensors=num_tensors)


@pytest.mark.parametrize("mcast", [0, 1])
@pytest.mark.parametrize("kind,n_weight,k,y_cols", [
    ("swiglu", 4096, 7168, 0), ("scatter", 7168, 2048, 896)])
def test_wide_tile_compile(tools, tmp_path, kind, n_weight, k, y_cols, mcast):
    """``blocks=3`` (128 tokens x 192 weight rows): 4 QGMMA 64x192x32 per K tile, a promotion
    of 96 FFMA with one scale product per (token row, block, FC1 up / gate) - 12 / 6 FMUL -
    after loading each block's scales (6 / 3 LDG, one K tile ahead), and no spills at 232
    consumer registers (producer 40), with the token multicast too."""
    sass = _check_sass(tools, tmp_path, kind, n_weight, k, 128, y_cols,
                       {"blocks": 3, "mcast_tokens": bool(mcast)})
    mix = k_loop_mix(sass, "QGMMA")
    fc1 = kind == "swiglu"
    assert mix["FMUL"] == (12 if fc1 else 6), mix
    assert mix["LDG.E.CONSTANT"] == (6 if fc1 else 3), mix
    assert "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8" in sass


@pytest.mark.parametrize("kind,n_weight,k,y_cols,tma", [
    ("swiglu", 4096, 7168, 0, True), ("scatter", 7168, 2048, 896, True),
    ("swiglu", 3072, 4096, 0, False)])
def test_tokens_m_compile(tools, tmp_path, kind, n_weight, k, y_cols, tma):
    """``tokens_m`` (tokens as WGMMA M, 128 weight rows as N): 4 QGMMA 64x128x32 per K tile
    and a promotion of one FFMA per accumulator (64) with at most 4 scale products, no
    spills - 155 instructions per K tile against the other orientation's ~230."""
    _check_sass(tools, tmp_path, kind, n_weight, k, 128, y_cols,
                {"tma": tma, "tokens_m": True})


CLUSTERS = {"cluster2": ("cluster2=1",), "mcast_x": ("mcast_tokens=1",),
            "cluster4": ("cluster2=1", "mcast_tokens=1"),
            "cluster2_one_box": ("cluster2=1", "fc1_one_box=1"),
            "cluster2_thread_release": ("cluster2=1", "release_per_warp=0"),
            "wide_cluster4_one_box": ("blocks=3", "cluster2=1", "mcast_tokens=1",
                                      "fc1_one_box=1")}


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
@pytest.mark.parametrize("kind,n_weight,k,y_cols,num_tensors", [
    ("swiglu", 4096, 7168, 0, 1), ("scatter", 7168, 2048, 896, 2)])
def test_cluster_compile(tools, tmp_path, cluster, kind, n_weight, k, y_cols, num_tensors):
    """The cluster kernels: ``cluster2``'s weight boxes by multicast tensor-map copies (each
    issued both ways: half to both CTAs when the pair shares an expert, all to this CTA alone
    otherwise), ``mcast_tokens``' token half by one multicast copy (else the token tile by a
    plain one), the cluster barrier at entry and exit; the tokens_m K tile unchanged."""
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import Fp8BlockGemm, fp8_config

    flags = CLUSTERS[cluster]
    cfg = fp8_config(128, **{name: int(v) if name == "blocks" else v == "1"
                             for name, v in (f.split("=") for f in flags)})
    kern = Fp8BlockGemm(epilogue=kind, n_weight=n_weight, k=k, bn=128, y_cols=y_cols,
                        config=cfg, num_tensors=num_tensors)
    sass = _compile_fp8_sass(tools, tmp_path, kind, str(n_weight), str(k), "128", str(y_cols),
                             *flags, f"num_tensors={num_tensors}")
    weight_copies = num_tensors * kern.blocks * kern.boxes  # one per box of the CTA's blocks
    mcast_w = 2 * weight_copies if cfg.cluster2 else 0
    mcast_x = 1 if cfg.mcast_tokens else 0
    dims = "4D" if kern.one_box else "2D"  # FC1's one-box block is a 4-D copy
    assert sass.count(f"UTMALDG.{dims}.MULTICAST") == mcast_w + (mcast_x if dims == "2D" else 0)
    plain = len(re.findall(rf"UTMALDG\.{dims}\b(?!\.)", sass))
    assert plain == (0 if cfg.cluster2 else weight_copies) + (1 - mcast_x if dims == "2D" else 0)
    assert sass.count("UCGABAR_ARV") == 2 and sass.count("UCGABAR_WAIT") == 2
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    mix = k_loop_mix(sass, "QGMMA")
    assert sum(n for op, n in mix.items() if op.startswith("QGMMA")) == 4, mix
    assert mix["FFMA"] == 32 * kern.blocks and mix["FMUL"] <= _scale_products(kind, kern), mix
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 1


@pytest.mark.parametrize("bn,overrides,store", [
    (128, {}, "STG.E "),             # tokens as M: 2 adjacent columns, one 4 B bf16 pair
    (32, {}, "STG.E.U16 "),          # tokens as N: one weight row per accumulator, 2 B
    (128, {"cluster2": True}, "STG.E "),
])
def test_y_bf16_compile(tools, tmp_path, bn, overrides, store):
    """``y_bf16``: FC2 stores its router-weighted rows as bf16 (half the fp32 bytes), rounded
    by the store's conversion; the K loop is the fp32 scratch's."""
    overrides = {"y_bf16": True, **overrides}
    if overrides.get("cluster2"):
        sass = _compile_fp8_sass(tools, tmp_path, "scatter", "7168", "2048", "128", "896",
                                 "cluster2=1", "y_bf16=1")
        assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    else:
        sass = _check_sass(tools, tmp_path, "scatter", 7168, 2048, bn, 896, overrides)
    stores = re.findall(r"\bSTG\.E[.A-Z0-9]* ", sass)
    assert stores and set(stores) == {store}, sorted(set(stores))


def _scale_products(kind, kern) -> int:
    """tokens_m's scale products per K tile at most: one per (token row, weight scale) - two
    rows a thread, one scale block for a block pair (4 at most), 1 (FC2) or 2 (FC1) a block
    for the wide tile."""
    if kern.cfg.pair_scales:
        return 4
    return 2 * (2 if kind == "swiglu" else 1) * kern.blocks


def _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, overrides, num_tensors=1):
    from tensorrt_llm_dwdp.kernels.sm90.fp8_gemm import Fp8BlockGemm, fp8_config

    cfg = fp8_config(bn, **overrides)
    kern = Fp8BlockGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols, config=cfg,
                        num_tensors=num_tensors)
    sass = _compile_fp8_sass(tools, tmp_path, kind, str(n_weight), str(k), str(bn), str(y_cols),
                             *[f"{f}={int(v)}" for f, v in overrides.items()],
                             f"num_tensors={num_tensors}")
    qgmma = re.findall(r"QGMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3 R\d+, gdesc\[UR\d+\], (\S+)", sass)
    # one per k32 step of the 128-wide K tile (the K loop body is not unrolled)
    assert len(qgmma) == kern.k_steps == 4, qgmma
    n_mma = kern.blocks * 64 if cfg.tokens_m else bn  # the MMA's N: weight rows or tokens
    assert {n for n, _ in qgmma} == {str(n_mma)}, qgmma
    # the first step of every K tile overwrites the partial accumulator (scale-d off)
    assert sum("RZ" in a for _, a in qgmma) == 1, qgmma
    assert "HGMMA" not in sass
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    # the K tile's 4 QGMMAs run back to back; the one full wait is the promotion point
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 1, "wgmmas serialized by ptxas"
    mix = k_loop_mix(sass, "QGMMA")
    assert sum(n for op, n in mix.items() if op.startswith("QGMMA")) == 4, mix
    # one FMA per accumulator; the scale products: one per (token column, row half) with the
    # tokens as N, with the tokens as M one per (token row, weight scale): at most 4 for two
    # blocks (one scale block), 2 x 3 x (FC1: 2) for the wide tile
    assert mix["FFMA"] == n_mma // 2, mix
    products = _scale_products(kind, kern) if cfg.tokens_m else (
        (2 if kind == "swiglu" else 1) * (bn // 4))
    assert mix["FMUL"] <= products, mix
    if cfg.tma:
        assert "LDGSTS" not in sass
        if kern.one_box:  # FC1's block as one 4-D box: its up / gate interleave by strides
            assert sass.count("UTMALDG.4D") == num_tensors * kern.blocks
            assert sass.count("UTMALDG.2D") == 1
        else:
            assert sass.count("UTMALDG.2D") == num_tensors * kern.blocks * kern.boxes + 1
        assert sass.count("UBLKCP.S.G") == 1  # the token tile's scales
    else:
        a_copies = 0 if cfg.bulk_weights else kern.a_chunks  # bulk: thread 0's 2 UBLKCP
        assert sass.count("LDGSTS.E.BYPASS.128") == a_copies + kern.b_chunks
        assert sass.count("UBLKCP.S.G") == (2 if cfg.bulk_weights else 0)
        assert len(re.findall(r"LDGSTS\.E \[", sass)) == 1  # the 4 B token scale
    assert "BRA.U.ANY" not in sass, "a per-lane loop around the bulk copies"
    assert f"USETMAXREG.DEALLOC.CTAPOOL {cfg.producer_regs:#x}" in sass
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {cfg.consumer_regs:#x}" in sass
    assert _registers(tools, tmp_path) == cfg.register_pool
    return sass
