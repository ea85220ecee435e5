"""bench/fast_moe.py keeps the torch reference's numerics: bitwise on CPU, close on GPU."""
import pytest
import torch

from bench.fast_moe import FastTorchMoeBackend, decode_bf16
from tensorrt_llm_dwdp.moe.backends.torch_ref import TorchMoeBackend
from tensorrt_llm_dwdp.moe.weights import ExpertWeights
from tensorrt_llm_dwdp.quant.nvfp4 import dequantize_nvfp4, quantize_nvfp4_per_leading


def _weights(e, h, i, device, seed=0, split=None):
    g = torch.Generator().manual_seed(seed)
    w13 = quantize_nvfp4_per_leading((torch.randn(e, 2 * i, h, generator=g) * 0.05).bfloat16())
    w2 = quantize_nvfp4_per_leading((torch.randn(e, h, i, generator=g) * 0.05).bfloat16())
    full = {"w3_w1_weight": w13.packed, "w3_w1_weight_scale": w13.scale, "fc31_alpha": w13.global_scale,
            "w2_weight": w2.packed, "w2_weight_scale": w2.scale, "fc2_alpha": w2.global_scale}
    full = {k: v.to(device) for k, v in full.items()}
    if split is None:
        return ExpertWeights.single(full)
    view = {k: list(torch.split(v, split)) for k, v in full.items()}
    offsets = [sum(split[:t]) for t in range(len(split))]
    return ExpertWeights.from_view(view, offsets)


def _inputs(t, h, e, k, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    w = torch.rand(t, k, generator=g)
    return x.to(device), ids.to(device), w.to(device)


def test_decode_bf16_is_exact():
    w = _weights(3, 64, 32, "cpu")
    got = decode_bf16(w.tensors["w3_w1_weight"][0], w.tensors["w3_w1_weight_scale"][0])
    ref = dequantize_nvfp4(w.tensors["w3_w1_weight"][0], w.tensors["w3_w1_weight_scale"][0], None)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.float(), ref)


@pytest.mark.parametrize("split", [None, [5, 14, 1]])
def test_cpu_bitwise_equal_to_reference(split):
    e, h, i, k = 20, 64, 32, 4     # 20 experts: more than one decode chunk of 16
    w = _weights(e, h, i, "cpu", split=split)
    x, ids, tw = _inputs(33, h, e, k, "cpu")
    assert torch.equal(FastTorchMoeBackend().run_experts(x, ids, tw, w),
                       TorchMoeBackend().run_experts(x, ids, tw, w))


@pytest.mark.gpu
def test_gpu_close_to_reference():
    e, h, i, k = 20, 256, 128, 4
    w = _weights(e, h, i, "cuda")
    x, ids, tw = _inputs(65, h, e, k, "cuda")
    got = FastTorchMoeBackend().run_experts(x, ids, tw, w).float()
    ref = TorchMoeBackend().run_experts(x, ids, tw, w).float()
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_triton_decode_is_bitwise_the_pytorch_decode():
    """Every byte with every non-NaN e4m3 scale, through Triton's CPU interpreter (a
    subprocess: the interpreter is chosen when triton is imported)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from bench.nvfp4_decode_triton import decode_bf16_triton\n"
        "from bench.fast_moe import decode_bf16\n"
        "scales = torch.tensor([b for b in range(256) if b not in (0x7F, 0xFF)], dtype=torch.uint8)\n"
        "packed = torch.arange(256, dtype=torch.uint8).repeat(scales.numel()).view(-1, 32, 8)\n"
        "scale = scales.repeat_interleave(32).view(-1, 32, 1).view(torch.float8_e4m3fn)\n"
        "a, b = decode_bf16_triton(packed, scale, block=512), decode_bf16(packed, scale)\n"
        "assert torch.equal(a.view(torch.int16), b.view(torch.int16))\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=root)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
