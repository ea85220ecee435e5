"""ConfigurableMoE: one MoE layer's routed experts (router + expert weights + backend).

The layer routes its tokens, takes this layer's expert weights (the DWDP manager's view when
DWDP is on, its own tensors otherwise), runs the chosen backend and tells the manager the
layer is done so the prefetch buffer can be refilled. With expert parallelism (``ep``) the layer
holds E/S experts and ``ep.run_experts`` sends its tokens to their experts' owners and back.
Shared experts live outside (the model's ``MoeBlock``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorrt_llm_dwdp.moe.backends import MoeBackend, get_backend
from tensorrt_llm_dwdp.moe.layouts import LINEAR, backend_layouts, layout_for_quant
from tensorrt_llm_dwdp.moe.router import RouterConfig, route
from tensorrt_llm_dwdp.moe.weights import ExpertWeights

logger = logging.getLogger(__name__)


class MoeGate(nn.Module):
    """Router parameters under Hugging Face's names: ``weight [E, H]`` and, for DeepSeek-V3,
    the ``e_score_correction_bias [E]`` buffer (float32 both; logits are computed in fp32)."""

    def __init__(self, num_experts: int, hidden_size: int, top_k: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size), requires_grad=False)
        if config.kind == "deepseek_v3":
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, H]`` -> ``(ids int32 [T, k], weights fp32 [T, k])``."""
        logits = F.linear(hidden.float(), self.weight.float())
        return route(self.config, logits, self.top_k, self.e_score_correction_bias)


