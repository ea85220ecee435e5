"""ExpertWeights: one MoE layer's routed experts as a LIST of tensors per parameter.

With DWDP a rank's view of a layer is S tensors per parameter (heads of lower peers, its own
slice, tails of higher peers; see docs/ARCHITECTURE.md); without it, one tensor holding all
experts. Tensor ``t`` holds experts ``[expert_offsets[t], expert_offsets[t] + n_t)`` and the
tensors together cover ``[0, num_experts)`` exactly once, in order.

Parameter names, shapes and dtypes: ``moe/specs.py`` (the one definition). ``weight_layout``
says how NVFP4 weights are ordered within each expert (``moe/layouts.py``: ``linear``, the
checkpoint's rows, or ``preshuffled``, what the sm90 kernels read); whoever builds a set from
permuted bytes tags it, and readers that need linear rows use ``linear_expert`` / ``to_linear``.
"""
from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tensorrt_llm_dwdp.moe.layouts import LINEAR, check_layout, to_linear
from tensorrt_llm_dwdp.moe.specs import BIAS_NAMES, REQUIRED_NAMES, check_sizes, expert_specs


def _detect_quant(dtype: torch.dtype) -> str:
    if dtype == torch.uint8:
        return "nvfp4"
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    raise ValueError(
        f"ExpertWeights: w3_w1_weight dtype {dtype} is not uint8 (nvfp4), bfloat16 or "
        "float8_e4m3fn (fp8)"
    )


