"""A small decoder with upstream's MoE wrapper: dense layers between MoE layers, the one at
``positional_layer`` with a position table that refuses a sequence longer than
``max_positions`` (ValueError: a forward that fails in the middle of a step, after MoE layers
ran; raised on the host, so a GPU run survives it like a CPU one), and
``skip_layers`` (a forward that leaves layers out)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tensorrt_llm._torch.moe.fused_moe.configurable_moe import ConfigurableMoE


@dataclass(frozen=True)
class ToyMoeConfig:
    vocab_size: int = 50
    hidden_size: int = 16
    intermediate_size: int = 8
    num_experts: int = 6
    top_k: int = 2
    num_layers: int = 6
    moe_layers: tuple = (1, 2, 4, 5)
    max_positions: int = 12
    positional_layer: int = 3


class DenseLayer(nn.Module):
    def __init__(self, config: ToyMoeConfig, positional: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.positions = nn.Embedding(config.max_positions, config.hidden_size) if positional \
            else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + torch.tanh(self.proj(h))
        if self.positions is not None:
            if h.shape[0] > self.positions.num_embeddings:
                raise ValueError(f"sequence of {h.shape[0]} tokens is longer than "
                                 f"max_positions={self.positions.num_embeddings}")
            h = h + self.positions(torch.arange(h.shape[0], device=h.device))
        return h


class MoeLayer(nn.Module):
    def __init__(self, config: ToyMoeConfig, layer_idx: int, mapping) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.mlp = nn.Module()
        self.mlp.experts = ConfigurableMoE(
            top_k=config.top_k, num_experts=config.num_experts, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, layer_idx=layer_idx, mapping=mapping)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp.experts(h, self.gate(h))


class ToyMoeForCausalLM(nn.Module):
    def __init__(self, config: ToyMoeConfig, mapping) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            MoeLayer(config, i, mapping) if i in config.moe_layers
            else DenseLayer(config, i == config.positional_layer)
            for i in range(config.num_layers))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, skip_layers: frozenset = frozenset()) -> torch.Tensor:
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            if i not in skip_layers:
                h = layer(h)
        return self.lm_head(h)

    def load_weights(self, weights: dict) -> None:
        """``weights``: the whole checkpoint (see ``toy_checkpoint``); each MoE backend keeps
        its own expert rows."""
        experts = {i: {} for i in self.config.moe_layers}
        own = {}
        for name, value in weights.items():
            if name.startswith("experts."):
                _, layer, pname = name.split(".", 2)
                experts[int(layer)][pname] = value
            else:
                own[name] = value
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if ".experts." not in k]
        if missing or unexpected:
            raise KeyError(f"missing weights {missing}, unexpected {unexpected}")
        for i in self.config.moe_layers:
            self.layers[i].mlp.experts.backend.load_weights(experts[i])


def toy_checkpoint(config: ToyMoeConfig, seed: int = 0) -> dict:
    """Every weight of the model, all experts included, from ``seed`` (same on every rank)."""
    from tensorrt_llm.mapping import Mapping

    g = torch.Generator().manual_seed(seed)
    shell = _without_manager(lambda: ToyMoeForCausalLM(config, Mapping()))
    weights = {k: torch.randn(v.shape, generator=g) * 0.3
               for k, v in shell.state_dict().items() if ".experts." not in k}
    e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
    for layer in config.moe_layers:
        for name, shape in {"w3_w1_weight": (e, 2 * i, h), "w2_weight": (e, h, i),
                            "w3_w1_weight_scale": (e, 2 * i, 1), "w2_weight_scale": (e, h, 1),
                            "fc31_alpha": (e,), "fc2_alpha": (e,), "fc2_dequant": (e,)}.items():
            base = torch.randn(shape, generator=g) * 0.3
            weights[f"experts.{layer}.{name}"] = base if "weight" in name and "scale" not in name \
                else 0.5 + torch.rand(shape, generator=g)
        weights[f"experts.{layer}.fc31_input_scale"] = torch.tensor([0.9])
    return weights


def _without_manager(build):
    from tensorrt_llm._torch.pyexecutor import dwdp

    saved = dwdp.get_global_dwdp_manager()
    dwdp.set_global_dwdp_manager(None)
    try:
        return build()
    finally:
        dwdp.set_global_dwdp_manager(saved)
