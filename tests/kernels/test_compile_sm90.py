"""The sm90 kernels compile for sm_90a on a CPU-only machine and their SASS is the design's.

Each configuration compiles in a subprocess (the DSL reads CUTE_DSL_* at import) into a temp
dump dir; cuobjdump (nvidia-cuda-cuobjdump, with nvdisasm from nvidia-cuda-nvdisasm) then
disassembles the cubin. Checks: warpgroup MMAs with the A operand in registers (RS HGMMA),
pipelined (not serialized by ptxas), no local-memory spills (LDL/STL), the preshuffled weights
moved by one bulk copy per CTA block (UBLKCP, no per-lane loop, no per-thread weight cp.async:
the LDGSTS are the token rows' and the scales' only), the consumer K loop's decode (2 shared
loads per pair, no byte select, HMUL2.BF16 scale multiply), and setmaxnreg honoured (the launch
pool of ``RsConfig.register_pool`` registers, split as configured).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.rs_variants import occupancy_configs

pytestmark = pytest.mark.kernels
HERE = Path(__file__).resolve().parent


def _compile_sass(tools, tmp_path, *argv) -> str:
    cuobjdump, nvdisasm = tools
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP_CUBIN="1",
               CUTE_DSL_DUMP_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "_compile_sm90_main.py"), *argv],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cubins = list(tmp_path.glob("*.sm_90a.cubin"))
    assert len(cubins) == 1, f"expected one sm_90a cubin in {os.listdir(tmp_path)}"
    env_path = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ["PATH"])
    return subprocess.run([cuobjdump, "-sass", str(cubins[0])], env=env_path,
                          capture_output=True, text=True, check=True).stdout


CONFIGS = [
    ("swiglu", 4096, 7168, 16, 0),    # DeepSeek-V3 FC1, memory-bound: 2 CTAs per SM
    ("swiglu", 3072, 4096, 64, 0),    # Qwen3-235B FC1, K tile 128
    ("scatter", 2880, 2880, 128, 384),  # FC2 with K = 2880 (K tile 64), 256 rows per CTA
]


@pytest.mark.parametrize("kind,n_weight,k,bn,y_cols", CONFIGS)
def test_compiles_to_register_a_hgmma(tools, tmp_path, kind, n_weight, k, bn, y_cols):
    """The weights reach WGMMA from registers: every HGMMA reads A from a register (``R..``,
    not a ``gdesc``) and B through a descriptor. Weights move by one UBLKCP per CTA block and
    stage, issued straight (no per-lane ``BRA.U.ANY`` loop); the 16 B cp.asyncs are the token
    rows' only (``b_chunks`` per thread), the 8 B ones the raw scales' (``raw_bytes``)."""
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, {})


@pytest.mark.parametrize("kind,n_weight,k,y_cols", [
    ("swiglu", 4096, 7168, 0),     # DeepSeek-V3 FC1
    ("scatter", 4096, 1536, 512),  # Qwen3-235B FC2 (a chunk of 8 blocks)
])
@pytest.mark.parametrize("bn,overrides", [pytest.param(bn, fields, id=name)
                                          for name, bn, fields in occupancy_configs()])
def test_occupancy_candidate_compiles(tools, tmp_path, kind, n_weight, k, y_cols, bn,
                                      overrides):
    """Every occupancy candidate the next device call times (more CTAs per SM, one 64-row block
    per consumer warpgroup) builds the design's SASS: no spills, wgmmas not serialized (at
    3 CTAs per SM a ring of 2 still fits 56 registers at bn <= 32; bn 64 cannot: ptxas needs
    62 for one 64x64 wgmma, C7602), setmaxnreg honoured."""
    _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, overrides)


def _check_sass(tools, tmp_path, kind, n_weight, k, bn, y_cols, overrides):
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import W4A16RsGemm, rs_config

    kern = W4A16RsGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols,
                       config=rs_config(bn, k, **overrides))
    cfg = kern.cfg
    sass = _compile_sass(tools, tmp_path, kind, str(n_weight), str(k), str(bn), str(y_cols),
                         *[f"{f}={int(v)}" for f, v in overrides.items()])
    assert sass.count("UBLKCP.S.G") == cfg.blocks_per_cta, "one bulk copy per block"
    assert "BRA.U.ANY" not in sass, "a per-lane loop around the bulk copies"
    assert sass.count("LDGSTS.E.BYPASS.128") == kern.b_chunks, "16 B cp.async beyond the B rows"
    assert sass.count("LDGSTS.E.64") == kern.raw_bytes // 8, "scale copies"
    hgmma = re.findall(r"HGMMA\.64x(\d+)x16\.F32\.BF16 R\d+, (\S+), gdesc", sass)
    # One HGMMA per block and k16 step, in the peeled first K tile and in the K loop.
    assert len(hgmma) == 2 * cfg.blocks_per_wg * cfg.k_tile // 16, hgmma
    assert {n for n, _ in hgmma} == {str(bn)}, hgmma
    assert all(re.fullmatch(r"R\d+,?", a) for _, a in hgmma), f"A not from registers: {hgmma}"
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    # ptxas keeps the wgmmas pipelined: the only full wait is the tile's final drain (a
    # serialized schedule, ptxas C7513 / C7512, waits for 0 groups after every HGMMA).
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 1, "wgmma serialized by ptxas"
    assert f"USETMAXREG.DEALLOC.CTAPOOL {cfg.producer_regs:#x}" in sass
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {cfg.consumer_regs:#x}" in sass
    assert _registers(tools, tmp_path) == cfg.register_pool  # what setmaxnreg redistributes
    # The consumer's K loop per k32 pair: one 16 B load of two pairs' weight words per block
    # and one of the scale pairs (2 LDS per pair at 2 blocks per warpgroup, 1.5 at 1), no byte
    # select (PRMT), 8 HMUL2 per block (the block scales), and at most 100 instructions per
    # pair and consumer warp at 2 blocks (CPU-measured 85 / 80 / 94 for the three CONFIGS; the
    # linear layout's decode took 124.5-145.5, kernels/NOTES.md), 60 at 1 block (45-58.5).
    pairs, bpw = cfg.k_tile // 32, cfg.blocks_per_wg
    mix = k_loop_mix(sass)
    assert _count(mix, "LDS") == pairs + bpw * pairs // 2, mix
    assert _count(mix, "PRMT") == 0, mix
    assert _count(mix, "HMUL2.BF16") == 8 * bpw * pairs, mix
    assert _count(mix, "HGMMA") == 2 * bpw * pairs, mix
    assert sum(mix.values()) <= (100 if bpw == 2 else 60) * pairs, (sum(mix.values()) / pairs,
                                                                    mix)
    return sass


@pytest.mark.parametrize("bn", [16, 128])
def test_y_bf16_scratch_compiles(tools, tmp_path, bn):
    """``RsConfig.y_bf16``: FC2's router-weighted rows stored as 2 B bf16 (the fp32 scratch
    stores 4 B), the K loop and everything else as the default's."""
    sass = _check_sass(tools, tmp_path, "scatter", 7168, 2048, bn, 768, {"y_bf16": True})
    stores = re.findall(r"\bSTG\.E[.A-Z0-9]* ", sass)
    assert stores and set(stores) == {"STG.E.U16 "}, sorted(set(stores))


