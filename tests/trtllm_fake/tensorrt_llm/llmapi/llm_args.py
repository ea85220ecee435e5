"""``DwdpConfig`` (the ``dwdp_config`` section) and the few ``TorchLlmArgs`` fields used here."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class DwdpConfig:
    dwdp_size: int = 1
    num_groups: int = 1
    num_experts_per_worker: int = 0
    num_prefetch_experts: int = 0
    contention_opt: bool = False


@dataclass
class TorchLlmArgs:
    dwdp_config: Optional[DwdpConfig] = None
    moe_backend: str = "CUTEDSL"