class ConfigurableMoE(nn.Module):
    """``forward(hidden [T, H] bf16) -> [T, H] bf16``: the routed-expert output.

    ``dwdp``: a DwdpManager (or None). With it, expert weights come from
    ``dwdp.weights(layer_idx)`` (``composite_weights`` under ``expert_view: composite``, which
    every backend takes as one tensor per parameter) each forward (the caller registers this layer's local tensors
    with the manager; ``set_local_weights`` keeps them for reference), and ``dwdp.done``
    follows the backend call. ``ep``: an ``ExpertParallel`` (or None; not with ``dwdp``): the
    local tensors hold this rank's E/S experts and every rank of the group runs every MoE
    layer together (``join_idle`` when it has no tokens). Without either, the tensors given to
    ``set_local_weights`` hold all ``num_experts`` experts.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        router: RouterConfig | None = None,
        backend: str | MoeBackend = "torch",
        dwdp: Any = None,
        layer_idx: int = 0,
        ep: Any = None,
    ) -> None:
        super().__init__()
        if dwdp is not None and ep is not None:
            raise ValueError("ConfigurableMoE: DWDP and expert parallelism are alternatives; "
                             "pass dwdp or ep, not both")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"ConfigurableMoE: top_k={top_k} must be in [1, {num_experts}]")
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(
                f"ConfigurableMoE: hidden_size={hidden_size} and intermediate_size="
                f"{intermediate_size} must be >= 1"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.layer_idx = layer_idx
        self.dwdp = dwdp
        self.ep = ep
        self.gate = MoeGate(num_experts, hidden_size, top_k, router or RouterConfig())
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        if (dwdp is not None and dwdp.layout.dwdp_size > 1 and dwdp.expert_view == "multi"
                and not self.backend.accepts_multi_tensor):
            raise ValueError(
                f"ConfigurableMoE layer {layer_idx}: backend {type(self.backend).__name__} runs "
                "over one [E, ...] tensor per parameter; set dwdp_config.expert_view: composite "
                "(run --expert-view composite)")
        self._local: ExpertWeights | None = None
        # Set by an engine that captures decode steps in CUDA graphs (``engine.graph_pieces``):
        # with DWDP the expert call (prefetch wait, kernels, done) runs outside the graphs.
        self.graph_breaks: Any = None

    @property
    def num_local_experts(self) -> int:
        """Experts in this rank's own tensors: W with DWDP (W - H with host experts), E/S with
        EP, all of them without."""
        if self.dwdp is not None:
            return self.dwdp.resident_experts
        if self.ep is not None:
            return self.ep.experts_per_rank
        return self.num_experts

    def set_local_weights(self, params: Mapping[str, torch.Tensor],
                          weight_layout: str = LINEAR) -> None:
        """This rank's expert tensors (names and layouts as in ``moe/weights.py``), dim 0 =
        ``num_local_experts``, their bytes in ``weight_layout`` (``moe/layouts.py``; DWDP views
        of the layer carry the same tag: the group agreed on it at the exchange). Validated
        now; kept by reference (no copy). A backend that cannot read ``weight_layout`` is
        refused here, before any step."""
        weights = ExpertWeights.single(params, weight_layout)
        reads = tuple(dict.fromkeys(layout_for_quant(r, weights.quant)
                                    for r in backend_layouts(self.backend)))
        if weight_layout not in reads:
            raise ValueError(
                f"MoE layer {self.layer_idx}: backend {type(self.backend).__name__} reads "
                f"{' or '.join(reads)} expert weights, got {weight_layout!r} for "
                f"{weights.quant} experts (load_model picks the backend's layout; "
                f"moe.layouts.shuffle_experts_ shuffles linear tensors)")
        got = (weights.num_experts, weights.hidden_size, weights.intermediate_size)
        want = (self.num_local_experts, self.hidden_size, self.intermediate_size)
        if got != want:
            raise ValueError(
                f"ConfigurableMoE layer {self.layer_idx}: local weights hold (experts, H, I) = "
                f"{got}, expected {want}"
            )
        self._local = weights

    @property
    def local_weights(self) -> ExpertWeights | None:
        return self._local

    @property
    def weight_layout(self) -> str:
        """The layout of this layer's expert bytes (the local weights'; linear before any)."""
        return self._local.weight_layout if self._local is not None else LINEAR

    def _view(self) -> ExpertWeights:
        if self.dwdp is None:
            if self._local is None:
                raise RuntimeError(
                    f"ConfigurableMoE layer {self.layer_idx}: no expert weights; call "
                    f"set_local_weights first"
                )
            return self._local
        layout = self.dwdp.weight_layout  # the group's, agreed at the exchange: peers' bytes
        if layout != self.weight_layout:
            raise RuntimeError(
                f"ConfigurableMoE layer {self.layer_idx}: local experts are {self.weight_layout!r} "
                f"but the DWDP manager's registered layers are {layout!r} (the layout its group "
                f"agreed on): pass the same weight_layout to set_local_weights and register_layer")
        if self.dwdp.expert_view == "composite":
            view = ExpertWeights.single(self.dwdp.composite_weights(self.layer_idx), layout)
        else:
            view = ExpertWeights.from_view(
                self.dwdp.weights(self.layer_idx), self.dwdp.view_offsets, layout
            )
        if view.num_experts != self.num_experts:
            raise RuntimeError(
                f"ConfigurableMoE layer {self.layer_idx}: DWDP view holds {view.num_experts} "
                f"experts, layer has {self.num_experts}"
            )
        return view

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(
                f"ConfigurableMoE layer {self.layer_idx}: hidden must be [T, {self.hidden_size}], "
                f"got {tuple(hidden.shape)}"
            )
        ids, weights = self.gate(hidden)
        if self.ep is not None:
            return self.ep.run_experts(hidden, ids, weights, self._view(), self.backend)
        if self.dwdp is not None and self.graph_breaks is not None:
            return self.graph_breaks.eager(self._run_experts, hidden, ids, weights)
        return self._run_experts(hidden, ids, weights)

    def _run_experts(self, hidden: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor) -> torch.Tensor:
        """The expert call: this layer's weights (with DWDP: wait for its prefetch), the
        backend, then ``done`` (its buffer may refill)."""
        out = self.backend.run_experts(hidden, ids, weights, self._view())
        if self.dwdp is not None:
            self.dwdp.done(self.layer_idx)
        return out

    def join_idle(self) -> None:
        """Take part in this layer's expert-parallel exchange with no tokens of this rank's own
        (it still computes the rows its peers send to its experts)."""
        if self.ep is None:
            raise RuntimeError(f"ConfigurableMoE layer {self.layer_idx}: join_idle needs expert parallelism")
        view = self._view()
        device = view.tensors["w3_w1_weight"][0].device
        self.ep.run_experts(torch.empty(0, self.hidden_size, dtype=torch.bfloat16, device=device),
                            torch.empty(0, self.top_k, dtype=torch.int32, device=device),
                            torch.empty(0, self.top_k, dtype=torch.float32, device=device),
                            view, self.backend)
