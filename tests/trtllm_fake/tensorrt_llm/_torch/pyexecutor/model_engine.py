"""``PyTorchModelEngine``: runs the model; ``warmup`` runs forwards while the executor is being
created, before the executor loop ever calls ``prefetch_first_layers()``."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduledBatch:
    input_ids: torch.Tensor
    skip_layers: frozenset = frozenset()


class PyTorchModelEngine:
    def __init__(self, model) -> None:
        self.model = model

    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        return self.model(batch.input_ids, skip_layers=batch.skip_layers)

    def warmup(self, batches) -> None:
        for batch in batches:
            self.forward(batch)
