"""Run the fused plan kernel under Triton's interpreter (TRITON_INTERPRET=1, set by the caller
before Triton is imported) on CPU tensors, against the torch-op plan, field by field.
Prints one line per case and 'ALL OK' at the end; exits 1 at the first difference."""
import sys

import torch

from tensorrt_llm_dwdp.moe.permute import _torch_plan_tensors, tile_bound
from tensorrt_llm_dwdp.moe.permute_fused import fused_plan_tensors


def cases():
    gen = torch.Generator().manual_seed(0)
    for tokens, k, experts, tile_m in [(1, 1, 1, 16), (16, 8, 256, 16), (37, 4, 16, 8),
                                       (64, 2, 8, 1), (512, 8, 256, 32), (200, 1, 8, 128),
                                       (5, 6, 64, 64), (3, 2, 1020, 16)]:
        scores = torch.rand(tokens, experts, generator=gen)
        ids = torch.topk(scores, min(k, experts), dim=-1).indices.int()
        yield f"T{tokens} k{k} E{experts} tile{tile_m}", ids, experts, tile_m
        holes = ids.clone()
        holes[torch.rand(holes.shape, generator=gen) < 0.3] = -1
        yield f"T{tokens} k{k} E{experts} tile{tile_m} empty slots", holes, experts, tile_m
    skew = torch.zeros(300, 4, dtype=torch.int32)
    skew[:, 1:] = torch.arange(1, 4, dtype=torch.int32)
    yield "all tokens on the same 4 experts", skew, 64, 16
    yield "only empty slots", torch.full((4, 2), -1, dtype=torch.int32), 8, 8
    bad = torch.tensor([[0, 9], [3, -1], [-5, 2]], dtype=torch.int32)
    yield "out-of-range ids", bad, 8, 4
    big = torch.randint(-1, 64, (512, 8), dtype=torch.int32, generator=gen)
    yield "4096 slots", big, 64, 128


def main() -> int:
    for name, ids, experts, tile_m in cases():
        tokens, k = ids.shape
        bound = tile_bound(tokens, k, experts, tile_m)
        want = _torch_plan_tensors(ids, experts, tile_m, bound)
        got = fused_plan_tensors(ids, experts, tile_m, bound)
        for field, t in want.items():
            if got[field].dtype != t.dtype or not torch.equal(got[field], t):
                print(f"{name}: {field} differs\n  fused {got[field].tolist()}\n  torch {t.tolist()}")
                return 1
        print(f"{name}: ok ({int(want['tile_count'][0])} of {bound} tiles)")
    print("ALL OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
