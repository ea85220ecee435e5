"""The fused FP8 activation quantization (``kernels/sm90/fp8_quant``).

CPU: the kernel compiles for sm_90a in both scale layouts with the design's PTX and SASS.
GPU (sm90): bit for bit ``quant.fp8.quantize_act_per_token`` run on the same device (codes and
scales) on random, zero, tiny, huge and single-token inputs over T x K x layout, with strided
inputs, preallocated outputs guarded by sentinels, a CUDA-graph replay and the dispatcher.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensorrt_llm_dwdp.kernels.compile_cache import CompileCache
from tensorrt_llm_dwdp.quant.fp8 import FP8_DTYPE, quantize_act_per_token

pytestmark = pytest.mark.kernels
HERE = Path(__file__).resolve().parent
LAYOUTS = ("row", "col")


# ---------------------------------------------------------------------------------------------
# Compile checks (CPU)


def _compile(tools, tmp_path, layout: str) -> tuple[str, str, str]:
    """(PTX, SASS, resource usage) of the kernel compiled for sm_90a."""
    cuobjdump, nvdisasm = tools
    env = dict(os.environ, CUTE_DSL_ARCH="sm_90a", CUTE_DSL_KEEP_CUBIN="1",
               CUTE_DSL_KEEP_PTX="1", CUTE_DSL_DUMP_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(HERE / "_compile_fp8_quant_main.py"), layout],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    cubins = list(tmp_path.glob("*.sm_90a.cubin"))
    ptxs = list(tmp_path.glob("*.sm_90a.ptx"))
    assert len(cubins) == 1 and len(ptxs) == 1, os.listdir(tmp_path)
    env_path = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ["PATH"])
    sass = subprocess.run([cuobjdump, "-sass", str(cubins[0])], env=env_path,
                          capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "-res-usage", str(cubins[0])], capture_output=True,
                           text=True, check=True).stdout
    return ptxs[0].read_text(errors="replace"), sass, usage


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiles_to_the_designed_sass(tools, tmp_path, layout):
    """Exact numerics in the PTX (IEEE reciprocal, round-to-nearest multiplies without ftz,
    the saturating e4m3 conversion); in the SASS, per unrolled item: two 16 B read-only loads,
    one 16 B store, three butterfly shuffles, eight e4m3x2 conversions; no local memory."""
    ptx, sass, usage = _compile(tools, tmp_path, layout)
    assert "rcp.rn.f32" in ptx and "div.approx" not in ptx and "rcp.approx" not in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert re.search(r"mul\.rn\.f32", ptx) and not re.search(r"\.ftz\.f32", ptx)
    assert "max.NaN.bf16x2" in ptx and "max.NaN.f32" in ptx
    stores = sass.count("STG.E.128")
    assert stores >= 1
    assert sass.count("LDG.E.128.CONSTANT") == 2 * stores, "two 16 B loads per item"
    assert sass.count("SHFL.BFLY") == 3 * stores, "three butterfly steps per item"
    assert len(re.findall(r"F2FP\.SATFINITE\.E4M3\.F32", sass)) == 8 * stores
    assert not re.search(r"\bFMUL\.FTZ\b", sass), "a flushing multiply"
    assert not re.search(r"\b(LDL|STL)\b", sass), "register spills to local memory"
    assert "LOCAL:0" in usage, usage
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    assert regs <= 48, f"{regs} registers: fewer than 5 CTAs of 256 threads per SM"


# ---------------------------------------------------------------------------------------------
# Device tests (sm90): fail, never skip, when a GPU is present

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cache():
    major, minor = torch.cuda.get_device_capability()
    assert major == 9, (f"the fp8 quantization kernel is sm90-only; this GPU is "
                        f"{torch.cuda.get_device_name()} (sm{major}{minor})")
    return CompileCache()


def _quantize(cache, x, layout, **kw):
    from tensorrt_llm_dwdp.kernels.sm90.fp8_quant import quantize_act_per_token_cuda

    return quantize_act_per_token_cuda(cache, x, scale_layout=layout, **kw)


def _assert_bitwise(x, q, scale, layout):
    """``(q, scale)`` equals the reference on ``x`` bit for bit, in the layout asked for."""
    want_q, want_s = quantize_act_per_token(x)
    t, k = x.shape
    g = k // 128
    assert q.dtype == FP8_DTYPE and tuple(q.shape) == (t, k) and q.is_contiguous()
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (t, g)
    if t > 1 and g > 1:
        assert scale.stride() == ((g, 1) if layout == "row" else (1, t))
    got, want = q.view(torch.uint8), want_q.view(torch.uint8)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} codes differ, first at {bad[0].tolist()}: got "
        f"{got[tuple(bad[0].tolist())].item():#x}, want {want[tuple(bad[0].tolist())].item():#x}"
    )
    bad = (scale.contiguous().view(torch.int32) != want_s.view(torch.int32)).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} scales differ, first at {bad[0].tolist()}: got "
        f"{scale[tuple(bad[0].tolist())].item()!r}, want {want_s[tuple(bad[0].tolist())].item()!r}"
    )


def _random(t: int, k: int, seed: int) -> torch.Tensor:
    """Normal values with a random power-of-two magnitude per (token, group), 2^-24 .. 2^24,
    so groups land below and above the amax floor and every e4m3 exponent is used."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(t, k // 128, 128, device="cuda", generator=gen)
    mag = torch.randint(-24, 25, (t, k // 128, 1), device="cuda", generator=gen).float()
    return (x * torch.exp2(mag)).reshape(t, k).to(torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [128, 512, 1536, 7168, 18432])
@pytest.mark.parametrize("t", [1, 3, 17, 300, 16384])
def test_bitwise_random(cache, t, k, layout):
    x = _random(t, k, seed=t * 100003 + k)
    q, scale = _quantize(cache, x, layout)
    _assert_bitwise(x, q, scale, layout)


def _ties(k: int) -> torch.Tensor:
    """Per group: 448 first (so r = rn(rn(1/448) * 448) = 1 exactly), then values halfway
    between adjacent e4m3 codes (normal and subnormal, alternating signs): nearest-even ties."""
    mids = [(8 + m + 0.5) * 2.0**e for e in range(-6, 5) for m in range(8)]
    mids += [(m + 0.5) * 2.0**-9 for m in range(8)]
    body = torch.tensor((mids * 2)[:127], device="cuda")
    body = body * torch.where(torch.arange(127, device="cuda") % 2 == 0, 1.0, -1.0)
    group = torch.cat([torch.tensor([448.0], device="cuda"), body])
    return group.repeat(k // 128)


def _special_rows(k: int) -> torch.Tensor:
    """One row per case: zeros, negative zeros, tiny (below the floor, bf16 subnormals among
    them), huge (near the bf16 maximum: the reciprocal is subnormal), one outlier per group
    over tiny values (e4m3 subnormal codes and flushes to zero), exact powers of two, values on
    e4m3 rounding ties, +-7 in every position (every code is +-448)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    rnd = torch.randn(k, device="cuda", generator=gen)
    bf16_max = torch.finfo(torch.bfloat16).max
    rows = [
        torch.zeros(k, device="cuda"),
        -torch.zeros(k, device="cuda"),
        rnd * 1e-6,
        rnd * 1e-39,
        torch.full((k,), 9.9e-5, device="cuda") * torch.sign(rnd),
        torch.full((k,), bf16_max, device="cuda") * torch.sign(rnd),
        rnd.clamp(-1, 1) * bf16_max,
        torch.where(torch.arange(k, device="cuda") % 128 == 5, 3.0e3, rnd * 1e-3),
        torch.exp2(torch.randint(-30, 30, (k,), device="cuda", generator=gen).float()),
        _ties(k),
        torch.where(rnd > 0, 1.0, -1.0) * 7.0,
    ]
    return torch.stack(rows).to(torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [128, 7168])
def test_bitwise_special_values(cache, k, layout):
    x = _special_rows(k)
    q, scale = _quantize(cache, x, layout)
    _assert_bitwise(x, q, scale, layout)
    codes = q.view(torch.uint8)
    assert (codes[0] == 0).all() and (codes[1] == 0x80).all(), "zeros keep their sign"
    assert ((codes[5] & 0x7F) == 0x7E).all() and ((codes[10] & 0x7F) == 0x7E).all(), (
        "+-amax is +-448")
    for t in (0, 1, 2, 3, 4):  # below the floor: the floor's scale
        assert torch.equal(scale[t], scale[0])


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_token_every_width(cache, layout):
    """T = 1 with K from one group to 144 groups: every item count below and above a
    CTA's 32 items."""
    for groups in (1, 2, 31, 32, 33, 56, 144):
        x = _random(1, groups * 128, seed=groups)
        q, scale = _quantize(cache, x, layout)
        _assert_bitwise(x, q, scale, layout)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_input_and_preallocated_outputs(cache, layout):
    """A row-strided view in; outputs written into views of larger buffers whose other bytes
    (sentinels) stay untouched; a second call into the same outputs overwrites them fully."""
    t, k = 300, 1536
    g = k // 128
    wide = _random(t, k + 256, seed=5)
    x = wide[:, 128:128 + k]
    q_buf = torch.full((t + 2, k), 0x55, dtype=torch.uint8, device="cuda")
    out = q_buf[1:t + 1].view(FP8_DTYPE)
    s_buf = torch.full((t * g + 64,), -7.0, device="cuda")
    body = s_buf[32:32 + t * g]
    scale_out = body.view(t, g) if layout == "row" else body.view(g, t).t()
    for seed in (5, 6):
        if seed == 6:
            x = x.neg()
        q, scale = _quantize(cache, x, layout, out=out, scale_out=scale_out)
        assert q.data_ptr() == out.data_ptr() and scale.data_ptr() == scale_out.data_ptr()
        _assert_bitwise(x, q, scale, layout)
    assert (q_buf[0] == 0x55).all() and (q_buf[t + 1] == 0x55).all(), "q written out of bounds"
    assert (s_buf[:32] == -7).all() and (s_buf[32 + t * g:] == -7).all(), "scale out of bounds"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_graph_replay(cache, layout):
    """Captured once (outputs preallocated), replayed on new contents of the static input."""
    t, k = 17, 7168
    x = _random(t, k, seed=1)
    out = torch.empty(t, k, dtype=FP8_DTYPE, device="cuda")
    g = k // 128
    scale_out = (torch.empty(t, g, device="cuda") if layout == "row"
                 else torch.empty(g, t, device="cuda").t())
    _quantize(cache, x, layout, out=out, scale_out=scale_out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _quantize(cache, x, layout, out=out, scale_out=scale_out)
    for seed in (2, 3):
        x.copy_(_random(t, k, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        _assert_bitwise(x, out, scale_out, layout)


@gpu
@pytest.mark.gpu
def test_non_finite_inputs_propagate(cache):
    """No host-side check: a NaN gives its group a NaN scale, an inf an inf scale; the other
    groups are the reference's."""
    x = _random(4, 512, seed=9)
    x[1, 130] = float("nan")
    x[2, 300] = float("inf")
    q, scale = _quantize(cache, x, "row")
    assert torch.isnan(scale[1, 1]) and torch.isinf(scale[2, 2])
    clean = x.clone()
    clean[1, 128:256] = 0
    clean[2, 256:384] = 0
    want_q, want_s = quantize_act_per_token(clean)
    keep = torch.ones(4, 4, dtype=torch.bool, device="cuda")
    keep[1, 1] = keep[2, 2] = False
    assert torch.equal(scale[keep], want_s[keep])
    keep_q = keep.repeat_interleave(128, dim=1)
    assert torch.equal(q.view(torch.uint8)[keep_q], want_q.view(torch.uint8)[keep_q])


@gpu
@pytest.mark.gpu
def test_bad_arguments_rejected_before_launch(cache):
    x = _random(4, 256, seed=0)
    with pytest.raises(ValueError, match="multiple of 128"):
        _quantize(cache, torch.zeros(4, 200, dtype=torch.bfloat16, device="cuda"), "row")
    with pytest.raises(ValueError, match="16-byte aligned"):
        _quantize(cache, x.view(-1)[4:4 + 4 * 128].view(4, 128), "row")
    with pytest.raises(ValueError, match="rows must be contiguous"):
        _quantize(cache, x[:, ::2], "row")
    with pytest.raises(TypeError, match="out must be"):
        _quantize(cache, x, "row", out=torch.empty(4, 256, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match="strides"):
        _quantize(cache, x, "col", scale_out=torch.empty(4, 2, device="cuda"))
    with pytest.raises(ValueError, match="scale_layout"):
        _quantize(cache, x, "diag")
    q, scale = _quantize(cache, x[:0], "col")
    assert q.shape == (0, 256) and scale.shape == (0, 2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dispatcher_takes_the_kernel(cache, layout):
    from tensorrt_llm_dwdp.quant.fp8_device import kernel_applies, quantize_act_per_token_fast

    fresh = CompileCache()
    x = _random(300, 7168, seed=4)
    assert kernel_applies(x)
    q, scale = quantize_act_per_token_fast(x, scale_layout=layout, cache=fresh)
    assert len(fresh) == 1, "the dispatcher did not run the kernel"
    _assert_bitwise(x, q, scale, layout)
    odd = _random(5, 256, seed=8)[:, :200]  # K not a multiple of 128: the reference
    assert not kernel_applies(odd)
    q, scale = quantize_act_per_token_fast(odd, scale_layout=layout, cache=fresh)
    want_q, want_s = quantize_act_per_token(odd)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(scale, want_s) and len(fresh) == 1