@dataclass(frozen=True, eq=False)
class ExpertWeights:
    """A validated multi-tensor view of one layer's experts. Build with :meth:`single` or
    :meth:`from_view`; the constructor validates too."""

    tensors: Mapping[str, tuple[torch.Tensor, ...]]
    expert_offsets: tuple[int, ...]
    weight_layout: str = LINEAR
    # Derived in __post_init__:
    quant: str = field(init=False)
    hidden_size: int = field(init=False)
    intermediate_size: int = field(init=False)
    num_experts: int = field(init=False)

    def __post_init__(self) -> None:
        if "w3_w1_weight" not in self.tensors:
            raise ValueError(
                f"ExpertWeights: missing 'w3_w1_weight' (got {sorted(self.tensors)})"
            )
        first = self.tensors["w3_w1_weight"]
        if not first:
            raise ValueError("ExpertWeights: 'w3_w1_weight' has no tensors")
        quant = _detect_quant(first[0].dtype)
        missing = [n for n in REQUIRED_NAMES[quant] if n not in self.tensors]
        if missing:
            raise ValueError(f"ExpertWeights ({quant}): missing parameters {missing}")
        allowed = set(REQUIRED_NAMES[quant]) | set(BIAS_NAMES)
        unknown = sorted(set(self.tensors) - allowed)
        if unknown:
            raise ValueError(
                f"ExpertWeights ({quant}): unknown parameters {unknown}; allowed {sorted(allowed)}"
            )
        w13, w2 = first[0], self.tensors["w2_weight"][0]
        if w13.dim() != 3 or w2.dim() != 3:
            raise ValueError(
                f"ExpertWeights: w3_w1_weight {tuple(w13.shape)} and w2_weight "
                f"{tuple(w2.shape)} must be 3-D [n, rows, cols]"
            )
        hidden = w2.shape[1]
        inter = w13.shape[1] // 2
        if w13.shape[1] % 2 or inter == 0:
            raise ValueError(
                f"ExpertWeights: w3_w1_weight rows {w13.shape[1]} must be 2*I with I > 0"
            )
        try:
            check_sizes(quant, hidden, inter)
        except ValueError as exc:
            raise ValueError(f"ExpertWeights ({quant}): {exc}") from None
        try:
            check_layout(self.weight_layout, quant, hidden, inter)
        except ValueError as exc:
            raise ValueError(f"ExpertWeights ({quant}, H={hidden}, I={inter}): {exc}") from None
        n_tensors = len(first)
        if len(self.expert_offsets) != n_tensors:
            raise ValueError(
                f"ExpertWeights: {len(self.expert_offsets)} expert offsets for {n_tensors} tensors"
            )
        specs = expert_specs(quant, hidden, inter, bias=True)
        sizes = [t.shape[0] for t in first]
        for name, tensors in self.tensors.items():
            if len(tensors) != n_tensors:
                raise ValueError(
                    f"ExpertWeights: '{name}' has {len(tensors)} tensors, w3_w1_weight {n_tensors}"
                )
            dtype = specs[name].dtype
            for t, tensor in enumerate(tensors):
                want = specs[name].shape(sizes[t])
                if tensor.dtype != dtype or tuple(tensor.shape) != want:
                    raise ValueError(
                        f"ExpertWeights ({quant}, H={hidden}, I={inter}): '{name}'[{t}] is "
                        f"{tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {want}"
                    )
                if tensor.device != w13.device:
                    raise ValueError(
                        f"ExpertWeights: '{name}'[{t}] on {tensor.device}, w3_w1_weight[0] on "
                        f"{w13.device}"
                    )
        expected = 0
        for t, (offset, size) in enumerate(zip(self.expert_offsets, sizes)):
            if offset != expected:
                raise ValueError(
                    f"ExpertWeights: tensor {t} starts at expert {offset}, expected {expected} "
                    f"(tensors must cover [0, E) contiguously; sizes {sizes}, offsets "
                    f"{list(self.expert_offsets)})"
                )
            expected += size
        if expected == 0:
            raise ValueError("ExpertWeights: the view holds no experts")
        object.__setattr__(self, "quant", quant)
        object.__setattr__(self, "hidden_size", hidden)
        object.__setattr__(self, "intermediate_size", inter)
        object.__setattr__(self, "num_experts", expected)

    @classmethod
    def single(cls, params: Mapping[str, torch.Tensor],
               weight_layout: str = LINEAR) -> ExpertWeights:
        """One tensor per name holding experts ``[0, n)``."""
        return cls({name: (t,) for name, t in params.items()}, (0,), weight_layout)

    @classmethod
    def from_view(
        cls, view: Mapping[str, Sequence[torch.Tensor]], tensor_offsets: Sequence[int],
        weight_layout: str = LINEAR,
    ) -> ExpertWeights:
        """A DWDP view ``{name: [S tensors by rank]}`` with ``layout.tensor_offsets``."""
        return cls({name: tuple(ts) for name, ts in view.items()},
                   tuple(int(o) for o in tensor_offsets), weight_layout)

    @property
    def num_tensors(self) -> int:
        return len(self.expert_offsets)

    @property
    def has_bias(self) -> bool:
        return "w3_w1_bias" in self.tensors or "w2_bias" in self.tensors

    def tensor_sizes(self) -> tuple[int, ...]:
        """Experts held by each tensor."""
        return tuple(t.shape[0] for t in self.tensors["w3_w1_weight"])

    def locate(self, expert: int) -> tuple[int, int]:
        """Global expert id -> (tensor index, local index)."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"ExpertWeights.locate: expert {expert} not in [0, {self.num_experts})")
        # The last tensor starting at or before `expert`; it is never an empty one, since an
        # empty tensor shares its offset with the next tensor.
        t = bisect.bisect_right(self.expert_offsets, expert) - 1
        return t, expert - self.expert_offsets[t]

    def expert(self, expert: int) -> dict[str, torch.Tensor]:
        """Views (no copy) of one expert's tensors, dim 0 dropped: ``{name: tensor}``."""
        t, local = self.locate(expert)
        return {name: tensors[t][local] for name, tensors in self.tensors.items()}

    def linear_expert(self, expert: int) -> dict[str, torch.Tensor]:
        """``expert(expert)`` with its NVFP4 weights and scales in the linear layout (views
        when the set is linear, exactly unshuffled copies when it is preshuffled)."""
        return {name: to_linear(name, t, self.weight_layout)
                for name, t in self.expert(expert).items()}

    def split(self, sizes: Sequence[int]) -> ExpertWeights:
        """Re-slice a single-tensor set into tensors of ``sizes`` experts (views, no copy):
        e.g. DWDP's ``[P] * r + [W] + [P] * (S - 1 - r)`` for rank r. Used to compare a
        multi-tensor view against the one-tensor set it came from."""
        if self.num_tensors != 1:
            raise ValueError(f"ExpertWeights.split: needs a single-tensor set, got {self.num_tensors}")
        sizes = [int(s) for s in sizes]
        if any(s < 0 for s in sizes) or sum(sizes) != self.num_experts:
            raise ValueError(
                f"ExpertWeights.split: sizes {sizes} must be >= 0 and sum to {self.num_experts}"
            )
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        tensors = {
            name: tuple(ts[0][o:o + s] for o, s in zip(offsets, sizes))
            for name, ts in self.tensors.items()
        }
        return ExpertWeights(tensors, tuple(offsets), self.weight_layout)