def k_loop_mix(sass: str, mma: str = "HGMMA") -> collections.Counter:
    """Opcode counts of the innermost loop holding an ``mma`` (the consumer's K-tile loop)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())))
    spans = []
    for addr, text in ins:
        m = re.match(r"BRA\b.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
            if any(t.startswith(mma) for t in body):
                spans.append(body)
    body = min(spans, key=len)
    return collections.Counter(t.split()[0] for t in body)


def _count(mix: collections.Counter, prefix: str) -> int:
    return sum(n for op, n in mix.items() if op.startswith(prefix))


def _registers(tools, tmp_path) -> int:
    cubin = next(tmp_path.glob("*.sm_90a.cubin"))
    usage = subprocess.run([tools[0], "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    return int(re.search(r"REG:(\d+)", usage).group(1))


def test_slot_sum_compiles_with_wide_loads(tools, tmp_path):
    sass = _compile_sass(tools, tmp_path, "slot_sum", "0", "0", "0")
    assert sass.count("LDG.E.128.CONSTANT") == 8  # one 16 B load per slot (top-k = 8)
    assert "STG.E.64" in sass


def test_slot_sum_bf16_scratch_loads_8_bytes_per_slot(tools, tmp_path):
    """bf16 scratch rows (FP8 FC2's ``y_bf16``): one 8 B load of 4 bf16 per slot, widened to
    fp32 by shifts and masks (no conversion instruction), the same 8 B bf16 store."""
    sass = _compile_sass(tools, tmp_path, "slot_sum", "bf16", "0", "0")
    assert sass.count("LDG.E.64.CONSTANT") == 8, sass.count("LDG.E")
    assert "LDG.E.128" not in sass
    assert "F2F.F32" not in sass  # the only conversions are the store's F2FP packs
    assert "STG.E.64" in sass


W4A8_CONFIGS = [
    ("swiglu", 4096, 7168, 16, 0),      # DeepSeek-V3 FC1, memory-bound: 2 CTAs per SM
    ("swiglu", 4096, 7168, 32, 0),      # one 64-row block per consumer warpgroup
    ("swiglu", 3072, 4096, 64, 0),      # Qwen3-235B FC1, 1 CTA per SM
    ("scatter", 7168, 2048, 128, 512),  # DeepSeek-V3 FC2, compute-bound tile
]


@pytest.mark.parametrize("kind,n_weight,k,bn,y_cols", W4A8_CONFIGS)
def test_w4a8_compiles_to_register_a_qgmma(tools, tmp_path, kind, n_weight, k, bn, y_cols):
    """compute="e4m3": every warpgroup MMA is an fp8 QGMMA (e4m3 x e4m3, k32) with A from
    registers and B through a descriptor, one per block and k32 pair in the peeled first K tile
    and in the K loop; the only full waits are the two per-stage promotion points (ptxas did not
    serialize the pairs); no spills; setmaxnreg as configured. In the K loop, per block and pair:
    8 e4m3 -> f16 conversions, 8 HMUL2 (the block scales) and 8 RN f16 -> e4m3 conversions (4
    per preshuffled word, two words per pair), and the fp32 promotion (one FFMA per accumulator
    after the first K tile)."""
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import W4A16RsGemm

    kern = W4A16RsGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols,
                       compute="e4m3")
    cfg = kern.cfg
    sass = _compile_sass(tools, tmp_path, kind, str(n_weight), str(k), str(bn), str(y_cols),
                         "compute=e4m3")
    assert "HGMMA" not in sass
    qgmma = re.findall(r"QGMMA\.64x(\d+)x32\.F32\.E4M3\.E4M3 R\d+, (\S+), gdesc", sass)
    pairs, bpw = cfg.k_tile // 32, cfg.blocks_per_wg
    assert len(qgmma) == 2 * bpw * pairs, qgmma
    assert {n for n, _ in qgmma} == {str(bn)}, qgmma
    assert all(re.fullmatch(r"R\d+,?", a) for _, a in qgmma), f"A not from registers: {qgmma}"
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 2, "wgmma serialized by ptxas"
    assert sass.count("UBLKCP.S.G") == cfg.blocks_per_cta, "one bulk copy per block"
    assert sass.count("LDGSTS.E.BYPASS.128") == kern.b_chunks, "16 B cp.async beyond the B rows"
    assert f"USETMAXREG.DEALLOC.CTAPOOL {cfg.producer_regs:#x}" in sass
    assert f"USETMAXREG.TRY_ALLOC.CTAPOOL UP0, {cfg.consumer_regs:#x}" in sass
    assert _registers(tools, tmp_path) == cfg.register_pool
    mix = k_loop_mix(sass, "QGMMA")
    assert _count(mix, "QGMMA") == bpw * pairs, mix
    assert _count(mix, "F2FP.F16.E4M3") == 8 * bpw * pairs, mix
    assert _count(mix, "F2FP.SATFINITE.E4M3.F16") == 8 * bpw * pairs, mix
    assert _count(mix, "HMUL2") == 8 * bpw * pairs, mix
    assert _count(mix, "FFMA") >= bpw * bn // 2, mix  # the promotion


@pytest.mark.parametrize("name", ["ring4", "bn64_2cta_1blk"])
def test_w4a8_variants_compile_clean(tools, tmp_path, name):
    """Each W4A8 configuration ``bench/w4a8_kernels.py --variants`` times (on its largest
    token tile) builds without spills and with the pairs pipelined."""
    from bench.w4a8_kernels import VARIANTS
    from tensorrt_llm_dwdp.kernels.sm90.w4a16_rs_gemm import W4A16RsGemm, rs_config

    tiles, fields = VARIANTS[name]
    bn = max(tiles)
    kind, n_weight, k, y_cols = ("scatter", 7168, 2048, 512) if bn == 128 else \
        ("swiglu", 4096, 7168, 0)
    cfg = rs_config(bn, k, "e4m3", **fields)
    W4A16RsGemm(epilogue=kind, n_weight=n_weight, k=k, bn=bn, y_cols=y_cols, config=cfg,
                compute="e4m3")
    sass = _compile_sass(tools, tmp_path, kind, str(n_weight), str(k), str(bn), str(y_cols),
                         "compute=e4m3", *[f"{f}={v}" for f, v in fields.items()])
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    assert sass.count("WARPGROUP.DEPBAR.LE gsb0, 0x0") == 2, "wgmma serialized by ptxas"
    assert sass.count("QGMMA") == 2 * cfg.blocks_per_wg * cfg.k_tile // 32
    assert _registers(tools, tmp_path) == cfg.register_pool
