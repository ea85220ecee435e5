"""EpConfig: the ``ep_config:`` section of an options YAML (ours, beside ``dwdp_config``).

```yaml
ep_config:
  ep_size: 2          # ranks of the expert-parallel group (= context servers); 1 or absent: off
  transport: auto     # auto | nccl | cuda_ipc | gloo | shm (see parallel/group.py)
  buffer_mb: 0        # shared-memory exchange buffers; 0 = sized from the engine's token budget
  timeout_s: 600      # a collective waiting longer than this fails (a peer died or hangs)
```
With it, every context server is one rank of an attention-data-parallel + expert-parallel
group: it holds E/S experts per MoE layer, sends each token to its experts' owners, and steps in
lockstep with its peers. Pure data: validated here, no device or communication code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

TRANSPORTS = ("auto", "nccl", "cuda_ipc", "gloo", "shm")


class EpConfigError(ValueError):
    """A bad ``ep_config`` value; the message names the key."""


@dataclass(frozen=True)
class EpConfig:
    ep_size: int = 1
    transport: str = "auto"
    buffer_mb: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1:
            raise EpConfigError(f"ep_config.ep_size must be an integer >= 1, got {self.ep_size!r}")
        if self.transport not in TRANSPORTS:
            raise EpConfigError(f"ep_config.transport={self.transport!r}; choose one of {list(TRANSPORTS)}")
        if isinstance(self.buffer_mb, bool) or not isinstance(self.buffer_mb, int) or self.buffer_mb < 0:
            raise EpConfigError(f"ep_config.buffer_mb must be an integer >= 0, got {self.buffer_mb!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or self.timeout_s <= 0:
            raise EpConfigError(f"ep_config.timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def enabled(self) -> bool:
        return self.ep_size > 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EpConfig":
        unknown = sorted(set(data) - {"ep_size", "transport", "buffer_mb", "timeout_s"})
        if unknown:
            raise EpConfigError(f"ep_config: unknown key(s) {unknown}; known: ep_size, transport, "
                                f"buffer_mb, timeout_s")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_num_experts(self, num_experts: int) -> None:
        if num_experts % self.ep_size:
            raise EpConfigError(f"ep_config.ep_size={self.ep_size} does not divide the model's "
                                f"{num_experts} experts evenly")


def exchange_capacity_bytes(ep_size: int, max_step_tokens: int, hidden: int, top_k: int) -> int:
    """Bytes one shared-exchange buffer needs for a step of ``max_step_tokens`` tokens per rank:
    a dispatch sends at most every token to every rank (bf16 row + k int32 ids + k fp32
    weights), a combine returns at most ``ep_size`` ranks' tokens (bf16 rows)."""
    dispatch = ep_size * max_step_tokens * (2 * hidden + 8 * top_k)
    combine = ep_size * max_step_tokens * 2 * hidden
    return max(dispatch, combine) + 3 * 256
