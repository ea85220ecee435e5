"""The one-launch Triton plan kernel: bit for bit the torch-op plan (run by Triton's interpreter
on the CPU, where there is no GPU), and compiled for sm_90a. Needs Triton (the device image has
it); on a machine without it these tests skip and the torch-op path is the only one."""
import os
import subprocess
import sys

import pytest
import torch

from tensorrt_llm_dwdp.moe.permute import build_permutation

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_fused_plan_equals_the_torch_plan_in_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_permute_fused_main.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_fused_kernel_compiles_for_sm90():
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from tensorrt_llm_dwdp.moe.permute_fused import _plan_kernel

    ptr = "*i32"
    signature = {"ids_ptr": ptr, "counts_ptr": ptr, "offsets_ptr": ptr, "gather_ptr": ptr,
                 "slot_ptr": ptr, "inverse_ptr": ptr, "tile_expert_ptr": ptr,
                 "tile_count_ptr": ptr, "error_ptr": "*i64", "scratch_ptr": ptr,
                 "n": "i32", "num_experts": "i32", "top_k": "i32", "tile_m": "i32",
                 "num_tiles": "i32"}
    for block_n, block_e in ((128, 512), (4096, 1024), (16, 16)):
        src = triton.compiler.ASTSource(fn=_plan_kernel, signature=signature, constexprs={
            "BLOCK_N": block_n, "BLOCK_E": block_e, "ROWS": 1024, "TILES": 32})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "bar.sync" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0


def test_fused_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="fused"):
        build_permutation(torch.zeros(2, 2, dtype=torch.int32), 4, fused=True)


@pytest.mark.gpu
def test_fused_plan_on_the_device_equals_the_torch_plan_without_a_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    pytest.importorskip("triton", reason="the device image ships Triton")
    gen = torch.Generator().manual_seed(11)
    names = ("counts", "expert_offsets", "gather_index", "slot_index", "inverse",
             "tile_expert", "tile_count", "error")
    for tokens, k, experts, tile_m in [(16, 8, 256, 16), (170, 6, 64, 16), (64, 2, 8, 16),
                                       (512, 8, 256, 32), (1, 1, 1, 128)]:
        ids = torch.topk(torch.rand(tokens, experts, generator=gen), k, dim=-1).indices.int()
        ids[torch.rand(tokens, k, generator=gen) < 0.1] = -1
        ids = ids.cuda()
        want = build_permutation(ids, experts, tile_m, fused=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = build_permutation(ids, experts, tile_m, fused=True)
            auto = build_permutation(ids, experts, tile_m)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for name in names:
            assert torch.equal(getattr(got, name), getattr(want, name)), (tokens, name)
            assert torch.equal(getattr(auto, name), getattr(want, name)), (tokens, name)
    bad = torch.tensor([[0, 300]], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="expert id 300"):
        build_permutation(bad, 256, 16, fused=True).check()
