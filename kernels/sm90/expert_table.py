"""The multi-B operand of the grouped GEMMs: S weight tensors resolved per expert in-kernel.

A DWDP rank's weights for one projection are S tensors (own slice + one prefetch buffer per
peer, unequal expert counts allowed). Instead of gathering them into one tensor, the kernel
gets ``table`` (int64 ``[3, S]``: base addresses of each tensor's packed weights, block scales
and alphas) and two int32 maps ``tensor_of_expert[E]`` / ``local_of_expert[E]``; it computes
the expert's address as ``base[t] + local * bytes_per_expert``. S = 1 is the same kernel.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class ExpertTable:
    """Device tables for one projection (all on the weights' device). They hold addresses,
    not references: the caller keeps the weight tensors alive while kernels use the table."""

    table: torch.Tensor
    tensor_of_expert: torch.Tensor
    local_of_expert: torch.Tensor
    rows: int
    k: int
    # host copies of each weight tensor's base address and expert count (tensor-map copies
    # describe every tensor on the host; empty where a table is built without them)
    weight_ptrs: tuple[int, ...] = ()
    experts_per_tensor: tuple[int, ...] = ()

    @property
    def num_tensors(self) -> int:
        return self.table.shape[1]


def build_expert_table(
    weights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    alphas: Sequence[torch.Tensor],
    expert_offsets: Sequence[int],
) -> ExpertTable:
    """Tables for NVFP4 tensors ``weights[t]`` uint8 ``[n_t, rows, K/2]``, ``scales[t]``
    float8_e4m3fn ``[n_t, rows, K/16]`` (the kernels read them in the preshuffled layout,
    ``preshuffle``; the bytes cannot say, the caller checks the tag), ``alphas[t]`` fp32
    ``[n_t]``; tensor t holds global experts ``[expert_offsets[t], expert_offsets[t] + n_t)``.
    Each weight tensor must start on a 16-byte boundary (the kernel's ``cp.async.bulk`` weight
    copies need 16-byte aligned sources; every offset inside a tensor is a multiple of 2 KiB)
    and each scale tensor on an 8-byte one (8 B scale copies): ValueError otherwise."""
    s = len(weights)
    if s == 0 or len(scales) != s or len(alphas) != s or len(expert_offsets) != s:
        raise ValueError(
            f"build_expert_table: need S >= 1 tensors of each kind and S offsets, got "
            f"{len(weights)} weights, {len(scales)} scales, {len(alphas)} alphas, "
            f"{len(expert_offsets)} offsets"
        )
    rows, half_k = weights[0].shape[1:]
    k = 2 * half_k
    device = weights[0].device
    tensor_of, local_of = [], []
    for t, (w, sf, a) in enumerate(zip(weights, scales, alphas)):
        n = w.shape[0]
        if (w.dtype != torch.uint8 or tuple(w.shape) != (n, rows, half_k)
                or sf.dtype != torch.float8_e4m3fn or tuple(sf.shape) != (n, rows, k // 16)
                or a.dtype != torch.float32 or tuple(a.shape) != (n,)):
            raise ValueError(
                f"build_expert_table: tensor {t}: weight {w.dtype} {tuple(w.shape)}, scale "
                f"{sf.dtype} {tuple(sf.shape)}, alpha {a.dtype} {tuple(a.shape)}; expected "
                f"uint8 [n, {rows}, {half_k}], float8_e4m3fn [n, {rows}, {k // 16}], float32 [n]"
            )
        for name, x in (("weight", w), ("scale", sf), ("alpha", a)):
            if not x.is_contiguous():
                raise ValueError(f"build_expert_table: {name} tensor {t} must be contiguous")
            if x.device != device:
                raise ValueError(f"build_expert_table: {name} tensor {t} on {x.device}, not {device}")
        if w.data_ptr() % 16:
            raise ValueError(f"build_expert_table: weight tensor {t} starts at {w.data_ptr():#x}, "
                             f"not on a 16-byte boundary (cp.async.bulk weight copies need one)")
        if sf.data_ptr() % 8:
            raise ValueError(f"build_expert_table: scale tensor {t} starts at {sf.data_ptr():#x}, "
                             f"not on an 8-byte boundary (the 8 B scale copies need one)")
        if expert_offsets[t] != len(tensor_of):
            raise ValueError(
                f"build_expert_table: tensor {t} starts at expert {expert_offsets[t]}, "
                f"expected {len(tensor_of)}"
            )
        tensor_of += [t] * n
        local_of += list(range(n))
    table = torch.tensor(
        [[w.data_ptr() for w in weights], [sf.data_ptr() for sf in scales],
         [a.data_ptr() for a in alphas]], dtype=torch.int64).to(device)
    return ExpertTable(
        table=table,
        tensor_of_expert=torch.tensor(tensor_of, dtype=torch.int32).to(device),
        local_of_expert=torch.tensor(local_of, dtype=torch.int32).to(device),
        rows=rows,
        k=k,
    )
